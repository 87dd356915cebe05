"""The prose of RESULTS.md: how it was measured, and what the numbers say."""

from __future__ import annotations

from benchmarks._report import CPU_FLOOR_RATIO, Report

__all__ = ["METHOD", "findings"]

METHOD = """## How it is measured

- **Peers.** (1) `novita-client` 0.7.1, Novita's official synchronous SDK, used as is: its
  own `base_url` argument points it at the emulator (it takes `http://` URLs and the same
  `/v3/merge-face` path, so no patching or re-implementation was needed); one client
  shared by a `ThreadPoolExecutor` of width C; the caller `b64decode`s `image_file` and
  writes the file. It is asked for PNG like the others (it silently defaults to JPEG).
  (2) The naive aiohttp client: whole files read and base64-encoded (stdlib) in memory,
  `json.dumps`, `asyncio.gather` of every job under an `asyncio.Semaphore(C)`,
  `await resp.json()`, `b64decode`, write the file; its connector limit is raised to C
  (aiohttp's default of 100 would cap it below 128). (3) novita_async with default
  settings: `NovitaClient(max_concurrency=C)` and `client.batch(jobs, output_dir=...)`
  over a lazy generator of `MergeJob` (default validation, retries and pacing on).
- **Isolation.** Each run is a fresh `python -m benchmarks._child` process against a fresh
  emulator process (`python -m novita_async serve --port 0 --engine composite
  --png-level 0`), so the emulator's memory and CPU are not the client's and no run
  inherits another's state. `--png-level 0` makes the emulator store its PNG results
  uncompressed (filter 0, stored deflate blocks: a few memcpys) instead of Pillow's
  level 1 (~60 ms of CPU per 2 MB noise image, which compresses by nothing): with 2 cores
  for both processes, the emulator's CPU otherwise crowded the client's and turned the
  issue's latency-bound cells CPU-bound.
- **Files.** Inputs are read from the system's temporary folder (in the page cache, as a
  dataset being processed would be); results go to a RAM-backed folder (`/dev/shm`) when
  there is one, and each run starts from an empty results folder. On this VM's disk (ext4
  without a journal) creating a file after many deletions scans past the recently freed
  inodes, so whichever client ran later in a cell paid for the earlier runs' deleted
  results (perf: up to half of a small job's CPU, in `__ext4_new_inode`); tmpfs keeps no
  such state and has no writeback competing for the cores.
- **Throughput** = settled jobs per second: the jobs finished after the first C (the
  first round pays the cold start once: connections, lazy imports, a new folder) over
  the seconds from the C-th to the last (with fewer than three rounds of jobs, the whole
  run's rate). `results.json` also keeps the whole-run rate (`overall_throughput`).
  **Ideal** = C / (latency + the emulator's own time per request), where the emulator
  measures its own time per request (`handling_seconds` in `/_emulator/stats`: from the
  body received to the answer ready, including waiting for one of its 2 merge workers,
  excluding the latency knob and the network). The efficiency target takes, as issue 5
  defines it, the time the emulator measured in that client's own run; its value also
  shows the rate against the cell's least loaded emulator. The grid table's ideal and
  eff. columns use that one shared ideal per cell (the run where the emulator was
  fastest), so all peers in a cell are compared against the same bar: under CPU
  contention a busier client slows the emulator too, and how its requests bunch up
  sets how long they wait for the emulator's 2 merge workers. A cell is marked
  **CPU-bound** when running at the ideal rate would need more than 80% of the machine's
  cores (emulator CPU per request plus the leanest client's CPU per job); there the 2
  cores, not the latency, set the pace, and CPU per job is the figure that counts.
- **Memory.** Idle RSS is taken in the child after its imports; the kernel's peak-RSS mark
  (`VmHWM`) is then reset (`/proc/self/clear_refs`) and read after the run. Growth = peak -
  idle.
- **CPU** = user + system seconds of the child during the run (`os.times`), all threads.
  **Floor** = what any client must spend per job on this machine: base64-encode both
  inputs and decode the result with the fastest codec (pybase64, in whichever piece size
  is cheapest) plus pushing the request and pulling the response through a loopback TCP
  socket (each side timed with its own thread's CPU clock, at the write size cheapest for
  both sides together). The floor leaves out reading the inputs and writing the result,
  which every client must also do; those are measured beside it the same way (a page-cached
  read, a write to a new file in the results folder, at the cheapest piece size) and give
  the column CPU/(floor+files). In the cells the CPU target judges, a reference run moves
  the same bytes with aiohttp and does nothing else (body built once and handed over as
  views, answers taken piece by piece and dropped): see CPU reference. For small images a
  job's fixed costs (HTTP request, file opens, renames) dwarf the byte costs, so the CPU
  target is judged where bytes dominate: medium and large cells that are CPU-bound.
- **Manifest scale.** A CSV manifest of N rows (`face_image,image,id`, the small images)
  read with `na.read_manifest` and fed to `client.batch` (C=32, emulator latency 0); the
  run stops after the first results (the same number for every N), so the figures compare
  the cost of a manifest's *size*, which a lazy reader must not pay.
  **First request** = from the run's start (before `read_manifest`) to the emulator
  receiving the first request (both `time.monotonic()`, system-wide on Linux).
- **Pacing.** Emulator `--rpm R --burst 3 --latency 0.2`; novita_async with C=32, once with
  `requests_per_minute=R` (fixed) and once without (adaptive: it starts unthrottled and
  learns the limit from 429s). Jobs never run out; the batch is stopped after the run time.
  Settled throughput counts jobs finished after the warm-up; 429 shares are from the
  emulator's own counters.
"""


