"""The emulator over raw HTTP: the contract, the faults, the rate limit and the counters."""

from __future__ import annotations

import base64
import email.utils
import io
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio
import pytest
from PIL import Image

from novita_async.emulator import (
    FAULT_KINDS,
    Emulator,
    EmulatorConfig,
    Faults,
    composite_merge,
    job_key,
)
from novita_async.emulator._merge import stored_png

from .conftest import flat_image, make_image, request_json

pytestmark = pytest.mark.anyio

FACE = make_image(seed=1)
TARGET = make_image(size=(96, 80), seed=2)
PATH = "/v3/merge-face"


@dataclass
class Answer:
    """One raw HTTP answer."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def payload(face: bytes = FACE, image: bytes = TARGET, **extra: Any) -> dict[str, Any]:
    """A request body as the API documents it."""
    return request_json(face, image, extra)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A bare aiohttp session (no client code in between)."""
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    http: aiohttp.ClientSession,
    emu: Emulator,
    body: dict[str, Any] | bytes | Any,
    *,
    key: str | None = "default",
    content_type: str = "application/json",
    path: str = PATH,
) -> Answer:
    """POST a body (a dict is sent as JSON) and read the whole answer."""
    headers = {"Content-Type": content_type}
    if key is not None:
        headers["Authorization"] = f"Bearer {emu.api_key if key == 'default' else key}"
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    if isinstance(data, bytes) and len(data) > 1024 * 1024:
        data = io.BytesIO(data)  # aiohttp warns about large raw bytes bodies
    async with http.post(emu.url + path, data=data, headers=headers) as response:
        return Answer(response.status, response.headers, await response.read())


def gif_image() -> bytes:
    """A small GIF (a format the API refuses)."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buffer, format="GIF")
    return buffer.getvalue()


def wide_png(width: int) -> bytes:
    """A cheap PNG of ``width`` x 4 pixels."""
    buffer = io.BytesIO()
    Image.new("L", (width, 4), 128).save(buffer, format="PNG")
    return buffer.getvalue()


# -- the contract ----------------------------------------------------------------


@pytest.mark.parametrize("image_type", ["png", "webp", "jpeg"])
async def test_success_in_each_type(
    http: aiohttp.ClientSession, emulator: Emulator, image_type: str
) -> None:
    """A valid request gets the documented success shape in the requested type."""
    answer = await post(http, emulator, payload(response_image_type=image_type))
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("application/json")
    doc = answer.json()
    assert doc["image_type"] == image_type
    with Image.open(io.BytesIO(base64.b64decode(doc["image_file"], validate=True))) as result:
        assert result.format == {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}[image_type]
        assert result.size == (96, 80)


async def test_default_type_is_png(http: aiohttp.ClientSession, emulator: Emulator) -> None:
    """Without extra the server answers PNG."""
    answer = await post(http, emulator, payload())
    assert answer.json()["image_type"] == "png"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(b"{not json", "INVALID_REQUEST_BODY", id="bad-json"),
        pytest.param(b"\xff\xfe", "INVALID_REQUEST_BODY", id="not-utf8"),
        pytest.param(b"[1, 2]", "INVALID_REQUEST_BODY", id="not-an-object"),
        pytest.param({"image_file": payload()["image_file"]}, "INVALID_REQUEST_BODY",
                     id="missing-face"),
        pytest.param({"face_image_file": payload()["face_image_file"]}, "INVALID_REQUEST_BODY",
                     id="missing-image"),
        pytest.param({**payload(), "image_file": ""}, "INVALID_REQUEST_BODY", id="empty-image"),
        pytest.param({**payload(), "image_file": 5}, "INVALID_REQUEST_BODY", id="number-image"),
        pytest.param({**payload(), "face_image_file": "abc$def"}, "INVALID_REQUEST_BODY",
                     id="bad-base64"),
        pytest.param({**payload(), "face_image_file": "QUJD\nREVG"}, "INVALID_REQUEST_BODY",
                     id="base64-with-newline"),
        pytest.param({**payload(), "face_image_file": "data:image/png;base64,"
                      + base64.b64encode(FACE).decode()}, "INVALID_REQUEST_BODY",
                     id="data-url-prefix"),
        pytest.param(payload(response_image_type="gif"), "INVALID_REQUEST_BODY",
                     id="bad-output-type"),
        pytest.param({**payload(), "extra": []}, "INVALID_REQUEST_BODY", id="extra-a-list"),
        pytest.param({**payload(), "extra": "png"}, "INVALID_REQUEST_BODY", id="extra-a-string"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "INVALID_REQUEST_BODY", id="nested-too-deep"),
        pytest.param(payload(face=b"definitely not an image"), "INVALID_IMAGE_FORMAT",
                     id="undecodable"),
        pytest.param(payload(image=FACE[: len(FACE) // 2]), "INVALID_IMAGE_FORMAT",
                     id="truncated-png"),
        pytest.param(payload(face=gif_image()), "INVALID_IMAGE_FORMAT", id="gif"),
        pytest.param(payload(image=wide_png(2049)), "IMAGE_EXCEEDS_MAX_RESOLUTION",
                     id="2049-px"),
        pytest.param(payload(face=make_image(size=(15, 64))), "INVALID_IMAGE_SIZE", id="15-px-wide"),
        pytest.param(payload(image=make_image(size=(64, 1))), "INVALID_IMAGE_SIZE", id="1-px-high"),
        pytest.param(payload(face=flat_image()), "IMAGE_NO_FACE_DETECTED", id="flat-face"),
        pytest.param(payload(image=flat_image()), "IMAGE_NO_FACE_DETECTED", id="flat-target"),
    ],
)
async def test_contract_errors(
    http: aiohttp.ClientSession, emulator: Emulator, body: dict[str, Any] | bytes, reason: str
) -> None:
    """Malformed requests get 400 with the API's error shape and reason."""
    answer = await post(http, emulator, body)
    assert answer.status == 400
    doc = answer.json()
    assert doc["code"] == 400
    assert doc["reason"] == reason
    assert isinstance(doc["message"], str) and doc["message"]
    assert doc["metadata"] == {}


