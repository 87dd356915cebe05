"""The emulator's aiohttp application: the Merge Face contract, faults and counters."""

from __future__ import annotations

import asyncio
import binascii
import hmac
import io
import json
import logging
import random
import time
import warnings
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
from aiohttp import web
from PIL import Image

from novita_async._b64 import b64decode_strict, b64encode
from novita_async._config import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, RESPONSE_IMAGE_TYPES
from novita_async.emulator._budget import BodyBudget
from novita_async.emulator._config import EmulatorConfig
from novita_async.emulator._facemerge import NoFaceFoundError
from novita_async.emulator._faults import LATE_FAULTS, dripped, drop, error_response, inject, truncated
from novita_async.emulator._merge import MergeFn, encode_result, select_merge
from novita_async.emulator._ratelimit import SlidingWindow, TokenBucket
from novita_async.emulator._requestlog import log_requests, note_fault
from novita_async.emulator._stats import EmulatorStats, job_key

__all__ = ["CONFIG", "STATS", "EmulatorStats", "create_app"]

logger = logging.getLogger("novita_async.emulator")

# MPO is a JPEG with more pictures after the first (phone cameras write it);
# any JPEG decoder reads its first picture, so it is accepted as a JPEG.
_ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP"})
# Greyscale images with more than 8 bits per sample (16-bit PNGs); Pillow's
# convert("RGB") clips these instead of scaling them, so they are scaled first.
_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


class _State:
    """Mutable per-app state: config, dice, limiter, merge pool, body budget."""

    def __init__(self, config: EmulatorConfig, stats: EmulatorStats) -> None:
        self.config = config
        self.rng = random.Random(config.faults.seed)
        self.limiter: TokenBucket | SlidingWindow | None = None
        if config.rate_limit_rpm and config.rate_limit_kind == "window":
            self.limiter = SlidingWindow(config.rate_limit_rpm, config.rate_limit_window)
        elif config.rate_limit_rpm:
            self.limiter = TokenBucket(config.rate_limit_rpm, config.rate_limit_burst)
        self.merge, self.engine_name = select_merge(config.engine)
        self.merge_limiter = anyio.CapacityLimiter(config.merge_workers)
        self.successes_total = 0
        # Merges under way that would spend balance if they succeed: counted
        # against the balance up front, so concurrent requests cannot overspend it.
        self.balance_held = 0
        self.body_budget = BodyBudget(config.max_body_bytes_held, stats)

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


def _check_key(request: web.Request, keys: tuple[str, ...]) -> web.Response | None:
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer ") or not auth[7:].strip():
        return error_response(400, "MISSING_API_KEY", "missing API key in the Authorization header")
    # aiohttp keeps header bytes that are not UTF-8 as surrogates; encode them
    # back the same way so such a key is simply wrong, not a crash.
    given = auth[7:].strip().encode("utf-8", "surrogateescape")
    # Compare against every key, in constant time, without stopping early.
    matches = [hmac.compare_digest(given, key.encode()) for key in keys]
    if not any(matches):
        return error_response(403, "INVALID_API_KEY", "invalid API key")
    return None


def _load_json(raw: bytearray) -> Any:
    """``json.loads(raw)``, emptying ``raw`` as soon as its text is decoded.

    The body's bytes, its text and the parsed strings would otherwise all be
    alive at once: three times the body instead of two.

    Raises:
        ValueError, UnicodeDecodeError, RecursionError: as ``json.loads``.
    """
    # The same decoding json.loads applies to bytes (UTF-8, -16 or -32).
    text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    raw.clear()
    return json.loads(text)