def findings(report: Report) -> str:
    """What this run shows: headline ratios and why a missed target was missed."""
    lines = ["## What the numbers say", ""]
    large = report.rows("large", 32)
    ours, naive, official = (large.get(c) for c in ("novita_async", "naive", "official"))
    if ours and ours.valid and naive and naive.valid and official and official.valid:
        lines.append(
            f"- **Memory, large images at C=32:** novita_async grew by "
            f"{ours.growth / 1e6:.0f} MB, the naive client by {naive.growth / 1e6:,.0f} MB "
            f"({naive.growth / max(ours.growth, 1):.0f}x more) and the official SDK by "
            f"{official.growth / 1e6:,.0f} MB ({official.growth / max(ours.growth, 1):.0f}x "
            f"more); novita_async also ran {ours.throughput / naive.throughput:.1f}x the "
            f"naive client's throughput on {naive.cpu_per_job / ours.cpu_per_job:.0f}x less "
            "CPU per job.")
    ratios = []
    for size, concurrency in report.cells():
        rows = report.rows(size, concurrency)
        a, n = rows.get("novita_async"), rows.get("naive")
        if a and n and a.valid and n.valid and n.throughput:
            ratios.append(a.throughput / n.throughput)
    if ratios:
        lines.append(f"- **Throughput vs the naive client:** {min(ratios):.2f}x to "
                     f"{max(ratios):.2f}x across the grid.")
    missed: dict[str, list[tuple[str, int]]] = {}
    for target in report.targets():
        if target.passed is False and target.cell is not None:
            missed.setdefault(target.name, []).append(target.cell)
    for name, cells in missed.items():
        where = "; ".join(f"{size}, C={concurrency}" for size, concurrency in cells)
        lines.append(f"- **Missed: {name}** ({where}). " + _why(report, name, cells))
    lines.append("")
    return "\n".join(lines) + "\n" + FIXES


def _why(report: Report, name: str, cells: list[tuple[str, int]]) -> str:
    if name == "efficiency vs ideal":
        return _why_efficiency(report, cells)
    if name == "CPU per job vs floor":
        return _why_cpu(report, cells)
    if name == "throughput vs naive, everywhere":
        return _why_naive(report, cells)
    return "See the tables above."


def _why_efficiency(report: Report, cells: list[tuple[str, int]]) -> str:
    parts = []
    for size, concurrency in cells:
        rows = report.rows(size, concurrency)
        valid = [r for r in rows.values() if r.valid]
        if report.bound(size, concurrency) == "CPU" and valid:
            emulator = min(r.emulator_cpu for r in valid)
            ideal = report.ideal(size, concurrency)
            parts.append(
                f"{size} at C={concurrency}: the emulator spends {emulator * 1e3:.1f} ms of "
                f"CPU per request, so its ideal {ideal:.0f} jobs/s would take "
                f"{ideal * emulator:.1f} of the {report.cores} cores for the emulator alone")
            continue
        ours = rows.get("novita_async")
        measured = (f" (the emulator measured {ours.handling * 1e3:.0f} ms per request "
                    "in novita_async's run)" if ours and ours.valid else "")
        parts.append(f"{size} at C={concurrency}: latency-bound; the ideal leaves out "
                     "moving the request and the answer, for which a job holds its slot "
                     f"too{measured}")
    return ("; ".join(parts) + ". Against a remote API the emulator's CPU would not "
            f"share this machine's {report.cores} cores with the client. The grid table "
            "compares the peers against one ideal per cell, its least loaded emulator's.")


