"""Retries of transient failures: tenacity, wrapped so none of it leaks.

Only errors marked ``retryable`` are retried (5xx, 408, 429, dropped
connections, timeouts, bodies cut short); everything else, local errors
included, surfaces at once.  The last real error is re-raised (never
``tenacity.RetryError``) with ``attempts`` set on it.

``RetryPolicy.total_timeout`` runs on a :class:`RetryDeadline`: from when the
first attempt starts sending (a call queued for a slot or for the pace has not
started yet), and it bounds every wait before a retry, the retry's wait for
the pace included (a 429 cool-down).  A retry's wait for a free slot is
``Timeout.pool``'s and stops the clock.

A server's ``Retry-After`` sets the wait before the retry on every status
retried (429, 5xx, 408), capped at ``RetryPolicy.max_retry_after``; only a
429 also slows the client's other requests (the pacer, in ``_client``).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
)

from novita_async._config import RetryPolicy
from novita_async._errors import APIStatusError, NovitaError

__all__ = ["RetryBudgetSpent", "RetryDeadline", "is_retryable", "retry_call", "wait_seconds"]

logger = logging.getLogger("novita_async")

T = TypeVar("T")

#: Jitter for backoff waits (any thread may draw from it; random() is atomic).
_JITTER = random.Random()


#: A retry's wait for the pace may end this long after the budget, seconds:
#: enough for a turn that is due at once (taking it passes through a lock).
_TURN_GRACE = 0.05


class RetryBudgetSpent(Exception):
    """A retry's wait for the pace ran past the retry deadline.

    Raised by an attempt, never to the caller: :func:`retry_call` raises the
    last real failure in its place.
    """


class RetryDeadline:
    """The clock of ``RetryPolicy.total_timeout``, started by the first attempt.

    The budget is for retrying a call, so its clock starts when the first
    attempt starts sending, and stops while a retry queues for a free slot:
    a call of a large ``gather`` queues behind the others, and must still get
    its retries.  Once started, it bounds the waits before each retry, the
    retry's wait for the pace included: a 429 cool-down must not stretch a
    20 s budget to 80 s.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._started: float | None = None

    def start(self) -> None:
        """Start the clock, if it has not started (an attempt is about to send)."""
        if self._started is None:
            self._started = time.monotonic()

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (a retry's wait for a free slot) out of the budget's clock."""
        if self._started is not None:
            self._started += seconds

    def left(self) -> float:
        """Seconds left of the budget (the clock starts now if it has not)."""
        self.start()
        assert self._started is not None
        return max(0.0, self.seconds - (time.monotonic() - self._started))

    def waits_end(self, attempt_number: int) -> float:
        """When attempt ``attempt_number``'s wait for the pace must end, on anyio's clock (inf: no bound).

        The first attempt's waits are not the retry budget's (its clock has
        not started); each retry's end with the budget, or a moment from now:
        a retry the loop let go may take a turn that is due at once.
        """
        if attempt_number <= 1:
            return math.inf
        return anyio.current_time() + max(self.left(), _TURN_GRACE)


def is_retryable(exc: BaseException) -> bool:
    """Whether the retry layer may try again after ``exc``."""
    return isinstance(exc, NovitaError) and exc.retryable


def wait_seconds(policy: RetryPolicy, exc: BaseException | None, retry_number: int, rand: float) -> float:
    """Seconds to wait before retry ``retry_number`` after ``exc`` (pure).

    A server's Retry-After wins (capped at ``policy.max_retry_after``),
    whatever the status (429, 5xx, 408); otherwise exponential backoff with
    jitter.
    """
    retry_after = exc.retry_after if isinstance(exc, APIStatusError) else None
    if retry_after is not None:
        return min(float(retry_after), policy.max_retry_after)
    return policy.backoff(retry_number, rand)


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, APIStatusError):
        return f"HTTP {exc.status}" + (f" {exc.reason}" if exc.reason else "")
    return type(exc).__name__


async def retry_call(
    attempt: Callable[[int], Awaitable[T]],
    policy: RetryPolicy,
    *,
    what: str = "request",
    rng: random.Random | None = None,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    deadline: RetryDeadline | None = None,
) -> tuple[T, int]:
    """Call ``attempt(n)`` for n = 1, 2, ... until it succeeds or may not retry.

    Args:
        deadline: The budget's clock, for an attempt that starts it itself
            when it starts sending; by default it starts now.  An attempt
            whose waits pass it raises :class:`RetryBudgetSpent`.

    Returns:
        The result and the number of attempts made.

    Raises:
        The last attempt's exception, with ``attempts`` set on NovitaErrors.
    """
    if deadline is None:
        deadline = RetryDeadline(policy.total_timeout)
        deadline.start()
    # The first attempt runs without tenacity: most calls succeed at once, and
    # a retrying object and its call state refer to each other, a cycle only
    # the cyclic garbage collector frees (~40 objects a call: 9% of a small
    # job's CPU at 128 in flight went to collecting them).  Tenacity takes
    # over from the first retryable failure, which it is shown first.
    try:
        return await attempt(1), 1
    except NovitaError as exc:
        exc.attempts = 1
        if not is_retryable(exc) or policy.max_attempts <= 1:
            raise
        first_failure = last_failure = exc

    # One shared generator: seeding a new Random() reads os.urandom and cost
    # ~50 us per call, on every job, for jitter that is rarely needed.
    chooser = rng or _JITTER

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        return wait_seconds(policy, exc, state.attempt_number, chooser.random())

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        sleep = state.next_action.sleep if state.next_action else 0.0
        logger.info(
            "%s failed with %s (attempt %d of %d); retrying in %.2f s",
            what, _describe(exc), state.attempt_number, policy.max_attempts, sleep,
        )

    def stop(state: RetryCallState) -> bool:
        # The deadline, not tenacity's own clock: it counts from the first
        # attempt's send and stops while a retry queues for a slot.
        return state.attempt_number >= policy.max_attempts or state.upcoming_sleep >= deadline.left()

    retrying = AsyncRetrying(
        stop=stop,
        wait=wait,
        retry=retry_if_exception(is_retryable),
        reraise=True,
        sleep=sleep,
        before_sleep=before_sleep,
    )
    number = 1
    try:
        async for state in retrying:
            with state:
                number = state.retry_state.attempt_number
                if number == 1:
                    raise first_failure
                try:
                    result = await attempt(number)
                except NovitaError as exc:
                    last_failure = exc
                    raise
            if not state.retry_state.outcome or not state.retry_state.outcome.failed:
                return result, number
    except NovitaError as exc:
        exc.attempts = number
        raise
    except RetryBudgetSpent:
        pass
    # Retry ``number`` never started: its waits ran out the budget.  Raised
    # outside the handler so the failure keeps its own cause and context.
    logger.info("%s: retry budget (%g s) spent waiting to retry; giving up after %d attempts",
                what, policy.total_timeout, number - 1)
    last_failure.attempts = number - 1
    raise last_failure
