"""Pure tests of the error tree: status mapping, Retry-After, redaction, pickling."""

from __future__ import annotations

import email.utils
import json
import pickle
import traceback

import pytest
from multidict import CIMultiDict

import novita_async as na
from novita_async._errors import error_class_for, error_from_response, parse_retry_after

KEY = "sk_live_5ecret_K3y_value"


def api_body(status: int, reason: str, message: str = "text", **metadata: str) -> bytes:
    """An error body in the API's documented shape."""
    return json.dumps(
        {"code": status, "reason": reason, "message": message, "metadata": metadata}
    ).encode()


def headers(**values: str) -> CIMultiDict[str]:
    """Case-insensitive response headers, as aiohttp hands them over."""
    return CIMultiDict({name.replace("_", "-"): value for name, value in values.items()})


HTML_502 = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"


@pytest.mark.parametrize(
    ("status", "body", "cls", "reason", "retryable"),
    [
        pytest.param(400, api_body(400, "INVALID_REQUEST_BODY"), na.BadRequestError,
                     "INVALID_REQUEST_BODY", False, id="400-invalid-body"),
        pytest.param(400, api_body(400, "INVALID_IMAGE_FORMAT"), na.BadRequestError,
                     "INVALID_IMAGE_FORMAT", False, id="400-image-format"),
        pytest.param(400, api_body(400, "IMAGE_NO_FACE_DETECTED"), na.NoFaceDetectedError,
                     "IMAGE_NO_FACE_DETECTED", False, id="400-no-face"),
        pytest.param(400, api_body(400, "BILLING_BALANCE_NOT_ENOUGH"), na.InsufficientBalanceError,
                     "BILLING_BALANCE_NOT_ENOUGH", False, id="400-balance"),
        pytest.param(400, api_body(400, "MISSING_API_KEY"), na.AuthenticationError,
                     "MISSING_API_KEY", False, id="400-missing-key"),
        pytest.param(401, api_body(401, "UNAUTHORIZED"), na.AuthenticationError,
                     "UNAUTHORIZED", False, id="401"),
        pytest.param(403, api_body(403, "INVALID_API_KEY"), na.AuthenticationError,
                     "INVALID_API_KEY", False, id="403-invalid-key"),
        pytest.param(403, api_body(403, "BILLING_AUTH_FAILED"), na.PermissionDeniedError,
                     "BILLING_AUTH_FAILED", False, id="403-billing-auth"),
        pytest.param(403, api_body(403, "API_NOT_ALLOWED"), na.PermissionDeniedError,
                     "API_NOT_ALLOWED", False, id="403-not-allowed"),
        pytest.param(404, api_body(404, "API_NOT_FOUND"), na.NotFoundError,
                     "API_NOT_FOUND", False, id="404-api"),
        pytest.param(404, b"404: Not Found", na.NotFoundError, None, False, id="404-router-text"),
        pytest.param(408, b"", na.APIStatusError, None, True, id="408-retryable"),
        pytest.param(429, api_body(429, "RATE_LIMIT_EXCEEDED"), na.RateLimitError,
                     "RATE_LIMIT_EXCEEDED", True, id="429"),
        pytest.param(500, api_body(500, "CREATE_TASK_FAILED"), na.ServerError,
                     "CREATE_TASK_FAILED", True, id="500-create-task"),
        pytest.param(500, api_body(500, "BILLING_FAILED"), na.ServerError,
                     "BILLING_FAILED", True, id="500-billing"),
        pytest.param(502, HTML_502, na.ServerError, None, True, id="502-html"),
        pytest.param(503, api_body(503, "SERVICE_UNAVAILABLE"), na.ServerError,
                     "SERVICE_UNAVAILABLE", True, id="503"),
        pytest.param(504, b"upstream timed out", na.ServerError, None, True, id="504-text"),
        pytest.param(418, api_body(418, "TEAPOT"), na.APIStatusError, "TEAPOT", False,
                     id="418-unknown-4xx"),
    ],
)
def test_status_and_reason_map_to_class(
    status: int, body: bytes, cls: type[na.APIStatusError], reason: str | None, retryable: bool
) -> None:
    """Each documented status/reason becomes its own class with the right retryability."""
    error = error_from_response(status, headers(), body)
    assert type(error) is cls or (cls is na.APIStatusError and isinstance(error, cls))
    assert error.status == status
    assert error.reason == reason
    assert error.retryable is retryable


