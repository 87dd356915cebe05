"""Reliability: chaos, crashes, a server that goes away, disk trouble, bad responses.

Everything runs against the emulator on 127.0.0.1.  The long runs are marked
``soak`` (CI runs them once with ``pytest -m soak``).  Set
``NOVITA_FIGURES=<file>`` to have the runs append their figures (jobs, faults
injected, kills survived...) to that file as JSON lines, for the README.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
import tracemalloc
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from PIL import Image

import novita_async as na
from novita_async._ledger import Ledger
from novita_async.emulator import Emulator, EmulatorConfig, Faults, job_key

from .conftest import noise_png

pytestmark = pytest.mark.anyio

#: The chaos mix: 30% of attempts fail, in every transient way the API can.
CHAOS_RATES = {
    "500": 0.05,
    "502_html": 0.04,
    "503": 0.04,
    "429": 0.04,
    "429_retry_after": 0.04,
    "drop": 0.03,
    "truncate": 0.03,
    "slow": 0.03,
}
#: Enough attempts that 30% failures never exhaust them (0.3 ** 12 per job), waits
#: that never sleep for real, and the emulator's Retry-After: 1 capped to 10 ms.
CHAOS_RETRY = na.RetryPolicy(max_attempts=12, initial_wait=0.001, max_wait=0.01, max_retry_after=0.01)
#: Shorter than the emulator's slow_seconds, longer than any honest answer here.
CHAOS_TIMEOUT = na.Timeout(total=1.0, connect=1.0, read=1.0)


# -- helpers ---------------------------------------------------------------------


def record_figures(name: str, **values: Any) -> None:
    """Append a run's figures to $NOVITA_FIGURES (a JSONL file), when set."""
    target = os.environ.get("NOVITA_FIGURES")
    if target:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"test": name, **values}, default=str) + "\n")


def write_pairs(folder: Path, count: int, size: int = 48) -> list[tuple[Path, Path]]:
    """Write ``count`` distinct (face, image) PNG pairs under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(count):
        face, image = folder / f"face{i:04d}.png", folder / f"image{i:04d}.png"
        face.write_bytes(noise_png(2 * i, size))
        image.write_bytes(noise_png(2 * i + 1, size))
        pairs.append((face, image))
    return pairs


def key_of(face: Path, image: Path) -> str:
    """The emulator's job key for a pair of input files."""
    return job_key(face.read_bytes(), image.read_bytes())


def read_ledger_lines(path: Path) -> list[dict[str, Any]]:
    """Every whole JSON line of a ledger (a line torn by a kill is skipped)."""
    records = []
    for line in path.read_bytes().splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def part_files(folder: Path) -> list[Path]:
    """Temporary ``.part`` files left anywhere under ``folder``."""
    return sorted(folder.rglob("*.part")) if folder.exists() else []


def assert_valid_image(path: Path) -> None:
    """The file decodes completely as an image."""
    with Image.open(path) as image:
        image.load()


def assert_outputs_complete(folder: Path, expected: int) -> None:
    """Exactly ``expected`` result files, each a whole image, and no leftovers."""
    outputs = sorted(p for p in folder.iterdir() if p.suffix == ".png" and not p.name.startswith("."))
    assert len(outputs) == expected
    for path in outputs:
        assert_valid_image(path)
    assert part_files(folder) == []


def _no_proxy_open(url: str, timeout: float = 10.0) -> bytes:
    """GET a loopback URL without any proxy from the environment."""
    assert url.startswith("http://127.0.0.1:"), url
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


@contextlib.contextmanager
def emulator_process(*options: str) -> Iterator[str]:
    """Run ``novita-async serve`` in its own process on a free loopback port; yield its URL."""
    command = [sys.executable, "-m", "novita_async", "serve", "--port", "0", "--engine", "composite", *options]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30.0)
        assert ready, "the emulator did not print its URL within 30 s"
        url = proc.stdout.readline().decode().strip()
        assert url.startswith("http://127.0.0.1:"), url
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a stuck emulator
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def emulator_stats(url: str) -> dict[str, Any]:
    """The emulator's counters, over HTTP."""
    stats: dict[str, Any] = json.loads(_no_proxy_open(f"{url}/_emulator/stats"))
    return stats


