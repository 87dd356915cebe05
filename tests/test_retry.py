"""Backoff arithmetic and the retry loop (tenacity kept private)."""

from __future__ import annotations

import base64
import email.utils
import gc
import random
import time

import anyio
import pytest
from aiohttp import web

import novita_async as na
from novita_async._errors import error_from_response
from novita_async._pacing import Pacer
from novita_async._retry import is_retryable, retry_call, wait_seconds

from .conftest import make_image, serving

pytestmark = pytest.mark.anyio

NO_WAIT = na.RetryPolicy(max_attempts=4, initial_wait=0.0, max_wait=0.0)


def server_error(n: int = 0) -> na.ServerError:
    """A transient 503 (distinguishable by its message)."""
    return na.ServerError(status=503, reason="SERVICE_UNAVAILABLE", message=f"busy {n}")


def rate_limited(retry_after: float | None) -> na.RateLimitError:
    """A 429 with an optional Retry-After."""
    return na.RateLimitError(retry_after=retry_after, status=429, reason="RATE_LIMIT_EXCEEDED",
                             message="slow down")


@pytest.mark.parametrize(
    ("retry_number", "expected"),
    [
        pytest.param(1, 0.5, id="first"),
        pytest.param(2, 1.0, id="second"),
        pytest.param(3, 2.0, id="third"),
        pytest.param(4, 4.0, id="fourth"),
        pytest.param(5, 5.0, id="capped"),
        pytest.param(50, 5.0, id="still-capped"),
        pytest.param(5000, 5.0, id="huge-number-no-overflow"),
    ],
)
def test_backoff_is_exponential_and_capped(retry_number: int, expected: float) -> None:
    """Without jitter the wait doubles from initial_wait up to max_wait."""
    policy = na.RetryPolicy(initial_wait=0.5, max_wait=5.0, jitter=0.0)
    assert policy.backoff(retry_number, 0.7) == expected
    assert wait_seconds(policy, server_error(), retry_number, 0.7) == expected


@pytest.mark.parametrize(
    ("jitter", "low", "high"),
    [
        pytest.param(1.0, 0.0, 4.0, id="full"),
        pytest.param(0.5, 2.0, 4.0, id="half"),
        pytest.param(0.0, 4.0, 4.0, id="none"),
    ],
)
def test_jitter_range(jitter: float, low: float, high: float) -> None:
    """Jitter spreads the wait over [base * (1 - jitter), base]."""
    policy = na.RetryPolicy(initial_wait=1.0, max_wait=60.0, jitter=jitter)
    assert policy.backoff(3, 0.0) == low
    assert policy.backoff(3, 0.999999) == pytest.approx(high, abs=1e-4)
    rng = random.Random(1)
    for _ in range(200):
        assert low <= policy.backoff(3, rng.random()) <= high


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [
        pytest.param(2.0, 2.0, id="honoured"),
        pytest.param(0.0, 0.0, id="zero"),
        pytest.param(500.0, 10.0, id="capped"),
        pytest.param(None, 1.0, id="absent-uses-backoff"),
    ],
)
def test_retry_after_wins_and_is_capped(retry_after: float | None, expected: float) -> None:
    """A server's Retry-After replaces the backoff, up to max_retry_after."""
    policy = na.RetryPolicy(initial_wait=1.0, jitter=0.0, max_retry_after=10.0)
    assert wait_seconds(policy, rate_limited(retry_after), 1, 0.5) == expected


def _http_date(seconds_from_now: float) -> str:
    """An HTTP date (whole seconds, GMT), as a Retry-After header may carry."""
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


@pytest.mark.parametrize(
    ("status", "body"),
    [
        pytest.param(500, b'{"code": 500, "reason": "TASK_FAILED", "message": "x"}', id="500"),
        pytest.param(502, b"<html><body>Bad Gateway</body></html>", id="502-html"),
        pytest.param(503, b"<html><body>Service Unavailable</body></html>", id="503-html"),
        pytest.param(504, b"", id="504-empty"),
        pytest.param(408, b"", id="408"),
        pytest.param(429, b'{"code": 429, "reason": "RATE_LIMIT_EXCEEDED", "message": "x"}', id="429"),
    ],
)
@pytest.mark.parametrize(
    ("header", "low", "high"),
    [
        pytest.param("2", 2.0, 2.0, id="seconds"),
        pytest.param("0", 0.0, 0.0, id="zero"),
        pytest.param("500", 10.0, 10.0, id="capped"),
        pytest.param("in-a-minute", 1.0, 1.0, id="unparseable-uses-backoff"),
    ],
)
def test_retry_after_sets_the_wait_on_every_retried_status(
    status: int, body: bytes, header: str, low: float, high: float
) -> None:
    """Retry-After on a 5xx or 408 sets the wait before the retry as on a 429, capped by max_retry_after."""
    policy = na.RetryPolicy(initial_wait=1.0, jitter=0.0, max_retry_after=10.0)
    error = error_from_response(status, {"Retry-After": header}, body)
    assert error.retryable
    assert low <= wait_seconds(policy, error, 1, 0.5) <= high


