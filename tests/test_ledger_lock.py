"""One run at a time per ledger: a second run on a ledger in use stops before it sends anything;
shards (their own ledgers in one folder) still run together, and readers take no lock."""

from __future__ import annotations

import pickle
import subprocess
from pathlib import Path

import anyio
import pytest

import novita_async as na
from novita_async._cli import main
from novita_async._ledger import Ledger
from novita_async.emulator import DEFAULT_API_KEY, Emulator, job_key

from .batch_support import EmulatorFactory, client_for, collect, csv_manifest, job_images, ledger_lines, memory_jobs
from .test_cli_process import CHILD_ENV, lines_reach, novita, served, start_batch, stats, wait_for

pytestmark = pytest.mark.anyio


def test_a_second_ledger_on_one_file_is_refused_until_the_first_is_closed(tmp_path: Path) -> None:
    """Opening a ledger in use raises LedgerInUseError (a ConfigurationError) naming it and the fix;
    once the first is closed the file opens again."""
    path = tmp_path / "out" / "ledger.jsonl"
    first = Ledger(path)
    with pytest.raises(na.LedgerInUseError) as info:
        Ledger(path)
    error = info.value
    assert isinstance(error, na.ConfigurationError)
    assert error.path == str(path)
    assert str(error).startswith(f"ledger {path} is in use: another run is using it; wait for it to end")
    assert "--shard K/N" in str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.path) == (na.LedgerInUseError, str(error), error.path)
    first.close()
    Ledger(path).close()


async def test_two_batches_in_one_process_on_one_ledger(emulator_factory: EmulatorFactory, tmp_path: Path) -> None:
    """While one batch runs, a second on its ledger raises LedgerInUseError before sending a job;
    `status` and a shard's ledger beside it still read it; once it ends, a third run resumes it."""
    out = tmp_path / "out"
    ledger = out / "ledger.jsonl"
    second_jobs = [na.MergeJob(*job_images(100 + i), id=f"second{i}") for i in range(3)]
    async with emulator_factory(latency=0.05) as emu, client_for(emu, max_concurrency=2) as client:
        async with client.batch(memory_jobs(8), output_dir=out, ledger=ledger) as first:
            results = [await anext(first)]  # the first run has its ledger open
            with pytest.raises(na.LedgerInUseError, match="is in use"):
                await collect(client.batch(second_jobs, output_dir=tmp_path / "other", ledger=ledger))
            # Readers take no lock: status, and a ledger of another name reading this one.
            assert na.run_status([out]).total.done >= 1
            assert main(["status", str(ledger)]) == 0
            sibling = Ledger(out / "ledger.shard-0-of-2.jsonl")
            assert sibling.is_done(results[0].job.id or "")
            sibling.close()
            results += [result async for result in first]
        assert [r.status for r in results] == ["ok"] * 8
        assert not (tmp_path / "other").exists()
        assert not any(job_key(*job_images(100 + i)) in emu.stats.attempts for i in range(3))
        assert sorted(line["id"] for line in ledger_lines(ledger)) == sorted(f"job{i}" for i in range(8))
        sent = emu.stats.requests
        assert sent == 8
        third = await collect(client.batch(memory_jobs(8), output_dir=out, ledger=ledger))
        assert [r.status for r in third] == ["skipped"] * 8 and emu.stats.requests == sent


async def test_shards_in_one_folder_run_at_once(emulator: Emulator, tmp_path: Path) -> None:
    """Two shards of one job list, each with its own ledger in the same folder, run together:
    neither is refused, and every job is sent once."""
    out = tmp_path / "out"
    jobs = memory_jobs(12)
    finished: dict[int, list[na.JobResult]] = {}

    async def shard(index: int, running: anyio.Event, other: anyio.Event) -> None:
        async with client_for(emulator) as client:
            run = client.batch(na.shard_jobs(jobs, index, 2), output_dir=out,
                               ledger=out / f"ledger.shard-{index}-of-2.jsonl")
            async with run:
                results = [await anext(run)]
                running.set()
                await other.wait()  # both ledgers are open at this point
                results += [result async for result in run]
        finished[index] = results

    events = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(shard, 0, events[0], events[1])
        group.start_soon(shard, 1, events[1], events[0])
    assert sorted(r.job.id or "" for k in (0, 1) for r in finished[k]) == sorted(j.id or "" for j in jobs)
    assert {r.status for k in (0, 1) for r in finished[k]} == {"ok"}
    assert sorted(emulator.stats.attempts.values()) == [1] * 12


def test_a_second_cli_process_on_a_ledger_in_use_exits_2(tmp_path: Path) -> None:
    """`novita-async batch` started twice on one output folder: the second says the ledger is in
    use and how to fix it (exit 2, one line, no traceback, nothing sent); the first does every job
    once; a third, after the first ended, resumes (exit 0, everything skipped)."""
    manifest = csv_manifest(tmp_path / "data", 40)
    out = tmp_path / "out"
    ledger = out / "ledger.jsonl"
    with served("--latency", "0.3") as url:
        first = start_batch(manifest, out, url)
        try:
            wait_for(lines_reach(ledger, 1))
            second = subprocess.run(
                novita("batch", manifest, "-o", out, "--no-progress", "--base-url", url,
                       "--api-key", DEFAULT_API_KEY),
                capture_output=True, text=True, timeout=60, env=CHILD_ENV)
            assert first.poll() is None, "the first run ended before the second was refused"
        finally:
            _, first_err = first.communicate(timeout=60)
        assert first.returncode == 0, first_err
        assert second.returncode == 2, second.stderr
        assert second.stderr.splitlines() == [
            f"novita-async: error: ledger {ledger} is in use: another run is using it; wait for it to "
            "end, or give each run its own ledger (e.g. --shard K/N for workers sharing one job list, "
            "or --ledger FILE; ledger=... in Python)"]
        # Every job was sent once, by the first run.
        assert stats(url)["requests"] == 40
        assert sorted(line["status"] for line in ledger_lines(ledger)) == ["ok"] * 40
        third = subprocess.run(
            novita("batch", manifest, "-o", out, "--no-progress", "--base-url", url, "--api-key", DEFAULT_API_KEY),
            capture_output=True, text=True, timeout=60, env=CHILD_ENV)
        assert third.returncode == 0, third.stderr
        assert "ok 0, failed 0, skipped 40 (resumed)" in third.stderr
        assert stats(url)["requests"] == 40
