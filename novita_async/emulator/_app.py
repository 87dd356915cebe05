"""The emulator's aiohttp application: the Merge Face contract, faults and counters."""

from __future__ import annotations

import asyncio
import binascii
import collections
import functools
import hashlib
import hmac
import io
import json
import logging
import random
import time
import warnings
import weakref
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
from aiohttp import web
from PIL import Image

from novita_async._b64 import b64decode_strict, b64encode
from novita_async._config import MAX_IMAGE_BYTES, MAX_IMAGE_SIDE, RESPONSE_IMAGE_TYPES
from novita_async.emulator._config import EmulatorConfig
from novita_async.emulator._facemerge import NoFaceFoundError
from novita_async.emulator._merge import MergeFn, encode_result, select_merge, stored_png

__all__ = ["CONFIG", "STATS", "EmulatorStats", "create_app"]

logger = logging.getLogger("novita_async.emulator")

# MPO is a JPEG with more pictures after the first (phone cameras write it);
# any JPEG decoder reads its first picture, so it is accepted as a JPEG.
_ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP"})
# Greyscale images with more than 8 bits per sample (16-bit PNGs); Pillow's
# convert("RGB") clips these instead of scaling them, so they are scaled first.
_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
#: Request start times kept for ``EmulatorStats.started_at`` (a bounded window,
#: so a million-request soak run does not grow the emulator's memory).
STARTS_KEPT = 100_000


@dataclass
class EmulatorStats:
    """What the emulator saw; tests read it to check the client's behaviour.

    Attributes:
        requests: Requests received on the merge-face route.
        statuses: Responses sent, by status (dropped connections are not here).
        faults: Faults injected, by kind.
        in_flight / peak_in_flight: Requests being handled now / at most at once.
        attempts: Attempts per job (a job is keyed by its two images' hashes).
        successes: Successful answers per job.
        chunked_requests: Requests that used chunked transfer encoding.
        missing_content_length: Requests without a Content-Length header.
        enterprise_requests: Valid requests that asked for the enterprise plan.
        handled: Successful merges timed in ``handling_seconds``.
        handling_seconds: The emulator's own time on those requests, from the
            body received to the answer ready (parse, wait for a merge worker,
            decode, merge, encode), not counting the latency knob or network
            I/O; benchmarks divide by ``handled`` for the per-request time.
        handling_cpu_seconds: CPU seconds of the parse and merge steps.
        connections: TCP connections that carried merge-face requests (a
            client that keeps its connections alive opens few).
        started_at: ``time.monotonic()`` of the latest requests (at most
            ``STARTS_KEPT``), for measuring a client's pace.
        first_request_at: ``time.monotonic()`` of the first request, or None.
    """

    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    peak_in_flight: int = 0
    attempts: Counter[str] = field(default_factory=Counter)
    successes: Counter[str] = field(default_factory=Counter)
    chunked_requests: int = 0
    missing_content_length: int = 0
    enterprise_requests: int = 0
    started_at: deque[float] = field(default_factory=lambda: deque(maxlen=STARTS_KEPT))
    first_request_at: float | None = None
    handled: int = 0
    handling_seconds: float = 0.0
    handling_cpu_seconds: float = 0.0
    connections: int = 0
    # The connections' transports seen so far; weak, so a closed one's memory
    # (and identity) can be reused without being mistaken for it.
    _transports: weakref.WeakSet[object] = field(default_factory=weakref.WeakSet, repr=False)

    def count_connection(self, transport: object) -> None:
        """Count a connection (its transport) the first time it carries a request."""
        if transport is not None and transport not in self._transports:
            self._transports.add(transport)
            self.connections += 1

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready snapshot."""
        return {
            "requests": self.requests,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "faults": dict(self.faults),
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "attempts": dict(self.attempts),
            "successes": dict(self.successes),
            "chunked_requests": self.chunked_requests,
            "missing_content_length": self.missing_content_length,
            "enterprise_requests": self.enterprise_requests,
            "handled": self.handled,
            "handling_seconds": self.handling_seconds,
            "handling_cpu_seconds": self.handling_cpu_seconds,
            "connections": self.connections,
            # time.monotonic() of the first request (system-wide on Linux).
            "first_request_at": self.first_request_at,
        }


def job_key(face: bytes, image: bytes) -> str:
    """The emulator's identity of a job: hashes of its two decoded images."""
    return hashlib.sha1(face).hexdigest()[:16] + ":" + hashlib.sha1(image).hexdigest()[:16]


