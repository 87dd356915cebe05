"""``python -m benchmarks [--full]``: run the grid, print the table, write the results.

Every run is a fresh ``python -m benchmarks._child`` process against a fresh
emulator process (``--engine composite --png-level 0``), so neither the emulator's memory
nor an earlier run's leftovers count against a client.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._clients import CLIENTS, REFERENCE
from benchmarks._emulator import EmulatorProcess, StatsDelta
from benchmarks._images import SIZES, ImagePair, make_pair
from benchmarks._measure import FloorModel, busy_share, measure_floor_model
from benchmarks._report import Report

__all__ = ["Plan", "main"]

HERE = Path(__file__).resolve().parent
LATENCY = 0.2  # seconds, the emulator's latency for the grid
CHILD_TIMEOUT = 900.0  # seconds, for one child run


@dataclass(frozen=True)
class Plan:
    """What one invocation measures."""

    mode: str
    grid: dict[str, tuple[int, ...]]  # size -> concurrencies
    rounds: dict[str, tuple[int, int, int]]  # size -> (rounds, fewest jobs, most jobs)
    manifest_rows: tuple[int, ...]
    manifest_stop_after: int
    manifest_concurrency: int
    pacing_rpm: float
    pacing_burst: int
    pacing_seconds: float
    pacing_warmup: float
    pacing_concurrency: int

    def jobs(self, size: str, concurrency: int) -> int:
        """Jobs per cell: enough rounds for a steady state, within a time budget."""
        rounds, fewest, most = self.rounds[size]
        return max(fewest, min(most, rounds * concurrency))


QUICK = Plan(
    mode="quick",
    grid={"small": (8, 32, 64, 128), "medium": (8, 32, 128), "large": (8, 32)},
    rounds={"small": (8, 80, 1024), "medium": (16, 64, 128), "large": (1, 16, 32)},
    manifest_rows=(10_000, 1_000_000),
    manifest_stop_after=1500,
    manifest_concurrency=32,
    pacing_rpm=600.0,
    pacing_burst=3,
    pacing_seconds=40.0,
    pacing_warmup=10.0,
    pacing_concurrency=32,
)

# The full grid: more cells, more jobs, longer pacing runs; the same pacing limit.
FULL = dataclasses.replace(
    QUICK,
    mode="full",
    grid={"small": (8, 32, 64, 128, 256), "medium": (8, 32, 64, 128), "large": (8, 32, 64)},
    rounds={"small": (20, 160, 4096), "medium": (8, 96, 512), "large": (2, 24, 128)},
    manifest_rows=(10_000, 1_000_000, 10_000_000),
    manifest_stop_after=5000,
    manifest_concurrency=64,
    pacing_seconds=90.0,
    pacing_warmup=20.0,
)


def _log(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


#: Others' load on the machine above which a run waits (share of all cores).
QUIET = 0.25
QUIET_WAIT = 90.0  # seconds at most


def _wait_for_quiet() -> float:
    """Wait (up to QUIET_WAIT) until other processes leave the CPU mostly idle.

    Runs happen one at a time, so between them any CPU use is someone else's.
    Returns the busy share last seen, recorded with the run.
    """
    deadline = time.monotonic() + QUIET_WAIT
    busy = busy_share(1.0)
    while busy > QUIET and time.monotonic() < deadline:
        _log(f"machine {busy:.0%} busy with other work; waiting")
        busy = busy_share(5.0)
    return busy


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measured child; a crash or a timeout becomes an ``error`` entry."""
    busy = _wait_for_quiet()
    command = [sys.executable, "-m", "benchmarks._child", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT,
                              cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CHILD_TIMEOUT:g} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-3:]
        return {"error": f"exit {done.returncode}: {' | '.join(tail)}"}
    result: dict[str, Any] = json.loads(lines[-1])
    result["busy_before"] = busy
    return result


def _available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _fits(client: str, pair: ImagePair, concurrency: int) -> bool:
    """Whether a whole-file client (and the emulator) fit in memory at this width."""
    if client == "novita_async":
        return True
    # Measured: ~4 copies of a job's inputs per request in flight for the
    # whole-file clients, ~5 in the emulator.  Keep a quarter of RAM free.
    need = concurrency * pair.input_bytes * 9
    return need < 0.75 * _available_memory()


def _grid_run(client: str, pair: ImagePair, concurrency: int, jobs: int,
              work: Folders) -> tuple[dict[str, Any], StatsDelta]:
    """One client on one cell, against a fresh emulator: the child's result and the emulator's counts."""
    out_dir = work.results
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    with EmulatorProcess(latency=LATENCY) as emulator:
        before = emulator.stats()
        cpu_before = emulator.cpu_seconds()
        spec = {"kind": "grid", "client": client, "url": emulator.url,
                "api_key": emulator.api_key, "face": str(pair.face),
                "image": str(pair.image), "concurrency": concurrency,
                "jobs": jobs, "out_dir": str(out_dir)}
        result = _run_child(spec)
        result["emulator_cpu_seconds"] = emulator.cpu_seconds() - cpu_before
        delta = EmulatorProcess.delta(before, emulator.stats())
    return result, delta