@contextlib.contextmanager
def tmpfs(where: Path, *options: str) -> Iterator[Path]:
    """Mount a small tmpfs at ``where`` (needs root); skip the test when mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(where)],
        capture_output=True, text=True, check=False,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip() or 'mount failed'})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill_up(path: Path) -> None:
    """Write zeros to ``path`` until its file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, bytes(65536))
    finally:
        os.close(fd)


# -- chaos ------------------------------------------------------------------------


async def run_chaos(tmp_path: Path, jobs: int, *, requests_per_minute: float | None) -> dict[str, Any]:
    """Run ``jobs`` merges through 30% mixed faults and check that nothing is lost or doubled."""
    concurrency = 8
    pairs = write_pairs(tmp_path / "in", jobs)
    out, ledger = tmp_path / "out", tmp_path / "ledger.jsonl"
    faults = Faults(rates=CHAOS_RATES, seed=20240601, slow_seconds=5.0)
    started = time.monotonic()
    async with Emulator(EmulatorConfig(engine="composite", faults=faults)) as emulator:
        async with na.NovitaClient(
            api_key=emulator.api_key, base_url=emulator.url, retry=CHAOS_RETRY, timeout=CHAOS_TIMEOUT,
            max_concurrency=concurrency, requests_per_minute=requests_per_minute,
        ) as client:
            results = [r async for r in client.batch(
                (na.MergeJob(str(f), str(i)) for f, i in pairs), output_dir=out, ledger=ledger, progress=False,
            )]
        stats = emulator.stats
    elapsed = time.monotonic() - started

    failed = [(r.job.id, r.error_reason, str(r.error)) for r in results if r.status != na.JobStatus.OK]
    assert failed == []
    assert len(results) == jobs
    assert len({r.job.id for r in results}) == jobs
    assert max(r.attempts for r in results) <= CHAOS_RETRY.max_attempts
    assert stats.peak_in_flight <= concurrency
    # Every job reached the server and succeeded there at least once.
    assert {key_of(f, i) for f, i in pairs} <= set(stats.successes)
    # Faults really were injected, in the proportion asked for.
    injected = sum(stats.faults.values())
    assert injected >= 0.15 * stats.requests
    assert_outputs_complete(out, jobs)
    lines = read_ledger_lines(ledger)
    assert len(lines) == jobs
    assert Counter(line["id"] for line in lines) == Counter({r.job.id: 1 for r in results})
    assert {line["status"] for line in lines} == {"ok"}
    return {
        "jobs": jobs, "ok": len(results), "requests": stats.requests, "faults": dict(stats.faults),
        "faults_total": injected, "fault_share": round(injected / stats.requests, 3),
        "retries": sum(r.attempts for r in results) - jobs, "max_attempts": max(r.attempts for r in results),
        "peak_in_flight": stats.peak_in_flight, "concurrency": concurrency, "elapsed": round(elapsed, 1),
        "pacing": "adaptive" if requests_per_minute is None else f"fixed {requests_per_minute:g}/min",
        "lost": 0,
    }


async def test_chaos_every_job_ends_ok(tmp_path: Path) -> None:
    """150 jobs through 30% mixed faults: all ok, none doubled or partial, one ledger line each."""
    figures = await run_chaos(tmp_path, 150, requests_per_minute=None)
    record_figures("chaos", **figures)


@pytest.mark.soak
@pytest.mark.timeout(600)
async def test_chaos_1000_jobs_soak(tmp_path: Path) -> None:
    """1,000 jobs through 30% mixed faults: all ok, none doubled or partial, one ledger line each."""
    # A fixed pace far above what the emulator serves: the adaptive pacer reads
    # every injected 429 as a rate signal, and 8% random 429s over 1,000 jobs
    # pace it down to about one request every two seconds (see the report).
    figures = await run_chaos(tmp_path, 1000, requests_per_minute=60_000)
    assert all(figures["faults"].get(kind, 0) > 0 for kind in CHAOS_RATES), figures["faults"]
    record_figures("chaos_soak", **figures)


