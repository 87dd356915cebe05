"""Security: the key never leaks, TLS stays verified, plain HTTP warns, the emulator is local and careful.

The leak tests run real batches at DEBUG with a known key against servers that
succeed, fail (500, 403, timeouts) and misbehave (echo the key back), then
search everything the library wrote or raised for the key.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import io
import logging
import os
import pickle
import shutil
import socket
import ssl
import subprocess
import sys
import traceback
import warnings
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from tqdm import tqdm

import novita_async as na
from novita_async._cli import build_parser
from novita_async.emulator import Emulator, EmulatorConfig, Faults

from .conftest import make_image, noise_png, serving

pytestmark = pytest.mark.anyio

#: A key that cannot occur by accident; no piece of it may appear anywhere.
KEY = "sk_live_7f3e9a1c_LEAK_CANARY_d4b2e8f6a0c3"
_CANARY = "LEAK_CANARY"
_FAST = na.RetryPolicy(max_attempts=2, initial_wait=0.0, max_wait=0.0, max_retry_after=0.0)


def exception_texts(error: BaseException | None) -> Iterator[str]:
    """str, repr, traceback and pickle of an error and of every error chained to it."""
    if error is None:
        return
    yield "".join(traceback.format_exception(error))
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield str(current)
        yield repr(current)
        yield repr(vars(current))
        with_body = getattr(current, "body", b"")
        if isinstance(with_body, bytes):
            yield with_body.decode("utf-8", "replace")
        current = current.__cause__ or current.__context__
    # Some third-party causes do not pickle; the error's own text is checked above.
    with contextlib.suppress(pickle.PicklingError, TypeError, AttributeError):
        yield pickle.dumps(error).decode("latin-1")


def assert_no_key(texts: list[str]) -> None:
    """Neither the key nor its distinctive middle appears in any text."""
    for text in texts:
        assert KEY not in text, text[:2000]
        assert _CANARY not in text, text[:2000]
        assert KEY.encode().hex() not in text


def echo_handler() -> Callable[[web.Request], Awaitable[web.Response]]:
    """A misbehaving server's handler that echoes the Authorization header in its error bodies."""

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        auth = request.headers.get("Authorization", "")
        body = {"code": 500, "reason": "TASK_FAILED", "message": f"could not run task for {auth}",
                "metadata": {"authorization": auth, "key": auth.removeprefix("Bearer ")}}
        return web.json_response(body, status=500)

    return handler


def _pairs(folder: Path, count: int) -> list[na.MergeJob]:
    folder.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i in range(count):
        face, image = folder / f"face{i}.png", folder / f"image{i}.png"
        face.write_bytes(noise_png(100 + 2 * i))
        image.write_bytes(noise_png(101 + 2 * i))
        jobs.append(na.MergeJob(str(face), str(image)))
    return jobs


async def test_key_never_leaks_from_a_batch_at_debug(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Successes, 500s, timeouts, a 403 and a key-echoing server: the key is in no log, error, ledger or bar."""
    caplog.set_level(logging.DEBUG)  # every logger: ours, aiohttp's, asyncio's
    texts: list[str] = []
    faults = Faults(rates={"500": 0.3, "slow": 0.15, "502_html": 0.1}, seed=7, slow_seconds=5.0)
    bar_output = io.StringIO()
    jobs = _pairs(tmp_path / "in", 12)
    async with Emulator(EmulatorConfig(engine="composite", api_keys=(KEY,), faults=faults)) as good, \
            Emulator(EmulatorConfig(engine="composite", api_keys=("sk_some_other_key",))) as wrong:
        async with na.NovitaClient(api_key=KEY, base_url=good.url, retry=_FAST, timeout=0.5) as client:
            texts.append(repr(client))
            with tqdm(total=len(jobs), file=bar_output, mininterval=0) as bar:
                async for result in client.batch(jobs, output_dir=tmp_path / "out", ledger=tmp_path / "a.jsonl",
                                                 progress=bar):
                    texts += [str(result), repr(result), *exception_texts(result.error)]
        assert good.stats.statuses.get(200, 0) > 0 and good.stats.faults  # both outcomes happened
        async with na.NovitaClient(api_key=KEY, base_url=wrong.url, retry=_FAST) as client:
            results = [r async for r in client.batch(jobs, output_dir=tmp_path / "out2",
                                                      ledger=tmp_path / "b.jsonl", progress=False)]
            assert any(isinstance(r.error, na.AuthenticationError) for r in results)
            for result in results:
                texts += [str(result), repr(result), *exception_texts(result.error)]
            texts.append(results[-1].error_reason or "")
    async with serving(echo_handler()) as echo_url:
        async with na.NovitaClient(api_key=KEY, base_url=echo_url, retry=_FAST) as client:
            with pytest.raises(na.ServerError) as caught:
                await client.merge_face(make_image(seed=1), make_image(seed=2))
            texts += [*exception_texts(caught.value), str(caught.value.metadata)]
            assert caught.value.reason == "TASK_FAILED" and "<redacted>" in caught.value.message
        # The echo server really does echo the key.
        async with aiohttp.ClientSession() as session, session.post(
            f"{echo_url}/v3/merge-face", headers={"Authorization": f"Bearer {KEY}"}
        ) as response:
            assert KEY in await response.text()
    texts += [caplog.text, bar_output.getvalue(), (tmp_path / "a.jsonl").read_text(),
              (tmp_path / "b.jsonl").read_text()]
    texts += [record.getMessage() for record in caplog.records]
    assert "merge-face" in caplog.text  # DEBUG logging really was on
    assert bar_output.getvalue()  # and the bar really wrote
    assert_no_key(texts)


async def test_html_error_body_echoing_the_key_is_redacted() -> None:
    """A proxy's HTML error page that contains the key is kept only with the key blanked out."""

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=502, content_type="text/html",
                            text=f"<html>upstream refused {request.headers.get('Authorization')}</html>")

    async with serving(handler) as url, na.NovitaClient(api_key=KEY, base_url=url, retry=_FAST) as client:
        with pytest.raises(na.ServerError) as caught:
            await client.merge_face(make_image(seed=1), make_image(seed=2))
    assert caught.value.status == 502
    assert b"<redacted>" in caught.value.body
    assert_no_key(list(exception_texts(caught.value)))