class _TokenBucket:
    """Per-key rate limit: ``rpm`` per minute, ``burst`` at once."""

    def __init__(self, rpm: float, burst: int) -> None:
        self.rate = rpm / 60.0
        self.burst = float(max(1, burst))
        self._tokens: dict[str, tuple[float, float]] = {}

    def take(self, key: str, now: float) -> float:
        """Take a token; return 0 if allowed, else seconds until one is free."""
        tokens, last = self._tokens.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._tokens[key] = (tokens - 1.0, now)
            return 0.0
        self._tokens[key] = (tokens, now)
        return (1.0 - tokens) / self.rate


class _SlidingWindow:
    """Per-key rate limit: at most ``rpm * window / 60`` requests in any ``window`` seconds.

    The other way a per-minute limit is commonly kept: with no burst allowance
    beyond the window's count, but the whole count may come at once.
    """

    def __init__(self, rpm: float, window: float) -> None:
        self.window = window
        self.limit = max(1, int(rpm * window / 60.0))
        self._starts: dict[str, collections.deque[float]] = {}

    def take(self, key: str, now: float) -> float:
        """Count a request; return 0 if allowed, else seconds until the window has room."""
        starts = self._starts.setdefault(key, collections.deque())
        while starts and starts[0] <= now - self.window:
            starts.popleft()
        if len(starts) < self.limit:
            starts.append(now)
            return 0.0
        return starts[0] + self.window - now


class _State:
    """Mutable per-app state: config, dice, limiter, merge pool."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.rng = random.Random(config.faults.seed)
        self.limiter: _TokenBucket | _SlidingWindow | None = None
        if config.rate_limit_rpm and config.rate_limit_kind == "window":
            self.limiter = _SlidingWindow(config.rate_limit_rpm, config.rate_limit_window)
        elif config.rate_limit_rpm:
            self.limiter = _TokenBucket(config.rate_limit_rpm, config.rate_limit_burst)
        self.merge, self.engine_name = select_merge(config.engine)
        self.merge_limiter = anyio.CapacityLimiter(config.merge_workers)
        self.successes_total = 0
        # Merges under way that would spend balance if they succeed: counted
        # against the balance up front, so concurrent requests cannot overspend it.
        self.balance_held = 0

    def fault_roll(self, key: str, attempt: int) -> float:
        """The fault dice for one attempt: with a seed, a function of the seed,
        the job and the attempt, so concurrent runs repeat whatever the order
        their requests arrive in."""
        seed = self.config.faults.seed
        if seed is None:
            return self.rng.random()
        return random.Random(f"{seed}/{key}/{attempt}").random()


STATS = web.AppKey("stats", EmulatorStats)
CONFIG = web.AppKey("config", EmulatorConfig)
_STATE = web.AppKey("state", _State)


def _error(status: int, reason: str, message: str, **headers: str) -> web.Response:
    """An answer in the API's error shape."""
    body = {"code": status, "reason": reason, "message": message, "metadata": {}}
    return web.json_response(body, status=status, headers=headers or None)


def _check_key(request: web.Request, keys: tuple[str, ...]) -> web.Response | None:
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer ") or not auth[7:].strip():
        return _error(400, "MISSING_API_KEY", "missing API key in the Authorization header")
    # aiohttp keeps header bytes that are not UTF-8 as surrogates; encode them
    # back the same way so such a key is simply wrong, not a crash.
    given = auth[7:].strip().encode("utf-8", "surrogateescape")
    # Compare against every key, in constant time, without stopping early.
    matches = [hmac.compare_digest(given, key.encode()) for key in keys]
    if not any(matches):
        return _error(403, "INVALID_API_KEY", "invalid API key")
    return None