def _why_cpu(report: Report, cells: list[tuple[str, int]]) -> str:
    ours_ratios: list[float] = []
    others: list[float] = []
    bounds: dict[str, str] = {}  # per size: floor plus file work against the goal
    for size, concurrency in cells:
        floor = report.floor_parts(size, concurrency)
        if floor is None or not floor.files:
            continue
        for client, row in report.rows(size, concurrency).items():
            if row.valid:
                (ours_ratios if client == "novita_async" else others).append(
                    row.cpu_per_job / floor.with_files)
        if size not in bounds:
            left = CPU_FLOOR_RATIO * floor.total - floor.with_files
            rest = (f"{left * 1e3:.2f} ms per job left" if left > 0
                    else f"{-left * 1e3:.2f} ms per job over")
            bounds[size] = f"{floor.with_files / floor.total:.2f}x the floor for {size} images ({rest})"
    files = ""
    model = report.floor_model
    if ours_ratios and model.read:
        files = (f" Every client here also reads its inputs and writes its result to a new "
                 f"file; measured like the floor (see Machine: a byte written to a new file "
                 f"costs {model.write / model.read:.0f} times a byte read from the page "
                 f"cache on this VM, which backs fresh memory lazily), "
                 f"that work raises the floor, and novita_async is at "
                 f"{min(ours_ratios):.1f}-{max(ours_ratios):.1f}x of floor plus file work in "
                 f"these cells (column CPU/(floor+files))"
                 + (f", the whole-file clients at {min(others):.0f}-{max(others):.0f}x."
                    if others else ".")
                 + f" Floor plus file work is already {'; '.join(bounds.values())}: the goal "
                 "is out of reach for any client that writes its results to files where that "
                 f"exceeds {CPU_FLOOR_RATIO}x, and elsewhere leaves it only the rest of the "
                 "budget for the HTTP exchange, Python and memory allocation.")
    return ("The floor counts only base64 and loopback bytes, at the cheapest speeds this "
            "machine reaches (a streamed codec into warm buffers, the cheapest write size)."
            + files + _exchange_note(report, cells) +
            " The rest is Python per network piece and per job, aiohttp's own copy of the "
            "response body, and page faults on freshly allocated buffers (see Fourth round "
            "below for a large job taken apart). Against the emulator, which shares the "
            f"{report.cores} cores, the figures are higher than against a server that costs "
            "no CPU (large at C=8: 24-27 ms per job there) and vary by 20-40% between runs.")


def _exchange_note(report: Report, cells: list[tuple[str, int]]) -> str:
    """What the exchange-alone reference says about the cells that missed."""
    alone: dict[str, float] = {}  # cell -> the exchange alone over the floor
    below: list[str] = []  # cells where novita_async's whole job cost less than exchange + codec + files
    for size, concurrency in cells:
        exchange, floor = report.reference(size, concurrency), report.floor(size, concurrency)
        bound = report.exchange_bound(size, concurrency)
        row = report.rows(size, concurrency).get("novita_async")
        if exchange is None or not floor or bound is None or row is None or not row.valid:
            continue
        cell = f"{size}, C={concurrency}"
        alone[cell] = exchange.cpu_per_job / floor
        if row.cpu_per_job < bound:
            below.append(cell)
    if not alone:
        return ""
    past = [cell for cell, ratio in alone.items() if ratio > CPU_FLOOR_RATIO]
    text = (f" The exchange alone (see CPU reference: aiohttp moving the same bytes, with no "
            f"base64, JSON or files) cost {min(alone.values()):.2f}-{max(alone.values()):.2f}x "
            "the floor in these cells")
    if past:
        text += (f", past the goal by itself in {len(past)} of {len(alone)} "
                 f"({'; '.join(past)})")
    text += "."
    if below:
        text += (" It is a reference, not a strict bound: each run meets the emulator at its "
                 f"own pace, and in {'; '.join(below)} novita_async's whole job cost less than "
                 "the exchange plus the floor's base64 and the file work.")
    return text


