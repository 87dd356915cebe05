"""Shared fixtures: a real emulator on a loopback port, clients, test images."""

from __future__ import annotations

import base64
import contextlib
import io
import ipaddress
import random
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any

import anyio.to_thread
import pytest
from aiohttp import web
from PIL import Image, ImageDraw

import novita_async as na
from novita_async._sources import ImageSource, _source_sync
from novita_async.emulator import Emulator, EmulatorConfig

#: Retries that never sleep for real: tests assert on behaviour, not on waits.
FAST_RETRY = na.RetryPolicy(max_attempts=5, initial_wait=0.0, max_wait=0.0, max_retry_after=0.05)


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Strip the user's NOVITA_* variables so no test can pick up a real key or endpoint."""
    monkeypatch.delenv("NOVITA_API_KEY", raising=False)
    monkeypatch.delenv("NOVITA_BASE_URL", raising=False)


def _is_loopback(host: object) -> bool:
    """Whether a host name or address is this machine's loopback."""
    if isinstance(host, bytes):
        host = host.decode()
    if host is None or host in ("localhost", "ip6-localhost"):
        return True  # None: a server asking for its own bind addresses
    try:
        return ipaddress.ip_address(str(host).strip("[]").split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def _loopback_only(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse any name lookup or TCP/UDP connect beyond loopback: tests never reach the real API.

    Tests construct clients with the public base URL to check defaults and
    warnings; this makes sure none of them can send it a byte. (Ray's tests
    are left out: Ray's own processes talk over the node's address.)
    """
    if request.node.get_closest_marker("ray") is not None:
        return
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is_loopback(host):
            raise OSError(f"tests reach only loopback: refused to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            raise OSError(f"tests reach only loopback: refused to connect to {address!r}")
        real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio (aiohttp needs it)."""
    return "asyncio"


def noise_png(seed: int, size: int = 48) -> bytes:
    """A PNG of random pixels: unique per seed (so each job has its own emulator key)."""
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_image(
    size: tuple[int, int] = (128, 128),
    color: tuple[int, int, int] = (200, 120, 80),
    fmt: str = "PNG",
    seed: int = 0,
) -> bytes:
    """A small non-flat image (the emulator's composite treats flat images as faceless)."""
    image = Image.new("RGB", size, color)
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse((w // 4, h // 5, 3 * w // 4, 4 * h // 5), fill=(color[2], color[0], color[1] + seed % 50))
    draw.line((0, 0, w, h), fill=(seed % 255, 30, 30), width=3)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


async def source_from_input(value: object, input_name: str) -> ImageSource:
    """The source the client makes of an input (stat, seek or encode), in a worker thread as it does."""
    return await anyio.to_thread.run_sync(_source_sync, value, input_name)


def split(body: bytes, sizes: Iterable[int]) -> Iterator[bytes]:
    """Cut ``body`` into consecutive chunks whose sizes cycle through ``sizes``."""
    sizes = list(sizes)
    position, index = 0, 0
    while position < len(body):
        size = sizes[index % len(sizes)]
        yield body[position : position + size]
        position += size
        index += 1


@contextlib.asynccontextmanager
async def serving(
    app_or_handler: web.Application | Callable[[web.Request], Awaitable[web.StreamResponse]],
    *, ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[str]:
    """Serve an aiohttp app, or one handler for the merge-face route, on 127.0.0.1; yield its base URL."""
    if isinstance(app_or_handler, web.Application):
        app = app_or_handler
    else:
        app = web.Application()
        app.router.add_post("/v3/merge-face", app_or_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        scheme = "https" if ssl_context is not None else "http"
        yield f"{scheme}://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def request_json(face: bytes, image: bytes, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A merge-face request body as the API documents it, built with the stdlib."""
    doc: dict[str, Any] = {
        "face_image_file": base64.b64encode(face).decode(),
        "image_file": base64.b64encode(image).decode(),
    }
    if extra:
        doc["extra"] = extra
    return doc


def flat_image(size: tuple[int, int] = (64, 64), fmt: str = "PNG") -> bytes:
    """A single-colour image: the composite emulator answers IMAGE_NO_FACE_DETECTED."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 90, 90)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def emulator_factory() -> Iterator[Callable[..., Emulator]]:
    """Make emulators with a given config; each test starts its own with `async with`."""

    def factory(**kwargs: object) -> Emulator:
        kwargs.setdefault("engine", "composite")
        return Emulator(EmulatorConfig(**kwargs))  # type: ignore[arg-type]  # kwargs are EmulatorConfig's

    yield factory


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    """A plain emulator (composite merge, no faults) on 127.0.0.1:<free port>."""
    async with Emulator(EmulatorConfig(engine="composite")) as emu:
        yield emu


@pytest.fixture
async def client(emulator: Emulator) -> AsyncIterator[na.NovitaClient]:
    """A client pointed at the emulator, with retries that do not sleep."""
    async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=FAST_RETRY) as c:
        yield c