def _parse_body(raw: bytes) -> tuple[bytes, bytes, str, bool] | web.Response:
    """Decode the request JSON; return (face, image, type, enterprise) or an error response."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _error(400, "INVALID_REQUEST_BODY", "request body is not valid JSON")
    except RecursionError:
        return _error(400, "INVALID_REQUEST_BODY", "request body is nested too deeply")
    if not isinstance(body, dict):
        return _error(400, "INVALID_REQUEST_BODY", "request body must be a JSON object")
    decoded: list[bytes] = []
    for name in ("face_image_file", "image_file"):
        value = body.get(name)
        if not isinstance(value, str) or not value:
            return _error(400, "INVALID_REQUEST_BODY", f"{name} is required (a base64 string)")
        try:
            decoded.append(b64decode_strict(value.encode("ascii")))
        except (binascii.Error, ValueError, UnicodeEncodeError):
            return _error(400, "INVALID_REQUEST_BODY", f"{name} is not valid base64")
    extra = body.get("extra")
    if extra is None:
        extra = {}
    elif not isinstance(extra, dict):
        return _error(400, "INVALID_REQUEST_BODY", "extra must be a JSON object")
    image_type = extra.get("response_image_type", "png")
    if image_type not in RESPONSE_IMAGE_TYPES:
        return _error(400, "INVALID_REQUEST_BODY",
                      f"extra.response_image_type must be one of {', '.join(RESPONSE_IMAGE_TYPES)}")
    plan = extra.get("enterprise_plan")
    enterprise = isinstance(plan, dict) and plan.get("enabled") is True
    return decoded[0], decoded[1], image_type, enterprise


class _BadImage(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def _open_checked(data: bytes, name: str) -> Image.Image:
    """Open an input as the API would, raising _BadImage with the API's reason."""
    if len(data) > MAX_IMAGE_BYTES:
        raise _BadImage("IMAGE_FILE_EXCEEDS_MAX_SIZE", f"{name} exceeds 30 MB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise _BadImage("IMAGE_EXCEEDS_MAX_RESOLUTION", f"{name} exceeds 2048x2048") from None
    except Exception:
        raise _BadImage("INVALID_IMAGE_FORMAT", f"{name} is not a supported image") from None
    if image.format not in _ALLOWED_FORMATS:
        raise _BadImage("INVALID_IMAGE_FORMAT", f"{name} must be PNG, JPEG or WebP")
    if max(image.size) > MAX_IMAGE_SIDE:
        raise _BadImage("IMAGE_EXCEEDS_MAX_RESOLUTION", f"{name} exceeds 2048x2048")
    try:
        image.load()
    except Exception:
        raise _BadImage("INVALID_IMAGE_FORMAT", f"{name} could not be decoded") from None
    if image.mode in _WIDE_GREY_MODES:
        return image.convert("I").point(lambda value: value * (1 / 256), "L")
    return image


def _merge_to_body(merge: MergeFn, face: bytes, image: bytes, image_type: str, png_level: int) -> bytes:
    """Decode, merge, encode and wrap in the success JSON (runs in a thread)."""
    face_img = _open_checked(face, "face_image_file")
    target_img = _open_checked(image, "image_file")
    result = merge(face_img, target_img)
    encoded = b64encode(encode_result(result, image_type, png_level))
    return b'{"image_file":"' + encoded + b'","image_type":"' + image_type.encode() + b'"}'


def _timed_merge_to_body(
    merge: MergeFn, face: bytes, image: bytes, image_type: str, png_level: int
) -> tuple[bytes, float]:
    """_merge_to_body plus the CPU seconds it took, timed in the worker thread."""
    cpu = time.thread_time()
    body = _merge_to_body(merge, face, image, image_type, png_level)
    return body, time.thread_time() - cpu


def _timed_parse(raw: bytes) -> tuple[tuple[bytes, bytes, str, bool] | web.Response, str, float]:
    """Parse the body and key the job, timed, in a worker thread.

    JSON-parsing and base64-decoding two 30 MB images, then hashing them, takes
    long enough to stall every other request if done on the event loop.
    """
    cpu = time.thread_time()
    parsed = _parse_body(raw)
    key = "" if isinstance(parsed, web.Response) else job_key(parsed[0], parsed[1])
    return parsed, key, time.thread_time() - cpu


async def _inject(kind: str, request: web.Request, state: _State) -> web.StreamResponse:
    """Answer one attempt with fault ``kind``."""
    config = state.config.faults
    if kind == "500":
        return _error(500, "CREATE_TASK_FAILED", "failed to create task")
    if kind == "502_html":
        html = "<html><head><title>502 Bad Gateway</title></head><body>bad gateway</body></html>"
        return web.Response(status=502, text=html, content_type="text/html")
    if kind == "503":
        return _error(503, "SERVICE_UNAVAILABLE", "surge protection: try again later")
    if kind == "429":
        return _error(429, "RATE_LIMIT_EXCEEDED", "rate limit exceeded")
    if kind == "429_retry_after":
        return _error(429, "RATE_LIMIT_EXCEEDED", "rate limit exceeded", **{"Retry-After": "1"})
    if kind == "huge_error":
        message = "x" * (10 * 1024 * 1024)
        return _error(500, "TASK_FAILED", message)
    if kind == "bad_json":
        return web.Response(status=200, text="<html>not json</html>", content_type="application/json")
    if kind == "no_image_file":
        return web.json_response({"image_type": "png"})
    if kind == "bad_base64":
        return web.Response(status=200, body=b'{"image_file":"@@not base64@@","image_type":"png"}',
                            content_type="application/json")
    if kind == "slow":
        await asyncio.sleep(config.slow_seconds)
        return _error(500, "TASK_FAILED", "too slow")
    if kind == "drip":
        body = _drip_body()
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        for index in range(len(body)):
            await response.write(body[index : index + 1])
            await asyncio.sleep(config.drip_interval)
        return response
    raise AssertionError(f"fault {kind} is handled by the caller")


@functools.cache
def _drip_body() -> bytes:
    """A small but real success body (a 1x1 PNG) for the ``drip`` fault."""
    png = stored_png(Image.new("RGB", (1, 1), (128, 128, 128)))
    return b'{"image_file":"' + b64encode(png) + b'","image_type":"png"}'


async def _discard_body(request: web.Request, limit: int) -> None:
    """Read the request body without keeping it, up to ``limit`` bytes."""
    seen = 0
    while seen <= limit and (piece := await request.content.readany()):
        seen += len(piece)


def _drop(request: web.Request) -> web.StreamResponse:
    transport = request.transport
    if transport is not None:
        transport.abort()
    # Nothing can be sent any more; aiohttp discards this quietly.
    return web.Response(status=500)


async def _truncated(request: web.Request, body: bytes) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    return _drop(request)


def _pick_fault(state: _State, key: str, attempt: int) -> str | None:
    faults = state.config.faults
    if attempt <= faults.fail_first:
        return faults.fail_first_kind
    roll = state.fault_roll(key, attempt)
    for kind, rate in faults.rates.items():
        if roll < rate:
            return kind
        roll -= rate
    return None


async def _handle(request: web.Request, state: _State, stats: EmulatorStats) -> web.StreamResponse:
    if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
        stats.chunked_requests += 1
    if request.content_length is None:
        stats.missing_content_length += 1
    # The key is checked from the headers, as a gateway does, before the body
    # is held in memory; the body is still read (and dropped) before the
    # answer, so the client sees the error rather than a reset mid-upload.
    denied = _check_key(request, state.config.api_keys)
    if denied is not None:
        await _discard_body(request, state.config.max_body_bytes)
        return denied
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _error(400, "IMAGE_FILE_EXCEEDS_MAX_SIZE", "request body too large: images exceed 30 MB")
    if state.limiter is not None:
        key = request.headers["Authorization"][7:].strip()
        wait = state.limiter.take(key, time.monotonic())
        if wait > 0:
            headers = {"Retry-After": str(max(1, int(wait + 0.999)))} if (
                state.config.rate_limit_retry_after) else {}
            return _error(429, "RATE_LIMIT_EXCEEDED", "images per minute limit exceeded", **headers)
    if request.content_type != "application/json":  # parameters such as charset are fine
        return _error(400, "INVALID_REQUEST_BODY", "Content-Type must be application/json")
    handling_started = time.perf_counter()
    parsed, key, parse_cpu = await anyio.to_thread.run_sync(_timed_parse, raw)
    if isinstance(parsed, web.Response):
        return parsed
    face, image, image_type, enterprise = parsed
    del raw
    if enterprise:
        stats.enterprise_requests += 1
    stats.attempts[key] += 1
    fault = _pick_fault(state, key, stats.attempts[key])
    if fault is not None:
        stats.faults[fault] += 1
        if fault not in ("truncate", "drop", "wrong_content_type"):
            return await _inject(fault, request, state)
        if fault == "drop":
            return _drop(request)
    balance = state.config.balance
    if balance is not None and state.successes_total + state.balance_held >= balance:
        return _error(400, "BILLING_BALANCE_NOT_ENOUGH", "balance not enough")
    state.balance_held += 1
    try:
        delay = state.config.latency + state.rng.random() * state.config.jitter
        slept = time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        slept = time.perf_counter() - slept
        body, merge_cpu = await anyio.to_thread.run_sync(
            _timed_merge_to_body, state.merge, face, image, image_type, state.config.png_level,
            limiter=state.merge_limiter,
        )
    except _BadImage as exc:
        return _error(400, exc.reason, exc.message)
    except NoFaceFoundError as exc:
        name = "face_image_file" if exc.which == "face_image" else "image_file"
        return _error(400, "IMAGE_NO_FACE_DETECTED", f"no face detected in {name}")
    finally:
        state.balance_held -= 1
    if fault == "truncate":
        return await _truncated(request, body)
    stats.successes[key] += 1
    state.successes_total += 1
    stats.handled += 1
    stats.handling_seconds += time.perf_counter() - handling_started - slept
    stats.handling_cpu_seconds += parse_cpu + merge_cpu
    content_type = "text/plain" if fault == "wrong_content_type" else "application/json"
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _merge_face(request: web.Request) -> web.StreamResponse:
    stats = request.app[STATS]
    state = request.app[_STATE]
    stats.requests += 1
    stats.count_connection(request.transport)
    now = time.monotonic()
    if stats.first_request_at is None:
        stats.first_request_at = now
    stats.started_at.append(now)
    stats.in_flight += 1
    stats.peak_in_flight = max(stats.peak_in_flight, stats.in_flight)
    try:
        response = await _handle(request, state, stats)
        if request.transport is not None and not request.transport.is_closing():
            stats.statuses[response.status] += 1
        return response
    finally:
        stats.in_flight -= 1


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Answer a wrong path or method in the API's JSON error shape, as the API does."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPNotFound:
        return _error(404, "API_NOT_FOUND", f"no API at {request.path}")
    except web.HTTPMethodNotAllowed as exc:
        return _error(405, "METHOD_NOT_ALLOWED", f"{request.method} is not allowed here; use POST",
                      Allow=",".join(sorted(exc.allowed_methods)))


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS].as_dict())


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "engine": request.app[_STATE].engine_name})


def create_app(config: EmulatorConfig | None = None) -> web.Application:
    """Build the emulator's ``aiohttp.web.Application``.

    Routes: ``POST /v3/merge-face`` (the API), ``GET /_emulator/stats`` (counters
    as JSON) and ``GET /_emulator/health``.  ``app[STATS]`` holds the live
    counters for in-process tests.

    Example:
        >>> app = create_app(EmulatorConfig(latency=0.2))  # doctest: +SKIP
        >>> web.run_app(app, host="127.0.0.1", port=8080)  # doctest: +SKIP
    """
    config = config or EmulatorConfig()
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[_json_errors])
    app[CONFIG] = config
    app[STATS] = EmulatorStats()
    app[_STATE] = _State(config)
    app.router.add_post("/v3/merge-face", _merge_face)
    app.router.add_get("/_emulator/stats", _stats)
    app.router.add_get("/_emulator/health", _health)
    return app


def engine_name(app: web.Application) -> str:
    """Which merge step the app uses (``composite`` or ``face/<detector>``)."""
    return app[_STATE].engine_name
