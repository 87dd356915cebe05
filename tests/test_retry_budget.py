"""RetryPolicy.total_timeout: when its clock starts, and the waits it bounds."""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import pytest

import novita_async as na
from novita_async._pacing import Pacer
from novita_async._retry import RetryBudgetSpent, RetryDeadline, retry_call
from novita_async.emulator import Emulator, Faults

from .conftest import make_image

pytestmark = pytest.mark.anyio

FACE = make_image(seed=11)
TARGET = make_image(size=(96, 80), seed=12)


async def test_a_retry_whose_waits_pass_the_deadline_raises_the_last_failure() -> None:
    """RetryBudgetSpent from a retry is never seen: the failure before it is, with its own cause."""
    cause = ConnectionResetError("peer reset")
    first = na.ServerError(status=503, reason="SERVICE_UNAVAILABLE", message="busy")
    first.__cause__ = cause
    calls: list[int] = []

    async def attempt(number: int) -> str:
        calls.append(number)
        if number == 1:
            raise first
        raise RetryBudgetSpent

    policy = na.RetryPolicy(max_attempts=5, initial_wait=0.0, max_wait=0.0)
    with pytest.raises(na.ServerError) as raised:
        await retry_call(attempt, policy)
    assert raised.value is first
    assert raised.value.attempts == 1
    assert raised.value.__cause__ is cause
    assert calls == [1, 2]


def test_the_deadline_starts_once_and_bounds_only_retries() -> None:
    """The clock starts with the first send; the first attempt's waits are not bounded by it."""
    deadline = RetryDeadline(10.0)
    assert deadline.waits_end(1) == float("inf")
    deadline.start()
    time.sleep(0.05)
    deadline.start()  # a second start does not reset the clock
    assert 9.0 < deadline.left() <= 9.96


async def test_a_429_cool_down_longer_than_the_budget_ends_the_call_at_the_budget(
    emulator_factory: Callable[..., Emulator],
) -> None:
    """A retry is not made when the shared cool-down outlasts total_timeout (it was: 2 s for 0.6 s)."""
    # 30/min: a 429 without Retry-After cools every start down for one interval, 2 s.
    policy = na.RetryPolicy(max_attempts=10, initial_wait=0.01, max_wait=0.01, total_timeout=0.6)
    faults = Faults(rates={"429": 1.0})
    async with emulator_factory(faults=faults) as emu, na.NovitaClient(
        api_key=emu.api_key, base_url=emu.url, requests_per_minute=30, retry=policy,
    ) as client:
        started = time.monotonic()
        with pytest.raises(na.RateLimitError) as raised:
            await client.merge_face(FACE, TARGET)
        elapsed = time.monotonic() - started
        assert isinstance(client.pacer, Pacer)
        # The retry gave its booked slot back: the next call is not pushed behind it.
        assert client.pacer.reserve(time.monotonic()) < 2.0
    assert raised.value.attempts == 1
    assert emu.stats.requests == 1
    assert 0.55 <= elapsed < 1.5


HOLDER = make_image(seed=13)


async def race_for_one_slot(
    emulator_factory: Callable[..., Emulator], policy: na.RetryPolicy, *, fresh_first: bool, pause: float,
) -> dict[str, na.MergeFaceResult]:
    """Two calls on one slot, 0.6 s of latency, every job's first attempt a 503 at once.

    The "holder" job has spent its failure beforehand, so its call holds the slot
    for 0.6 s; the "fresh" job fails at once and retries.  One starts ``pause``
    seconds after the other (the fresh one first if ``fresh_first``).
    """
    faults = Faults(fail_first=1, fail_first_kind="503")
    async with emulator_factory(faults=faults, latency=0.6) as emu, na.NovitaClient(
        api_key=emu.api_key, base_url=emu.url, max_concurrency=1, retry=policy, requests_per_minute=60_000,
    ) as client:
        await client.merge_face(HOLDER, TARGET)  # this job's failure is spent: its next call takes 0.6 s
        results: dict[str, na.MergeFaceResult] = {}

        async def run(name: str, face: bytes) -> None:
            results[name] = await client.merge_face(face, TARGET)

        calls = [("holder", HOLDER), ("fresh", FACE)]
        async with anyio.create_task_group() as tasks:
            first, second = reversed(calls) if fresh_first else calls
            tasks.start_soon(run, *first)
            await anyio.sleep(pause)
            tasks.start_soon(run, *second)
    return results


async def test_a_call_that_waited_longer_than_the_budget_for_a_slot_still_retries(
    emulator_factory: Callable[..., Emulator],
) -> None:
    """The budget runs from the first send: queueing behind other calls does not use it up."""
    policy = na.RetryPolicy(max_attempts=3, initial_wait=0.01, max_wait=0.01, total_timeout=0.3)
    # The holder has the only slot for 0.5 s after the fresh call arrives.
    results = await race_for_one_slot(emulator_factory, policy, fresh_first=False, pause=0.1)
    assert results["holder"].attempts == 1
    assert results["fresh"].attempts == 2


async def test_a_retry_queued_for_a_slot_longer_than_the_budget_is_still_made(
    emulator_factory: Callable[..., Emulator],
) -> None:
    """A retry's wait for a free slot is Timeout.pool's: it neither spends the budget nor ends the retry."""
    # The fresh call fails at once and backs off 0.2 s; meanwhile the holder takes the slot, so
    # the retry queues ~0.45 s behind it: past the 0.5 s budget.
    policy = na.RetryPolicy(max_attempts=3, initial_wait=0.2, max_wait=0.2, jitter=0.0, total_timeout=0.5)
    results = await race_for_one_slot(emulator_factory, policy, fresh_first=True, pause=0.05)
    assert results["holder"].attempts == 1
    assert results["fresh"].attempts == 2
