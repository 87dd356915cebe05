"""The emulator produces what the contract says may happen, and says what it does (QA 3)."""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from PIL import Image

import novita_async as na
from novita_async.emulator import Emulator, EmulatorConfig, Faults
from novita_async.emulator._cli import add_serve_options, config_from_args

from .conftest import make_image, request_json

pytestmark = pytest.mark.anyio

FACE = make_image(seed=1)
TARGET = make_image(size=(96, 80), seed=2)
PATH = "/v3/merge-face"
ONE_TRY = na.RetryPolicy(max_attempts=1)


def serve_config(*argv: str) -> EmulatorConfig:
    """The config ``novita-async serve ARGV`` would run with."""
    parser = argparse.ArgumentParser()
    add_serve_options(parser)
    try:
        args = parser.parse_args(["--engine", "composite", *argv])
    except SystemExit:  # a plain failure: SystemExit would unwind an async test's event loop
        pytest.fail(f"serve refused {argv}")
    return config_from_args(args)


def has_ipv6_loopback() -> bool:
    """Whether this machine can listen on ::1."""
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this machine")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A bare aiohttp session (no client code in between)."""
    async with aiohttp.ClientSession() as session:
        yield session


async def post(http: aiohttp.ClientSession, emu: Emulator, body: Any, key: str | None = None) -> tuple[int, Any]:
    """POST ``body`` (a dict as JSON, or bytes) to the merge route: (status, parsed JSON answer)."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key or emu.api_key}"}
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    # A BytesIO: aiohttp warns that a large raw bytes body may block the loop.
    async with http.post(emu.url + PATH, data=io.BytesIO(data), headers=headers) as response:
        return response.status, json.loads(await response.read())


def client_for(emu: Emulator, **kwargs: Any) -> na.NovitaClient:
    """A client of ``emu`` (one attempt, unless told otherwise)."""
    kwargs.setdefault("retry", ONE_TRY)
    return na.NovitaClient(api_key=emu.api_key, base_url=emu.url, **kwargs)


def serve_process(*options: str) -> subprocess.Popen[str]:
    """``novita-async serve --port 0 OPTIONS`` as a process (stop it with :func:`stop`)."""
    argv = [sys.executable, "-m", "novita_async", "serve", "--port", "0", "--engine", "composite", *options]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(process: subprocess.Popen[str]) -> str:
    """Ctrl-C the server; its stderr."""
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=10)
    return err


# -- 1. IPv6 hosts in brackets --------------------------------------------------------------------


@needs_ipv6
async def test_emulator_url_brackets_an_ipv6_host() -> None:
    """Emulator(host="::1").url is http://[::1]:PORT, and the client merges through it."""
    async with Emulator(EmulatorConfig(engine="composite"), host="::1") as emu:
        assert emu.url == f"http://[::1]:{emu.port}"
        async with client_for(emu) as client:
            result = await client.merge_face(FACE, TARGET)
    assert result.to_pil().size == (96, 80)


@needs_ipv6
def test_serve_prints_a_usable_ipv6_url() -> None:
    """`serve --host ::1` prints http://[::1]:PORT first, a URL that reaches it."""
    process = serve_process("--host", "::1")
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://[::1]:"), url
        with urllib.request.urlopen(f"{url}/_emulator/health", timeout=5) as response:
            assert json.load(response)["ok"] is True
    finally:
        stop(process)


# -- 2. one DEBUG line per request -----------------------------------------------------------------


