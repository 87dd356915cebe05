"""The client on an aiohttp session of the caller's, and in the event loop it belongs to."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import gzip
import json
import threading
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import novita_async as na
from novita_async.emulator import Emulator, EmulatorConfig

from .conftest import FAST_RETRY, flat_image, make_image, serving

pytestmark = pytest.mark.anyio

FACE = make_image(seed=1)
TARGET = make_image(size=(96, 80), seed=2)
RESULT = make_image(size=(32, 32), seed=3)
KEY = "sk_test_sessions"

#: aiohttp 3.12 lets an absolute URL override a session's base_url; before, it fails an assertion.
NEW_AIOHTTP = tuple(int(part) for part in aiohttp.__version__.split(".")[:2]) >= (3, 12)
#: aiohttp 3.14 refuses a request with both an Authorization header and a .netrc login (a ValueError).
AIOHTTP_REFUSES_NETRC_BESIDE_AUTHORIZATION = tuple(int(part) for part in aiohttp.__version__.split(".")[:2]) >= (3, 14)


async def _raise_all(response: aiohttp.ClientResponse) -> None:
    """A session-wide raise_for_status callable, as aiohttp allows: raise on any error status."""
    response.raise_for_status()


def _json_response(status: int, doc: dict[str, Any], *, gzipped: bool) -> web.Response:
    """A JSON answer, gzip-encoded on the wire when asked (as a proxy in front of the API may send)."""
    body = json.dumps(doc).encode()
    headers = {"Content-Type": "application/json"}
    if gzipped:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    return web.Response(status=status, body=body, headers=headers)


def _merge_handler(
    seen: list[web.Request], *, gzipped: bool = False, delay: float = 0.0
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A stand-in for the API: checks the key and the body's type like the service, answers a merged image."""

    async def handler(request: web.Request) -> web.Response:
        seen.append(request)
        await request.read()
        await asyncio.sleep(delay)
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return _json_response(403, {"code": 403, "reason": "INVALID_API_KEY", "message": "invalid API key",
                                        "metadata": {}}, gzipped=gzipped)
        if request.content_type != "application/json":
            return _json_response(400, {"code": 400, "reason": "INVALID_REQUEST_BODY",
                                        "message": f"not JSON: {request.content_type}", "metadata": {}},
                                  gzipped=gzipped)
        return _json_response(200, {"image_file": base64.b64encode(RESULT).decode(), "image_type": "png"},
                              gzipped=gzipped)

    return handler


@pytest.mark.parametrize(
    "raise_for_status",
    [pytest.param(True, id="true"), pytest.param(_raise_all, id="callable")],
)
@pytest.mark.parametrize(
    ("key", "image", "error"),
    [
        pytest.param("sk_not_this_one", TARGET, na.AuthenticationError, id="wrong-key"),
        pytest.param(None, flat_image(), na.NoFaceDetectedError, id="no-face"),
    ],
)
async def test_a_raise_for_status_session_still_gives_typed_errors(
    emulator: Emulator, raise_for_status: Any, key: str | None, image: bytes, error: type[na.APIStatusError]
) -> None:
    """On a session made with raise_for_status, an error status is its typed error at once, not a retried
    connection error."""
    async with (
        aiohttp.ClientSession(raise_for_status=raise_for_status) as session,
        na.NovitaClient(api_key=key or emulator.api_key, base_url=emulator.url, retry=FAST_RETRY,
                        session=session) as client,
    ):
        with pytest.raises(error) as raised:
            await client.merge_face(FACE, image)
    assert raised.value.reason is not None  # the body was read: the API's reason is kept
    assert raised.value.attempts == 1
    assert emulator.stats.requests == 1


