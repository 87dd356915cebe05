"""The shared pace: fixed spacing, 429 cool-downs and the adaptive (AIMD) rate."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import pytest

from novita_async._pacing import Pacer


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("rpm", [pytest.param(0, id="zero"), pytest.param(-5, id="negative")])
def test_rate_must_be_positive(rpm: float) -> None:
    """A non-positive requests_per_minute is refused."""
    with pytest.raises(ValueError, match="requests_per_minute"):
        Pacer(rpm)


def test_fixed_pace_spaces_starts_evenly() -> None:
    """At 60/min, starts booked at the same instant are one second apart."""
    pacer = Pacer(60, clock=FakeClock())
    assert pacer.rate == 1.0
    assert [pacer.reserve(1000.0) for _ in range(4)] == [0.0, 1.0, 2.0, 3.0]


def test_fixed_pace_does_not_bank_idle_time() -> None:
    """Idle time is not saved up into a later burst."""
    pacer = Pacer(120, clock=FakeClock())
    assert pacer.reserve(0.0) == 0.0
    assert pacer.reserve(100.0) == 0.0
    assert pacer.reserve(100.0) == 0.5
    assert pacer.reserve(100.0) == 1.0


def test_fixed_pace_after_waiting_out_a_slot() -> None:
    """A caller arriving between slots waits only for the rest of the interval."""
    pacer = Pacer(60, clock=FakeClock())
    assert pacer.reserve(10.0) == 0.0
    assert pacer.reserve(10.25) == pytest.approx(0.75)


def test_cooldown_after_retry_after() -> None:
    """After a 429 with Retry-After every start waits until the cool-down ends."""
    clock = FakeClock(50.0)
    pacer = Pacer(60_000, clock=clock)  # a pace fast enough not to matter
    pacer.on_rate_limited(2.5)
    assert pacer.reserve(50.0) == pytest.approx(2.5)
    assert pacer.reserve(51.0) == pytest.approx(1.5 + 0.001)
    assert pacer.reserve(60.0) == 0.0
    assert pacer.rate_limited == 1
    assert pacer.rate == 1000.0  # a fixed pace is never changed by 429s


def test_cooldown_never_shrinks() -> None:
    """A shorter Retry-After arriving later does not cut an earlier, longer cool-down."""
    clock = FakeClock(0.0)
    pacer = Pacer(60_000, clock=clock)
    pacer.on_rate_limited(5.0)
    clock.now = 1.0
    pacer.on_rate_limited(1.0)
    assert pacer.reserve(1.0) == pytest.approx(4.0)


def test_cooldown_without_retry_after_backs_off() -> None:
    """Without Retry-After the cool-down doubles per consecutive 429, capped, reset by success."""
    clock = FakeClock(0.0)
    pacer = Pacer(60, clock=clock)  # interval 1 s
    pauses = []
    for _ in range(7):
        clock.now += 100.0
        pacer.on_rate_limited(None)
        pauses.append(pacer._cooldown_until - clock.now)
    assert pauses == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    pacer.on_success()
    clock.now += 100.0
    pacer.on_rate_limited(None)
    assert pacer._cooldown_until - clock.now == 1.0


def test_adaptive_is_unthrottled_until_a_429() -> None:
    """With no rate set, starts are never delayed before the first 429."""
    pacer = Pacer(None, clock=FakeClock())
    assert pacer.rate is None
    assert not pacer.fixed
    assert all(pacer.reserve(5.0) == 0.0 for _ in range(100))


@pytest.mark.parametrize("starts", [pytest.param(n, id=f"{n}-starts") for n in (2, 3, 5, 10)])
def test_adaptive_cuts_below_the_observed_rate(starts: int) -> None:
    """After a 429 the adaptive rate is set below the rate the server just refused."""
    clock = FakeClock(0.0)
    pacer = Pacer(None, clock=clock)
    for index in range(starts):  # two starts per second
        clock.now = index * 0.5
        assert pacer.reserve(clock.now) == 0.0
    pacer.on_rate_limited(None)
    assert pacer.rate is not None
    assert 1.0 < pacer.rate < 2.0
    assert pacer.rate_limited == 1


def test_adaptive_without_history_starts_slow() -> None:
    """A 429 before two starts were seen falls back to under one request per second."""
    pacer = Pacer(None, clock=FakeClock())
    pacer.on_rate_limited(None)
    assert pacer.rate is not None
    assert pacer.rate < 1.0


def test_adaptive_paces_after_the_cut() -> None:
    """Once cut, the adaptive pacer spaces starts at its new rate."""
    clock = FakeClock(0.0)
    pacer = Pacer(None, clock=clock)
    pacer.on_rate_limited(0.0)
    assert pacer.rate is not None
    interval = 1.0 / pacer.rate
    assert pacer.reserve(10.0) == 0.0
    assert pacer.reserve(10.0) == pytest.approx(interval)


def adaptive_after_a_cut() -> tuple[Pacer, FakeClock, float]:
    """An adaptive pacer on a fake clock, just cut by its first 429: (pacer, clock, the cut rate)."""
    clock = FakeClock(0.0)
    pacer = Pacer(None, clock=clock)
    pacer.on_rate_limited(0.0)
    assert pacer.rate is not None
    return pacer, clock, pacer.rate


def test_adaptive_grows_on_success_and_shrinks_on_429() -> None:
    """While the pace holds starts back, each success raises it a little; each 429 cuts it again."""
    pacer, clock, cut = adaptive_after_a_cut()
    for _ in range(10):
        assert pacer.reserve(clock.now) >= 0.0
        assert pacer.reserve(clock.now) > 0.0  # the second booking waits: the pace binds
        pacer.on_success()
    grown = pacer.rate
    assert grown is not None
    assert cut < grown < cut * 1.2
    clock.now = 100.0  # no recent starts: the cut is from the current rate
    pacer.on_rate_limited(0.0)
    assert pacer.rate is not None
    assert pacer.rate < grown


def test_adaptive_pace_does_not_grow_while_something_else_limits_the_starts() -> None:
    """Successes of starts the pace never held back (concurrency or a slow server set the rate)
    leave the pace where it is: otherwise it drifts far above what is sent, and the first 429
    after the drift meets a pace the server never allowed."""
    pacer, clock, cut = adaptive_after_a_cut()
    for step in range(1, 200):
        clock.now = 10.0 + step * 2.0 / cut  # one start every two intervals: never held back
        assert pacer.reserve(clock.now) == 0.0
        pacer.on_success()
    assert pacer.rate == cut
    # Once starts queue behind the pace again (for a window of them), it grows.
    for _ in range(8):
        pacer.reserve(clock.now)
    pacer.on_success()
    assert pacer.rate > cut


def test_adaptive_pace_does_not_grow_on_bunched_starts_below_it() -> None:
    """Starts that come in pairs (two callers freed at once) but at half the pace in all:
    the second of each pair waits a turn, yet the pace is not what limits them.  The
    pace stays put (it grew 0.5% a success before, 7x over these 400)."""
    pacer, clock, cut = adaptive_after_a_cut()
    for step in range(1, 201):
        clock.now = 10.0 + step * 4.0 / cut  # a pair every four intervals
        assert pacer.reserve(clock.now) == 0.0
        assert pacer.reserve(clock.now) > 0.0  # held back a turn
        pacer.on_success()
        pacer.on_success()
    assert pacer.rate == cut


def test_adaptive_rate_has_a_floor() -> None:
    """However many 429s arrive, the pace never drops below one request a minute."""
    clock = FakeClock(0.0)
    pacer = Pacer(None, clock=clock)
    for step in range(200):
        clock.now = step * 100.0
        pacer.on_rate_limited(0.0)
    assert pacer.rate == pytest.approx(1.0 / 60.0)


def test_fixed_pace_ignores_success() -> None:
    """A fixed pace stays fixed whatever happens."""
    pacer = Pacer(30, clock=FakeClock())
    for _ in range(10):
        pacer.on_success()
    assert pacer.rate == 0.5


@pytest.mark.anyio
async def test_wait_turn_sleeps_the_booked_delay() -> None:
    """wait_turn really waits: four starts at 1200/min take at least 0.15 s."""
    pacer = Pacer(1200)
    started = time.monotonic()
    async with anyio.create_task_group() as group:
        for _ in range(4):
            group.start_soon(pacer.wait_turn)
    assert time.monotonic() - started >= 0.14


@contextlib.asynccontextmanager
async def _queued(count: int) -> AsyncIterator[tuple[Pacer, list[anyio.CancelScope]]]:
    """A 60/min pacer whose slot now is taken, with ``count`` tasks waiting their turns after it
    (at +1, +2... s), each under a scope the test may cancel; the rest are cancelled at the end."""
    pacer = Pacer(60, clock=FakeClock())  # the clock stands still; the waits are real sleeps
    await pacer.wait_turn()
    scopes = [anyio.CancelScope() for _ in range(count)]

    async def wait(scope: anyio.CancelScope) -> None:
        with scope:
            await pacer.wait_turn()

    async with anyio.create_task_group() as group:
        for scope in scopes:
            group.start_soon(wait, scope)
        await anyio.sleep(0.05)  # every waiter has booked its slot and sleeps
        yield pacer, scopes
        group.cancel_scope.cancel()


@pytest.mark.anyio
@pytest.mark.parametrize("order", [pytest.param("first", id="earliest-first"),
                                   pytest.param("last", id="latest-first")])
async def test_waiters_cancelled_before_their_turn_give_their_slots_back(order: str) -> None:
    """Ten calls queued at 60/min and then cancelled (a batch broken off, a client closed) leave
    no phantom slots: the next call goes at once, not ten seconds later."""
    async with _queued(10) as (pacer, scopes):
        for scope in scopes if order == "first" else reversed(scopes):
            scope.cancel()
            await anyio.lowlevel.checkpoint()
        assert pacer.reserve(1000.0) == 1.0


@pytest.mark.anyio
async def test_a_slot_given_back_in_the_middle_is_taken_by_the_next_caller() -> None:
    """Cancelling one waiter among others frees its slot for the next caller, so the pace
    stays even: no gap where it was, no caller pushed past the end of the queue."""
    async with _queued(3) as (pacer, scopes):
        scopes[0].cancel()
        await anyio.lowlevel.checkpoint()
        assert pacer.reserve(1000.0) == 1.0  # the freed +1 s slot
        assert pacer.reserve(1000.0) == 4.0  # after the queue