def _why_naive(report: Report, cells: list[tuple[str, int]]) -> str:
    """Per-job CPU of both clients in each cell, and the whole-run rates (cold start included)."""
    cpu, overall = [], []
    for size, concurrency in cells:
        rows = report.rows(size, concurrency)
        ours, naive = rows.get("novita_async"), rows.get("naive")
        if not (ours and naive):
            continue
        cpu.append(f"{size} at C={concurrency}, novita_async {ours.cpu_per_job * 1e3:.2f} "
                   f"against the naive client's {naive.cpu_per_job * 1e3:.2f} ms of CPU per job")
        if naive.overall_throughput:
            overall.append(f"{size} at C={concurrency}: {ours.overall_throughput:.0f} against "
                           f"{naive.overall_throughput:.0f} jobs/s "
                           f"({ours.overall_throughput / naive.overall_throughput:.2f}x)")
    return (f"Where both processes together need the {report.cores} cores, per-job CPU "
            f"decides: {'; '.join(cpu) or 'see the grid'}."
            + (" Over the whole run, cold start included: " + "; ".join(overall) + "."
               if overall else ""))


FIXES = """## Library fixes found by these benchmarks

### Fourth round: copies into fresh memory

Against a server that costs no CPU, perf on one large job at C=8 (26.7 ms of CPU; floor
14.2 ms, floor plus files 19.9 ms): system calls 18.2 ms (sends 8.9, result writes 4.3,
input reads 2.2, receives 2.2), base64 1.7 ms, and 6.8 ms besides: loopback packet
processing outside system calls (2.3 ms), page faults on buffers glibc had returned to the
kernel (0.6 ms in that run, 4.2 ms in another), aiohttp's copy of each response piece
(0.6 ms), the decoder's search for the string's end (0.3 ms), and Python across ~170
network pieces and ~115 file calls. A process-wide
`MALLOC_TRIM_THRESHOLD_` cut the faults by 70% but CPU per job by less than the noise
(24.2-25.5 against 24.5-26.0 ms, 3 alternating runs), and a library must not set it.

cProfile of small jobs found one copy worth removing: on Python before 3.12.9 aiohttp
joins the request headers with the first body piece it is given into a new bytes object,
and our writer glued the JSON prefix onto the first piece of base64, so a small image's
267 KB body was copied twice into fresh memory (`bytes.join`: the largest entry in the
profile).

1. `_encode.py`: the JSON prefix now goes to aiohttp on its own (aiohttp's join is then
   ~250 bytes), and a piece of 512 KiB or more is never copied to glue a few bytes of JSON
   onto it. Small C=128 against the emulator, 4 alternating runs of 2,048 jobs:
   0.91-1.00 ms per job (was 1.03-1.10) at the same throughput (544-566 against 554-562
   jobs/s); against a server that costs no CPU 0.70-0.84 ms (was 0.86-1.02).

### Third round: thread hops and garbage

The second round left small images at C=128 at 0.95x the naive client, on ~0.3 ms more
CPU per job. Against a server that costs no CPU (C=128, 2,048 small jobs a run, runs
alternating), moving one hop at a time back onto the event loop showed what each cost:
1.55-1.71 ms per job with both hops, 1.20-1.21 without the input check's, 1.46-1.54
without the result's, 0.95-0.99 without either. The calls themselves are tens of
microseconds; the rest is wake-ups and GIL hand-offs between two busy vCPUs. And a
collector callback showed gen-2 garbage collections of 60-140 ms: ~40 objects per job in
reference cycles (tenacity's retrying object and its call state), 181 ms of collection
per 2,048 jobs.

1. `_fileio.py`, `_client.py`, `_output.py`: `file_io="auto"` (the default) makes the
   input check and the result's writes and rename on the event loop for folders on local
   file systems (learnt from `/proc/self/mountinfo` by the first call in each folder, in a
   worker thread); a folder whose recent calls are mostly over 5 ms, and every network or
   FUSE file system, uses worker threads. Small C=128: 0.87-0.97 ms per job (was
   1.36-1.74); medium C=32 4.7-5.3 ms (threads: 5.1-6.1); large C=8 27-29 ms
   (threads: 29-32).
   Input reads the page cache cannot serve at once (`preadv2(RWF_NOWAIT)` answers EAGAIN,
   or the file system lacks the flag, as tmpfs does) follow the same choice: with inputs
   on tmpfs, medium C=8, 37.0-37.3 jobs/s against 31.5-32.4 when each 384 KiB went to a
   worker thread.
2. `_retry.py`: the first attempt runs without tenacity, which takes over from the first
   retryable failure. No garbage left per successful job (a test checks it); collection
   time per 2,048 small jobs fell from 181 ms to 65-74 ms.

### Second round: what the efficiency and CPU misses really were

The first round missed the efficiency target in two cells the issue calls latency-bound
(small at C=64: 90%, medium at C=8: 88%). Profiling both processes showed three causes,
two in the harness and one in the emulator, and none in the client:

1. **The emulator's PNG encode.** Pillow's level-1 PNG encode of a noise result took
   ~60 ms of CPU per 2 MB image (~3 ms per 100 KB), most of the emulator's ~84 ms per
   medium request, so at the ideal rate the emulator alone needed 1.3-1.8 of the 2 cores.
   `serve --png-level 0` now writes stored PNGs (filter 0, stored deflate blocks: ~4 ms per
   2 MB; the same pixels, tested) and the benchmarks use it. With that alone (whole-run
   rate, medians of 2 alternating runs): small C=64 93%, medium C=8 88%.
2. **The cold start inside the measured window.** With 8 rounds of jobs per cell the
   first round (connections, lazy imports, the results folder's first files) weighed
   several percent. Throughput is now the settled rate after the first round (see How it
   is measured): small C=8 99%, small C=64 99%, medium C=8 96% (same harness, medians of 2).
3. **The disk's memory of earlier runs.** perf on the client's worker threads, small C=128:
   40% of their CPU in `__ext4_new_inode` scanning past recently deleted inodes
   (`recently_deleted`, ext4 without a journal) and 15% spinning on the results folder's
   lock in `rename`/`open`. Every client creates one file per job, but each ran after the
   previous client's results were deleted, so later clients paid more. Results now go to
   tmpfs: small C=128 CPU per job, novita_async vs naive, medians of 2: 1.77 vs 1.62 ms on
   the disk, 1.36 vs 1.12 ms on tmpfs. (Inputs stay on the disk: tmpfs has no
   `RWF_NOWAIT`, and novita_async then read each 384 KiB in a worker thread; medium C=8
   cost 7.8 ms per job with inputs on tmpfs against 5.0-5.9 on the disk. Since the third
   round those reads follow `file_io` and run on the event loop for local folders.)

Library changes in this round:

1. `_encode.py`: the body's pieces are joined into writes of up to 512 KiB (a few bytes of
   JSON are joined onto the large piece after them): a small image's request is one
   `send()` instead of five (strace), and the client's time in `send()` per small job fell
   from 0.47 to 0.35 ms (cProfile, C=128); whole-process CPU moved by less than the noise.
2. `_sources.py`, `_client.py`: an input over 1 MiB is opened once per job, by the header
   check, and that descriptor serves the first upload (two fewer thread hops per job);
   tests count the process's descriptors and ResourceWarnings on success, retry, refusal
   and cancellation.

Tried and not kept: a pool of 8 worker threads for file work instead of anyio's 40 (small
C=128, 5 alternating runs each: 1.28-1.63 ms per job against 1.29-1.54, no difference); the
event loop's own executor instead of `anyio.to_thread` (a bare hop cost 25 us of CPU instead
of 55 in isolation, but a small job 1.28-1.60 ms against 1.34-1.52, 4 alternating runs);
1.5 MiB upload pieces instead of 384 KiB (medium C=8: 6.1 ms per job instead of 7.2, but
four times the upload buffers, which at C=32 with large images would pass the 100 MB
memory target).

### First round: the bytes path

Profiled with perf (kernel and native stacks) and py-spy on the client process. Before,
a medium job cost (against a server that costs no CPU, C=8) ~7 ms of CPU: ~1.3 ms of
loopback send and receive, ~0.3 ms of base64, and the rest thread hand-offs (21 per job:
every 384 KiB read of an input went to a worker thread), copies and Python. Changes:

1. `_sources.py`: inputs are read with `preadv2(RWF_NOWAIT)` on the event loop (Linux;
   a memcpy from the page cache, no thread hop) into one reused buffer per upload; only
   a read that would wait for the disk (EAGAIN, or a short read) goes to a worker thread.
   A medium job now takes 5 thread hops instead of 21, and no 384 KiB allocation per
   chunk. (Other systems keep the threaded reads.)
2. `_decode.py`: the base64 quantum split across two network chunks is completed and
   decoded on its own, and the rest decoded through a memoryview, instead of
   `quantum + chunk` and `chars[:whole]` (two copies of nearly every response chunk);
   `feed_parts()` returns the pieces so nothing is joined (`feed()` still joins).
3. `_transport.py`: the response is taken one buffered network chunk at a time
   (`iter_chunks`) rather than `iter_any`, which joins whatever is buffered into a new
   bytes object.
4. `_encode.py`: base64 pieces go to aiohttp as memoryviews, so a piece the socket takes
   only partly (14% of a large request's bytes against the busy emulator) is copied once
   into the transport's buffer, not twice.
5. `_output.py`: a batch of decoded pieces is written with one `writev()` (one GIL
   release and re-take per flush instead of one per piece).

Client CPU per job (ms), old code against new on the same machine: three quick-grid runs
of each (the last full run, then two of novita_async alone; the new code's full run is the
table above), and a single-process reproduction against a zero-cost server (a stub that
reads the body, waits 0.2 s and returns a canned answer of the same size; C=8, old and new
alternating, 128-192 medium / 32-48 large jobs a run). The grid's cells have only 16-128
jobs and share 2 cores with the emulator, so they vary by 20-40% between runs:

| cell | before (3 runs) | after (3 runs) |
|---|--:|--:|
| medium, C=8 | 10.2, 9.4, 8.3 | 5.9, 6.9, 8.6 |
| medium, C=32 | 8.2, 7.8, 7.3 | 6.9, 7.0, 6.1 |
| medium, C=128 | 9.0, 9.3, 12.6 | 8.2, 9.5, 6.5 |
| large, C=8 | 45.6, 48.1, 41.9 | 28.7, 28.8, 26.9 |
| large, C=32 | 41.2, 67.5, 62.8 | 48.8, 63.4, 44.7 |
| medium, C=8, zero-cost server | 6.7-7.4 | 4.8-5.3 |
| large, C=8, zero-cost server | 34-37 | 25-29 |

Peak RSS growth fell with the per-chunk allocations (large at C=32: 67-75 MB before,
47-49 MB after). Tried and not kept: smaller upload pieces (48-192 KiB instead of
384 KiB): no difference beyond the run-to-run noise. Not done in this round: the file write
of the result (a thread hop per MiB; buffered writes cannot be made non-blocking on ext4;
the third round moved it onto the event loop for local folders) and aiohttp's own copy of
the response body.

### First round: small images and thread hand-offs

Measured with this harness, old code against new, alternating runs on a quiet machine
(medians of 3; small images, emulator latency 0.2 s):

| cell | before: jobs/s, eff., CPU ms/job | after | naive client |
|---|---|---|---|
| small, C=8 | 34.7, 91%, 4.12 | 37.1, 97%, 2.00 | 37.2, 97%, 1.63 |
| small, C=64 (2 runs) | 184, 73%, 3.77 | 233, 91%, 2.31 | 203, 87%, 2.06 |
| small, C=128 | 211, 52%, 3.84 | 272, 92%, 2.08 | 266, 89%, 1.88 |
| large, C=8 (1 run) | 2.39, 67%, 50.0 | 2.38, 68%, 43.8 | |

The cause was thread hand-offs: a small job took 15 trips to a worker thread (each
~65 us of CPU on an idle machine, several context switches and GIL hand-overs on a busy
one: 36 context switches per job against the naive client's 3), and the header check's
many small reads each released and re-took the GIL. Now a job takes 2:

1. `_sources.py`: a file of at most one chunk is opened, read, size-checked and closed in
   one hop (was four: open, read, read-one-more-byte, close).
2. `_sources.py`: for files up to 1 MiB the header check reads the file once (unbuffered)
   and parses it from memory, instead of Pillow seeking and reading the file piecemeal
   in a worker thread; the bytes it read are kept and sent by the first attempt, so a
   small input is read once per job, not twice (a retry reads the file again).
3. `_client.py`: the stat and the header check of both inputs run in one hop (was four).
4. `_output.py`: a result's last write and its rename into place are one hop (was two).
5. `_client.py`: the output-folder probe (create and delete a file before sending) runs
   once per folder per client instead of once per job; per job it cost ~0.5 ms of CPU,
   and ext4 slows down allocating inodes past recently deleted ones.
6. `_retry.py`: one module-level `random.Random` for backoff jitter; a new one per call
   seeded itself from `os.urandom` (~50 us per job).
7. `emulator/_app.py` (measurement only): the emulator counts its own time per request
   (`handled`, `handling_seconds`, `handling_cpu_seconds`, `first_request_at` in
   `/_emulator/stats`), which the ideal throughput is computed from.
"""