async def test_16_px_is_accepted(http: aiohttp.ClientSession, emulator: Emulator) -> None:
    """The smallest side taken is 16 pixels, the limit the client checks before sending."""
    answer = await post(http, emulator, payload(face=make_image(size=(16, 16))))
    assert answer.status == 200


async def test_2048_px_is_accepted(http: aiohttp.ClientSession, emulator: Emulator) -> None:
    """The largest allowed side is 2048 pixels."""
    answer = await post(http, emulator, payload(image=make_image(size=(2048, 24))))
    assert answer.status == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/jsonx", "application/json-seq"])
async def test_wrong_content_type(
    http: aiohttp.ClientSession, emulator: Emulator, content_type: str
) -> None:
    """A body not labelled application/json is refused."""
    answer = await post(http, emulator, json.dumps(payload()).encode(), content_type=content_type)
    assert answer.status == 400
    assert answer.json()["reason"] == "INVALID_REQUEST_BODY"


async def test_json_with_a_charset_is_accepted(http: aiohttp.ClientSession, emulator: Emulator) -> None:
    """Parameters of the JSON content type, such as a charset, are fine."""
    answer = await post(http, emulator, json.dumps(payload()).encode(),
                        content_type="application/json; charset=utf-8")
    assert answer.status == 200


async def test_an_extra_that_is_not_an_object_is_named(
    http: aiohttp.ClientSession, emulator: Emulator
) -> None:
    """The error for a malformed `extra` names `extra`, not one of its fields."""
    answer = await post(http, emulator, {**payload(), "extra": "png"})
    assert answer.json()["message"] == "extra must be a JSON object"


async def test_an_mpo_camera_jpeg_is_accepted(http: aiohttp.ClientSession, emulator: Emulator) -> None:
    """An MPO (a JPEG with a second picture, as phone cameras write) is read as the JPEG it is."""
    first = Image.open(io.BytesIO(make_image((120, 100), fmt="JPEG", seed=3)))
    second = Image.open(io.BytesIO(make_image((120, 100), fmt="JPEG", seed=4)))
    buffer = io.BytesIO()
    first.save(buffer, format="MPO", save_all=True, append_images=[second])
    mpo = buffer.getvalue()
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    answer = await post(http, emulator, payload(image=mpo))
    assert answer.status == 200, answer.body[:200]
    result = Image.open(io.BytesIO(base64.b64decode(answer.json()["image_file"])))
    assert result.size == (120, 100)


async def test_a_16_bit_greyscale_face_is_scaled_not_clipped(
    http: aiohttp.ClientSession, emulator: Emulator
) -> None:
    """A 16-bit greyscale PNG merges as its 8-bit version does (Pillow's plain conversion
    would clip it to white)."""
    grey = Image.open(io.BytesIO(FACE)).convert("L")
    wide = Image.new("I;16", grey.size)
    wide.frombytes(bytes(byte for value in grey.tobytes() for byte in (value * 257).to_bytes(2, "little")))

    async def merged(face: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        face.save(buffer, format="PNG")
        answer = await post(http, emulator, payload(face=buffer.getvalue()))
        assert answer.status == 200, answer.body[:200]
        return Image.open(io.BytesIO(base64.b64decode(answer.json()["image_file"]))).convert("RGB")

    assert Image.open(io.BytesIO(_png_bytes(wide))).mode.startswith("I")
    eight, sixteen = await merged(grey), await merged(wide)
    difference = max(abs(a - b) for a, b in zip(eight.tobytes(), sixteen.tobytes(), strict=True))
    assert difference <= 1


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("authorization", "status", "reason"),
    [
        pytest.param(None, 400, "MISSING_API_KEY", id="no-header"),
        pytest.param("Bearer ", 400, "MISSING_API_KEY", id="empty-bearer"),
        pytest.param("Basic c2s6eA==", 400, "MISSING_API_KEY", id="basic"),
        pytest.param("Bearer sk_wrong", 403, "INVALID_API_KEY", id="wrong-key"),
    ],
)
async def test_key_errors(
    http: aiohttp.ClientSession, emulator: Emulator, authorization: str | None, status: int,
    reason: str,
) -> None:
    """A missing key is 400 MISSING_API_KEY (not 401); a wrong one is 403 INVALID_API_KEY."""
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    async with http.post(emulator.url + PATH, json=payload(), headers=headers) as response:
        assert response.status == status
        assert (await response.json())["reason"] == reason


