"""Arguments of the wrong type or out of range: a clear error naming them, before anything is sent."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

import novita_async as na
from novita_async.emulator import Emulator

from .conftest import FAST_RETRY, make_image

pytestmark = pytest.mark.anyio

FACE = make_image(seed=1)
TARGET = make_image(size=(96, 80), seed=2)

#: Values no numeric setting takes: text, a bool (True is not 1 second), nan, infinity.
NOT_NUMBERS = [
    pytest.param("1", id="str"),
    pytest.param(True, id="bool"),
    pytest.param(math.nan, id="nan"),
    pytest.param(math.inf, id="inf"),
]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        pytest.param({"retry": 3}, "retry", id="retry-int"),
        pytest.param({"session": "x"}, "session", id="session-str"),
        pytest.param({"pacer": 5}, "pacer", id="pacer-int"),
        pytest.param({"api_key": 123}, "api_key", id="api-key-int"),
        pytest.param({"base_url": 8080}, "base_url", id="base-url-int"),
        pytest.param({"requests_per_minute": "10"}, "requests_per_minute", id="rpm-str"),
        pytest.param({"requests_per_minute": True}, "requests_per_minute", id="rpm-bool"),
        pytest.param({"requests_per_minute": math.nan}, "requests_per_minute", id="rpm-nan"),
        pytest.param({"requests_per_minute": math.inf}, "requests_per_minute", id="rpm-inf"),
        pytest.param({"max_concurrency": True}, "max_concurrency", id="concurrency-bool"),
        pytest.param({"timeout": "30"}, "timeout", id="timeout-str"),
        pytest.param({"timeout": True}, "timeout", id="timeout-bool"),
        pytest.param({"timeout": math.inf}, "timeout", id="timeout-inf"),
        pytest.param({"auto_resize": "no"}, "auto_resize", id="auto-resize-str"),
        pytest.param({"validate": "no"}, "validate", id="validate-str"),
    ],
)
def test_client_arguments_are_checked_at_construction(kwargs: dict[str, Any], name: str) -> None:
    """A wrong client argument is a ConfigurationError naming it, not an AttributeError at first use."""
    kwargs.setdefault("api_key", "sk_x")
    with pytest.raises(na.ConfigurationError, match=name):
        na.NovitaClient(**kwargs)


def test_a_malformed_key_is_not_shown() -> None:
    """A key of the wrong type is named, but its value never appears in the message."""
    with pytest.raises(na.ConfigurationError, match="api_key") as info:
        na.NovitaClient(api_key=b"sk_live_secret")  # type: ignore[arg-type]  # deliberately wrong
    assert "secret" not in str(info.value)


@pytest.mark.parametrize("value", NOT_NUMBERS)
@pytest.mark.parametrize("field", ["initial_wait", "max_wait", "total_timeout", "jitter", "max_retry_after"])
def test_retry_policy_numbers(field: str, value: object) -> None:
    """Each RetryPolicy field refuses text, bools, nan and infinity, naming the field."""
    with pytest.raises(na.ConfigurationError, match=f"RetryPolicy.{field}"):
        na.RetryPolicy(**{field: value})  # type: ignore[arg-type]  # deliberately wrong


def test_retry_policy_attempts_is_not_a_bool() -> None:
    """max_attempts=True is not one attempt."""
    with pytest.raises(na.ConfigurationError, match="max_attempts"):
        na.RetryPolicy(max_attempts=True)


@pytest.mark.parametrize("value", [*NOT_NUMBERS, pytest.param(0, id="zero")])
@pytest.mark.parametrize("field", ["total", "connect", "read", "pool"])
def test_timeout_numbers(field: str, value: object) -> None:
    """Each Timeout field refuses text, bools, nan, infinity and zero (no limit is unbounded)."""
    with pytest.raises(na.ConfigurationError, match=f"Timeout.{field}"):
        na.Timeout(**{field: value})  # type: ignore[arg-type]  # deliberately wrong


def test_configuration_errors_are_still_value_errors() -> None:
    """Callers catching ValueError from RetryPolicy and Timeout still catch these."""
    with pytest.raises(ValueError, match="initial_wait"):
        na.RetryPolicy(initial_wait=-1.0)
    with pytest.raises(ValueError, match="total"):
        na.Timeout(total=-1.0)


@pytest.mark.parametrize(
    "output",
    [pytest.param(5, id="int"), pytest.param(b"out.png", id="bytes"), pytest.param("", id="empty")],
)
async def test_bad_output_is_named(emulator: Emulator, tmp_path: Path, output: object) -> None:
    """output= that is not a file path is a ConfigurationError naming output; nothing is sent."""
    async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=FAST_RETRY) as client:
        with pytest.raises(na.ConfigurationError, match="output must be the path"):
            await client.merge_face(FACE, TARGET, output=output)  # type: ignore[arg-type]  # deliberately wrong
    assert emulator.stats.requests == 0


@pytest.mark.parametrize(
    "value", [pytest.param("no", id="str"), pytest.param(1, id="int"), pytest.param(None, id="none")]
)
async def test_enterprise_plan_must_be_a_bool(emulator: Emulator, value: object) -> None:
    """enterprise_plan="no" (truthy) does not buy the enterprise plan: it is refused, unsent."""
    async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=FAST_RETRY) as client:
        with pytest.raises(na.ConfigurationError, match="enterprise_plan"):
            await client.merge_face(FACE, TARGET, enterprise_plan=value)  # type: ignore[arg-type]  # deliberately wrong
    assert emulator.stats.requests == 0
    assert emulator.stats.enterprise_requests == 0


async def test_auto_resize_per_call_must_be_a_bool(emulator: Emulator) -> None:
    """merge_face(auto_resize="no") is refused rather than taken as True."""
    async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=FAST_RETRY) as client:
        with pytest.raises(na.ConfigurationError, match="auto_resize"):
            await client.merge_face(FACE, TARGET, auto_resize="no")  # type: ignore[arg-type]  # deliberately wrong
    assert emulator.stats.requests == 0


@pytest.mark.parametrize("mode", [pytest.param("closed", id="closed"), pytest.param("wb", id="write-only")])
async def test_unusable_file_object_is_named(emulator: Emulator, tmp_path: Path, mode: str) -> None:
    """A closed or write-only file object is an InvalidImageError naming the input, not a raw ValueError."""
    path = tmp_path / "face.png"
    path.write_bytes(FACE)
    handle = path.open("rb" if mode == "closed" else "ab")
    if mode == "closed":
        handle.close()
    try:
        async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url,
                                   retry=FAST_RETRY) as client:
            with pytest.raises(na.InvalidImageError) as info:
                await client.merge_face(handle, TARGET)
    finally:
        handle.close()
    assert (info.value.input_name, info.value.rule) == ("face_image", "unreadable")
    assert str(info.value).startswith(f"face_image ({path}): ")
    assert ("closed" if mode == "closed" else "not open for reading") in str(info.value)
    assert emulator.stats.requests == 0
