"""Handing results to the consumer: a cancelled wait loses none, and a result held only in memory
is recorded in the ledger once the consumer is done with it (at-least-once delivery)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from novita_async.emulator import Emulator

from .batch_support import EmulatorFactory, client_for, ledger_lines, memory_jobs

pytestmark = pytest.mark.anyio


class ConsumerFailed(Exception):
    """The consumer's own error while it handles a result."""


async def test_a_consumer_that_polls_with_a_timeout_gets_every_result_once(
    emulator_factory: EmulatorFactory,
) -> None:
    """Waits for the next result cut short by a timeout (a worker doing housekeeping between
    results) lose nothing: every job's result arrives exactly once, none only in the ledger."""
    jobs = 240
    async with emulator_factory(latency=0.002, jitter=0.01) as emu, client_for(emu, max_concurrency=8) as client:
        received: list[str] = []
        timeouts = 0
        rng = random.Random(7)
        async with client.batch(memory_jobs(jobs), progress=False) as run:
            results = run.__aiter__()
            while True:
                try:
                    result = await asyncio.wait_for(results.__anext__(), rng.uniform(0.0005, 0.004))
                except asyncio.TimeoutError:
                    timeouts += 1
                    continue
                except StopAsyncIteration:
                    break
                received.append(result.job.id or "")
        assert timeouts > 0  # the waits really were cut short
        assert sorted(received) == sorted(job.id or "" for job in memory_jobs(jobs))
        assert run.summary.ok == jobs


async def test_an_in_memory_result_the_consumer_failed_on_is_done_again(
    emulator: Emulator, tmp_path: Path
) -> None:
    """With a ledger and no output folder, a result is recorded once the consumer comes back for
    the next: the one it raised on, and those it never got, are merged again by a re-run."""
    ledger = tmp_path / "ledger.jsonl"
    jobs = memory_jobs(8)
    async with client_for(emulator, max_concurrency=4) as client:
        handled: list[str] = []
        with pytest.raises(ConsumerFailed):
            async with client.batch(jobs, ledger=ledger, progress=False) as run:
                async for result in run:
                    if len(handled) == 2:
                        raise ConsumerFailed
                    handled.append(result.job.id or "")
        assert [line["id"] for line in ledger_lines(ledger)] == handled
        async with client.batch(jobs, ledger=ledger, progress=False) as again:
            rerun = {result.job.id: result.status async for result in again}
    assert {job_id for job_id, status in rerun.items() if status == "skipped"} == set(handled)
    assert {job_id for job_id, status in rerun.items() if status == "ok"} == {j.id for j in jobs} - set(handled)
    assert sorted(line["id"] for line in ledger_lines(ledger)) == sorted(j.id or "" for j in jobs)


async def test_leaving_the_batch_without_an_error_records_the_last_result_taken(
    emulator: Emulator, tmp_path: Path
) -> None:
    """`break` inside `async with` is no error: the result in hand is done, and recorded."""
    ledger = tmp_path / "ledger.jsonl"
    async with client_for(emulator, max_concurrency=2) as client, \
            client.batch(memory_jobs(6), ledger=ledger, progress=False) as run:
        async for result in run:
            taken = result.job.id
            break
    assert [line["id"] for line in ledger_lines(ledger)] == [taken]
    assert ledger_lines(ledger)[0]["status"] == "ok"


async def test_results_written_to_files_are_recorded_before_delivery(emulator: Emulator, tmp_path: Path) -> None:
    """A result already in its file is safe whatever the consumer does: recorded at once."""
    ledger = tmp_path / "out" / "ledger.jsonl"
    async with client_for(emulator, max_concurrency=1) as client:
        with pytest.raises(ConsumerFailed):
            async with client.batch(memory_jobs(3), output_dir=tmp_path / "out", ledger=ledger,
                                    progress=False) as run:
                async for result in run:
                    assert [line["id"] for line in ledger_lines(ledger)][-1] == result.job.id
                    raise ConsumerFailed