async def test_several_keys(
    http: aiohttp.ClientSession, emulator_factory: Callable[..., Emulator]
) -> None:
    """Every configured key is accepted."""
    async with emulator_factory(api_keys=("sk_one", "sk_two")) as emu:
        for key in ("sk_one", "sk_two"):
            assert (await post(http, emu, payload(), key=key)).status == 200
        assert (await post(http, emu, payload(), key="sk_three")).status == 403


async def test_body_over_1_mib_is_accepted(http: aiohttp.ClientSession, emulator: Emulator) -> None:
    """aiohttp's 1 MiB default body limit is raised: a ~1.6 MB body is merged."""
    noise = Image.frombytes("RGB", (640, 640), os.urandom(640 * 640 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG", compress_level=0)
    body = json.dumps(payload(image=buffer.getvalue())).encode()
    assert len(body) > 1.5 * 1024 * 1024
    answer = await post(http, emulator, body)
    assert answer.status == 200, answer.body[:200]


async def test_body_over_the_limit(http: aiohttp.ClientSession, emulator: Emulator) -> None:
    """A body over max_body_bytes (~82 MiB by default) is 400 IMAGE_FILE_EXCEEDS_MAX_SIZE."""
    size = emulator.config.max_body_bytes + 1024
    body = b'{"face_image_file":"' + b"A" * size + b'","image_file":"AAAA"}'
    answer = await post(http, emulator, body)
    assert answer.status == 400
    assert answer.json()["reason"] == "IMAGE_FILE_EXCEEDS_MAX_SIZE"


async def test_image_over_30_mb(http: aiohttp.ClientSession, emulator: Emulator) -> None:
    """One image over 30 MB (in a body under the limit) is IMAGE_FILE_EXCEEDS_MAX_SIZE."""
    big = base64.b64encode(FACE + b"\0" * (30 * 1024 * 1024 + 3 - len(FACE)))
    body = b'{"face_image_file":"' + big + b'","image_file":"' + base64.b64encode(TARGET) + b'"}'
    answer = await post(http, emulator, body)
    assert answer.status == 400
    assert answer.json()["reason"] == "IMAGE_FILE_EXCEEDS_MAX_SIZE"


async def test_small_body_limit(
    http: aiohttp.ClientSession, emulator_factory: Callable[..., Emulator]
) -> None:
    """max_body_bytes is configurable."""
    async with emulator_factory(max_body_bytes=1000) as emu:
        answer = await post(http, emu, payload())
        assert answer.status == 400
        assert answer.json()["reason"] == "IMAGE_FILE_EXCEEDS_MAX_SIZE"


@pytest.mark.parametrize("path", ["/v3/nope", "/v3/merge-face/", "/v3/merge_face"])
async def test_unknown_path_is_404_api_not_found(
    http: aiohttp.ClientSession, emulator: Emulator, path: str
) -> None:
    """Other paths get 404 API_NOT_FOUND in the API's JSON error shape."""
    answer = await post(http, emulator, payload(), path=path)
    assert answer.status == 404
    assert answer.json() == {"code": 404, "reason": "API_NOT_FOUND", "message": f"no API at {path}",
                             "metadata": {}}
    assert emulator.stats.requests == 0


async def test_wrong_method_is_405_in_the_error_shape(
    http: aiohttp.ClientSession, emulator: Emulator
) -> None:
    """GET on the merge-face route is 405 with an Allow header and the API's JSON error shape."""
    async with http.get(emulator.url + PATH) as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
        doc = await response.json()
    assert (doc["code"], doc["reason"]) == (405, "METHOD_NOT_ALLOWED")
    assert emulator.stats.requests == 0


async def _raw_exchange(emu: Emulator, head: bytes, body: bytes) -> tuple[int, dict[str, Any]]:
    """Send one hand-written HTTP/1.1 request (bytes aiohttp's client would not send)."""
    host, port = emu.url.removeprefix("http://").rsplit(":", 1)
    async with await anyio.connect_tcp(host, int(port)) as stream:
        await stream.send(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        reply = b""
        with anyio.fail_after(10):
            try:
                while True:
                    reply += await stream.receive()
            except anyio.EndOfStream:
                pass
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


async def test_a_key_that_is_not_utf8_is_invalid_not_a_crash(emulator: Emulator) -> None:
    """Authorization bytes that are not UTF-8 are a wrong key: 403 INVALID_API_KEY, not a 500."""
    head = (b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer sk_\xe9\xff\r\n")
    status, doc = await _raw_exchange(emulator, head, json.dumps(payload()).encode())
    assert (status, doc["reason"]) == (403, "INVALID_API_KEY")


async def test_a_missing_key_is_reported_before_the_body_size(
    http: aiohttp.ClientSession, emulator_factory: Callable[..., Emulator]
) -> None:
    """The key is checked from the headers first: a key-less request with a body over the
    limit is MISSING_API_KEY, as a gateway answers, and the connection stays usable."""
    async with emulator_factory(max_body_bytes=1000) as emu:
        body = json.dumps(payload()).encode()
        assert len(body) > 1000
        answer = await post(http, emu, body, key=None)
        assert (answer.status, answer.json()["reason"]) == (400, "MISSING_API_KEY")
        answer = await post(http, emu, b"{}", key="sk_wrong")
        assert (answer.status, answer.json()["reason"]) == (403, "INVALID_API_KEY")


async def test_balance_runs_out(
    http: aiohttp.ClientSession, emulator_factory: Callable[..., Emulator]
) -> None:
    """After `balance` successes every request is BILLING_BALANCE_NOT_ENOUGH."""
    async with emulator_factory(balance=1) as emu:
        assert (await post(http, emu, payload())).status == 200
        for _ in range(2):
            answer = await post(http, emu, payload())
            assert answer.status == 400
            assert answer.json()["reason"] == "BILLING_BALANCE_NOT_ENOUGH"


async def test_balance_is_not_overspent_by_concurrent_requests(
    http: aiohttp.ClientSession, emulator_factory: Callable[..., Emulator]
) -> None:
    """Merges under way hold their share of the balance: with a balance of 1, four requests
    at once give one success and three BILLING_BALANCE_NOT_ENOUGH; a failed merge gives its
    share back."""
    async with emulator_factory(balance=1, latency=0.3) as emu:
        assert (await post(http, emu, payload(face=flat_image()))).status == 400  # no face: not spent
        answers: list[Answer] = []

        async def one() -> None:
            answers.append(await post(http, emu, payload()))

        async with anyio.create_task_group() as group:
            for _ in range(4):
                group.start_soon(one)
        assert sorted(answer.status for answer in answers) == [200, 400, 400, 400]
        assert {answer.json().get("reason") for answer in answers if answer.status == 400} == {
            "BILLING_BALANCE_NOT_ENOUGH"}


async def test_latency(http: aiohttp.ClientSession, emulator_factory: Callable[..., Emulator]) -> None:
    """latency delays each merge."""
    async with emulator_factory(latency=0.15) as emu:
        started = time.monotonic()
        assert (await post(http, emu, payload())).status == 200
        assert time.monotonic() - started >= 0.15


async def test_enterprise_requests_are_counted(
    http: aiohttp.ClientSession, emulator: Emulator
) -> None:
    """enterprise_plan.enabled=true is seen and counted; false or absent is not."""
    await post(http, emulator, payload(enterprise_plan={"enabled": True}))
    await post(http, emulator, payload(enterprise_plan={"enabled": False}))
    await post(http, emulator, payload())
    assert emulator.stats.enterprise_requests == 1


# -- faults ------------------------------------------------------------------------

FAULT_CHECKS = [
    "500", "502_html", "503", "429", "429_retry_after", "drop", "truncate", "slow", "drip",
    "bad_json", "no_image_file", "bad_base64", "huge_error", "wrong_content_type",
    "504_html", "invalid_image_size", "billing_auth_failed", "api_not_allowed",
    "429_retry_date", "billing_failed", "get_result_failed",
]
#: Faults answered in the API's JSON error shape: kind -> (status, reason).
JSON_ERROR_FAULTS = {
    "invalid_image_size": (400, "INVALID_IMAGE_SIZE"),
    "billing_auth_failed": (403, "BILLING_AUTH_FAILED"),
    "api_not_allowed": (403, "API_NOT_ALLOWED"),
    "billing_failed": (500, "BILLING_FAILED"),
    "get_result_failed": (500, "GET_RESULT_FAILED"),
}


def test_every_fault_kind_is_tested() -> None:
    """The fault table below covers FAULT_KINDS exactly."""
    assert sorted(FAULT_CHECKS) == sorted(FAULT_KINDS)


async def _raw_attempt(http: aiohttp.ClientSession, emu: Emulator) -> Answer | BaseException:
    """One raw attempt, returning the answer or the aiohttp exception it raised."""
    try:
        return await post(http, emu, payload())
    except aiohttp.ClientError as exc:
        return exc


@pytest.mark.parametrize("kind", FAULT_CHECKS)
async def test_fault_does_what_fault_kinds_says(
    http: aiohttp.ClientSession, emulator_factory: Callable[..., Emulator], kind: str
) -> None:
    """fail_first=1 injects the fault once; the job's second attempt succeeds."""
    # drip_interval 0: the dripped answer is the real merge, too long to trickle here
    # (tests/test_emulator_fidelity.py checks the trickle against a read timeout).
    faults = Faults(fail_first=1, fail_first_kind=kind, slow_seconds=0.2, drip_interval=0.0)
    async with emulator_factory(faults=faults) as emu:
        started = time.monotonic()
        first = await _raw_attempt(http, emu)
        took = time.monotonic() - started
        if kind in ("500", "503", "429", "429_retry_after", "huge_error", "slow"):
            assert isinstance(first, Answer)
            status = {"503": 503, "429": 429, "429_retry_after": 429}.get(kind, 500)
            assert first.status == status
            doc = first.json()
            assert doc["code"] == status and isinstance(doc["reason"], str)
            assert ("Retry-After" in first.headers) == (kind == "429_retry_after")
            if kind == "429_retry_after":
                assert first.headers["Retry-After"] == "1"
            if kind == "huge_error":
                assert len(first.body) >= 10 * 1024 * 1024
            if kind == "slow":
                assert took >= 0.2
        elif kind in ("502_html", "504_html"):
            assert isinstance(first, Answer)
            assert first.status == int(kind[:3])
            assert first.headers["Content-Type"].startswith("text/html")
            assert first.body.startswith(b"<html>")
        elif kind in JSON_ERROR_FAULTS:
            assert isinstance(first, Answer)
            status, reason = JSON_ERROR_FAULTS[kind]
            doc = first.json()
            assert (first.status, doc["code"], doc["reason"]) == (status, status, reason)
            assert isinstance(doc["message"], str) and doc["metadata"] == {}
        elif kind == "drop":
            assert isinstance(first, aiohttp.ServerDisconnectedError)
        elif kind == "truncate":
            assert isinstance(first, aiohttp.ClientPayloadError)
        elif kind == "drip":
            assert isinstance(first, Answer) and first.status == 200
            # A patient client gets the real merge (the same as the second attempt's,
            # checked below), never a stand-in that passes for one.
            with Image.open(io.BytesIO(base64.b64decode(first.json()["image_file"]))) as image:
                assert image.size == (96, 80)
        elif kind == "429_retry_date":
            assert isinstance(first, Answer) and first.status == 429
            assert first.json()["reason"] == "RATE_LIMIT_EXCEEDED"
            when = email.utils.parsedate_to_datetime(first.headers["Retry-After"])
            assert 0 < when.timestamp() - time.time() <= 2.1
        elif kind == "bad_json":
            assert isinstance(first, Answer) and first.status == 200
            with pytest.raises(ValueError):
                first.json()
        elif kind == "no_image_file":
            assert isinstance(first, Answer) and first.status == 200
            assert "image_file" not in first.json()
        elif kind == "bad_base64":
            assert isinstance(first, Answer) and first.status == 200
            with pytest.raises(ValueError):
                base64.b64decode(first.json()["image_file"], validate=True)
        elif kind == "wrong_content_type":
            assert isinstance(first, Answer) and first.status == 200
            assert first.headers["Content-Type"].startswith("text/plain")
            assert first.json()["image_type"] == "png"
        else:  # pragma: no cover - guarded by test_every_fault_kind_is_tested
            pytest.fail(f"no check for {kind}")
        second = await post(http, emu, payload())
        assert second.status == 200
        assert second.json()["image_type"] == "png"
        if kind == "drip":
            assert isinstance(first, Answer) and first.body == second.body
        assert emu.stats.faults == {kind: 1}
        assert emu.stats.attempts[job_key(FACE, TARGET)] == 2
        assert emu.stats.in_flight == 0


async def test_fail_first_counts_per_job(
    http: aiohttp.ClientSession, emulator_factory: Callable[..., Emulator]
) -> None:
    """fail_first applies to each job (pair of images) separately."""
    async with emulator_factory(faults=Faults(fail_first=1)) as emu:
        other = payload(face=make_image(seed=9))
        assert (await post(http, emu, payload())).status == 503
        assert (await post(http, emu, other)).status == 503
        assert (await post(http, emu, payload())).status == 200
        assert (await post(http, emu, other)).status == 200


async def test_fault_rates(
    http: aiohttp.ClientSession, emulator_factory: Callable[..., Emulator]
) -> None:
    """A rate of 1.0 faults every attempt; the seed makes mixed rates repeatable."""
    async with emulator_factory(faults=Faults(rates={"500": 1.0})) as emu:
        for _ in range(3):
            assert (await post(http, emu, payload())).status == 500
    outcomes = []
    for _ in range(2):
        async with emulator_factory(faults=Faults(rates={"503": 0.5}, seed=42)) as emu:
            outcomes.append([(await post(http, emu, payload())).status for _ in range(12)])
    assert outcomes[0] == outcomes[1]
    assert {200, 503} == set(outcomes[0])


async def test_seeded_faults_do_not_depend_on_arrival_order(
    http: aiohttp.ClientSession, emulator_factory: Callable[..., Emulator]
) -> None:
    """With a seed, each job's fault is the same however its concurrent requests interleave."""
    jobs = [payload(face=make_image(seed=100 + index)) for index in range(16)]
    outcomes = []
    for order in (jobs, jobs[::-1]):
        async with emulator_factory(faults=Faults(rates={"503": 0.5}, seed=7), latency=0.01) as emu:
            statuses: dict[str, int] = {}

            async def one(job: dict[str, Any], statuses: dict[str, int] = statuses) -> None:
                statuses[job["face_image_file"]] = (await post(http, emu, job)).status

            async with anyio.create_task_group() as group:
                for job in order:
                    group.start_soon(one, job)
            outcomes.append(statuses)
    assert outcomes[0] == outcomes[1]
    assert set(outcomes[0].values()) == {200, 503}


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"rates": {"nope": 0.1}}, id="unknown-kind"),
        pytest.param({"fail_first_kind": "nope"}, id="unknown-first-kind"),
        pytest.param({"rates": {"500": 0.7, "503": 0.7}}, id="over-1"),
        pytest.param({"rates": {"500": -0.1}}, id="negative"),
        pytest.param({"fail_first": -1}, id="fail-first"),
        pytest.param({"slow_seconds": -1}, id="slow-seconds"),
        pytest.param({"drip_interval": -0.5}, id="drip-interval"),
    ],
)
def test_faults_validation(kwargs: dict[str, Any]) -> None:
    """Faults refuses unknown kinds and impossible rates."""
    with pytest.raises(ValueError):
        Faults(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"engine": "magic"}, id="engine"),
        pytest.param({"api_keys": ()}, id="no-keys"),
        pytest.param({"png_level": 10}, id="png-level"),
        pytest.param({"keepalive_timeout": 0}, id="keepalive-timeout"),
        pytest.param({"merge_workers": 0}, id="no-workers"),
        pytest.param({"rate_limit_rpm": -5}, id="negative-rpm"),
        pytest.param({"rate_limit_rpm": 0}, id="zero-rpm"),
        pytest.param({"rate_limit_burst": 0}, id="burst"),
        pytest.param({"balance": -1}, id="balance"),
        pytest.param({"latency": -0.1}, id="latency"),
        pytest.param({"jitter": -1}, id="jitter"),
        pytest.param({"max_body_bytes": 0}, id="max-body"),
        pytest.param({"max_image_bytes": 0}, id="max-image-bytes"),
        pytest.param({"rate_limit_kind": "fixed"}, id="rate-limit-kind"),
        pytest.param({"rate_limit_window": 0}, id="rate-limit-window"),
        pytest.param({"max_body_bytes_held": 0}, id="max-body-held"),
        pytest.param({"body_read_timeout": 0}, id="body-read-timeout"),
        pytest.param({"body_read_timeout": float("nan")}, id="body-read-timeout-nan"),
        pytest.param({"body_read_timeout": float("inf")}, id="body-read-timeout-inf"),
    ],
)
def test_config_validation(kwargs: dict[str, Any]) -> None:
    """EmulatorConfig refuses settings that would hang it or silently mean something else
    (no merge workers, a negative rate as no limit), naming the setting."""
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        EmulatorConfig(**kwargs)


