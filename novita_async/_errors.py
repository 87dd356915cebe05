"""The one exception tree of novita_async.

::

    NovitaError
    ├── ConfigurationError          bad client settings (no API key, bad URL)
    │   └── LedgerInUseError            a batch's ledger is held by another run
    ├── ClientClosedError           the client was used after close, or in another event loop
    ├── APIStatusError              the server answered with an error status (carries retry_after)
    │   ├── BadRequestError             400
    │   │   ├── NoFaceDetectedError         IMAGE_NO_FACE_DETECTED
    │   │   │   └── NoFaceFoundBeforeError      ... in an earlier run of a batch: not sent again
    │   │   └── InsufficientBalanceError    BILLING_BALANCE_NOT_ENOUGH
    │   ├── AuthenticationError         401, 400 MISSING_API_KEY, 403 INVALID_API_KEY
    │   ├── PermissionDeniedError       other 403 (BILLING_AUTH_FAILED, API_NOT_ALLOWED)
    │   ├── NotFoundError               404
    │   ├── RateLimitError              429 (also slows every request of the client)
    │   └── ServerError                 5xx
    ├── APIConnectionError          the request never got an answer
    │   └── APITimeoutError             ... because a time limit ran out
    ├── InvalidResponseError        a 2xx whose body is not the success shape
    ├── InvalidImageError           an input failed a local check; nothing was sent
    │   └── SourceChangedError          an input changed size while it was uploaded
    ├── OutputError                 the result could not be written where asked
    ├── DuplicateJobError           a batch job repeats an earlier job's id or output
    └── JobNotAttemptedError        a batch stopped before this job ran

Every error the library raises is one of these: aiohttp and tenacity
exceptions are translated at one boundary and chained as ``__cause__``.
``retryable`` says whether the retry layer treats the error as transient.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ClientClosedError",
    "ConfigurationError",
    "DuplicateJobError",
    "InsufficientBalanceError",
    "InvalidImageError",
    "InvalidResponseError",
    "JobNotAttemptedError",
    "LedgerInUseError",
    "NoFaceDetectedError",
    "NoFaceFoundBeforeError",
    "NotFoundError",
    "NovitaError",
    "OutputError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "SourceChangedError",
    "error_from_response",
    "parse_retry_after",
]

# Headers that proxies and API gateways commonly use for a request id; the
# Novita docs name none, so take the first that is present.
_REQUEST_ID_HEADERS = ("x-request-id", "x-novita-request-id", "request-id", "x-trace-id")


class NovitaError(Exception):
    """Base class of every error novita_async raises.

    Attributes:
        retryable: Whether retrying the same request may succeed.
        attempts: Attempts made before the error surfaced (set by the retry
            layer; 0 when it was raised before any attempt).
    """

    retryable: bool = False
    attempts: int = 0


class ConfigurationError(NovitaError, ValueError):
    """The client was configured wrongly (for example no API key)."""


class LedgerInUseError(ConfigurationError):
    """A batch's ledger is held by another run that is still going; nothing was sent.

    Two runs on one ledger would both send the same jobs (paying twice) and
    interleave their lines.  Raised when the batch starts, before any job.

    Attributes:
        path: The ledger file.
    """

    def __init__(self, path: str) -> None:
        super().__init__(
            f"ledger {path} is in use: another run is using it; wait for it to end, or give each "
            "run its own ledger (e.g. --shard K/N for workers sharing one job list, or --ledger FILE; "
            "ledger=... in Python)")
        self.path = path

    def __reduce__(self) -> tuple[type[LedgerInUseError], tuple[str]]:
        return type(self), (self.path,)


class ClientClosedError(NovitaError, RuntimeError):
    """The client was used after ``aclose()`` or outside its ``async with``.

    Also raised, before anything is sent, when a client is used in another
    event loop than the one it was first used in (a second ``asyncio.run()``):
    its connections belong to that loop.  Create one client per event loop,
    inside the coroutine that uses it.
    """


class APIStatusError(NovitaError):
    """The API answered with an error status.

    Attributes:
        status: HTTP status code.
        reason: The API's machine-readable reason (``"INVALID_REQUEST_BODY"``),
            or ``None`` when the body was not the API's error shape (an HTML page
            from a proxy, say).
        message: The API's human-readable message, or a summary of the body.
        metadata: The API's string map of extra details (may be empty).
        request_id: The server's request id header, when it sent one.
        body: The error body as received (at most 64 KiB of it).
        retry_after: Seconds the server asked to wait before trying again
            (its ``Retry-After`` header, delta-seconds or HTTP date), or
            ``None``.  The retry layer honours it on every status it retries
            (429, 5xx, 408), up to ``RetryPolicy.max_retry_after``.
    """

    retryable = False
    retry_after: float | None = None

    def __init__(
        self,
        *,
        status: int,
        reason: str | None,
        message: str,
        metadata: Mapping[str, str] | None = None,
        request_id: str | None = None,
        body: bytes = b"",
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})
        self.request_id = request_id
        self.body = body
        self.retry_after = retry_after
        super().__init__(self._render())

    def _render(self) -> str:
        head = f"HTTP {self.status}"
        if self.reason:
            head += f" {self.reason}"
        text = f"{head}: {self.message}" if self.message else head
        if self.request_id:
            text += f" (request id {self.request_id})"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only __init__ needs help to survive pickling (multiprocessing, Ray).
        return (_rebuild_status_error, (type(self), self.__dict__.copy()))


def _rebuild_status_error(cls: type[APIStatusError], state: dict[str, Any]) -> APIStatusError:
    error = cls.__new__(cls)
    error.__dict__.update(state)
    Exception.__init__(error, error._render())
    return error


class BadRequestError(APIStatusError):
    """400: the request was refused as it is; sending it again will not help."""


class NoFaceDetectedError(BadRequestError):
    """400 IMAGE_NO_FACE_DETECTED: a normal outcome in bulk work, reported per job."""


class NoFaceFoundBeforeError(NoFaceDetectedError):
    """A batch job the API found no face in during an earlier run, not sent again.

    Its two input files are unchanged since (same size and modification
    time), so the answer would be the same, and the request would still count
    against the rate limit.  ``resend_no_face=True`` (``--resend-no-face``)
    sends such jobs anyway.  The earlier ledger record stands; no line is added.
    """

    def _render(self) -> str:
        return f"{self.reason} in an earlier run: {self.message}"


class InsufficientBalanceError(BadRequestError):
    """400 BILLING_BALANCE_NOT_ENOUGH: every later request will fail too."""


class AuthenticationError(APIStatusError):
    """The API key is missing or invalid (400 MISSING_API_KEY, 401, 403 INVALID_API_KEY)."""


class PermissionDeniedError(APIStatusError):
    """403: the key is valid but may not use this API (billing, plan)."""


class NotFoundError(APIStatusError):
    """404: wrong base URL or path."""


class RateLimitError(APIStatusError):
    """429: the account's rate limit was exceeded.

    Unlike other retried statuses it slows every request of the client (the
    shared pace), for ``retry_after`` seconds when the server gave one.
    """

    retryable = True


class ServerError(APIStatusError):
    """5xx: the server or a proxy in front of it failed; transient."""

    retryable = True


class _RetryableStatusError(APIStatusError):
    """A status outside the classes above that is still transient (408)."""

    retryable = True


class APIConnectionError(NovitaError):
    """The request got no (complete) answer: refused, reset or dropped connection."""

    retryable = True


class APITimeoutError(APIConnectionError):
    """A time limit ran out before the answer was complete."""


class InvalidResponseError(NovitaError):
    """A 2xx answer whose body is not ``{"image_file": <base64>, ...}``.

    A body cut short in transit is retryable; a well-formed body of the wrong
    shape is not (the server would send it again).
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class InvalidImageError(NovitaError, ValueError):
    """An input image failed a local check (format, size, resolution, readable).

    Nothing was sent. The message names the input, the rule and the fix.

    Attributes:
        input_name: Which input: ``"face_image"`` or ``"image"``.
        source: A description of the input (its path, or its type and size).
        rule: Short name of the rule broken, e.g. ``"max_resolution"``.
    """

    def __init__(self, message: str, *, input_name: str = "", source: str = "", rule: str = "") -> None:
        super().__init__(message)
        self.input_name = input_name
        self.source = source
        self.rule = rule


