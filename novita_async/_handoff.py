"""The batch's hand-off of results to its consumer: nothing is lost to a cancelled wait.

anyio's zero-buffer memory stream pushes an item into the waiting receiver;
if the receiver's wait is then cancelled (``asyncio.wait_for(anext(run), t)``,
``asyncio.timeout``), the item is gone.  Here the consumer takes an item
itself, with no ``await`` between taking and returning it, so a cancelled
wait leaves the item for the next call.

An item can carry a callback for when the consumer is done with it: when it
comes back for the next one, or closes the channel without an error
(at-least-once delivery, for records that must only be written then).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio

__all__ = ["Handoff"]

T = TypeVar("T")


class _Parcel(Generic[T]):
    """An item on its way, and what its sender waits for."""

    __slots__ = ("item", "on_done", "received", "taken")

    def __init__(self, item: T, on_done: Callable[[], None] | None) -> None:
        self.item = item
        self.on_done = on_done
        self.received = False
        self.taken = anyio.Event()


class Handoff(Generic[T]):
    """A rendezvous channel: :meth:`send` returns once the consumer has taken the item."""

    def __init__(self) -> None:
        self._waiting: collections.deque[_Parcel[T]] = collections.deque()
        self._ready = anyio.Event()
        self._in_hand: _Parcel[T] | None = None  # taken, and the consumer not done with it yet
        self._settled = anyio.Event()
        self._ended = False  # the sender closed: no more items
        self._gone = False  # the consumer closed: nobody will take another

    # -- sender side -------------------------------------------------------
    async def send(self, item: T, *, on_done: Callable[[], None] | None = None) -> None:
        """Hand ``item`` over; return once the consumer has taken it.

        ``on_done`` runs (in the consumer's task) once the consumer is done
        with the item; never if it stops with an error first.

        Raises:
            anyio.BrokenResourceError: The consumer closed before taking it.
        """
        if self._gone:
            raise anyio.BrokenResourceError
        parcel = _Parcel(item, on_done)
        self._waiting.append(parcel)
        self._ready.set()
        try:
            await parcel.taken.wait()
        finally:
            if not parcel.received and parcel in self._waiting:  # cancelled before it was taken
                self._waiting.remove(parcel)
        if not parcel.received:
            raise anyio.BrokenResourceError

    def end(self) -> None:
        """No more items: the consumer's next :meth:`receive` after those waiting ends the stream."""
        self._ended = True
        self._ready.set()

    async def settled(self) -> None:
        """Wait until the consumer is done with every item it took, or gone."""
        if self._in_hand is not None and not self._gone:
            self._settled = anyio.Event()
            await self._settled.wait()

    # -- consumer side -----------------------------------------------------
    async def receive(self) -> T:
        """The next item; the consumer is then done with the one it received before.

        Raises:
            anyio.EndOfStream: The sender ended and every item was taken.
            anyio.ClosedResourceError: This side was closed.
        """
        self._finish_in_hand()
        while not self._waiting:
            if self._gone:
                raise anyio.ClosedResourceError
            if self._ended:
                raise anyio.EndOfStream
            self._ready = anyio.Event()
            await self._ready.wait()
        # Taken with no await before the return: a cancelled wait loses nothing.
        parcel = self._waiting.popleft()
        parcel.received = True
        parcel.taken.set()
        self._in_hand = parcel
        return parcel.item

    def close(self, *, done: bool) -> None:
        """Stop receiving; ``done``: the consumer finished with the last item it took (no error)."""
        if done:
            self._finish_in_hand()
        self._in_hand = None
        self._gone = True
        self._ready.set()
        self._settled.set()
        for parcel in self._waiting:
            parcel.taken.set()  # wake its sender, which sees it was not received
        self._waiting.clear()

    def _finish_in_hand(self) -> None:
        parcel, self._in_hand = self._in_hand, None
        if parcel is not None:
            if parcel.on_done is not None:
                parcel.on_done()
            self._settled.set()