# -- rate limit ----------------------------------------------------------------------


@pytest.mark.parametrize("retry_after", [pytest.param(False, id="plain"), pytest.param(True, id="retry-after")])
async def test_rate_limit(
    http: aiohttp.ClientSession, emulator_factory: Callable[..., Emulator], retry_after: bool
) -> None:
    """Past the burst a key gets 429 RATE_LIMIT_EXCEEDED, with Retry-After when configured."""
    async with emulator_factory(api_keys=("sk_a", "sk_b"), rate_limit_rpm=60, rate_limit_burst=2,
                                rate_limit_retry_after=retry_after) as emu:
        statuses = [(await post(http, emu, payload(), key="sk_a")).status for _ in range(2)]
        assert statuses == [200, 200]
        limited = await post(http, emu, payload(), key="sk_a")
        assert limited.status == 429
        assert limited.json()["reason"] == "RATE_LIMIT_EXCEEDED"
        if retry_after:
            assert limited.headers["Retry-After"] == "1"
        else:
            assert "Retry-After" not in limited.headers
        # The limit is per key.
        assert (await post(http, emu, payload(), key="sk_b")).status == 200


async def test_sliding_window_rate_limit(
    http: aiohttp.ClientSession, emulator_factory: Callable[..., Emulator]
) -> None:
    """The "window" kind lets the window's whole count through at once, then refuses until the
    oldest request leaves the window, saying how long with Retry-After."""
    async with emulator_factory(rate_limit_rpm=300, rate_limit_kind="window", rate_limit_window=1.2,
                                rate_limit_retry_after=True) as emu:
        started = time.monotonic()
        assert [(await post(http, emu, payload())).status for _ in range(6)] == [200] * 6  # 300/min * 1.2 s
        limited = await post(http, emu, payload())
        assert limited.status == 429 and limited.json()["reason"] == "RATE_LIMIT_EXCEEDED"
        assert limited.headers["Retry-After"] == "2"  # a place frees within 1.2 s: whole seconds, rounded up
        await anyio.sleep(max(0.0, started + 1.25 - time.monotonic()))
        assert (await post(http, emu, payload())).status == 200