@pytest.mark.parametrize(
    ("status", "reason", "cls"),
    [
        pytest.param(400, "MISSING_API_KEY", na.AuthenticationError, id="missing-key"),
        pytest.param(403, "INVALID_API_KEY", na.AuthenticationError, id="invalid-key"),
        pytest.param(403, "SOMETHING_ELSE", na.PermissionDeniedError, id="other-403"),
        pytest.param(403, None, na.PermissionDeniedError, id="403-no-reason"),
        pytest.param(400, None, na.BadRequestError, id="400-no-reason"),
        pytest.param(599, None, na.ServerError, id="599"),
    ],
)
def test_error_class_for(status: int, reason: str | None, cls: type[na.APIStatusError]) -> None:
    """error_class_for picks the class from the reason first, then the status."""
    assert error_class_for(status, reason) is cls


def test_fields_are_kept() -> None:
    """Reason, message, metadata and body are kept as received."""
    body = api_body(400, "INVALID_IMAGE_SIZE", "image too small", field="image_file")
    error = error_from_response(400, headers(), body)
    assert error.message == "image too small"
    assert error.metadata == {"field": "image_file"}
    assert error.body == body
    assert error.request_id is None


def test_request_id_from_header() -> None:
    """A request id header is picked up, whatever its case."""
    error = error_from_response(500, headers(X_Request_Id="req-123"), api_body(500, "TASK_FAILED"))
    assert error.request_id == "req-123"


def test_request_id_from_metadata() -> None:
    """Without a header, a request_id in the metadata is used."""
    error = error_from_response(500, headers(), api_body(500, "TASK_FAILED", request_id="meta-9"))
    assert error.request_id == "meta-9"


def test_html_body_maps_by_status() -> None:
    """An HTML page from a proxy gives no reason and a short summary, not the page."""
    error = error_from_response(502, headers(), HTML_502)
    assert isinstance(error, na.ServerError)
    assert error.reason is None
    assert "HTML" in error.message
    assert "nginx" not in error.message


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\xfe not utf-8 \x80", id="binary"),
        pytest.param(b"[1, 2, 3]", id="json-array"),
        pytest.param(b'{"reason": 5, "message": ["x"], "metadata": "no"}', id="wrong-types"),
        pytest.param(b"x" * 5000, id="long-text"),
    ],
)
def test_non_json_or_odd_bodies(body: bytes) -> None:
    """Bodies that are not the API's shape still give a typed error with a short message."""
    error = error_from_response(500, headers(), body)
    assert isinstance(error, na.ServerError)
    assert error.reason is None
    assert error.metadata == {}
    assert 0 < len(error.message) <= 210


def test_key_is_redacted_everywhere() -> None:
    """The API key is scrubbed from the message, metadata and body."""
    body = api_body(403, "INVALID_API_KEY", f"key {KEY} is invalid", echo=f"Bearer {KEY}")
    error = error_from_response(403, headers(), body, redact=KEY)
    assert KEY not in error.message
    assert KEY not in str(error.metadata)
    assert KEY.encode() not in error.body
    assert "<redacted>" in error.message
    assert KEY not in str(error) + repr(error)
    assert KEY not in "".join(traceback.format_exception(error))


def test_key_is_redacted_from_summarised_body() -> None:
    """A non-JSON body echoing the key loses the key in the summary too."""
    error = error_from_response(502, headers(), f"proxy saw Authorization: Bearer {KEY}".encode(),
                                redact=KEY)
    assert KEY not in error.message
    assert KEY.encode() not in error.body


def test_429_with_retry_after_seconds() -> None:
    """A Retry-After in seconds is parsed onto RateLimitError.retry_after."""
    error = error_from_response(429, headers(Retry_After="7"), api_body(429, "RATE_LIMIT_EXCEEDED"))
    assert isinstance(error, na.RateLimitError)
    assert error.retry_after == 7.0