def _parse_body(raw: bytearray) -> tuple[bytes, bytes, str, bool] | web.Response:
    """Decode the request JSON; return (face, image, type, enterprise) or an error response.

    ``raw`` is emptied on the way (its memory is freed before the images are decoded).
    """
    try:
        body = _load_json(raw)
    except (ValueError, UnicodeDecodeError):
        return error_response(400, "INVALID_REQUEST_BODY", "request body is not valid JSON")
    except RecursionError:
        return error_response(400, "INVALID_REQUEST_BODY", "request body is nested too deeply")
    if not isinstance(body, dict):
        return error_response(400, "INVALID_REQUEST_BODY", "request body must be a JSON object")
    decoded: list[bytes] = []
    for name in ("face_image_file", "image_file"):
        # Popped, so each base64 text is freed once its image is decoded.
        value = body.pop(name, None)
        if not isinstance(value, str) or not value:
            return error_response(400, "INVALID_REQUEST_BODY", f"{name} is required (a base64 string)")
        try:
            decoded.append(b64decode_strict(value.encode("ascii")))
        except (binascii.Error, ValueError, UnicodeEncodeError):
            return error_response(400, "INVALID_REQUEST_BODY", f"{name} is not valid base64")
        del value
    extra = body.get("extra")
    if extra is None:
        extra = {}
    elif not isinstance(extra, dict):
        return error_response(400, "INVALID_REQUEST_BODY", "extra must be a JSON object")
    image_type = extra.get("response_image_type", "png")
    if image_type not in RESPONSE_IMAGE_TYPES:
        return error_response(400, "INVALID_REQUEST_BODY",
                      f"extra.response_image_type must be one of {', '.join(RESPONSE_IMAGE_TYPES)}")
    enterprise = _enterprise_plan(extra)
    if isinstance(enterprise, web.Response):
        return enterprise
    return decoded[0], decoded[1], image_type, enterprise


def _enterprise_plan(extra: dict[str, Any]) -> bool | web.Response:
    """Whether ``extra.enterprise_plan`` asks for the dedicated endpoints, or a 400 for a malformed one.

    Strict like the rest of ``extra``: ``"enterprise_plan": true`` (the easy
    mistake) would otherwise pass for "not enterprise", and a client sending
    it would never learn that it never used the dedicated endpoints.
    """
    if "enterprise_plan" not in extra:
        return False
    plan = extra["enterprise_plan"]
    if not isinstance(plan, dict) or not isinstance(plan.get("enabled", False), bool):
        return error_response(400, "INVALID_REQUEST_BODY",
                              'extra.enterprise_plan must be an object such as {"enabled": true}, '
                              "with enabled a boolean")
    return plan.get("enabled") is True