async def test_rate_limit_refills(
    http: aiohttp.ClientSession, emulator_factory: Callable[..., Emulator]
) -> None:
    """Tokens come back at the configured rate."""
    async with emulator_factory(rate_limit_rpm=600, rate_limit_burst=1) as emu:
        assert (await post(http, emu, payload())).status == 200
        assert (await post(http, emu, payload())).status == 429
        await anyio.sleep(0.12)
        assert (await post(http, emu, payload())).status == 200


# -- counters, lifecycle -------------------------------------------------------------


async def test_stats_counters(http: aiohttp.ClientSession, emulator: Emulator) -> None:
    """requests, statuses, attempts and successes count what happened."""
    await post(http, emulator, payload())
    await post(http, emulator, payload())
    await post(http, emulator, payload(face=flat_image()))
    await post(http, emulator, b"{")
    stats = emulator.stats
    assert stats.requests == 4
    assert stats.statuses == {200: 2, 400: 2}
    assert stats.attempts[job_key(FACE, TARGET)] == 2
    assert stats.successes[job_key(FACE, TARGET)] == 2
    assert stats.chunked_requests == 0
    assert stats.missing_content_length == 0
    assert stats.peak_in_flight == 1
    assert stats.in_flight == 0


async def test_chunked_requests_are_counted(http: aiohttp.ClientSession, emulator: Emulator) -> None:
    """A chunked body (no Content-Length) is served but counted as such."""
    raw = json.dumps(payload()).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(raw), 1000):
            yield raw[start : start + 1000]

    answer = await post(http, emulator, chunks())
    assert answer.status == 200
    assert emulator.stats.chunked_requests == 1
    assert emulator.stats.missing_content_length == 1


