"""A shared pace for all requests of a client, and a shared slow-down on 429.

Concurrency (how many requests are in flight) and pace (how many start per
minute) are separate limits: the API limits images per minute, so a client
that only bounds concurrency still runs into 429s.

Two modes:

* fixed: ``requests_per_minute`` set; starts are spaced evenly at that rate.
* adaptive: no rate set; the pacer runs unthrottled until the first 429, then
  cuts the rate to a fraction of what was observed and grows it slowly on
  each success (AIMD), so a batch settles just under the server's real limit.

In both modes a 429 anywhere starts a shared cool-down that every later start
waits out (the server's Retry-After when it sent one).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

import anyio

__all__ = ["Pacer"]

logger = logging.getLogger("novita_async")

#: Rate cut on a 429 (multiplicative decrease).
_DECREASE = 0.85
#: Rate growth per success (multiplicative increase, deliberately slow).
_INCREASE = 0.01
#: Window over which the observed start rate is measured, seconds.
_OBSERVE_WINDOW = 5.0
#: Floor on the adaptive rate, requests per second (1 per minute).
_MIN_RATE = 1.0 / 60.0
#: Cap on the shared cool-down when the server sent no Retry-After, seconds.
_MAX_COOLDOWN = 30.0


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
        self._cooldown_until = 0.0
        self._streak = 0  # consecutive 429s, for the cool-down's backoff
        self._starts: collections.deque[float] = collections.deque(maxlen=4096)
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
        span = max(now - recent[0], 1e-3)
        return len(recent) / span

    def reserve(self, now: float) -> float:
        """Book the next start slot; return how long the caller must wait (pure)."""
        start = max(now, self._cooldown_until)
        if self._rate is not None:
            start = max(start, self._next_start)
            self._next_start = start + 1.0 / self._rate
        self._starts.append(start)
        return start - now

    async def wait_turn(self) -> None:
        """Wait until this task may start a request."""
        async with self._lock:
            # Slots are booked under the lock but slept outside it, so waiters
            # queue in order without serialising their sleeps.
            delay = self.reserve(self._clock())
        if delay > 0:
            await anyio.sleep(delay)

    def on_success(self) -> None:
        """A request succeeded: relax the adaptive pace a little."""
        self._streak = 0
        if not self.fixed and self._rate is not None:
            self._rate *= 1.0 + _INCREASE

    def on_rate_limited(self, retry_after: float | None) -> None:
        """A 429 arrived: slow everyone down."""
        now = self._clock()
        self.rate_limited += 1
        self._streak += 1
        if not self.fixed:
            observed = self._observed_rate(now)
            base = min(x for x in (self._rate, observed) if x is not None) if (
                self._rate is not None or observed is not None) else 1.0
            self._rate = max(_MIN_RATE, base * _DECREASE)
        if retry_after is not None:
            pause = retry_after
        else:
            interval = 1.0 / self._rate if self._rate else 0.5
            pause = min(_MAX_COOLDOWN, interval * (2 ** (self._streak - 1)))
        self._cooldown_until = max(self._cooldown_until, now + pause)
        logger.info(
            "rate limited (429): pausing new requests %.2f s; pace now %s/min",
            pause, f"{self._rate * 60:.1f}" if self._rate else "unlimited",
        )