async def test_a_batch_on_a_raise_for_status_session_stops_at_a_wrong_key(emulator: Emulator) -> None:
    """A batch on such a session stops after the first 403, as on the client's own session."""
    jobs = [na.MergeJob(FACE, TARGET, id=f"j{i}") for i in range(6)]
    async with (
        aiohttp.ClientSession(raise_for_status=True) as session,
        na.NovitaClient(api_key="sk_not_this_one", base_url=emulator.url, retry=FAST_RETRY,
                        session=session, max_concurrency=1) as client,
    ):
        results = [result async for result in client.batch(jobs)]
    assert [r.status for r in results] == ["failed"] + ["not_attempted"] * 5
    assert isinstance(results[0].error, na.AuthenticationError)
    assert emulator.stats.requests == 1


@pytest.mark.parametrize(
    ("key", "expect"),
    [
        pytest.param(KEY, None, id="success"),
        pytest.param("sk_not_this_one", na.AuthenticationError, id="error-body"),
    ],
)
async def test_a_gzip_answer_on_a_session_without_auto_decompress(
    key: str, expect: type[na.NovitaError] | None
) -> None:
    """A gzip-encoded answer is decoded even on a session made with auto_decompress=False."""
    seen: list[web.Request] = []
    async with (
        serving(_merge_handler(seen, gzipped=True)) as url,
        aiohttp.ClientSession(auto_decompress=False) as session,
        na.NovitaClient(api_key=key, base_url=url, retry=FAST_RETRY, session=session) as client,
    ):
        if expect is None:
            result = await client.merge_face(FACE, TARGET)
            assert result.data == RESULT
        else:
            with pytest.raises(expect) as raised:
                await client.merge_face(FACE, TARGET)
            assert raised.value.attempts == 1
    assert len(seen) == 1


async def test_a_session_with_every_setting_that_could_change_a_request() -> None:
    """The session's raise_for_status, auto_decompress, short timeout and own Authorization and
    Content-Type headers all leave the client's request as it would be on its own session."""
    seen: list[web.Request] = []
    async with (
        serving(_merge_handler(seen, gzipped=True, delay=0.3)) as url,
        aiohttp.ClientSession(
            raise_for_status=True, auto_decompress=False, timeout=aiohttp.ClientTimeout(total=0.05),
            headers={"Authorization": "Bearer sk_someone_else", "Content-Type": "text/plain"},
        ) as session,
        na.NovitaClient(api_key=KEY, base_url=url, retry=FAST_RETRY, session=session,
                        timeout=na.Timeout(total=10.0)) as client,
    ):
        result = await client.merge_face(FACE, TARGET)
    assert result.data == RESULT
    assert result.attempts == 1
    assert len(seen) == 1
    assert seen[0].headers.getall("Authorization") == [f"Bearer {KEY}"]


async def test_a_session_with_auth_is_refused() -> None:
    """A session with auth= (which aiohttp will not send beside the API key) is refused when the client is made."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # aiohttp 3.14 deprecates BasicAuth and auth=
        session = aiohttp.ClientSession(auth=aiohttp.BasicAuth("user", "secret"))
    async with session:
        with pytest.raises(na.ConfigurationError, match="auth="):
            na.NovitaClient(api_key=KEY, base_url="http://127.0.0.1:9", session=session)


@pytest.mark.skipif(not NEW_AIOHTTP, reason="aiohttp < 3.12 cannot send an absolute URL on a base_url session")
async def test_a_session_with_a_base_url_sends_to_the_client_base_url(emulator: Emulator) -> None:
    """The client's base_url, not the session's, says where requests go."""
    seen: list[web.Request] = []
    async with (
        serving(_merge_handler(seen)) as elsewhere,
        aiohttp.ClientSession(base_url=elsewhere) as session,
        na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=FAST_RETRY,
                        session=session) as client,
    ):
        result = await client.merge_face(FACE, TARGET)
    assert result.attempts == 1
    assert emulator.stats.requests == 1
    assert seen == []


@pytest.mark.skipif(NEW_AIOHTTP, reason="aiohttp >= 3.12 sends an absolute URL on a base_url session")
async def test_a_session_with_a_base_url_is_refused_on_an_old_aiohttp() -> None:
    """On an aiohttp that would fail every request with an AssertionError, the client refuses such a session."""
    async with aiohttp.ClientSession(base_url="http://127.0.0.1:9") as session:
        with pytest.raises(na.ConfigurationError, match="base_url"):
            na.NovitaClient(api_key=KEY, base_url="http://127.0.0.1:9", session=session)


# -- .netrc ------------------------------------------------------------------------

#: Proxy variables a trust_env session would obey: cleared so requests go straight to the emulator.
_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home folder of the test's own, with no .netrc yet, NETRC and proxies unset."""
    folder = tmp_path / "home"
    folder.mkdir()
    monkeypatch.setenv("HOME", str(folder))
    monkeypatch.delenv("NETRC", raising=False)
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return folder


