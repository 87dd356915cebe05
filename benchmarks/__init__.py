"""Side-by-side benchmarks: novita_async against the tools users would otherwise use.

Run ``python -m benchmarks`` from the repository root (after
``pip install -e '.[bench]'``) for the quick grid (about 5 minutes on 2 cores),
or ``python -m benchmarks --full`` for the bigger one.  Results go to
``benchmarks/RESULTS.md``, ``benchmarks/results.json`` and
``benchmarks/results.png``; ``--render`` rebuilds the last two from the JSON.

Layout: ``__main__`` (orchestrator and CLI), ``_child`` (one measured run in a
fresh process), ``_clients`` (the three peers), ``_scenarios`` (manifest scale
and pacing), ``_emulator`` (the emulator in its own process), ``_images``
(test images), ``_measure`` (RSS, CPU and the CPU floor), ``_rows`` (one
record per run), ``_report`` (targets, tables, RESULTS.md), ``_notes`` (its
prose), ``_chart`` (the PNG).
"""