# -- crashes ---------------------------------------------------------------------


def _wait_for(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.soak
@pytest.mark.timeout(300)
def test_sigkill_five_times_then_resume_soak(tmp_path: Path) -> None:
    """SIGKILL the batch CLI at five random moments; the re-runs finish every job, none sent too often."""
    jobs, concurrency, kills_wanted = 120, 4, 5
    pairs = write_pairs(tmp_path / "in", jobs)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("face_image,image\n" + "".join(f"{f.name},{i.name}\n" for f, i in pairs))
    (tmp_path / "in" / manifest.name).write_text(manifest.read_text())
    manifest = tmp_path / "in" / manifest.name
    out = tmp_path / "out"
    ledger = out / "ledger.jsonl"
    seed = int(os.environ.get("NOVITA_CRASH_SEED", str(time.time_ns() % 100_000)))
    rng = random.Random(seed)
    key = "sk_crash_test_key"
    with emulator_process("--api-key", key, "--latency", "0.3") as url:
        command = [
            sys.executable, "-m", "novita_async", "batch", str(manifest), "-o", str(out),
            "--api-key", key, "--base-url", url, "--no-progress", "--concurrency", str(concurrency),
        ]

        def ledger_lines() -> int:
            return len(ledger.read_bytes().splitlines()) if ledger.exists() else 0

        kills, moments = 0, []
        for _ in range(kills_wanted):
            before = ledger_lines()
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # Kill only once this run has jobs in flight: after its first result, plus a random delay.
            assert _wait_for(lambda p=proc, b=before: ledger_lines() > b or p.poll() is not None, 60)
            delay = rng.uniform(0.0, 0.8)
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                moments.append(round(delay, 2))
            proc.wait()
        final = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        stats = emulator_stats(url)

    assert kills == kills_wanted, f"seed {seed}: the batch ended before every kill landed"
    assert final.returncode == 0, final.stderr
    last: dict[str, dict[str, Any]] = {}
    for record in read_ledger_lines(ledger):
        last[record["id"]] = record
    assert len(last) == jobs
    assert {r["status"] for r in last.values()} == {"ok"}
    for record in last.values():
        assert_valid_image(Path(record["output"]))
    finals = [p for p in out.iterdir() if p.suffix == ".png" and not p.name.startswith(".")]
    assert len(finals) == jobs
    assert part_files(out) == [], "the final run swept what the kills left"
    successes: dict[str, int] = stats["successes"]
    keys = {key_of(f, i) for f, i in pairs}
    assert keys == set(successes), f"seed {seed}"
    # Each job is merged once, plus at most once more per kill it was in flight for.
    assert max(successes.values()) <= 1 + kills, f"seed {seed}: {successes}"
    assert sum(successes.values()) <= jobs + kills * concurrency, f"seed {seed}"
    record_figures(
        "crash_soak", jobs=jobs, kills=kills, kill_delays_after_first_result=moments, seed=seed,
        server_successes=sum(successes.values()), resent_after_kill=sum(successes.values()) - jobs,
        stale_part_files=len(part_files(out)), requests=stats["requests"], lost=0,
    )


# -- the server goes away ---------------------------------------------------------


def _jobs(pairs: list[tuple[Path, Path]]) -> list[na.MergeJob]:
    return [na.MergeJob(str(f), str(i)) for f, i in pairs]


async def test_server_gone_and_back_batch_waits(tmp_path: Path) -> None:
    """The emulator stops mid-batch for 1.5 s and returns: the batch retries through it, all jobs ok."""
    pairs = write_pairs(tmp_path / "in", 30)
    out, ledger = tmp_path / "out", tmp_path / "ledger.jsonl"
    # A budget of about 40 x 0.1 s, well beyond the outage.
    retry = na.RetryPolicy(max_attempts=40, initial_wait=0.05, max_wait=0.2)
    results: list[na.JobResult] = []
    async with Emulator(EmulatorConfig(engine="composite", latency=0.05)) as emulator:

        async def come_back() -> None:
            await anyio.sleep(1.5)
            await emulator.resume()

        async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=retry,
                                   max_concurrency=4) as client, anyio.create_task_group() as group:
            paused_at = resumed_at = 0.0
            async for result in client.batch(_jobs(pairs), output_dir=out, ledger=ledger, progress=False):
                results.append(result)
                if len(results) == 8:
                    await emulator.pause()
                    paused_at = time.monotonic()
                    group.start_soon(come_back)
            resumed_at = time.monotonic()
        requests_after = emulator.stats.requests

    assert [r.error for r in results if not r.ok] == []
    assert len(results) == 30
    assert resumed_at - paused_at >= 1.5  # the batch really waited for the server
    assert max(r.attempts for r in results) > 1  # ... by retrying
    assert requests_after >= 30
    assert_outputs_complete(out, 30)
    assert [line["status"] for line in read_ledger_lines(ledger)] == ["ok"] * 30