class _BadImage(Exception):
    def __init__(self, reason: str, message: str, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.reason, self.message, self.metadata = reason, message, metadata


def _open_checked(data: bytes, name: str, max_bytes: int) -> Image.Image:
    """Open an input as the API would, raising _BadImage with the API's reason."""
    if len(data) > max_bytes:
        # The metadata says which reading of "30 MB" refused it (see EmulatorConfig.max_image_bytes).
        raise _BadImage("IMAGE_FILE_EXCEEDS_MAX_SIZE", f"{name} exceeds 30 MB ({len(data):,} bytes)",
                        {"field": name, "size_bytes": str(len(data)), "max_bytes": str(max_bytes)})
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
    if min(image.size) < MIN_IMAGE_SIDE:
        width, height = image.size
        raise _BadImage("INVALID_IMAGE_SIZE",
                        f"{name} is {width}x{height}; each side must be at least {MIN_IMAGE_SIDE} pixels")
    try:
        image.load()
    except Exception:
        raise _BadImage("INVALID_IMAGE_FORMAT", f"{name} could not be decoded") from None
    if image.mode in _WIDE_GREY_MODES:
        return image.convert("I").point(lambda value: value * (1 / 256), "L")
    return image


def _merge_to_body(merge: MergeFn, face: bytes, image: bytes, image_type: str, config: EmulatorConfig) -> bytes:
    """Decode, merge, encode and wrap in the success JSON (runs in a thread)."""
    face_img = _open_checked(face, "face_image_file", config.max_image_bytes)
    target_img = _open_checked(image, "image_file", config.max_image_bytes)
    result = merge(face_img, target_img)
    encoded = b64encode(encode_result(result, image_type, config.png_level))
    return b'{"image_file":"' + encoded + b'","image_type":"' + image_type.encode() + b'"}'


def _timed_merge_to_body(
    merge: MergeFn, face: bytes, image: bytes, image_type: str, config: EmulatorConfig
) -> tuple[bytes, float]:
    """_merge_to_body plus the CPU seconds it took, timed in the worker thread."""
    cpu = time.thread_time()
    body = _merge_to_body(merge, face, image, image_type, config)
    return body, time.thread_time() - cpu


def _timed_parse(raw: bytearray) -> tuple[tuple[bytes, bytes, str, bool] | web.Response, str, float]:
    """Parse the body and key the job, timed, in a worker thread.

    JSON-parsing and base64-decoding two 30 MB images, then hashing them, takes
    long enough to stall every other request if done on the event loop.
    """
    cpu = time.thread_time()
    parsed = _parse_body(raw)
    key = "" if isinstance(parsed, web.Response) else job_key(parsed[0], parsed[1])
    return parsed, key, time.thread_time() - cpu


class _BodyTooLarge(Exception):
    """More than ``max_body_bytes`` of request body arrived."""


@dataclass(frozen=True)
class _Fault:
    """A fault to answer with once the request's images are let go.

    Attributes:
        kind: The fault (see ``FAULT_KINDS``).
        body: The merged answer, for a fault that spoils one (``truncate``, ``drip``).
    """

    kind: str
    body: bytes = b""


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


def _count_framing(request: web.Request, stats: EmulatorStats) -> None:
    if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
        stats.chunked_requests += 1
    if request.content_length is None:
        stats.missing_content_length += 1


def _body_reservation(request: web.Request, config: EmulatorConfig) -> int:
    """Budget bytes a request reserves before its body is read: its Content-Length,
    or, without one (chunked), the largest body it may send."""
    length = request.content_length
    return config.max_body_bytes if length is None else min(length, config.max_body_bytes)


async def _read_body(request: web.Request, limit: int, *, keep: bool) -> bytearray:
    """Read the whole request body into one buffer, or (``keep=False``) read and drop it.

    Unlike ``request.read()``, the bytes are not cached on the request (where
    they would stay until the answer is sent) nor copied once more at the end.

    Raises:
        _BodyTooLarge: more than ``limit`` bytes came, when keeping them (a
            dropped body just stops being read there).
    """
    buffer = bytearray()
    seen = 0
    while piece := await request.content.readany():
        seen += len(piece)
        if seen > limit:
            if keep:
                raise _BodyTooLarge
            break
        if keep:
            buffer += piece
    return buffer


async def _receive(
    request: web.Request, state: _State, stats: EmulatorStats, *, keep: bool
) -> bytearray | web.StreamResponse:
    """The request body, read within ``body_read_timeout``; else what to answer instead."""
    config = state.config
    try:
        with anyio.fail_after(config.body_read_timeout):
            return await _read_body(request, config.max_body_bytes, keep=keep)
    except TimeoutError:
        # A client that stalls mid-body would hold its connection (and its
        # share of the body budget) for good: close it as a proxy would; the
        # client sees a dropped connection, which it may retry.
        stats.body_read_timeouts += 1
        logger.info("closed a connection whose request body took over %g s", config.body_read_timeout)
        return drop(request)
    except _BodyTooLarge:
        return error_response(400, "IMAGE_FILE_EXCEEDS_MAX_SIZE", "request body too large: images exceed 30 MB",
                              metadata={"max_body_bytes": str(config.max_body_bytes)})


def _limit_metadata(config: EmulatorConfig) -> dict[str, str]:
    """The rate limit a 429 enforced, as the string map API errors carry."""
    if config.rate_limit_kind == "window":
        return {"limit": f"{config.rate_limit_rpm:g}/min", "kind": "window",
                "window_seconds": f"{config.rate_limit_window:g}"}
    return {"limit": f"{config.rate_limit_rpm:g}/min", "kind": "bucket", "burst": str(config.rate_limit_burst)}


def _refuse_before_parsing(request: web.Request, state: _State) -> web.Response | None:
    """A 429 from the rate limit, or a 400 for a body that is not JSON; None to go on."""
    if state.limiter is not None:
        key = request.headers["Authorization"][7:].strip()
        wait = state.limiter.take(key, time.monotonic())
        if wait > 0:
            headers = {"Retry-After": str(max(1, int(wait + 0.999)))} if (
                state.config.rate_limit_retry_after) else {}
            return error_response(429, "RATE_LIMIT_EXCEEDED", "images per minute limit exceeded",
                                  metadata=_limit_metadata(state.config), headers=headers)
    if request.content_type != "application/json":  # parameters such as charset are fine
        return error_response(400, "INVALID_REQUEST_BODY", "Content-Type must be application/json")
    return None


async def _merge(
    state: _State, face: bytes, image: bytes, image_type: str
) -> tuple[bytes, float, float] | web.Response:
    """Merge after the latency knob: (answer body, seconds slept, CPU seconds), or the refusal."""
    balance = state.config.balance
    if balance is not None and state.successes_total + state.balance_held >= balance:
        return error_response(400, "BILLING_BALANCE_NOT_ENOUGH", "balance not enough")
    state.balance_held += 1
    try:
        delay = state.config.latency + state.rng.random() * state.config.jitter
        slept = time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        slept = time.perf_counter() - slept
        body, merge_cpu = await anyio.to_thread.run_sync(
            _timed_merge_to_body, state.merge, face, image, image_type, state.config,
            limiter=state.merge_limiter,
        )
        return body, slept, merge_cpu
    except _BadImage as exc:
        return error_response(400, exc.reason, exc.message, metadata=exc.metadata)
    except NoFaceFoundError as exc:
        name = "face_image_file" if exc.which == "face_image" else "image_file"
        return error_response(400, "IMAGE_NO_FACE_DETECTED", f"no face detected in {name}")
    finally:
        state.balance_held -= 1


async def _receive_and_merge(
    request: web.Request, state: _State, stats: EmulatorStats
) -> web.StreamResponse | _Fault:
    """Read, check, parse and merge one request: its answer, or the fault to answer with."""
    raw = await _receive(request, state, stats, keep=True)
    if isinstance(raw, web.StreamResponse):
        return raw
    refused = _refuse_before_parsing(request, state)
    if refused is not None:
        return refused
    handling_started = time.perf_counter()
    parsed, key, parse_cpu = await anyio.to_thread.run_sync(_timed_parse, raw)
    if isinstance(parsed, web.Response):
        return parsed
    face, image, image_type, enterprise = parsed
    if enterprise:
        stats.enterprise_requests += 1
    stats.attempts[key] += 1
    fault = _pick_fault(state, key, stats.attempts[key])
    if fault is not None:
        stats.faults[fault] += 1
        note_fault(fault)
        if fault == "drop":
            return drop(request)
        if fault not in LATE_FAULTS:
            return _Fault(fault)
    merged = await _merge(state, face, image, image_type)
    if isinstance(merged, web.Response):
        return merged
    body, slept, merge_cpu = merged
    if fault in ("truncate", "drip"):
        return _Fault(fault, body)
    stats.successes[key] += 1
    state.successes_total += 1
    stats.handled += 1
    stats.handling_seconds += time.perf_counter() - handling_started - slept
    stats.handling_cpu_seconds += parse_cpu + merge_cpu
    content_type = "text/plain" if fault == "wrong_content_type" else "application/json"
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _handle(request: web.Request, state: _State, stats: EmulatorStats) -> web.StreamResponse:
    _count_framing(request, stats)
    # The key is checked from the headers, as a gateway does, before the body
    # is held in memory; the body is still read (and dropped) before the
    # answer, so the client sees the error rather than a reset mid-upload.
    denied = _check_key(request, state.config.api_keys)
    if denied is not None:
        dropped = await _receive(request, state, stats, keep=False)
        return dropped if isinstance(dropped, web.StreamResponse) else denied
    # The body is read only once its bytes fit in the budget: until then the
    # client is held back by TCP flow control, not buffered here.
    async with state.body_budget.reserve(_body_reservation(request, state.config)):
        outcome = await _receive_and_merge(request, state, stats)
    # The body and its images went with _receive_and_merge's frame; a fault's
    # answer (which may take long: slow, drip) holds none of the budget.
    if not isinstance(outcome, _Fault):
        return outcome
    if outcome.kind == "truncate":
        return await truncated(request, outcome.body)
    if outcome.kind == "drip":
        return await dripped(request, outcome.body, state.config.faults.drip_interval)
    return await inject(outcome.kind, request, state.config.faults)


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
        return error_response(404, "API_NOT_FOUND", f"no API at {request.path}")
    except web.HTTPMethodNotAllowed as exc:
        return error_response(405, "METHOD_NOT_ALLOWED", f"{request.method} is not allowed here; use POST",
                              headers={"Allow": ",".join(sorted(exc.allowed_methods))})


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
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[log_requests, _json_errors])
    app[CONFIG] = config
    app[STATS] = EmulatorStats()
    app[_STATE] = _State(config, app[STATS])
    app.router.add_post("/v3/merge-face", _merge_face)
    app.router.add_get("/_emulator/stats", _stats)
    app.router.add_get("/_emulator/health", _health)
    return app


def engine_name(app: web.Application) -> str:
    """Which merge step the app uses (``composite`` or ``face/<detector>``)."""
    return app[_STATE].engine_name