def run_grid(plan: Plan, work: Folders, clients: tuple[str, ...], sizes: tuple[str, ...],
             report: Report) -> None:
    """Every size x concurrency x client, each against a fresh emulator.

    In the cells the CPU target judges, the exchange alone (``REFERENCE``)
    runs after the peers, as a reference for novita_async's CPU per job.
    """
    for size in sizes:
        pair = make_pair(size, work.images)
        for concurrency in plan.grid[size]:
            jobs = plan.jobs(size, concurrency)
            for client in clients:
                if not _fits(client, pair, concurrency):
                    _log(f"grid {size} C={concurrency} {client}: skipped (would not fit in RAM)")
                    report.add_grid(size, concurrency, client, jobs,
                                    {"error": "skipped: would not fit in memory"}, None,
                                    input_bytes=pair.input_bytes)
                    continue
                result, delta = _grid_run(client, pair, concurrency, jobs, work)
                row = report.add_grid(size, concurrency, client, jobs, result, delta,
                                      input_bytes=pair.input_bytes)
                _log(f"grid {size} C={concurrency} {client}: {row.summary()}")
            if "novita_async" in clients and report.cpu_target_applies(size, concurrency):
                result, delta = _grid_run(REFERENCE, pair, concurrency, jobs, work)
                row = report.add_reference(size, concurrency, jobs, result, delta,
                                           input_bytes=pair.input_bytes)
                _log(f"grid {size} C={concurrency} {REFERENCE} (reference): {row.summary()}")
        shutil.rmtree(work.results, ignore_errors=True)


def _write_manifest(path: Path, rows: int, pair: ImagePair) -> None:
    face, image = pair.face.name, pair.image.name
    with path.open("w", newline="") as handle:
        handle.write("face_image,image,id\n")
        block = 10_000
        for start in range(0, rows, block):
            handle.write("".join(f"{face},{image},row-{i}\n"
                                 for i in range(start, min(rows, start + block))))


def run_manifests(plan: Plan, work: Folders, report: Report) -> None:
    """Peak RSS and time to first request for lazy manifests of growing size."""
    pair = make_pair("small", work.images)
    for rows in plan.manifest_rows:
        manifest = work.images / f"manifest-{rows}.csv"
        _write_manifest(manifest, rows, pair)
        out_dir = work.results
        shutil.rmtree(out_dir, ignore_errors=True)
        with EmulatorProcess(latency=0.0) as emulator:
            spec = {"kind": "manifest", "url": emulator.url, "api_key": emulator.api_key,
                    "manifest": str(manifest), "rows": rows,
                    "concurrency": plan.manifest_concurrency,
                    "stop_after": plan.manifest_stop_after, "out_dir": str(out_dir)}
            result = _run_child(spec)
            stats = emulator.stats()
        manifest_bytes = manifest.stat().st_size
        manifest.unlink()
        shutil.rmtree(out_dir, ignore_errors=True)
        row = report.add_manifest(rows, plan.manifest_stop_after, manifest_bytes=manifest_bytes,
                                  result=result, first_request_at=stats.get("first_request_at"))
        _log(f"manifest {rows:,} rows: {row.summary()}")


def run_pacing(plan: Plan, work: Folders, report: Report) -> None:
    """Fixed and adaptive pace against the emulator's rate limit."""
    pair = make_pair("small", work.images)
    for mode, rpm in (("fixed", plan.pacing_rpm), ("adaptive", None)):
        out_dir = work.results
        shutil.rmtree(out_dir, ignore_errors=True)
        with EmulatorProcess(latency=LATENCY, rpm=plan.pacing_rpm,
                             burst=plan.pacing_burst) as emulator:
            spec = {"kind": "pacing", "url": emulator.url, "api_key": emulator.api_key,
                    "face": str(pair.face), "image": str(pair.image),
                    "concurrency": plan.pacing_concurrency, "rpm": rpm,
                    "duration": plan.pacing_seconds, "warmup": plan.pacing_warmup,
                    "out_dir": str(out_dir)}
            result = _run_child(spec)
        shutil.rmtree(out_dir, ignore_errors=True)
        row = report.add_pacing(mode, plan.pacing_rpm, plan.pacing_burst, result)
        _log(f"pacing {mode}: {row.summary()}")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="novita_async vs novita-client 0.7.1 vs a naive aiohttp client, "
                    "against the local emulator.")
    parser.add_argument("--full", action="store_true",
                        help="the bigger grid (about 30 minutes on 2 cores)")
    parser.add_argument("--sizes", default=",".join(SIZES),
                        help="size classes to run (default: small,medium,large)")
    parser.add_argument("--clients", default=",".join(CLIENTS),
                        help="peers to run (default: official,naive,novita_async)")
    parser.add_argument("--only", choices=("grid", "manifest", "pacing"), action="append",
                        help="run only these sections (repeatable; default: all)")
    parser.add_argument("--pacing-rpm", type=float, metavar="R",
                        help="the emulator's limit for the pacing runs (default: 600/min)")
    parser.add_argument("--pacing-seconds", type=float, metavar="S",
                        help="length of each pacing run (default: 40, 90 with --full); the first "
                             "quarter is warm-up")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rebuild RESULTS.md and results.png from the "
                             "results.json in --out")
    parser.add_argument("--out", type=Path, default=HERE,
                        help="folder for RESULTS.md, results.json, results.png "
                             "(default: the benchmarks folder)")
    return parser.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class Folders:
    """Where a run's inputs are (the system's temporary folder) and its results go."""

    images: Path
    results: Path