@pytest.mark.parametrize(
    "retry",
    [
        pytest.param(na.RetryPolicy(max_attempts=4, initial_wait=0.01, max_wait=0.05), id="attempts-budget"),
        pytest.param(na.RetryPolicy(max_attempts=1000, initial_wait=0.05, max_wait=0.1, total_timeout=0.6),
                     id="time-budget"),
    ],
)
async def test_server_gone_for_good_reports_connection_errors(tmp_path: Path, retry: na.RetryPolicy) -> None:
    """The emulator stops and stays away: each remaining job fails clearly and the ledger says so."""
    jobs = 16
    pairs = write_pairs(tmp_path / "in", jobs)
    out, ledger = tmp_path / "out", tmp_path / "ledger.jsonl"
    results: list[na.JobResult] = []
    async with Emulator(EmulatorConfig(engine="composite", latency=0.05)) as emulator:
        url = f"{emulator.url}/v3/merge-face"
        async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=retry,
                                   max_concurrency=4) as client:
            with anyio.fail_after(30):
                async for result in client.batch(_jobs(pairs), output_dir=out, ledger=ledger, progress=False):
                    results.append(result)
                    if len(results) == 4:
                        await emulator.pause()

    assert len(results) == jobs  # the batch went on to the end
    ok = [r for r in results if r.status == na.JobStatus.OK]
    failed = [r for r in results if r.status == na.JobStatus.FAILED]
    assert len(ok) >= 4 and len(ok) + len(failed) == jobs and failed
    for result in failed:
        assert isinstance(result.error, na.APIConnectionError)
        message = str(result.error)
        assert f"connection to {url} failed" in message
        if retry.total_timeout < 60:
            assert result.elapsed < retry.total_timeout + 2.0
        else:
            assert result.attempts == retry.max_attempts
    lines = {line["id"]: line for line in read_ledger_lines(ledger)}
    assert len(lines) == jobs
    for result in ok:
        assert lines[result.job.id]["status"] == "ok"
        assert result.output is not None
        assert_valid_image(result.output)
    for result in failed:
        line = lines[result.job.id]
        assert line["status"] == "failed"
        assert line["error_type"] in ("APIConnectionError", "APITimeoutError")
        assert "failed" in line["error_message"]
        assert line["attempts"] == result.attempts >= 1
        assert result.output is not None and not result.output.exists()
    assert part_files(out) == []


# -- disk trouble ------------------------------------------------------------------


def _blocked_by_file(tmp_path: Path) -> Path:
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file where the output folder's parent should be")
    return blocker / "out"


@contextlib.contextmanager
def _unwritable_output(tmp_path: Path, how: str) -> Iterator[Path]:
    """An output folder this process cannot write to, even as root."""
    if how == "parent-is-a-file":
        yield _blocked_by_file(tmp_path)
    else:
        with tmpfs(tmp_path / "ro", "ro", "size=1m") as mount:
            yield mount / "out"


@pytest.mark.parametrize("how", [pytest.param("parent-is-a-file", id="parent-is-a-file"),
                                 pytest.param("read-only-mount", id="read-only-mount")])
