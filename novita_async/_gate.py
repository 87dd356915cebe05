"""The send gate: how a batch that is stopping keeps its queued work from going out.

A batch sets one gate for the jobs it runs (through a context variable the
client reads).  The client asks it just before each attempt is sent, and
waits for its pacing turn and its retry back-off inside the gate's
:meth:`SendGate.waiting` scope, so closing the gate ends those waits at once:
with a pace of 10 requests a minute, 32 jobs queued for their turn would
otherwise keep a graceful stop waiting for over three minutes.

Each client keeps one more gate of its own, which ``aclose()`` closes: its
calls' waits (for a request slot, a pacing turn, a retry's back-off) end at
once rather than when their turn comes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator

import anyio

__all__ = ["SendGate"]


class SendGate:
    """Says whether an attempt may be sent, and interrupts waits when it closes.

    Args:
        check: Returns the exception to raise instead of sending, or None.
            Closing the gate is expected to make it return one.
    """

    def __init__(self, check: Callable[[], BaseException | None]) -> None:
        self._check = check
        self._waiting: set[anyio.CancelScope] = set()

    def check(self) -> BaseException | None:
        """The exception to raise instead of sending now, or None to send."""
        return self._check()

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """A wait that ends early, without an error, when the gate closes."""
        scope = anyio.CancelScope()
        self._waiting.add(scope)
        try:
            with scope:
                yield
        finally:
            self._waiting.discard(scope)

    async def sleep(self, seconds: float) -> None:
        """Sleep (a retry's back-off) with the gate open; a gate that closes ends it early."""
        with self.waiting():
            await anyio.sleep(seconds)

    async def admit(self, wait: Callable[[], Awaitable[None]]) -> None:
        """Wait (for a pacing turn) with the gate open, then let the attempt go or raise why not.

        Raises:
            The gate's exception, checked before and after the wait: a gate
            that closes meanwhile ends the wait at once.
        """
        if (stop := self.check()) is None:
            with self.waiting():
                await wait()
            stop = self.check()
        if stop is not None:
            raise stop

    def close(self) -> None:
        """End every wait in progress (call from the event loop's thread)."""
        for scope in list(self._waiting):
            scope.cancel()