async def test_peak_in_flight(http: aiohttp.ClientSession, emulator_factory: Callable[..., Emulator]) -> None:
    """Concurrent requests raise peak_in_flight."""
    async with emulator_factory(latency=0.2) as emu:
        async with anyio.create_task_group() as group:
            for _ in range(3):
                group.start_soon(post, http, emu, payload())
        assert emu.stats.peak_in_flight == 3
        assert emu.stats.in_flight == 0


async def test_stats_route(http: aiohttp.ClientSession, emulator: Emulator) -> None:
    """GET /_emulator/stats returns the counters as JSON."""
    await post(http, emulator, payload())
    async with http.get(emulator.url + "/_emulator/stats") as response:
        assert response.status == 200
        doc = await response.json()
    assert doc == emulator.stats.as_dict()
    assert doc["requests"] == 1
    assert doc["statuses"] == {"200": 1}


async def test_health_route(http: aiohttp.ClientSession, emulator: Emulator) -> None:
    """GET /_emulator/health names the merge engine."""
    async with http.get(emulator.url + "/_emulator/health") as response:
        assert await response.json() == {"ok": True, "engine": "composite"}


async def test_binds_loopback_by_default() -> None:
    """The emulator listens on 127.0.0.1 and a free port unless told otherwise."""
    async with Emulator(EmulatorConfig(engine="composite")) as emu:
        assert emu.host == "127.0.0.1"
        assert emu.port > 0
        assert emu.url == f"http://127.0.0.1:{emu.port}"
        assert emu.api_key == "sk_emulator_local"


