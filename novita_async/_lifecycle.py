"""A client's life: its aiohttp session, the event loop it belongs to, and closing.

A client is unopened until its first use, open after it, and closed by
``aclose()``.  Its connections belong to the event loop of that first use (or
to the loop the caller's session was made in), so a client used from another
loop is refused with a message that says how to fix it.  Every wait of a call
runs inside :attr:`ClientLifecycle.closing`, a :class:`SendGate` that
``aclose()`` closes, so closing ends those waits at once.
"""

from __future__ import annotations

import asyncio
import enum
import logging

import aiohttp

from novita_async._errors import ClientClosedError
from novita_async._gate import SendGate
from novita_async._transport import refuse_netrc_credentials
from novita_async._version import __version__

__all__ = ["ClientLifecycle"]

logger = logging.getLogger("novita_async")


class _State(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


class ClientLifecycle:
    """The session a client sends with, the loop it belongs to, and whether it is closed.

    Args:
        session: The caller's session (the client then does not close it), or
            None to create one on first use.
        max_concurrency: The connection limit of a session created here.
    """

    def __init__(self, session: aiohttp.ClientSession | None, max_concurrency: int) -> None:
        self._session = session
        self._owns_session = session is None
        self._max_concurrency = max_concurrency
        # The event loop the client's connections belong to: a caller's session
        # is bound to the loop it was made in (no public accessor for it), the
        # client's own to the loop of its first use.
        self._loop: asyncio.AbstractEventLoop | None = getattr(session, "_loop", None)
        self._state = _State.UNOPENED
        # Every wait of a call (a request slot, a pacing turn, a retry's back-off)
        # runs inside this gate, so aclose() ends them at once: at 10 requests a
        # minute, calls queued for their turn would otherwise hold on for minutes
        # after the client closed, only to raise ClientClosedError then.
        self.closing = SendGate(self._closed_check)

    @property
    def state(self) -> str:
        """``"unopened"``, ``"open"`` or ``"closed"``."""
        return self._state.value

    @property
    def closed(self) -> bool:
        """Whether the client has been closed."""
        return self._state is _State.CLOSED

    def session(self) -> aiohttp.ClientSession:
        """The session to send with, created on first use; the client is open afterwards.

        Raises:
            ClientClosedError: the client is closed, or belongs to another event loop.
        """
        if self._state is _State.CLOSED:
            raise self.closed_error()
        other_loop = self._other_loop()
        if other_loop is not None:
            raise self._wrong_loop_error(other_loop)
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_concurrency, enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers={"User-Agent": f"novita_async/{__version__}"},
                # Larger socket reads: fewer, bigger chunks for the streaming decoder.
                read_bufsize=256 * 1024,
                raise_for_status=False,
            )
        self._state = _State.OPEN
        return self._session

    def refuse_unusable_session(self, url: str) -> None:
        """Raise now what every request to ``url`` on the caller's session would raise.

        Raises:
            ConfigurationError: the session would send ``.netrc`` credentials for the API's host.
        """
        if self._session is not None and not self._owns_session:
            refuse_netrc_credentials(self._session, url)

    def check_open(self, session: aiohttp.ClientSession) -> None:
        """Raise ClientClosedError if the client, or the session it uses, is closed."""
        if self._state is _State.CLOSED or session.closed:
            raise self.closed_error()

    def closed_error(self) -> ClientClosedError:
        """The error for a call on a closed client (or on a closed caller's session)."""
        if self._state is _State.CLOSED:
            return ClientClosedError(
                "this NovitaClient is closed; create a new one (or use it inside 'async with')"
            )
        return ClientClosedError(
            "the aiohttp session given to this NovitaClient was closed; keep it open while "
            "the client is in use"
        )

    async def close(self) -> None:
        """Close: end every wait, then close the session if the client created it. Idempotent.

        Raises:
            ClientClosedError: called in another event loop than the client's
                while that loop still runs (close it from its own loop).
        """
        if self._state is _State.CLOSED:
            return
        other_loop = self._other_loop()
        if other_loop is not None and not other_loop.is_closed():
            raise self._wrong_loop_error(other_loop)
        self._state = _State.CLOSED
        self.closing.close()
        if self._session is not None and self._owns_session:
            if other_loop is None:
                await self._session.close()
            else:
                # Closing its connections needs their loop, which has ended
                # (aiohttp: "Event loop is closed"); the garbage collector frees them.
                logger.warning("NovitaClient.aclose() in a new event loop: the connections of the "
                               "loop the client was used in (now closed) cannot be closed here")

    def _closed_check(self) -> ClientClosedError | None:
        """The error for a call that must not go on (the client is closed), or None."""
        return self.closed_error() if self._state is _State.CLOSED else None

    def _other_loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the client belongs to if it is not the running one (None: same, or no loop runs)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return None  # batch() called outside a coroutine: the calls it makes check again
        if self._loop is None:
            self._loop = running
        return self._loop if self._loop is not running else None

    @staticmethod
    def _wrong_loop_error(loop: asyncio.AbstractEventLoop) -> ClientClosedError:
        state = "has ended" if loop.is_closed() else "is another one, still running"
        return ClientClosedError(
            f"this NovitaClient belongs to the event loop it was first used in, which {state}: "
            "a client's connections cannot move to another loop (a second asyncio.run()?). "
            "Create the client inside the coroutine that uses it "
            "('async with NovitaClient(...) as client:'), one client per event loop"
        )
