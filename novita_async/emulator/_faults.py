"""The emulator's answers that are not a merge: API errors and injected faults."""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections.abc import Mapping

from aiohttp import web

from novita_async.emulator._config import Faults

__all__ = ["LATE_FAULTS", "dripped", "drop", "error_response", "inject", "truncated"]

#: Faults applied after the merge (to its answer) rather than instead of it.
LATE_FAULTS = frozenset({"truncate", "wrong_content_type", "drip"})

#: Faults answered with the API's JSON error shape: kind -> (status, reason, message).
_JSON_ERRORS: dict[str, tuple[int, str, str]] = {
    "500": (500, "CREATE_TASK_FAILED", "failed to create task"),
    "billing_failed": (500, "BILLING_FAILED", "failed to bill this request"),
    "get_result_failed": (500, "GET_RESULT_FAILED", "failed to get the task's result"),
    "503": (503, "SERVICE_UNAVAILABLE", "surge protection: try again later"),
    "429": (429, "RATE_LIMIT_EXCEEDED", "rate limit exceeded"),
    "invalid_image_size": (400, "INVALID_IMAGE_SIZE", "image size is not supported"),
    "billing_auth_failed": (403, "BILLING_AUTH_FAILED", "billing authorization failed for this key"),
    "api_not_allowed": (403, "API_NOT_ALLOWED", "this key may not use this API"),
}

#: Faults answered by a proxy in front of the API, with its HTML page: kind -> (status, title, text).
_HTML_ERRORS: dict[str, tuple[int, str, str]] = {
    "502_html": (502, "502 Bad Gateway", "bad gateway"),
    "504_html": (504, "504 Gateway Time-out", "the upstream server did not answer in time"),
}


def error_response(
    status: int, reason: str, message: str, *, metadata: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """An answer in the API's error shape; ``metadata`` is its string-to-string map of context."""
    body = {"code": status, "reason": reason, "message": message, "metadata": dict(metadata or {})}
    return web.json_response(body, status=status, headers=headers)


def retry_after_date(now: float | None = None) -> str:
    """A ``Retry-After`` HTTP date (RFC 9110) 1 to 2 seconds after ``now`` (default: the clock).

    HTTP dates count whole seconds: rounding up first keeps the date from
    falling in the past, which a client would read as "retry at once".
    """
    moment = math.ceil(time.time() if now is None else now) + 1
    return email.utils.formatdate(moment, usegmt=True)


def drop(request: web.Request) -> web.StreamResponse:
    """Close the connection without an answer; return a response aiohttp discards."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    # Nothing can be sent any more; aiohttp discards this quietly.
    return web.Response(status=500)


async def truncated(request: web.Request, body: bytes) -> web.StreamResponse:
    """Send half of a 200's ``body``, then close the connection."""
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    return drop(request)


def _html_page(status: int, title: str, text: str) -> web.Response:
    html = f"<html><head><title>{title}</title></head><body>{text}</body></html>"
    return web.Response(status=status, text=html, content_type="text/html")


async def inject(kind: str, request: web.Request, faults: Faults) -> web.StreamResponse:
    """Answer one attempt with fault ``kind`` (any but ``drop`` and ``LATE_FAULTS``)."""
    if kind in _JSON_ERRORS:
        return error_response(*_JSON_ERRORS[kind])
    if kind in _HTML_ERRORS:
        return _html_page(*_HTML_ERRORS[kind])
    if kind == "429_retry_after":
        return error_response(429, "RATE_LIMIT_EXCEEDED", "rate limit exceeded", headers={"Retry-After": "1"})
    if kind == "429_retry_date":
        return error_response(429, "RATE_LIMIT_EXCEEDED", "rate limit exceeded",
                              headers={"Retry-After": retry_after_date()})
    if kind == "huge_error":
        return error_response(500, "TASK_FAILED", "x" * (10 * 1024 * 1024))
    if kind == "bad_json":
        return web.Response(status=200, text="<html>not json</html>", content_type="application/json")
    if kind == "no_image_file":
        return web.json_response({"image_type": "png"})
    if kind == "bad_base64":
        return web.Response(status=200, body=b'{"image_file":"@@not base64@@","image_type":"png"}',
                            content_type="application/json")
    if kind == "slow":
        await asyncio.sleep(faults.slow_seconds)
        return error_response(500, "TASK_FAILED", "too slow")
    raise AssertionError(f"fault {kind} is handled by the caller")


async def dripped(request: web.Request, body: bytes, interval: float) -> web.StreamResponse:
    """A 200 whose ``body`` (the real merged answer) trickles out one byte per ``interval`` seconds.

    The real answer, not a stand-in: a client patient enough to wait it out
    gets the merge it asked for, never an image that passes for one.
    """
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    if interval <= 0:  # nothing to trickle: thousands of one-byte writes would only cost CPU
        await response.write(body)
        return response
    for index in range(len(body)):
        if index:
            await asyncio.sleep(interval)
        await response.write(body[index : index + 1])
    return response