async def test_pause_and_resume_keep_the_port(
    http: aiohttp.ClientSession, emulator: Emulator
) -> None:
    """While paused nothing answers, kept-alive connections included; resume uses the same port."""
    assert (await post(http, emulator, payload())).status == 200  # leaves a kept-alive connection
    port = emulator.port
    await emulator.pause()
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(http, emulator, payload())
    await emulator.resume()
    assert emulator.port == port
    assert (await post(http, emulator, payload())).status == 200


async def test_pause_drops_requests_in_flight(
    http: aiohttp.ClientSession, emulator_factory: Callable[..., Emulator]
) -> None:
    """A request being handled when the server pauses loses its connection."""
    async with emulator_factory(latency=0.5) as emu:
        outcome: list[Answer | BaseException] = []

        async def send() -> None:
            outcome.append(await _raw_attempt(http, emu))

        async with anyio.create_task_group() as group:
            group.start_soon(send)
            for _ in range(200):
                if emu.stats.in_flight:
                    break
                await anyio.sleep(0.005)
            await emu.pause()
        assert isinstance(outcome[0], aiohttp.ClientConnectionError)
        await anyio.sleep(0.01)
        assert emu.stats.in_flight == 0


async def test_stop_is_prompt_with_a_slow_request(
    http: aiohttp.ClientSession, emulator_factory: Callable[..., Emulator]
) -> None:
    """A client that gives up on a slow answer frees the handler (handler_cancellation)."""
    async with emulator_factory(faults=Faults(rates={"slow": 1.0}, slow_seconds=30)) as emu:
        with anyio.move_on_after(0.2):
            await post(http, emu, payload())
        await http.close()  # the pooled connection goes, so the server sees the client leave
        for _ in range(100):
            if emu.stats.in_flight == 0:
                break
            await anyio.sleep(0.01)
        assert emu.stats.in_flight == 0
        started = time.monotonic()
    assert time.monotonic() - started < 2