async def test_cli_at_debug_never_prints_the_key(tmp_path: Path) -> None:
    """`novita-async -vv batch` (key from the environment, then from --api-key) prints no trace of the key."""
    jobs = _pairs(tmp_path / "in", 6)
    manifest = tmp_path / "in" / "manifest.csv"
    manifest.write_text("face_image,image\n" + "".join(
        f"{Path(str(j.face_image)).name},{Path(str(j.image)).name}\n" for j in jobs))
    faults = Faults(rates={"500": 0.3, "503": 0.2}, seed=3)
    outputs = []
    async with Emulator(EmulatorConfig(engine="composite", api_keys=(KEY,), faults=faults)) as good, \
            Emulator(EmulatorConfig(engine="composite", api_keys=("sk_some_other_key",))) as wrong:
        for index, (url, key_by) in enumerate([(good.url, "env"), (wrong.url, "env"), (good.url, "option")]):
            env = {k: v for k, v in os.environ.items() if not k.startswith("NOVITA_")}
            command = [sys.executable, "-m", "novita_async", "-vv", "batch", str(manifest),
                       "-o", str(tmp_path / f"out{index}"), "--base-url", url, "--max-attempts", "2"]
            if key_by == "env":
                env["NOVITA_API_KEY"] = KEY
            else:
                command += ["--api-key", KEY]
            done = await anyio.run_process(command, env=env, check=False)
            outputs += [done.stdout.decode(), done.stderr.decode(),
                        (tmp_path / f"out{index}" / "ledger.jsonl").read_text()]
            assert done.returncode in (0, 1), done.stderr.decode()[-2000:]
    assert "DEBUG" in outputs[1] and "INVALID_API_KEY" in outputs[4]
    assert_no_key(outputs)