async def test_unwritable_output_folder_fails_each_job_clearly(tmp_path: Path, how: str) -> None:
    """An output folder that cannot be written: OutputError per job, an honest ledger, nothing sent."""
    pairs = write_pairs(tmp_path / "in", 5)
    ledger = tmp_path / "ledger.jsonl"
    with _unwritable_output(tmp_path, how) as out:
        async with Emulator(EmulatorConfig(engine="composite")) as emulator:
            async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url,
                                       retry=CHAOS_RETRY) as client:
                results = [r async for r in client.batch(_jobs(pairs), output_dir=out, ledger=ledger,
                                                         progress=False)]
            requests = emulator.stats.requests
        assert part_files(out.parent) == []
    assert [r.status for r in results] == ["failed"] * 5
    strerror = "Not a directory" if how == "parent-is-a-file" else "Read-only file system"
    for result in results:
        assert isinstance(result.error, na.OutputError)
        assert str(out) in str(result.error) and strerror in str(result.error)
    # Checked before sending: a result with nowhere to go is never paid for.
    assert requests == 0
    lines = read_ledger_lines(ledger)
    assert [(line["status"], line["error_type"]) for line in lines] == [("failed", "OutputError")] * 5
    assert all(strerror in line["error_message"] for line in lines)


@pytest.mark.parametrize("file_io", [pytest.param("auto", id="inline"), pytest.param("threads", id="threads")])
async def test_disk_fills_up(tmp_path: Path, file_io: str) -> None:
    """A 1 MB disk: the results that fit are ok, those being written when it filled fail with a
    clear OutputError, none half-written, and the batch stops: the rest are not_attempted,
    never sent (their results would have nowhere to go).

    Both ways of writing: on the event loop (a tmpfs is local and fast) and in worker threads.
    """
    jobs, concurrency = 10, 2
    pairs = write_pairs(tmp_path / "in", jobs, size=256)  # results of about 200 KB each
    ledger = tmp_path / "ledger.jsonl"
    with tmpfs(tmp_path / "disk", "size=1m") as disk:
        out = disk / "out"
        async with Emulator(EmulatorConfig(engine="composite")) as emulator, na.NovitaClient(
            api_key=emulator.api_key, base_url=emulator.url, retry=CHAOS_RETRY, max_concurrency=concurrency,
            file_io=file_io,  # type: ignore[arg-type]
        ) as client:
            run = client.batch(_jobs(pairs), output_dir=out, ledger=ledger, progress=False)
            results = [r async for r in run]
            assert client._files.runs_inline((str(out),)) is (file_io == "auto")
            requests = emulator.stats.requests
        assert len(results) == jobs
        ok, failed, not_attempted = ([r for r in results if r.status == status]
                                     for status in ("ok", "failed", "not_attempted"))
        # Failed: the jobs alive when the disk filled (in flight, or prepared and
        # checked ahead: the batch's prefetch of 2 at this concurrency).
        assert len(ok) >= 2 and 1 <= len(failed) <= concurrency + 2, [r.status for r in results]
        assert len(ok) + len(failed) + len(not_attempted) == jobs and not_attempted
        assert len(ok) <= requests <= len(ok) + len(failed)  # nothing sent after the disk was found full
        assert run.summary.stop_reason is not None and "No space left on device" in run.summary.stop_reason
        for result in ok:
            assert result.output is not None
            assert_valid_image(result.output)
        for result in failed:
            assert isinstance(result.error, na.OutputError)
            assert "No space left on device" in str(result.error)
            assert result.output is not None and not result.output.exists()
        for result in not_attempted:
            assert isinstance(result.error, na.JobNotAttemptedError)
            assert isinstance(result.error.cause, na.OutputError)
        assert part_files(disk) == []
        assert {p for p in out.iterdir() if not p.name.startswith(".")} == {r.output for r in ok}
    lines = {line["id"]: line for line in read_ledger_lines(ledger)}
    assert len(lines) == jobs
    assert {i for i, line in lines.items() if line["status"] == "ok"} == {r.job.id for r in ok}
    assert all("No space left on device" in lines[r.job.id]["error_message"] for r in failed)
    assert {i for i, line in lines.items() if line["status"] == "not_attempted"} == {
        r.job.id for r in not_attempted}


