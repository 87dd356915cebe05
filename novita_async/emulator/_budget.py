"""A byte budget for the request bodies the emulator holds at once.

Reading a body, parsing its JSON and decoding its two images holds a few
times the body's size; with no bound, a handful of concurrent maximum-size
uploads took the emulator past a gigabyte.  Each request reserves its size
here before its body is read and gives it back once its images are no
longer needed.  A request that waits is not read from, so its client is
held back by TCP flow control rather than buffered.
"""

from __future__ import annotations

import asyncio
import collections
from types import TracebackType

from novita_async.emulator._stats import EmulatorStats

__all__ = ["BodyBudget", "Reservation"]


class BodyBudget:
    """At most ``capacity`` body bytes held at once, let in first come, first served.

    First come, first served, so a large body is not starved by a stream of
    small ones that would each fit.  A body larger than the whole budget is
    let in alone, once nothing else is held, rather than never.  When the
    budget has room and nobody waits, a reservation costs no await at all.

    Args:
        capacity: Bytes that may be held at once (positive).
        stats: Where the bytes held, their peak and the waits are counted.

    Example:
        >>> async with budget.reserve(len_of_body):  # doctest: +SKIP
        ...     body = await read_body()
    """

    def __init__(self, capacity: int, stats: EmulatorStats) -> None:
        self.capacity = capacity
        self.held = 0
        self._stats = stats
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def reserve(self, size: int) -> Reservation:
        """An async context manager holding ``size`` bytes of the budget while inside it."""
        return Reservation(self, size)

    def _fits(self, size: int) -> bool:
        # Alone, anything fits: a body over the whole budget must still be served.
        return self.held == 0 or self.held + size <= self.capacity

    def _take(self, size: int) -> None:
        self.held += size
        self._stats.note_body_bytes(self.held)

    async def acquire(self, size: int) -> None:
        """Wait until ``size`` bytes fit, then hold them (give them back with ``release``)."""
        if not self._waiters and self._fits(size):
            self._take(size)
            return
        self._stats.body_waits += 1
        entry = (size, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        except BaseException:
            # Cancelled (the client went away): if the bytes were granted in the
            # meantime they are ours to give back, else leave the queue.
            if entry[1].done() and not entry[1].cancelled():
                self.release(size)
            else:
                self._forget(entry)
            raise

    def release(self, size: int) -> None:
        """Give back ``size`` bytes and let in whoever now fits."""
        self.held -= size
        self._stats.note_body_bytes(self.held)
        self._wake()

    def _forget(self, entry: tuple[int, asyncio.Future[None]]) -> None:
        try:
            self._waiters.remove(entry)
        except ValueError:
            return
        # The head of the queue leaving may let in those behind it.
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            size, future = self._waiters[0]
            if future.done():  # cancelled, not yet forgotten by its task
                self._waiters.popleft()
                continue
            if not self._fits(size):
                return
            self._waiters.popleft()
            self._take(size)
            future.set_result(None)


class Reservation:
    """``size`` bytes of a ``BodyBudget``, held from ``async with`` until its end or ``release()``."""

    def __init__(self, budget: BodyBudget, size: int) -> None:
        self._budget = budget
        self.size = size
        self._held = False

    async def __aenter__(self) -> Reservation:
        await self._budget.acquire(self.size)
        self._held = True
        return self

    def release(self) -> None:
        """Give the bytes back now (idempotent)."""
        if self._held:
            self._held = False
            self._budget.release(self.size)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