async def test_debug_logs_one_line_per_request_without_key_or_body(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """At DEBUG each request is one line (method, path, status, fault, time); never the key or body."""
    caplog.set_level(logging.DEBUG, logger="novita_async.emulator")
    config = EmulatorConfig(engine="composite", faults=Faults(fail_first=1, fail_first_kind="503"))
    body = request_json(FACE, TARGET)
    async with Emulator(config) as emu:
        assert (await post(http, emu, body))[0] == 503  # the job's first attempt: the fault
        assert (await post(http, emu, body))[0] == 200
        assert (await post(http, emu, body, key="sk_not_the_key"))[0] == 403
        async with http.get(emu.url + "/v3/nope") as response:
            assert response.status == 404
    lines = [r.getMessage() for r in caplog.records if r.name == "novita_async.emulator"]
    assert len(lines) == 4, lines
    assert lines[0].startswith("POST /v3/merge-face -> 503 fault=503 in ")
    assert lines[1].startswith("POST /v3/merge-face -> 200 in ")
    assert lines[2].startswith("POST /v3/merge-face -> 403 in ")
    assert lines[3].startswith("GET /v3/nope -> 404 in ")
    assert all(line.endswith(" s") for line in lines)
    text = caplog.text
    assert emu.api_key not in text and "sk_not_the_key" not in text
    assert body["face_image_file"][:40] not in text


def test_serve_dash_vv_logs_each_request() -> None:
    """`novita-async -vv serve` writes a line per request to stderr (and no Pillow chunk chatter)."""
    process = serve_process("-vv")
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        request = urllib.request.Request(
            url + PATH, data=json.dumps(request_json(FACE, TARGET)).encode(),
            headers={"Content-Type": "application/json", "Authorization": "Bearer sk_emulator_local"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
    finally:
        err = stop(process)
    assert "DEBUG novita_async.emulator: POST /v3/merge-face -> 200 in " in err
    assert "sk_emulator_local\n" in err  # the banner shows the key once...
    assert err.count("sk_emulator_local") == 1  # ...and no request line does
    assert "STREAM b'IHDR'" not in err


# -- 3. drip and slow outlast the client's defaults; drip never passes for a merge --------------


def test_slow_and_drip_defaults_outlast_the_clients_default_timeouts() -> None:
    """With defaults, `slow` outlasts Timeout.total and `drip`'s gaps outlast Timeout.read
    (in Faults and in `serve`'s flags alike), so each is the timeout its name promises."""
    client = na.Timeout()
    served = serve_config().faults
    for faults in (Faults(), served):
        assert faults.slow_seconds > client.total
        assert faults.drip_interval > client.read


def test_serve_sets_the_drip_interval() -> None:
    """`serve --drip-interval S` reaches the config."""
    assert serve_config("--drip-interval", "0.25").faults.drip_interval == 0.25


async def test_a_patient_client_gets_the_real_merge_from_drip() -> None:
    """A drip waited out delivers the real merge (the target's size), never a stand-in image."""
    faults = Faults(fail_first=1, fail_first_kind="drip", drip_interval=0.0)
    async with Emulator(EmulatorConfig(engine="composite", faults=faults)) as emu, client_for(emu) as client:
        dripped = await client.merge_face(FACE, TARGET)
        plain = await client.merge_face(FACE, TARGET)
        assert emu.stats.faults == {"drip": 1}
    assert dripped.to_pil().size == (96, 80)
    assert dripped.data == plain.data


async def test_drip_is_caught_by_the_read_timeout() -> None:
    """A drip whose gaps outlast Timeout.read is APITimeoutError at the read timeout, not the total."""
    config = serve_config("--fault", "drip=1", "--drip-interval", "5")
    async with Emulator(config) as emu, client_for(emu, timeout=na.Timeout(total=30, read=0.3)) as client:
        started = time.monotonic()
        with pytest.raises(na.APITimeoutError):
            await client.merge_face(FACE, TARGET)
        assert time.monotonic() - started < 3


# -- 4. Retry-After as a date, metadata, the other 500 reasons --------------------------------------


async def test_retry_after_as_an_http_date_reaches_the_client() -> None:
    """The `429_retry_date` fault sends Retry-After as an HTTP date; the client reads it as seconds."""
    faults = Faults(fail_first=1, fail_first_kind="429_retry_date")
    async with Emulator(EmulatorConfig(engine="composite", faults=faults)) as emu, client_for(emu) as client:
        with pytest.raises(na.RateLimitError) as caught:
            await client.merge_face(FACE, TARGET)
    assert caught.value.retry_after is not None
    assert 0 < caught.value.retry_after <= 2.1


@pytest.mark.parametrize("kind", ["billing_failed", "get_result_failed"])
async def test_the_other_documented_500_reasons(kind: str) -> None:
    """BILLING_FAILED and GET_RESULT_FAILED come as 500s in the error shape; the client retries them."""
    faults = Faults(fail_first=1, fail_first_kind=kind)
    async with Emulator(EmulatorConfig(engine="composite", faults=faults)) as emu:
        async with client_for(emu) as client:
            with pytest.raises(na.ServerError) as caught:
                await client.merge_face(FACE, TARGET)
        assert (caught.value.status, caught.value.reason) == (500, kind.upper())
        assert caught.value.retryable
        retry = na.RetryPolicy(max_attempts=2, initial_wait=0.0, max_wait=0.0)
        async with client_for(emu, retry=retry) as client:
            assert (await client.merge_face(make_image(seed=9), TARGET)).attempts == 2


async def test_a_rate_limit_429_carries_metadata() -> None:
    """A rate-limit 429 carries a non-empty string map of the limit; the client keeps it."""
    config = EmulatorConfig(engine="composite", rate_limit_rpm=60, rate_limit_burst=1)
    async with Emulator(config) as emu, client_for(emu, requests_per_minute=6000) as client:
        await client.merge_face(FACE, TARGET)
        with pytest.raises(na.RateLimitError) as caught:
            await client.merge_face(FACE, TARGET)
    assert caught.value.metadata == {"limit": "60/min", "kind": "bucket", "burst": "1"}


# -- 5. "30 MB" read as 30,000,000 bytes --------------------------------------------------------


def png_of_size(size: int) -> bytes:
    """A valid PNG of exactly ``size`` bytes, padded with a private ancillary chunk decoders skip."""
    png = make_image(size=(64, 64), seed=3)
    pad = size - len(png) - 12
    chunk = struct.pack(">I", pad) + b"paDd" + b"\0" * pad
    chunk += struct.pack(">I", zlib.crc32(b"\0" * pad, zlib.crc32(b"paDd")))
    return png[:-12] + chunk + png[-12:]  # before IEND (the last 12 bytes)


def body_with_face_of_size(size: int) -> bytes:
    """A request body whose face image is a valid PNG of ``size`` bytes (kept out of test frames:
    a failure report would try to show it)."""
    image = png_of_size(size)
    assert len(image) == size
    with Image.open(io.BytesIO(image)) as check:
        check.load()  # a real image, not just bytes
    return (b'{"face_image_file":"' + base64.b64encode(image) + b'","image_file":"'
            + base64.b64encode(TARGET) + b'"}')


@pytest.mark.parametrize(
    ("unit", "size", "status"),
    [
        pytest.param("mb", 30_000_000, 200, id="mb-at-the-limit"),
        pytest.param("mb", 30_000_001, 400, id="mb-one-over"),
        pytest.param("mib", 30_000_001, 200, id="mib-default-takes-it"),
    ],
)
async def test_size_limit_unit(http: aiohttp.ClientSession, unit: str, size: int, status: int) -> None:
    """`serve --size-limit-unit mb` refuses an image over 30,000,000 bytes, saying the limit in metadata;
    the default (mib) takes it."""
    config = serve_config("--size-limit-unit", unit)
    async with Emulator(config) as emu:
        answer_status, doc = await post(http, emu, body_with_face_of_size(size))
    assert answer_status == status
    if status == 400:
        assert doc["reason"] == "IMAGE_FILE_EXCEEDS_MAX_SIZE"
        assert doc["metadata"] == {"field": "face_image_file", "size_bytes": "30000001", "max_bytes": "30000000"}


# -- 6. a malformed enterprise_plan is refused ------------------------------------------------------


@pytest.mark.parametrize(
    "plan",
    [
        pytest.param(True, id="true"),
        pytest.param("yes", id="string"),
        pytest.param({"enabled": "true"}, id="enabled-a-string"),
        pytest.param([], id="list"),
        pytest.param(None, id="null"),
        pytest.param({"enabled": 1}, id="enabled-a-number"),
    ],
)
async def test_a_malformed_enterprise_plan_is_refused(http: aiohttp.ClientSession, plan: object) -> None:
    """enterprise_plan that is not {"enabled": <bool>} is 400 INVALID_REQUEST_BODY naming it."""
    body = request_json(FACE, TARGET, {"enterprise_plan": plan})
    async with Emulator(EmulatorConfig(engine="composite")) as emu:
        status, doc = await post(http, emu, body)
        assert emu.stats.enterprise_requests == 0
    assert (status, doc["reason"]) == (400, "INVALID_REQUEST_BODY")
    assert "extra.enterprise_plan" in doc["message"]