@pytest.mark.parametrize("status", [pytest.param(503, id="503"), pytest.param(429, id="429")])
def test_retry_after_as_an_http_date(status: int) -> None:
    """Retry-After as an HTTP date is the seconds until then, on a 503 as on a 429."""
    policy = na.RetryPolicy(initial_wait=0.0, max_wait=0.0, max_retry_after=60.0)
    error = error_from_response(status, {"Retry-After": _http_date(30)}, b"")
    assert error.retry_after is not None and 28.0 <= error.retry_after <= 31.0
    assert 28.0 <= wait_seconds(policy, error, 1, 0.5) <= 31.0
    past = error_from_response(status, {"Retry-After": _http_date(-30)}, b"")
    assert past.retry_after == 0.0


@pytest.mark.parametrize(
    ("status", "header", "max_retry_after", "low", "high"),
    [
        pytest.param(503, "0.4", 5.0, 0.38, 2.0, id="503-honoured"),
        pytest.param(502, "0.4", 5.0, 0.38, 2.0, id="502-honoured"),
        pytest.param(408, "0.4", 5.0, 0.38, 2.0, id="408-honoured"),
        pytest.param(503, "3600", 0.3, 0.28, 1.5, id="503-capped"),
        pytest.param(503, "not-a-number", 5.0, 0.0, 0.3, id="503-unparseable-backs-off"),
    ],
)
async def test_a_server_error_with_retry_after_waits_before_its_retry(
    status: int, header: str, max_retry_after: float, low: float, high: float
) -> None:
    """The client waits the Retry-After a 5xx or 408 asks for before retrying (within the policy's cap),
    without slowing its other requests: the shared pace is for 429s."""
    sent: list[float] = []
    image = make_image(size=(32, 32), seed=3)

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        sent.append(time.monotonic())
        if len(sent) == 1:
            return web.json_response({"code": status, "reason": "", "message": "busy", "metadata": {}},
                                     status=status, headers={"Retry-After": header})
        return web.json_response({"image_file": base64.b64encode(image).decode(),
                                  "image_type": "png"})

    policy = na.RetryPolicy(max_attempts=3, initial_wait=0.0, max_wait=0.0, max_retry_after=max_retry_after)
    async with serving(handler) as url, na.NovitaClient(api_key="sk_x", base_url=url, retry=policy) as client:
        result = await client.merge_face(make_image(seed=1), make_image(seed=2))
    assert result.attempts == 2
    assert low <= sent[1] - sent[0] <= high
    assert isinstance(client.pacer, Pacer)
    assert (client.pacer.rate_limited, client.pacer.rate) == (0, None)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"max_attempts": 0}, "max_attempts", id="zero-attempts"),
        pytest.param({"max_attempts": 2.5}, "max_attempts", id="float-attempts"),
        pytest.param({"initial_wait": -1.0}, "initial_wait", id="negative-wait"),
        pytest.param({"jitter": 1.5}, "jitter", id="jitter-above-1"),
        pytest.param({"total_timeout": -1.0}, "total_timeout", id="negative-total"),
    ],
)
def test_policy_validation(kwargs: dict[str, float], match: str) -> None:
    """RetryPolicy refuses nonsense values."""
    with pytest.raises(ValueError, match=match):
        na.RetryPolicy(**kwargs)  # type: ignore[arg-type]  # deliberately wrong types


def test_is_retryable() -> None:
    """Only NovitaErrors marked retryable are retried."""
    assert is_retryable(server_error())
    assert is_retryable(na.APIConnectionError("x"))
    assert not is_retryable(na.BadRequestError(status=400, reason=None, message="x"))
    assert not is_retryable(ConnectionError("not ours"))
    assert not is_retryable(na.SourceChangedError("x"))


async def test_success_after_retries_returns_attempts() -> None:
    """retry_call returns the result and how many attempts it took."""
    calls: list[int] = []

    async def attempt(number: int) -> str:
        calls.append(number)
        if number < 3:
            raise server_error(number)
        return "ok"

    assert await retry_call(attempt, NO_WAIT) == ("ok", 3)
    assert calls == [1, 2, 3]


async def test_first_try_success() -> None:
    """A first success is one attempt."""

    async def attempt(number: int) -> int:
        return number * 10

    assert await retry_call(attempt, NO_WAIT) == (10, 1)