async def test_ledger_on_a_full_disk_stops_the_batch_honestly(tmp_path: Path) -> None:
    """The ledger's disk fills: the batch stops at the first line it cannot write, says why, and resumes later."""
    pairs = write_pairs(tmp_path / "in", 6)
    with tmpfs(tmp_path / "disk", "size=1m") as disk:
        ledger = disk / "ledger.jsonl"
        # Earlier runs' lines fill most of the ledger's page; then the disk fills up,
        # so the next line fits only in part (a short write, not an error).
        earlier = json.dumps({"id": "earlier-run", "status": "failed"}) + "\n"
        ledger.write_text(earlier * ((4096 - 120) // len(earlier)))
        fill_up(disk / "filler")
        out = tmp_path / "out"
        received: list[tuple[na.JobResult, bool]] = []
        async with Emulator(EmulatorConfig(engine="composite")) as emulator, na.NovitaClient(
            api_key=emulator.api_key, base_url=emulator.url, retry=CHAOS_RETRY, max_concurrency=1
        ) as client:
            run = client.batch(_jobs(pairs), output_dir=out, ledger=ledger, progress=False)
            async for result in run:
                received.append((result, run.summary.stop_reason is not None))
                if run.summary.stop_reason is not None:
                    # Stopped, not ended: the ledger stays locked until the run is over.
                    with pytest.raises(na.LedgerInUseError):
                        Ledger(ledger)
            stop_reason = run.summary.stop_reason
            assert stop_reason is not None
            assert "cannot write the ledger" in stop_reason and "No space left on device" in stop_reason
            assert len(received) == len(pairs)  # every job accounted for, none silently dropped
            whole = {line["id"]: line for line in read_ledger_lines(ledger)}
            # A job handed over before the stop was declared has its whole line in the ledger.
            for result, after_stop in received:
                if not after_stop:
                    assert result.job.id in whole, "a torn ledger line was counted as written"
            for job_id, line in whole.items():  # and every whole line is the truth
                if line["status"] == "ok":
                    assert (out / Path(line["output"]).name).exists(), job_id
            # Space again: the same command resumes and finishes every job.
            (disk / "filler").unlink()
            rerun = [r async for r in client.batch(_jobs(pairs), output_dir=out, ledger=ledger, progress=False)]
        assert {r.status for r in rerun} <= {na.JobStatus.OK, na.JobStatus.SKIPPED}
        final = {line["id"]: line for line in read_ledger_lines(ledger)}
        assert all(final[r.job.id]["status"] == "ok" for r in rerun if r.status == na.JobStatus.OK)
        assert_outputs_complete(out, len(pairs))


# -- bad responses ------------------------------------------------------------------

_ONE_TRY = na.RetryPolicy(max_attempts=1)
_RETRY_ONCE = na.RetryPolicy(max_attempts=3, initial_wait=0.0, max_wait=0.0, max_retry_after=0.0)


@pytest.mark.parametrize(
    ("kind", "seconds", "error", "retryable"),
    [
        pytest.param("bad_json", 2.0, na.InvalidResponseError, False, id="200-not-json"),
        pytest.param("no_image_file", 2.0, na.InvalidResponseError, False, id="200-without-image_file"),
        pytest.param("bad_base64", 2.0, na.InvalidResponseError, False, id="200-invalid-base64"),
        pytest.param("truncate", 2.0, na.InvalidResponseError, True, id="200-cut-short"),
        pytest.param("drip", 1.0, na.APITimeoutError, True, id="drip-slower-than-total-timeout"),
        pytest.param("slow", 0.5, na.APITimeoutError, True, id="answer-slower-than-timeout"),
        pytest.param("huge_error", 2.0, na.ServerError, True, id="10-MB-error-body"),
        pytest.param("502_html", 2.0, na.ServerError, True, id="502-html-body"),
    ],
)
async def test_bad_response_gives_typed_error_then_retry(
    kind: str, seconds: float, error: type[na.NovitaError], retryable: bool
) -> None:
    """Each bad answer is a typed error within the timeout, retried only when a retry can help."""
    faults = Faults(fail_first=1, fail_first_kind=kind, slow_seconds=10.0, drip_interval=0.1)
    face, image = noise_png(1), noise_png(2)
    limit = na.Timeout(total=seconds, read=seconds, connect=seconds)
    async with Emulator(EmulatorConfig(engine="composite", faults=faults)) as emulator:
        async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=_ONE_TRY,
                                   timeout=limit) as client:
            started = time.monotonic()
            with pytest.raises(error) as caught:
                await client.merge_face(face, image)
            assert time.monotonic() - started < seconds + 1.5  # never a hang past the timeout
        assert caught.value.retryable is retryable
        assert caught.value.attempts == 1
        async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=_RETRY_ONCE,
                                   timeout=limit) as client:
            fresh = noise_png(3)  # a new job: its first attempt gets the fault too
            before = emulator.stats.requests
            if retryable:  # one retry finishes it
                result = await client.merge_face(fresh, image)
                assert result.attempts == 2
                assert result.data is not None and result.to_pil().size == (48, 48)
                assert emulator.stats.requests == before + 2
            else:  # never retried: the server would say the same again
                with pytest.raises(error):
                    await client.merge_face(fresh, image)
                assert emulator.stats.requests == before + 1