def _write_netrc(path: Path, machine: str) -> Path:
    """A .netrc with one entry (``machine`` is a host, or ``default``), private as ftp and curl want it."""
    line = "default" if machine == "default" else f"machine {machine}"
    path.write_text(f"{line}\n  login someone\n  password netrc-secret\n")
    path.chmod(0o600)
    return path


@contextlib.asynccontextmanager
async def _client_on_trust_env_session(emulator: Emulator) -> AsyncIterator[na.NovitaClient]:
    """A client for the emulator on a caller's session made with trust_env=True (it reads .netrc)."""
    async with (
        aiohttp.ClientSession(trust_env=True) as session,
        na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=FAST_RETRY,
                        session=session) as client,
    ):
        yield client


@pytest.mark.parametrize(
    ("machine", "named", "says"),
    [
        pytest.param("127.0.0.1", False, "has an entry for '127.0.0.1'", id="entry-for-the-host"),
        pytest.param("default", False, "has a default entry", id="default-entry"),
        pytest.param("127.0.0.1", True, "has an entry for '127.0.0.1'", id="NETRC-variable"),
    ],
)
async def test_a_trust_env_session_with_netrc_credentials_for_the_host(
    emulator: Emulator, home: Path, monkeypatch: pytest.MonkeyPatch, machine: str, named: bool, says: str
) -> None:
    """A trust_env session whose .netrc has a login for the API's host is a ConfigurationError naming the
    entry and the fixes, not aiohttp's bare ValueError (nor, before aiohttp 3.14, a 401); nothing is sent."""
    if named:
        netrc_file = _write_netrc(home / "elsewhere.netrc", machine)
        monkeypatch.setenv("NETRC", str(netrc_file))
    else:
        netrc_file = _write_netrc(home / ".netrc", machine)
    async with _client_on_trust_env_session(emulator) as client:
        with pytest.raises(na.ConfigurationError) as raised:
            await client.merge_face(FACE, TARGET)
    message = str(raised.value)
    assert f"{netrc_file} {says}" in message
    assert "trust_env=False" in message and "NETRC" in message
    assert "netrc-secret" not in message
    assert raised.value.attempts == 1
    assert emulator.stats.requests == 0


async def test_a_batch_on_a_session_refused_for_netrc_stops_before_its_first_job(
    emulator: Emulator, home: Path, tmp_path: Path
) -> None:
    """A batch on such a session raises the ConfigurationError once, before any job: no job is
    sent or recorded (each of 20 jobs failed with it in turn before)."""
    _write_netrc(home / ".netrc", "127.0.0.1")
    ledger = tmp_path / "out" / "ledger.jsonl"
    jobs = [na.MergeJob(FACE, TARGET, id=f"job{i}") for i in range(20)]
    async with _client_on_trust_env_session(emulator) as client:
        with pytest.raises(na.ConfigurationError, match="trust_env=False"):
            async for _ in client.batch(jobs, output_dir=tmp_path / "out", ledger=ledger):
                pass
    assert emulator.stats.requests == 0
    assert not ledger.exists()


async def test_a_trust_env_session_with_netrc_credentials_for_other_hosts_works(
    emulator: Emulator, home: Path
) -> None:
    """A .netrc with logins for other hosts only leaves a trust_env session usable, with the API key sent."""
    _write_netrc(home / ".netrc", "files.example.org")
    async with _client_on_trust_env_session(emulator) as client:
        result = await client.merge_face(FACE, TARGET)
    assert result.attempts == 1
    assert emulator.stats.requests == 1