def test_429_with_retry_after_http_date() -> None:
    """A Retry-After HTTP date becomes the seconds until then."""
    import time

    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    error = error_from_response(429, headers(Retry_After=date), b"")
    assert isinstance(error, na.RateLimitError)
    assert error.retry_after is not None
    assert 25 <= error.retry_after <= 31


def test_429_without_retry_after() -> None:
    """A 429 with no Retry-After leaves retry_after None."""
    error = error_from_response(429, headers(), api_body(429, "RATE_LIMIT_EXCEEDED"))
    assert isinstance(error, na.RateLimitError)
    assert error.retry_after is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, None, id="absent"),
        pytest.param("", None, id="empty"),
        pytest.param("12", 12.0, id="seconds"),
        pytest.param(" 1.5 ", 1.5, id="fractional-with-spaces"),
        pytest.param("-3", 0.0, id="negative-clamped"),
        pytest.param("soon", None, id="garbage"),
        pytest.param("Thu, 01 Jan 1970 00:00:10 GMT", 0.0, id="date-in-the-past"),
        pytest.param("Thu, 01 Jan 1970 00:01:40 GMT", 60.0, id="date-ahead-of-now"),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    """parse_retry_after reads seconds or an HTTP date, never returns a negative wait."""
    assert parse_retry_after(value, now=40.0) == expected


def test_parse_retry_after_naive_date_is_utc(monkeypatch: pytest.MonkeyPatch) -> None:
    """A date with a -0000 zone (naive) is read as UTC, not as local time."""
    import time

    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        assert parse_retry_after("Thu, 01 Jan 1970 00:01:40 -0000", now=40.0) == 60.0
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(error_from_response(400, headers(), api_body(400, "IMAGE_NO_FACE_DETECTED",
                                                                  "no face", k="v")), id="no-face"),
        pytest.param(error_from_response(429, headers(Retry_After="3", X_Request_Id="r1"),
                                         api_body(429, "RATE_LIMIT_EXCEEDED")), id="rate-limit"),
        pytest.param(error_from_response(502, headers(), HTML_502), id="server-html"),
        pytest.param(error_from_response(403, headers(), api_body(403, "INVALID_API_KEY")),
                     id="auth"),
    ],
)
def test_pickling_keeps_fields(error: na.APIStatusError) -> None:
    """APIStatusError subclasses survive pickling with every field."""
    error.attempts = 4
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert copy.__dict__ == error.__dict__
    assert str(copy) == str(error)
    assert copy.retryable is error.retryable
    assert copy.attempts == 4


def test_str_contains_status_reason_message_and_request_id() -> None:
    """str() of a status error names the status, reason, message and request id."""
    error = error_from_response(500, headers(X_Request_Id="abc-42"),
                                api_body(500, "TASK_FAILED", "the task failed"))
    text = str(error)
    for part in ("500", "TASK_FAILED", "the task failed", "abc-42"):
        assert part in text


def test_local_errors_are_not_retryable() -> None:
    """Configuration, image and output errors are never retryable; connection ones are."""
    assert not na.ConfigurationError("x").retryable
    assert not na.InvalidImageError("x").retryable
    assert not na.SourceChangedError("x").retryable
    assert not na.OutputError("x").retryable
    assert na.APIConnectionError("x").retryable
    assert na.APITimeoutError("x").retryable
    assert na.InvalidResponseError("x", retryable=True).retryable
    assert not na.InvalidResponseError("x").retryable


def test_error_tree() -> None:
    """The documented hierarchy holds (a catch of the parent catches the child)."""
    assert issubclass(na.NoFaceDetectedError, na.BadRequestError)
    assert issubclass(na.InsufficientBalanceError, na.BadRequestError)
    assert issubclass(na.APITimeoutError, na.APIConnectionError)
    assert issubclass(na.SourceChangedError, na.InvalidImageError)
    for cls in (na.BadRequestError, na.AuthenticationError, na.PermissionDeniedError,
                na.NotFoundError, na.RateLimitError, na.ServerError):
        assert issubclass(cls, na.APIStatusError)
    assert issubclass(na.OutputError, OSError)
    assert issubclass(na.ConfigurationError, ValueError)