#: Free space the results folder needs: one run's results at a time.
_SCRATCH_NEEDS = 4 * 1024**3


def scratch_root() -> str | None:
    """Where results go: a RAM-backed folder when the machine has one.

    Every client's results are files, and each run starts from an empty folder.
    On a disk, the clients that run later in a cell would create their files
    among the inodes the earlier runs just freed (ext4 without a journal scans
    past recently deleted inodes on every create: measured up to half of a
    small job's CPU), and writeback of earlier runs' results would compete for
    the 2 cores.  tmpfs has neither, so every client meets the same file system.
    Inputs stay on the disk, read from its page cache as a dataset would be.
    """
    shm = "/dev/shm"
    try:
        if os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= _SCRATCH_NEEDS:
            return shm
    except OSError:
        pass
    return None  # the system's temporary folder


def _describe_scratch(root: str | None) -> str:
    if root is None:
        return f"inputs and results in {tempfile.gettempdir()}"
    return (f"inputs in {tempfile.gettempdir()} (page cache), results in {root} (tmpfs: "
            "RAM-backed files, no state left by earlier runs)")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; returns the exit code."""
    args = _parse_args(argv)
    if args.render:
        report = Report.from_json(json.loads((args.out / "results.json").read_text()))
        _write(report, args.out)
        return 0
    plan = FULL if args.full else QUICK
    if args.pacing_rpm is not None:
        plan = dataclasses.replace(plan, pacing_rpm=args.pacing_rpm)
    if args.pacing_seconds is not None:
        plan = dataclasses.replace(plan, pacing_seconds=args.pacing_seconds,
                                   pacing_warmup=args.pacing_seconds / 4)
    sizes = tuple(s for s in args.sizes.split(",") if s)
    clients = tuple(c for c in args.clients.split(",") if c)
    unknown = [s for s in sizes if s not in SIZES] + [c for c in clients if c not in CLIENTS]
    if unknown:
        sys.stderr.write(f"unknown sizes or clients: {', '.join(unknown)}\n")
        return 2
    sections = tuple(args.only or ("grid", "manifest", "pacing"))
    command = "python -m benchmarks" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                        ).rstrip()
    started = time.monotonic()
    _log(f"{plan.mode} run: sections {', '.join(sections)}; measuring the CPU floor")
    scratch = scratch_root()
    work = Folders(images=Path(tempfile.mkdtemp(prefix="novita-bench-inputs-")),
                   results=Path(tempfile.mkdtemp(prefix="novita-bench-results-", dir=scratch)))
    try:
        floor: FloorModel = measure_floor_model(inputs=work.images, results=work.results)
        report = Report(mode=plan.mode, command=command, latency=LATENCY, floor=floor)
        report.machine["scratch"] = _describe_scratch(scratch)
        if "grid" in sections:
            run_grid(plan, work, clients, sizes, report)
        if "manifest" in sections:
            run_manifests(plan, work, report)
        if "pacing" in sections:
            run_pacing(plan, work, report)
    finally:
        shutil.rmtree(work.images, ignore_errors=True)
        shutil.rmtree(work.results, ignore_errors=True)
    report.finish(time.monotonic() - started)
    _write(report, args.out)
    _log(f"done in {report.total_seconds / 60:.1f} min")
    return 0


def _write(report: Report, out: Path) -> None:
    """Print the table; write results.json, RESULTS.md and results.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    sys.stdout.write(report.text() + "\n")
    (out / "results.json").write_text(json.dumps(report.as_json(), indent=1) + "\n")
    (out / "RESULTS.md").write_text(report.markdown())
    report.chart(out / "results.png")
    _log(f"wrote {out / 'RESULTS.md'}, results.json and results.png")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