@pytest.mark.skipif(not AIOHTTP_REFUSES_NETRC_BESIDE_AUTHORIZATION,
                    reason="aiohttp < 3.14 sends the .netrc login in place of the key (a 401), unseen by the client")
async def test_a_netrc_entry_written_after_the_client_was_made(emulator: Emulator, home: Path) -> None:
    """An entry that appears once the client exists: aiohttp's refusal becomes the same ConfigurationError."""
    async with _client_on_trust_env_session(emulator) as client:
        _write_netrc(home / ".netrc", "127.0.0.1")
        with pytest.raises(na.ConfigurationError, match=r"trust_env=True and a \.netrc file") as raised:
            await client.merge_face(FACE, TARGET)
    assert raised.value.attempts == 1
    assert emulator.stats.requests == 0


async def test_a_base_url_with_a_password(emulator: Emulator) -> None:
    """A user:password in the base URL (which aiohttp will not send beside the key) is a ConfigurationError
    saying so, not a bare ValueError; nothing is sent."""
    url = emulator.url.replace("http://", "http://someone:secret@")
    async with na.NovitaClient(api_key=emulator.api_key, base_url=url, retry=FAST_RETRY) as client:
        with pytest.raises(na.ConfigurationError, match="user:password@"):
            await client.merge_face(FACE, TARGET)
    assert emulator.stats.requests == 0


# -- event loops -----------------------------------------------------------------


@contextlib.contextmanager
def emulator_in_a_thread() -> Iterator[Emulator]:
    """An emulator serving from its own thread and event loop, for tests that run several loops."""
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        holder["loop"], holder["stop"] = asyncio.get_running_loop(), stop
        async with Emulator(EmulatorConfig(engine="composite")) as emu:
            holder["emulator"] = emu
            started.set()
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(10), "the emulator did not start"
    try:
        yield holder["emulator"]
    finally:
        holder["loop"].call_soon_threadsafe(holder["stop"].set)
        thread.join(10)


@contextlib.contextmanager
def dropped_quietly() -> Iterator[None]:
    """Let the garbage collector free what a finished event loop left open, without ResourceWarnings."""
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


def test_a_client_reused_in_a_second_event_loop() -> None:
    """A second asyncio.run() with the same client is a ClientClosedError naming the fix, before anything is
    sent; aclose() there does not fail."""
    with emulator_in_a_thread() as emu, dropped_quietly():
        client = na.NovitaClient(api_key=emu.api_key, base_url=emu.url, retry=FAST_RETRY)
        first = asyncio.run(client.merge_face(FACE, TARGET))
        assert first.attempts == 1
        with pytest.raises(na.ClientClosedError, match="one client per event loop") as raised:
            asyncio.run(client.merge_face(FACE, TARGET))
        assert "has ended" in str(raised.value)
        with pytest.raises(na.ClientClosedError, match="one client per event loop"):
            asyncio.run(client.__aenter__())
        assert emu.stats.requests == 1
        asyncio.run(client.aclose())
        assert client.closed
        del client


def test_a_caller_session_from_another_event_loop() -> None:
    """A session made in a loop that has ended cannot serve a client in a new one: ClientClosedError, unsent."""
    with emulator_in_a_thread() as emu, dropped_quietly():

        async def make_session() -> aiohttp.ClientSession:
            return aiohttp.ClientSession()

        session = asyncio.run(make_session())

        async def merge(session: aiohttp.ClientSession) -> na.MergeFaceResult:
            async with na.NovitaClient(api_key=emu.api_key, base_url=emu.url, retry=FAST_RETRY,
                                       session=session) as client:
                return await client.merge_face(FACE, TARGET)

        with pytest.raises(na.ClientClosedError, match="one client per event loop"):
            asyncio.run(merge(session))
        assert emu.stats.requests == 0
        del session
