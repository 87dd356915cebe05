"""Run the emulator on a loopback port, in-process (tests) or as a command."""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

from aiohttp import web

from novita_async.emulator._app import STATS, create_app, engine_name
from novita_async.emulator._config import DEFAULT_API_KEY, EmulatorConfig
from novita_async.emulator._stats import EmulatorStats

__all__ = ["Emulator", "base_url"]

logger = logging.getLogger("novita_async.emulator")


def base_url(host: str, port: int) -> str:
    """``http://host:port``, with an IPv6 address in brackets as URLs need (RFC 3986).

    ``http://::1:8787`` cannot be told apart from an address ending in ``:8787``;
    clients, ours included, refuse it.
    """
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


class Emulator:
    """The emulator served on ``host:port`` (port 0 picks a free one).

    Args:
        config: Behaviour (latency, faults, rate limit, keys).
        host: Interface to bind; loopback unless you really mean otherwise
            (``"::1"`` for IPv6: ``url`` puts it in brackets).
        port: TCP port; 0 picks a free one (read it back from ``url``).

    Example:
        >>> async with Emulator(EmulatorConfig(latency=0.1)) as emu:  # doctest: +SKIP
        ...     async with NovitaClient(api_key=emu.api_key, base_url=emu.url) as client:
        ...         await client.merge_face("a.png", "b.png")
    """

    def __init__(self, config: EmulatorConfig | None = None, *, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.config = config or EmulatorConfig()
        self.host = host
        self.port = port
        self.app = create_app(self.config)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def stats(self) -> EmulatorStats:
        """Live counters (requests, statuses, faults, peak concurrency...)."""
        return self.app[STATS]

    @property
    def url(self) -> str:
        """Base URL to give the client (an IPv6 host in brackets: ``http://[::1]:8787``)."""
        return base_url(self.host, self.port)

    @property
    def api_key(self) -> str:
        """A key the emulator accepts."""
        return self.config.api_keys[0] if self.config.api_keys else DEFAULT_API_KEY

    @property
    def engine(self) -> str:
        """The merge step in use: ``composite`` or ``face/<detector>``."""
        return engine_name(self.app)

    async def start(self) -> Emulator:
        """Start serving; afterwards ``url`` has the real port."""
        # handler_cancellation: a request whose client gave up (timeout) stops
        # counting as in flight at once, as on a real server behind a proxy.
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                     keepalive_timeout=self.config.keepalive_timeout)
        await self._runner.setup()
        await self.resume()
        return self

    async def pause(self) -> None:
        """Stop listening (the server is 'gone'); ``resume`` brings it back on the same port."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        # Closing the listening socket leaves kept-alive connections open, and a
        # client would go on being served over them: drop them too, busy ones
        # included, as a crashed server would.  (Server.pre_shutdown is no use:
        # it leaves idle connections open with no task reading them.)
        server = self._runner.server if self._runner is not None else None
        if server is not None:
            for connection in server.connections:
                connection.force_close()
            # Let the transports and cancelled handlers finish closing.
            await asyncio.sleep(0)

    async def resume(self) -> None:
        """Listen again on the same port."""
        assert self._runner is not None, "call start() first"
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()
        if self.port == 0:
            # An asyncio Server (the AbstractServer aiohttp's annotation names has no sockets).
            sockets = getattr(self._site._server, "sockets", None)
            assert sockets, "the site is not listening"
            self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop serving and release everything."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None

    async def __aenter__(self) -> Emulator:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
