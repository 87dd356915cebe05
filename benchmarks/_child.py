"""One measured run in a fresh process: ``python -m benchmarks._child '<json spec>'``.

The child imports what its client needs, takes its idle RSS, resets the
kernel's peak-RSS mark, runs, and prints one JSON line: the runner's result
plus ``baseline_rss``, ``peak_rss`` (bytes) and ``cpu_seconds`` (user+system
of the run only).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import sys
import time
from typing import Any

from benchmarks._clients import GridSpec, preload, run_client
from benchmarks._measure import cpu_seconds, current_rss, peak_rss, reset_peak_rss
from benchmarks._scenarios import ManifestSpec, PacingSpec, run_manifest, run_pacing

__all__ = ["main"]


def _output_sample(spec: GridSpec) -> dict[str, Any]:
    path = spec.output(0)
    if not path.exists():
        return {"output_bytes": None, "output_sha1": None}
    data = path.read_bytes()
    return {"output_bytes": len(data), "output_sha1": hashlib.sha1(data).hexdigest()}


def main(argv: list[str]) -> int:
    """Run the spec in ``argv[0]`` and print the measurement as JSON."""
    spec: dict[str, Any] = json.loads(argv[0])
    kind = spec.pop("kind")
    client = spec.pop("client", "novita_async")
    preload(client)
    gc.collect()
    baseline = current_rss()
    peak_was_reset = reset_peak_rss()
    cpu_before, wall_before = cpu_seconds(), time.perf_counter()
    result: dict[str, Any]
    if kind == "grid":
        grid = GridSpec(**spec)
        outcome = run_client(client, grid)
        result = {"ok": outcome.ok, "failed": outcome.failed, "errors": outcome.errors,
                  "elapsed": outcome.elapsed, "settled_rate": outcome.settled_rate(grid.concurrency)}
    elif kind == "manifest":
        result = asyncio.run(run_manifest(ManifestSpec(**spec)))
    elif kind == "pacing":
        result = asyncio.run(run_pacing(PacingSpec(**spec)))
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    result.update(
        cpu_seconds=cpu_seconds() - cpu_before,
        wall_seconds=time.perf_counter() - wall_before,
        baseline_rss=baseline,
        peak_rss=peak_rss(),
        peak_was_reset=peak_was_reset,
    )
    if kind == "grid":
        result.update(_output_sample(grid))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
