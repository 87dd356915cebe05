"""A shared pace for all requests of a client, and a shared slow-down on 429.

Concurrency (how many requests are in flight) and pace (how many start per
minute) are separate limits: the API limits images per minute, so a client
that only bounds concurrency still runs into 429s.

Two modes:

* fixed: ``requests_per_minute`` set; starts are spaced evenly at that rate.
* adaptive: no rate set; the pacer runs unthrottled until the first 429, then
  cuts the rate to a fraction of what was observed and grows it slowly on
  each success (AIMD), so a batch settles just under the server's real limit.
  It grows only while it is what holds starts back: a pace above what
  concurrency lets through would otherwise drift ever higher unchecked.

In both modes a 429 anywhere starts a shared cool-down that every later start
waits out (the server's Retry-After when it sent one); tasks already waiting
for a slot booked at the old pace book again.

:class:`PacerProtocol` is what a client needs from a pacer, so a pace can be
shared beyond one process (``novita_async.ray`` keeps one in a Ray actor).
"""

from __future__ import annotations

import bisect
import collections
import logging
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import anyio

__all__ = ["Pacer", "PacerProtocol"]

logger = logging.getLogger("novita_async")

#: Rate cut on a 429 (multiplicative decrease).  The pace saws between this
#: share of the server's limit and just over it: 0.9 averages ~95%.
_DECREASE = 0.9
#: Rate growth per success (multiplicative increase, deliberately slow): ~20
#: successes per cut-and-regrow cycle, so about one request in 20 meets a 429.
_INCREASE = 0.005
#: Window over which the observed start and success rates are measured, seconds.
_OBSERVE_WINDOW = 5.0
#: Successes (and seconds they span) needed before their rate is trusted, and
#: how far back they count: long enough to see five at a 10-per-minute limit.
_MIN_SUCCESSES, _MIN_SPAN, _SUCCESS_WINDOW = 5, 0.5, 60.0
#: A 429 with the pace above what got through by more than this factor cuts
#: from what got through (the pace drifted up while few requests were sent).
#: Not less: successes run below the pace whenever some requests fail (5xx) and
#: lag it while it grows; cutting from them on every 429 spirals the pace down.
_DRIFT = 2.0
#: After a cut, 429s within one interval of the new pace (at most this many
#: seconds) belong to the same overshoot: they neither cut again nor lengthen
#: the cool-down.
_HOLD = 1.0
#: The pace binds (and may grow) only while starts keep up with it: at least
#: this share of it over the last window of starts.  Two callers booking within
#: one interval are held back even when concurrency sets the rate; without this
#: the pace grew 0.5% on every success and drifted from 12/s to 13,656/s in 55 s.
_BINDING_SHARE = 0.8
#: Shortest window over which the start rate is measured, seconds (and at
#: least this many intervals of the pace, so a window sees several starts).
_START_WINDOW, _START_WINDOW_INTERVALS = 1.0, 4.0
#: Floor on the adaptive rate, requests per second (1 per minute).
_MIN_RATE = 1.0 / 60.0
#: Cap on the shared cool-down when the server sent no Retry-After, seconds.
_MAX_COOLDOWN = 30.0


@runtime_checkable
class PacerProtocol(Protocol):
    """What :class:`~novita_async.NovitaClient` asks of a pacer (``pacer=``).

    Implement it to share one pace between clients in several processes or
    machines; :class:`Pacer` is the in-process implementation.  The client
    calls :meth:`wait_turn` before every attempt (retries included), then
    exactly one of :meth:`on_success` or :meth:`on_rate_limited` when the
    attempt got an answer.
    """

    @property
    def fixed(self) -> bool:
        """Whether the pace is fixed (True) or adapts to 429s (False)."""
        ...

    @property
    def rate(self) -> float | None:
        """The current pace in requests per second, as far as known (None: unthrottled)."""
        ...

    async def wait_turn(self) -> None:
        """Return when the caller may start a request."""
        ...

    def on_success(self) -> None:
        """An attempt succeeded (must not block)."""
        ...

    def on_rate_limited(self, retry_after: float | None) -> None:
        """An attempt got a 429; ``retry_after`` is the server's hint in seconds (must not block)."""
        ...