async def test_payloads_are_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    """DEBUG logs of a merge hold no base64 of the inputs or of the result."""
    caplog.set_level(logging.DEBUG)
    face, image = noise_png(1, size=96), noise_png(2, size=96)
    async with Emulator(EmulatorConfig(engine="composite")) as emulator, na.NovitaClient(
        api_key=emulator.api_key, base_url=emulator.url, retry=_FAST
    ) as client:
        result = await client.merge_face(face, image)
    assert result.data is not None
    assert "merge-face" in caplog.text
    for payload in (face, image, result.data):
        encoded = base64.b64encode(payload).decode()
        for start in range(0, len(encoded) - 40, max(1, len(encoded) // 20)):
            assert encoded[start : start + 40] not in caplog.text


# -- TLS ------------------------------------------------------------------------------


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (made with openssl; skipped when it is missing)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed and the cryptography package is not used here")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key


async def test_tls_verification_is_on_by_default(self_signed: tuple[Path, Path]) -> None:
    """An https server with a self-signed certificate is refused: a connection error about verification."""
    cert, key = self_signed
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async with Emulator(EmulatorConfig(engine="composite")) as emulator, \
            serving(emulator.app, ssl_context=context) as url:
        async with na.NovitaClient(api_key=emulator.api_key, base_url=url, retry=_FAST) as client:
            with pytest.raises(na.APIConnectionError) as caught:
                await client.merge_face(make_image(seed=1), make_image(seed=2))
        assert "certificate verify failed" in str(caught.value).lower()
        assert caught.value.attempts == 1  # a bad certificate is not retried
        requests_refused = emulator.stats.requests
        # The same server, trusted explicitly, works: only verification stood in the way.
        trusted = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusted)) as session, \
                na.NovitaClient(api_key=emulator.api_key, base_url=url, session=session) as client:
            result = await client.merge_face(make_image(seed=1), make_image(seed=2))
        assert result.data is not None
    assert requests_refused == 0


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://api.example.com", id="public-host"),
        pytest.param("http://example.com", id="http-host"),
        pytest.param("http://10.0.0.5:8080", id="private-ip"),
        pytest.param("http://0.0.0.0:8787", id="any-address"),
        pytest.param("http://localhost.example.com", id="localhost-lookalike"),
        pytest.param("http://127.0.0.1.nip.io", id="loopback-lookalike"),
    ],
)
async def test_plain_http_to_a_remote_host_warns(url: str) -> None:
    """A plain-HTTP base URL that is not loopback warns that the key would travel unencrypted."""
    with pytest.warns(UserWarning, match="plain HTTP.*unencrypted") as record:
        client = na.NovitaClient(api_key=KEY, base_url=url)
    await client.aclose()
    assert record[0].filename == __file__  # points at the caller's line, not the library's


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://127.0.0.1:8787", id="ipv4-loopback"),
        pytest.param("http://127.8.9.10", id="ipv4-loopback-range"),
        pytest.param("http://localhost:8787", id="localhost"),
        pytest.param("http://[::1]:8787", id="ipv6-loopback"),
        pytest.param("https://api.example.com", id="https"),
        pytest.param("https://example.com", id="https-host"),
    ],
)
async def test_https_or_loopback_does_not_warn(url: str) -> None:
    """HTTPS anywhere, or plain HTTP to this machine, gives no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        client = na.NovitaClient(api_key=KEY, base_url=url)
    await client.aclose()


# -- the emulator ------------------------------------------------------------------------


async def test_emulator_binds_loopback_by_default() -> None:
    """The emulator and `novita-async serve` listen on 127.0.0.1 unless told otherwise."""
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    async with Emulator(EmulatorConfig(engine="composite")) as emulator:
        assert emulator.host == "127.0.0.1"
        server: Any = emulator._site._server if emulator._site is not None else None
        assert server is not None
        assert {sock.getsockname()[0] for sock in server.sockets} == {"127.0.0.1"}


@pytest.mark.parametrize(
    ("given", "status", "reason"),
    [
        pytest.param(KEY, 200, None, id="right-key"),
        pytest.param(KEY[:-1] + ("0" if KEY[-1] != "0" else "1"), 403, "INVALID_API_KEY", id="same-length"),
        pytest.param(KEY[:-1], 403, "INVALID_API_KEY", id="prefix"),
        pytest.param(KEY + "0", 403, "INVALID_API_KEY", id="longer"),
        pytest.param("sk_x", 403, "INVALID_API_KEY", id="short"),
        pytest.param("", 400, "MISSING_API_KEY", id="empty"),
    ],
)
async def test_emulator_compares_keys_in_constant_time(
    given: str, status: int, reason: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wrong keys of any length are 403, the right one passes, and every check goes through hmac.compare_digest."""
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    async with Emulator(EmulatorConfig(engine="composite", api_keys=(KEY,))) as emulator, \
            aiohttp.ClientSession() as session:
        body = {"face_image_file": base64.b64encode(make_image(seed=1)).decode(),
                "image_file": base64.b64encode(make_image(seed=2)).decode()}
        async with session.post(f"{emulator.url}/v3/merge-face", json=body,
                                headers={"Authorization": f"Bearer {given}"}) as response:
            assert response.status == status
            answer = await response.json()
    if reason is not None:
        assert answer["reason"] == reason
    if given:
        assert calls and all(b == len(KEY) for _, b in calls)


def test_the_suite_reaches_only_loopback() -> None:
    """The suite's guard (conftest) refuses lookups and connects beyond loopback: no test reaches a real API."""
    with pytest.raises(OSError, match="only loopback"):
        socket.getaddrinfo("api.example.com", 443)
    with socket.socket() as sock, pytest.raises(OSError, match="only loopback"):
        sock.connect(("192.0.2.1", 443))  # TEST-NET-1: never routed
    assert socket.getaddrinfo("127.0.0.1", 80)  # loopback still resolves