async def test_reraises_the_last_real_error_with_attempts() -> None:
    """After the last attempt the last error itself is raised (no RetryError), with attempts."""
    raised: list[na.ServerError] = []

    async def attempt(number: int) -> None:
        raised.append(server_error(number))
        raise raised[-1]

    with pytest.raises(na.ServerError) as info:
        await retry_call(attempt, NO_WAIT)
    assert info.value is raised[-1]
    assert info.value.attempts == NO_WAIT.max_attempts
    assert len(raised) == NO_WAIT.max_attempts
    assert "tenacity" not in type(info.value).__module__


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(na.BadRequestError(status=400, reason="INVALID_REQUEST_BODY", message="x"),
                     id="bad-request"),
        pytest.param(na.AuthenticationError(status=403, reason="INVALID_API_KEY", message="x"),
                     id="auth"),
        pytest.param(na.SourceChangedError("changed"), id="source-changed"),
        pytest.param(na.OutputError("disk full"), id="output"),
        pytest.param(na.InvalidResponseError("not json"), id="bad-response"),
    ],
)
async def test_never_retries_a_non_retryable_error(error: na.NovitaError) -> None:
    """A non-retryable error surfaces after one attempt."""
    calls: list[int] = []

    async def attempt(number: int) -> None:
        calls.append(number)
        raise error

    with pytest.raises(type(error)) as info:
        await retry_call(attempt, NO_WAIT)
    assert info.value is error
    assert calls == [1]
    assert error.attempts == 1


async def test_foreign_exceptions_pass_through_unretried() -> None:
    """An exception that is not a NovitaError (a bug) is not retried or altered."""
    calls: list[int] = []

    async def attempt(number: int) -> None:
        calls.append(number)
        raise KeyError("bug")

    with pytest.raises(KeyError):
        await retry_call(attempt, NO_WAIT)
    assert calls == [1]


async def test_stops_at_total_timeout() -> None:
    """Retrying stops once total_timeout would be passed, long before max_attempts."""
    policy = na.RetryPolicy(max_attempts=10_000, initial_wait=0.01, max_wait=0.01, jitter=0.0,
                            total_timeout=0.2)
    calls: list[int] = []

    async def attempt(number: int) -> None:
        calls.append(number)
        raise server_error(number)

    started = time.monotonic()
    with pytest.raises(na.ServerError) as info:
        await retry_call(attempt, policy)
    elapsed = time.monotonic() - started
    assert 0.15 <= elapsed < 1.0
    assert 2 <= len(calls) < 100
    assert info.value.attempts == len(calls)


async def test_waits_what_wait_seconds_says() -> None:
    """The loop sleeps the Retry-After a 429 asks for (a tiny one here)."""
    policy = na.RetryPolicy(max_attempts=3, initial_wait=0.0, max_wait=0.0, max_retry_after=0.1)

    async def attempt(number: int) -> str:
        if number == 1:
            raise rate_limited(0.08)
        return "ok"

    started = time.monotonic()
    assert await retry_call(attempt, policy) == ("ok", 2)
    assert time.monotonic() - started >= 0.07


async def test_cancellation_is_not_retried() -> None:
    """Cancelling the caller stops the loop at once; the attempt is not run again."""
    calls: list[int] = []

    async def attempt(number: int) -> None:
        calls.append(number)
        await anyio.sleep(10)

    with anyio.move_on_after(0.05) as scope:
        await retry_call(attempt, NO_WAIT)
    assert scope.cancelled_caught
    assert calls == [1]


async def test_retries_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Each retry is logged at INFO with the failure and the attempt number."""
    caplog.set_level("INFO", logger="novita_async")

    async def attempt(number: int) -> str:
        if number < 3:
            raise server_error(number)
        return "ok"

    await retry_call(attempt, NO_WAIT, what="merge-face")
    messages = [r.getMessage() for r in caplog.records if r.name == "novita_async"]
    assert len(messages) == 2
    assert "HTTP 503 SERVICE_UNAVAILABLE (attempt 1 of 4)" in messages[0]
    assert "(attempt 2 of 4)" in messages[1]


async def test_deadline_counts_the_first_attempt() -> None:
    """total_timeout runs from the first attempt: a slow first failure leaves no room for a retry."""
    policy = na.RetryPolicy(max_attempts=5, initial_wait=0.2, max_wait=0.2, jitter=0.0, total_timeout=0.3)
    calls: list[int] = []

    async def attempt(number: int) -> None:
        calls.append(number)
        await anyio.sleep(0.15)  # 0.15 s spent + 0.2 s wait > 0.3 s: no second attempt
        raise server_error(number)

    with pytest.raises(na.ServerError) as raised:
        await retry_call(attempt, policy)
    assert calls == [1]
    assert raised.value.attempts == 1


async def test_a_call_that_succeeds_at_once_leaves_no_reference_cycles() -> None:
    """No garbage for the cyclic collector per successful call (it cost a busy batch ~9% of its CPU)."""

    async def attempt(number: int) -> str:
        return "ok"

    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(20):
            assert await retry_call(attempt, NO_WAIT) == ("ok", 1)
        gc.collect()
        cyclic = [type(o).__module__ for o in gc.garbage]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert [m for m in cyclic if m.startswith(("tenacity", "novita_async"))] == []