class Pacer:
    """Spaces request starts and shares 429 back-pressure across tasks.

    Args:
        requests_per_minute: A fixed pace, or None for the adaptive one.
        clock: Monotonic clock in seconds (injectable for tests).

    Example:
        >>> pacer = Pacer(requests_per_minute=600)  # one start every 0.1 s
        >>> pacer.rate
        10.0
    """

    def __init__(
        self,
        requests_per_minute: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if requests_per_minute is not None and not requests_per_minute > 0:
            raise ValueError(f"requests_per_minute must be > 0, got {requests_per_minute!r}")
        self.fixed = requests_per_minute is not None
        self._rate: float | None = requests_per_minute / 60.0 if requests_per_minute else None
        self._clock = clock
        self._next_start = 0.0
        # Booked slots given back by waiters that were cancelled, as (start, end),
        # for the next bookings to take (see _give_back).
        self._returned: list[tuple[float, float]] = []
        self._cooldown_until = 0.0
        self._streak = 0  # consecutive 429s, for the cool-down's backoff
        self._starts: collections.deque[float] = collections.deque(maxlen=4096)
        self._successes: collections.deque[float] = collections.deque(maxlen=1024)
        self._last_cut: float | None = None
        # When the schedule last held a caller back, and the rate of starts over
        # the last full window: the pace only grows while it is what limits the
        # starts (see _pace_binds).
        self._held_at: float | None = None
        self._window_began = 0.0
        self._window_starts = 0
        self._window_paused = 0.0  # seconds of the window spent in cool-downs
        self._start_rate: float | None = None
        self._guessed = False  # the pace was cut from a guess, not from successes
        # Bumped when a 429 changes the pace or the cool-down: a task that
        # booked its slot before then books again instead of going at the old pace.
        self._epoch = 0
        self._lock = anyio.Lock()
        self.rate_limited = 0

    @property
    def rate(self) -> float | None:
        """Current pace in requests per second (None: unthrottled)."""
        return self._rate

    def _observed_rate(self, now: float) -> float | None:
        recent = [t for t in self._starts if now - t <= _OBSERVE_WINDOW]
        if len(recent) < 2:
            return None
        # n starts span n - 1 intervals; counting n over-estimates the rate
        # (by 25% for 5 starts), and the cut would then land above it.
        span = max(now - recent[0], 1e-3)
        return (len(recent) - 1) / span

    def _success_rate(self, now: float) -> float | None:
        recent = [t for t in self._successes if now - t <= _SUCCESS_WINDOW]
        if len(recent) < _MIN_SUCCESSES or recent[-1] - recent[0] < _MIN_SPAN:
            return None
        return (len(recent) - 1) / (recent[-1] - recent[0])

    def reserve(self, now: float) -> float:
        """Book the next start slot; return how long the caller must wait (pure)."""
        return self._book(now)[0] - now

    def _book(self, now: float) -> tuple[float, float]:
        """Book the next start slot: ``(start, end)``, where the next slot may begin at ``end``."""
        start = max(now, self._cooldown_until)
        if self._rate is None:
            self._starts.append(start)
            return start, start
        while self._returned and self._returned[0][0] < start:
            self._returned.pop(0)  # its time has passed (or falls in a cool-down)
        if self._returned:
            slot = self._returned.pop(0)
        else:
            if self._next_start > start:
                self._held_at = now
            slot = (max(start, self._next_start), max(start, self._next_start) + 1.0 / self._rate)
            self._next_start = slot[1]
        self._starts.append(slot[0])
        if not self.fixed:  # only the adaptive pace asks whether it binds
            self._count_start(slot[0], self._rate)
        return slot

    def _count_start(self, at: float, rate: float) -> None:
        """Count a start in the current window; a full window's count becomes the start rate."""
        span = at - self._window_began
        if span >= max(_START_WINDOW, _START_WINDOW_INTERVALS / rate):
            # Cool-downs are not a slow start rate: their time is left out.
            active = span - self._window_paused
            self._start_rate = self._window_starts / active if active > 0 else None
            self._window_began, self._window_starts, self._window_paused = at, 0, 0.0
        self._window_starts += 1

    def _give_back(self, slot: tuple[float, float]) -> None:
        """A waiter cancelled before its turn: free its slot for the next booking.

        Without this, a batch broken off with 30 calls queued at 6 a minute
        would leave the next call waiting five minutes behind slots nobody uses.
        """
        if self._rate is None:
            return
        bisect.insort(self._returned, slot)
        # Slots at the end of the schedule shorten it rather than wait to be taken.
        while self._returned and self._returned[-1][1] == self._next_start:
            self._next_start = self._returned.pop()[0]

    async def wait_turn(self) -> None:
        """Wait until this task may start a request."""
        while True:
            async with self._lock:
                # Slots are booked under the lock but slept outside it, so waiters
                # queue in order without serialising their sleeps.
                epoch = self._epoch
                now = self._clock()
                slot = self._book(now)
            if slot[0] > now:
                try:
                    await anyio.sleep(slot[0] - now)
                except BaseException:
                    if self._epoch == epoch:  # else a 429 has redrawn the schedule
                        self._give_back(slot)
                    raise
            if self._epoch == epoch:
                return
            # A 429 arrived while this task slept: its slot was booked at the
            # old pace and before the cool-down; book again.

    def on_success(self) -> None:
        """A request succeeded: relax the adaptive pace a little, if it is what holds starts back."""
        self._streak = 0
        now = self._clock()
        self._successes.append(now)
        if not self.fixed and self._rate is not None and self._pace_binds(now):
            self._rate *= 1.0 + _INCREASE

    def _pace_binds(self, now: float) -> bool:
        """Whether the schedule held a caller back lately.

        When something else limits the starts (concurrency, a slow server, a
        slow job stream), a success says nothing about a faster pace: growing
        on it would let the pace drift far above what is sent, and the first
        429 after the drift would meet a pace the server never allowed.  So
        the schedule must have held someone back lately, and the starts of
        the last window must have kept up with the pace.
        """
        if self._held_at is None or self._rate is None or self._start_rate is None:
            return False
        return (now - self._held_at <= max(_HOLD, 2.0 / self._rate)
                and self._start_rate >= _BINDING_SHARE * self._rate)

    def _cut_base(self, now: float) -> float:
        """The rate a 429 cuts from: the pace, unless the server let far fewer through."""
        succeeded = self._success_rate(now)
        if succeeded is not None and (self._rate is None or self._guessed or succeeded * _DRIFT < self._rate):
            # What got through is the best measure of the limit: use it for the
            # first cut, to replace a guess (the burst of an unthrottled start
            # overstates the limit many times), and when the pace drifted far
            # above it.
            self._guessed = False
            return succeeded
        if self._rate is None:
            # Unthrottled, and too few successes to trust: a guess from what was sent.
            self._guessed = True
            observed = self._observed_rate(now)
            return observed if observed is not None else 1.0
        return self._rate

    def on_rate_limited(self, retry_after: float | None) -> None:
        """A 429 arrived: slow everyone down."""
        now = self._clock()
        self.rate_limited += 1
        hold = min(_HOLD, 1.0 / self._rate) if self._rate else 0.0
        if self._last_cut is not None and now - self._last_cut < hold:
            # Another answer from the same overshoot: the cut and the pause
            # already made account for it.
            return
        self._last_cut = now
        self._streak += 1
        if not self.fixed:
            self._rate = max(_MIN_RATE, self._cut_base(now) * _DECREASE)
        if retry_after is not None:
            pause = retry_after
        else:
            interval = 1.0 / self._rate if self._rate else 0.5
            pause = min(_MAX_COOLDOWN, interval * (2 ** (self._streak - 1)))
        until = max(self._cooldown_until, now + pause)
        self._window_paused += until - max(self._cooldown_until, now)
        self._cooldown_until = until
        # Restart the schedule from the cool-down, at the new pace.
        self._next_start = now
        self._returned.clear()
        self._epoch += 1
        logger.info(
            "rate limited (429): pausing new requests %.2f s; pace now %s/min",
            pause, f"{self._rate * 60:.1f}" if self._rate else "unlimited",
        )
