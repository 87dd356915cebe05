"""Answers the API should never give: a 2xx with no body, a redirect, an error body over the cap.

Each comes from a small scripted ``aiohttp.web`` server on 127.0.0.1, since the
emulator gives none of them.  The bodiless 2xx cases run in a child process:
the old client spun at 100% CPU on them without ever yielding to the event
loop, which no timeout inside the process can interrupt.

Run as ``python -m tests.test_odd_answers STATUS`` (the child): two calls to a
server answering STATUS with no body, printed as one JSON object.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web

import novita_async as na
from novita_async._config import ERROR_BODY_CAP
from novita_async._errors import _leading_members

from .conftest import FAST_RETRY, make_image, serving

pytestmark = pytest.mark.anyio

FACE = make_image(seed=1)
TARGET = make_image(size=(96, 80), seed=2)
RESULT = make_image(size=(32, 32), seed=3)
KEY = "sk_test_odd_answers_7c1f"
SUCCESS = {"image_file": base64.b64encode(RESULT).decode(), "image_type": "png"}

#: The child process must not inherit a user's key or endpoint.
CHILD_ENV = {k: v for k, v in os.environ.items() if not k.startswith("NOVITA_")}
REPO = Path(__file__).resolve().parents[1]


# -- a 2xx with no body -------------------------------------------------------------


async def _bodiless_calls(status: int) -> dict[str, Any]:
    """Two merge_face calls (retries allowed) to a server answering ``status`` with no body."""
    requests = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal requests
        requests += 1
        await request.read()
        return web.Response(status=status)

    errors = []
    async with serving(handler) as url, na.NovitaClient(api_key=KEY, base_url=url, retry=FAST_RETRY) as client:
        started = time.monotonic()
        # Two calls: aiohttp's shared empty body of a 204 misbehaves only once read before.
        for _ in range(2):
            with anyio.fail_after(10):
                try:
                    await client.merge_face(FACE, TARGET)
                except na.NovitaError as exc:
                    errors.append({"type": type(exc).__name__, "retryable": exc.retryable,
                                   "attempts": exc.attempts, "message": str(exc)})
        seconds = time.monotonic() - started
    return {"errors": errors, "requests": requests, "seconds": seconds}


@pytest.mark.parametrize(
    "status",
    [
        pytest.param(204, id="204-no-content"),
        pytest.param(205, id="205-reset-content"),
        pytest.param(202, id="202-content-length-0"),
    ],
)
def test_a_2xx_with_no_body_is_a_typed_error_at_once(status: int) -> None:
    """A bodiless 2xx: InvalidResponseError naming the status, not retried, in milliseconds."""
    try:
        done = subprocess.run([sys.executable, "-m", "tests.test_odd_answers", str(status)], cwd=REPO,
                              capture_output=True, text=True, timeout=60, env=CHILD_ENV)
    except subprocess.TimeoutExpired:
        pytest.fail(f"merge_face did not return on HTTP {status} with no body (a busy loop?)")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [(e["type"], e["retryable"], e["attempts"]) for e in report["errors"]] == [
        ("InvalidResponseError", False, 1)] * 2
    assert all(f"HTTP {status} with no body" in e["message"] for e in report["errors"])
    assert report["requests"] == 2  # one per call: the same answer would come back
    assert report["seconds"] < 5


# -- redirects -------------------------------------------------------------------------

_REDIRECTS: dict[int, type[web.HTTPMove]] = {
    301: web.HTTPMovedPermanently,
    302: web.HTTPFound,
    303: web.HTTPSeeOther,
    307: web.HTTPTemporaryRedirect,
    308: web.HTTPPermanentRedirect,
}


def _recorder(seen: list[web.Request]) -> web.Application:
    """The redirect's target: records every request (any method, any path) and answers a merge."""

    async def handler(request: web.Request) -> web.Response:
        seen.append(request)
        await request.read()
        return web.json_response(SUCCESS)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


def _redirecting(status: int, location: Callable[[str], str] | None, seen: list[web.Request]) -> Callable[
        [web.Request], Awaitable[web.StreamResponse]]:
    """The configured base URL: answers every POST with a ``status`` redirect to ``location(own URL)``."""

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        await request.read()
        if location is None:
            return web.Response(status=status)
        raise _REDIRECTS[status](location(f"http://{request.host}"))

    return handler