async def test_drip_slower_than_read_timeout() -> None:
    """A body trickling slower than the read timeout stops at the read timeout, not the total."""
    faults = Faults(fail_first=1, fail_first_kind="drip", drip_interval=1.0)
    async with Emulator(EmulatorConfig(engine="composite", faults=faults)) as emulator, na.NovitaClient(
        api_key=emulator.api_key, base_url=emulator.url, retry=_ONE_TRY, timeout=na.Timeout(total=30.0, read=0.3)
    ) as client:
        started = time.monotonic()
        with pytest.raises(na.APITimeoutError):
            await client.merge_face(noise_png(1), noise_png(2))
        assert time.monotonic() - started < 2.0


async def test_wrong_content_type_on_a_good_body_is_accepted() -> None:
    """A success body labelled text/plain is still decoded by its shape: a valid image, once."""
    faults = Faults(fail_first=1, fail_first_kind="wrong_content_type")
    async with Emulator(EmulatorConfig(engine="composite", faults=faults)) as emulator:
        async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=_ONE_TRY) as client:
            result = await client.merge_face(noise_png(1), noise_png(2))
        assert emulator.stats.faults["wrong_content_type"] == 1
    assert result.attempts == 1
    assert result.to_pil().size == (48, 48)


def test_ten_megabyte_error_body_memory_stays_small() -> None:
    """A 10 MB error body is read only up to the cap: the client's Python memory peak stays under 2 MB."""
    face, image = noise_png(1), noise_png(2)

    async def merge(url: str) -> na.ServerError:
        async with na.NovitaClient(api_key="sk_emulator_local", base_url=url, retry=_ONE_TRY,
                                   timeout=10.0) as client:
            with pytest.raises(na.ServerError) as caught:
                await client.merge_face(face, image)
            return caught.value

    # The emulator runs in its own process so only the client's allocations are traced.
    with emulator_process("--fault", "huge_error=1.0") as url:
        anyio.run(merge, url)  # warm up: imports, codec, connection machinery
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            started = time.monotonic()
            error = anyio.run(merge, url)
            elapsed = time.monotonic() - started
            peak = tracemalloc.get_traced_memory()[1] - baseline
        finally:
            tracemalloc.stop()
    # Cut at the cap the body is no longer JSON: typed by its status, and retryable.
    assert error.status == 500 and error.retryable
    assert len(error.body) <= 64 * 1024
    assert peak < 2 * 1024 * 1024, f"peak {peak / 2**20:.1f} MB above baseline"
    assert elapsed < 10.0


def test_helpers_hash_like_the_emulator(tmp_path: Path) -> None:
    """key_of matches the documented job key (sha1 of each input, 16 hex digits each)."""
    face, image = tmp_path / "f.png", tmp_path / "i.png"
    face.write_bytes(b"face")
    image.write_bytes(b"image")
    expected = hashlib.sha1(b"face").hexdigest()[:16] + ":" + hashlib.sha1(b"image").hexdigest()[:16]
    assert key_of(face, image) == expected