class SourceChangedError(InvalidImageError):
    """An input changed size while it was being uploaded; the request was aborted."""


class OutputError(NovitaError, OSError):
    """The result could not be written to its destination (permissions, full disk)."""


class DuplicateJobError(NovitaError, ValueError):
    """A batch job has the id or the output path of an earlier job of the same run.

    It is not sent (that would do one job twice, or write two results to one
    file) and not written to the ledger (the earlier job's record stands).

    Attributes:
        job_id: The repeated job's id.
        output: The output path it shares with an earlier job, when that is the clash.
    """

    def __init__(self, message: str, *, job_id: str, output: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.output = output


class JobNotAttemptedError(NovitaError):
    """A batch stopped early (a fatal error) before this job was sent.

    Attributes:
        cause: The fatal error that stopped the batch.
    """

    def __init__(self, message: str, *, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


_BY_REASON: dict[str, type[APIStatusError]] = {
    "IMAGE_NO_FACE_DETECTED": NoFaceDetectedError,
    "BILLING_BALANCE_NOT_ENOUGH": InsufficientBalanceError,
    "MISSING_API_KEY": AuthenticationError,
    "INVALID_API_KEY": AuthenticationError,
}

_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    408: _RetryableStatusError,
    429: RateLimitError,
}


def error_class_for(status: int, reason: str | None) -> type[APIStatusError]:
    """The exception class for an error status and API reason (pure)."""
    if reason in _BY_REASON:
        return _BY_REASON[reason]
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if status >= 500:
        return ServerError
    return APIStatusError


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or HTTP date).

    Returns None when absent or unparseable; never negative.
    """
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    import datetime
    import email.utils
    import time

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # "-0000" gives a naive datetime; HTTP dates are always UTC.
        when = when.replace(tzinfo=datetime.timezone.utc)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def _summarise_body(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    if text.lstrip().lower().startswith(("<!doctype", "<html")):
        return "non-JSON (HTML) error body"
    text = " ".join(text.split())
    return text[:200] + ("..." if len(text) > 200 else "") if text else "empty error body"


def _leading_members(body: bytes) -> dict[str, object]:
    """The complete members at the start of a JSON object whose end was cut off (pure).

    An error body is read up to ERROR_BODY_CAP: past it, json.loads fails, and
    a reason sent in the first bytes would be lost with the rest.

    Stops quietly at the first member that is incomplete or not JSON.
    """
    text = body.decode("utf-8", "replace")
    decoder = json.JSONDecoder()
    members: dict[str, object] = {}
    pos = _skip_space(text, 0)
    if not text.startswith("{", pos):
        return members
    pos += 1
    try:
        while True:
            key, pos = decoder.raw_decode(text, _skip_space(text, pos))
            pos = _skip_space(text, pos)
            if not isinstance(key, str) or not text.startswith(":", pos):
                return members
            value, pos = decoder.raw_decode(text, _skip_space(text, pos + 1))
            members[key] = value
            pos = _skip_space(text, pos)
            if not text.startswith(",", pos):
                return members
            pos += 1
    except ValueError:  # a member cut off by the cap, or not JSON
        return members


_JSON_SPACE = re.compile(r"[ \t\r\n]*")


def _skip_space(text: str, pos: int) -> int:
    """Index of the first non-whitespace character at or after ``pos``."""
    match = _JSON_SPACE.match(text, pos)
    return match.end() if match is not None else pos


def error_from_response(
    status: int, headers: Mapping[str, str], body: bytes, *, redact: str | None = None
) -> APIStatusError:
    """Build the typed error for an error response (pure: no I/O).

    Args:
        status: HTTP status.
        headers: Response headers (case-insensitive mapping expected).
        body: The (capped) error body.
        redact: A secret (the API key) to scrub from anything kept.
    """
    reason: str | None = None
    message = ""
    metadata: dict[str, str] = {}
    try:
        parsed: object = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        parsed = _leading_members(body)  # cut at the cap, or not JSON at all
    if isinstance(parsed, dict):
        raw_reason = parsed.get("reason")
        reason = raw_reason if isinstance(raw_reason, str) and raw_reason else None
        raw_message = parsed.get("message")
        message = raw_message if isinstance(raw_message, str) else ""
        raw_meta = parsed.get("metadata")
        if isinstance(raw_meta, dict):
            metadata = {str(k): str(v) for k, v in raw_meta.items()}
    if not message:
        message = _summarise_body(body)
    if redact:
        message = message.replace(redact, "<redacted>")
        metadata = {k: v.replace(redact, "<redacted>") for k, v in metadata.items()}
        body = body.replace(redact.encode(), b"<redacted>")
    request_id = next((headers[h] for h in _REQUEST_ID_HEADERS if h in headers), None)
    if request_id is None:
        request_id = metadata.get("request_id")
    cls = error_class_for(status, reason)
    # Parsed for every status: a 503 or a proxy's 502 may ask for a pause as a 429 does.
    error = cls(
        status=status, reason=reason, message=message, metadata=metadata,
        request_id=request_id, body=body, retry_after=parse_retry_after(headers.get("Retry-After")),
    )
    if status >= 500 or status in (408, 429):
        # A 5xx mapped by reason (none today) must still be retried.
        error.retryable = True
    return error