@pytest.mark.parametrize("status", [pytest.param(code, id=str(code)) for code in _REDIRECTS])
async def test_a_redirect_is_reported_not_followed(status: int) -> None:
    """A 3xx: a non-retryable APIStatusError naming the new base URL; nothing reaches the target."""
    sent: list[web.Request] = []
    followed: list[web.Request] = []
    async with serving(_recorder(followed)) as target:
        handler = _redirecting(status, lambda _: f"{target}/v3/merge-face", sent)
        async with serving(handler) as url, na.NovitaClient(api_key=KEY, base_url=url, retry=FAST_RETRY) as client:
            with anyio.fail_after(10), pytest.raises(na.APIStatusError) as caught:
                await client.merge_face(FACE, TARGET)
    error = caught.value
    assert (error.status, error.retryable, error.attempts) == (status, False, 1)
    assert f"redirects to {target}/v3/merge-face" in str(error)
    assert f"use base_url={target!r}" in str(error)
    assert (len(sent), followed) == (1, [])


@pytest.mark.parametrize(
    ("location", "shown"),
    [
        pytest.param("/v4/merge-face?token={key}", "{url}/v4/merge-face?token=<redacted>", id="relative-with-key"),
        pytest.param("{url}/v3/merge-face?token={key}", "{url}/v3/merge-face?token=<redacted>",
                     id="endpoint-with-key"),
        pytest.param("{target}/login?next={key}", "{target}/login?next=<redacted>", id="elsewhere-with-key"),
    ],
)
async def test_a_redirect_message_names_the_location_but_never_the_key(location: str, shown: str) -> None:
    """A Location that is not the endpoint is named (resolved, the key redacted), with the fix."""
    followed: list[web.Request] = []
    sent: list[web.Request] = []
    async with serving(_recorder(followed)) as target:
        handler = _redirecting(301, lambda own: location.format(key=KEY, target=target, url=own), sent)
        async with serving(handler) as url, na.NovitaClient(api_key=KEY, base_url=url, retry=FAST_RETRY) as client:
            with pytest.raises(na.APIStatusError) as caught:
                await client.merge_face(FACE, TARGET)
    text = f"{caught.value} {caught.value!r}"
    assert KEY not in text
    assert f"redirects to {shown.format(url=url, target=target)} (not followed)" in text
    assert "as base_url" in text
    assert followed == []


async def test_a_redirect_without_location() -> None:
    """A 3xx with no Location is still a non-retryable APIStatusError, and says so."""
    sent: list[web.Request] = []
    async with serving(_redirecting(302, None, sent)) as url, \
            na.NovitaClient(api_key=KEY, base_url=url, retry=FAST_RETRY) as client:
        with pytest.raises(na.APIStatusError, match="with no Location: check base_url") as caught:
            await client.merge_face(FACE, TARGET)
    assert (caught.value.status, caught.value.retryable, len(sent)) == (302, False, 1)


# -- an error body over the cap ------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason", "cls", "retryable"),
    [
        pytest.param(500, "TASK_FAILED", na.ServerError, True, id="500-task-failed"),
        pytest.param(400, "IMAGE_NO_FACE_DETECTED", na.NoFaceDetectedError, False, id="400-no-face"),
    ],
)
async def test_an_error_body_over_the_cap_keeps_its_reason(
    status: int, reason: str, cls: type[na.APIStatusError], retryable: bool
) -> None:
    """The reason in the first bytes of an error body too large to read whole still types the error."""
    huge = json.dumps({"code": status, "reason": reason, "message": "x" * (4 * ERROR_BODY_CAP)}).encode()

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status, body=huge, content_type="application/json")

    once = na.RetryPolicy(max_attempts=1)
    async with serving(handler) as url, na.NovitaClient(api_key=KEY, base_url=url, retry=once) as client:
        with pytest.raises(na.APIStatusError) as caught:
            await client.merge_face(FACE, TARGET)
    error = caught.value
    assert (type(error), error.status, error.reason, error.retryable) == (cls, status, reason, retryable)
    assert error.body == huge[:ERROR_BODY_CAP]


@pytest.mark.parametrize(
    ("body", "members"),
    [
        pytest.param(b' {"code": 500, "reason": "TASK_FAILED", "message": "xx', {"code": 500, "reason": "TASK_FAILED"},
                     id="cut-in-a-value"),
        pytest.param(b'{"metadata": {"reason": "X"}, "rea', {"metadata": {"reason": "X"}}, id="nested-not-top"),
        pytest.param(b'{"a": 1 "b": 2}', {"a": 1}, id="missing-comma"),
        pytest.param(b"<html>" + b"x" * 100, {}, id="html"),
        pytest.param(b"", {}, id="empty"),
    ],
)
def test_leading_members_of_a_cut_body(body: bytes, members: dict[str, object]) -> None:
    """Only complete top-level members before the cut are taken."""
    assert _leading_members(body) == members


if __name__ == "__main__":
    sys.stdout.write(json.dumps(asyncio.run(_bodiless_calls(int(sys.argv[1])))))