def test_composite_merge_keeps_the_target_size() -> None:
    """The built-in composite returns an RGB image of the target's size."""
    face = Image.open(io.BytesIO(FACE))
    target = Image.open(io.BytesIO(TARGET))
    result = composite_merge(face, target)
    assert result.size == target.size
    assert result.mode == "RGB"
    assert result.tobytes() != target.convert("RGB").tobytes()


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA"])
def test_stored_png_keeps_every_pixel(mode: str) -> None:
    """The level-0 PNG writer gives a valid PNG with the image's pixels (other modes as RGB/RGBA)."""
    source = Image.open(io.BytesIO(make_image(size=(37, 23), seed=3))).convert(mode)
    data = stored_png(source)
    with Image.open(io.BytesIO(data)) as result:
        result.load()
        assert result.format == "PNG"
        expected = {"P": "RGB", "LA": "RGBA"}.get(mode, mode)
        assert result.mode == expected
        assert result.tobytes() == source.convert(expected).tobytes()
    # Stored blocks: about the size of the pixels, one filter byte per row more.
    assert len(data) > 37 * 23 * len(expected)


async def test_png_level_0_gives_the_same_pixels(
    http: aiohttp.ClientSession, emulator_factory: Callable[..., Emulator]
) -> None:
    """png_level=0 changes how the result is stored, not what it shows."""
    pixels = []
    for level in (0, 1):
        async with emulator_factory(png_level=level) as emu:
            answer = await post(http, emu, payload())
        assert answer.status == 200
        data = base64.b64decode(answer.json()["image_file"])
        with Image.open(io.BytesIO(data)) as result:
            assert result.format == "PNG"
            if level == 0:  # stored, not compressed: at least one byte per sample
                assert len(data) > result.width * result.height * len(result.getbands())
            pixels.append(result.convert("RGB").tobytes())
    assert pixels[0] == pixels[1]


def test_serve_options_make_the_config() -> None:
    """`serve` options map onto EmulatorConfig; a zlib level past 9 is refused by the parser."""
    import argparse

    from novita_async.emulator._cli import add_serve_options, config_from_args

    parser = argparse.ArgumentParser()
    add_serve_options(parser)
    args = parser.parse_args(["--png-level", "0", "--rpm", "60", "--burst", "2", "--fault", "503=0.25",
                              "--rate-limit-kind", "window",
                              "--engine", "composite", "--latency", "0.1", "--keepalive-timeout", "5"])
    config = config_from_args(args)
    assert (config.png_level, config.rate_limit_rpm, config.rate_limit_burst) == (0, 60, 2)
    assert config.keepalive_timeout == 5.0
    assert (config.rate_limit_kind, config_from_args(parser.parse_args([])).rate_limit_kind) == ("window", "bucket")
    assert config_from_args(parser.parse_args([])).keepalive_timeout == 75.0
    assert (config.engine, config.latency, dict(config.faults.rates)) == ("composite", 0.1, {"503": 0.25})
    assert config_from_args(parser.parse_args([])).png_level == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["--png-level", "12"])


def test_serve_options_bound_body_memory_and_read_time() -> None:
    """--max-body-held-mib and --body-read-timeout map onto the config, with its defaults."""
    import argparse

    from novita_async.emulator._cli import add_serve_options, config_from_args

    parser = argparse.ArgumentParser()
    add_serve_options(parser)
    config = config_from_args(parser.parse_args(["--max-body-held-mib", "1.5", "--body-read-timeout", "0.5"]))
    assert (config.max_body_bytes_held, config.body_read_timeout) == (3 * 512 * 1024, 0.5)
    default = config_from_args(parser.parse_args([]))
    assert (default.max_body_bytes_held, default.body_read_timeout) == (
        EmulatorConfig().max_body_bytes_held, EmulatorConfig().body_read_timeout)


@pytest.mark.parametrize("argv", [["--workers", "0"], ["--rpm", "-5"], ["--rpm", "0"], ["--burst", "0"],
                                  ["--balance", "-1"], ["--latency", "-1"], ["--slow-seconds", "x"],
                                  ["--keepalive-timeout", "0"], ["--fail-first", "-2"],
                                  ["--max-body-held-mib", "0"], ["--body-read-timeout", "0"],
                                  ["--body-read-timeout", "inf"]])
def test_serve_refuses_impossible_settings(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """`serve` refuses a setting that would hang the emulator or mean something else,
    naming the option."""
    import argparse

    from novita_async.emulator._cli import add_serve_options

    parser = argparse.ArgumentParser()
    add_serve_options(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert f"argument {argv[0]}:" in capsys.readouterr().err
