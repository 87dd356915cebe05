"""Edge cases of what callers pass: refused at once with the fix, or made to work, never a late surprise."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

import novita_async as na
from novita_async._places import _safe_name
from novita_async.emulator import Emulator

from .batch_support import client_for, collect, job_images
from .conftest import make_image

pytestmark = pytest.mark.anyio

KEY = "sk_live_TopSecret_0123456789abcdef"


# -- base_url ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "fix"),
    [
        pytest.param("http://127.0.0.1:99999", "1 to 65535", id="port-out-of-range"),
        pytest.param("http://127.0.0.1:0", "1 to 65535", id="port-zero"),
        pytest.param("http://127.0.0.1:http", "1 to 65535", id="port-not-a-number"),
        pytest.param("http://127.0.0.1:8080?x=1", "'http://127.0.0.1:8080'", id="query"),
        pytest.param("http://127.0.0.1:8080/#frag", "'http://127.0.0.1:8080'", id="fragment"),
        pytest.param("http://127.0.0.1:8080?", "'http://127.0.0.1:8080'", id="empty-query"),
        pytest.param("http://127.0.0.1:8080/v3/merge-face", "base URL only: 'http://127.0.0.1:8080'",
                     id="endpoint"),
        pytest.param("https://gw.example/novita/v3/merge-face/", "base URL only: 'https://gw.example/novita'",
                     id="endpoint-behind-a-prefix"),
        pytest.param("http://127.0.0.1:8080/a b", "space or control character", id="inner-space"),
        pytest.param("http://[::1", "not a valid URL", id="unclosed-ipv6"),
    ],
)
def test_a_base_url_no_request_could_use_is_refused_at_construction(base_url: str, fix: str) -> None:
    """A port out of range, a query or fragment, or the endpoint's own path is a ConfigurationError
    naming the URL and its fix, not retried connection errors or a 404 at the first call."""
    with pytest.raises(na.ConfigurationError) as raised:
        na.NovitaClient(api_key=KEY, base_url=base_url)
    assert repr(base_url) in str(raised.value)
    assert fix in str(raised.value)


@pytest.mark.parametrize(
    ("base_url", "kept"),
    [
        pytest.param(" http://127.0.0.1:8080/ ", "http://127.0.0.1:8080", id="loopback"),
        pytest.param("\thttps://gw.example/v3/\n", "https://gw.example/v3", id="path-prefix"),
        pytest.param("  http://[::1]:8080", "http://[::1]:8080", id="ipv6-loopback"),
        pytest.param("https://gw.example ", "https://gw.example", id="public"),
    ],
)
def test_spaces_around_a_base_url_are_stripped(base_url: str, kept: str) -> None:
    """Spaces around a pasted URL are dropped (as around a key), so 127.0.0.1 draws no plain-HTTP warning."""
    client = na.NovitaClient(api_key=KEY, base_url=base_url)  # a warning would fail the test
    assert client.base_url == kept


# -- the API key ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("sk_live_TopSecret\n0123456789abcdef", id="line-feed"),
        pytest.param("sk_live_TopSecret\r0123456789abcdef", id="carriage-return"),
        pytest.param("sk_live_TopSecret\x000123456789abcdef", id="nul"),
        pytest.param("sk_live_TopSecret\x7f0123456789abcdef", id="delete"),
    ],
)
def test_a_key_with_a_control_character_inside_is_refused_unshown(key: str) -> None:
    """A control character inside the key is a ConfigurationError at construction (not aiohttp's bare
    ValueError at every call); the message names api_key and never any part of the key."""
    with pytest.raises(na.ConfigurationError, match="api_key holds a control character") as raised:
        na.NovitaClient(api_key=key, base_url="http://127.0.0.1:9")
    message = str(raised.value)
    assert "sk_" not in message and "TopSecret" not in message and "0123" not in message
    # Around the key, line breaks are stripped as before: a key read from a file still works.
    assert na.NovitaClient(api_key=KEY + "\r\n", base_url="http://127.0.0.1:9")._api_key == KEY


def test_a_control_character_in_the_environment_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NOVITA_API_KEY holding a line break is refused naming the variable, never showing its value."""
    monkeypatch.setenv("NOVITA_API_KEY", "sk_live_TopSecret\nX-Other: 1")
    with pytest.raises(na.ConfigurationError, match="NOVITA_API_KEY environment variable") as raised:
        na.NovitaClient(base_url="http://127.0.0.1:9")
    assert "TopSecret" not in str(raised.value) and "X-Other" not in str(raised.value)


# -- MergeJob ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        pytest.param({"id": 7}, "MergeJob id must be a str, got int 7", id="id-int"),
        pytest.param({"id": b"a"}, "MergeJob id must be a str, got bytes", id="id-bytes"),
        pytest.param({"output": 5}, "MergeJob output must be the path", id="output-int"),
        pytest.param({"output": b"x.png"}, "MergeJob output must be the path", id="output-bytes"),
        pytest.param({"output": ""}, "MergeJob output must be the path", id="output-empty"),
        pytest.param({"response_image_type": "JPG"}, "response_image_type 'JPG' is not one of",
                     id="type-upper-case"),
    ],
)
def test_a_merge_job_field_of_the_wrong_kind_is_refused_when_made(kwargs: dict[str, object], named: str) -> None:
    """A wrong id, output or type is a ConfigurationError (a ValueError) when the job is made, not a
    TypeError that ends the whole batch later."""
    with pytest.raises(na.ConfigurationError, match=named):
        na.MergeJob("face.png", "photo.png", **kwargs)  # type: ignore[arg-type]  # deliberately wrong


# -- batch(): the job stream ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("jobs", "why"),
    [
        pytest.param(5, "got int 5 (not iterable)", id="int"),
        pytest.param(None, "got NoneType None (not iterable)", id="none"),
        pytest.param("jobs.csv", "one job per character", id="str"),
        pytest.param(b"ab", "one job per character", id="bytes"),
        pytest.param(na.MergeJob("f.png", "i.png"), "for a single job, pass [job]", id="one-job"),
    ],
)
async def test_a_job_stream_that_is_no_stream_of_jobs_is_refused_at_once(
    emulator: Emulator, jobs: object, why: str
) -> None:
    """batch(5) or batch("jobs.csv") is a ConfigurationError from batch() itself, saying what was
    given and what to pass; nothing is sent."""
    async with client_for(emulator) as client:
        with pytest.raises(na.ConfigurationError, match="batch jobs must be an iterable") as raised:
            client.batch(jobs, output_dir=None)  # type: ignore[arg-type]  # deliberately wrong
    assert why in str(raised.value) and "read_manifest" in str(raised.value)
    assert emulator.stats.requests == 0


# -- output names of long ids --------------------------------------------------------------


def test_an_id_too_long_in_bytes_is_cut_to_a_byte_budget_keeping_names_that_fit() -> None:
    """Names that fit a file system stay as they were (resume finds them); longer ones are cut to
    200 bytes of UTF-8 with a hash of the whole id, so ids sharing a long start keep their own files."""
    assert _safe_name("a" * 300) == "a" * 200
    assert _safe_name("é" * 110) == "é" * 110  # 220 bytes: fits, unchanged
    assert _safe_name("a/b") == "a_b"
    cut = [_safe_name(job_id) for job_id in ("顔" * 100, "é" * 150, "顔" * 99 + "x", "顔" * 99 + "y")]
    assert all(len(name.encode()) <= 200 for name in cut)
    assert len(set(cut)) == len(cut)
    assert cut[0] == _safe_name("顔" * 100)  # the same name on every run


async def test_long_non_ascii_ids_are_written_and_resumed(emulator: Emulator, tmp_path: Path) -> None:
    """Jobs whose ids are long in UTF-8 (300 and more bytes) get names under 255 bytes: each result is
    written, and a re-run on the same ledger finds them all done, sending nothing again."""
    ids = ["顔" * 100, "é" * 150, "顔" * 99 + "x", "顔" * 99 + "y"]
    jobs = [na.MergeJob(*job_images(index), id=job_id) for index, job_id in enumerate(ids)]
    ledger = tmp_path / "out" / "ledger.jsonl"
    async with client_for(emulator) as client:
        first = await collect(client.batch(jobs, output_dir=tmp_path / "out", ledger=ledger))
        again = await collect(client.batch(jobs, output_dir=tmp_path / "out", ledger=ledger))
    assert [r.status for r in first] == ["ok"] * 4, [r.error for r in first]
    outputs = {r.output for r in first}
    assert len(outputs) == 4
    assert all(path is not None and path.is_file() and len(os.fsencode(path.name)) <= 255 for path in outputs)
    assert [r.status for r in again] == ["skipped"] * 4
    assert emulator.stats.requests == 4


# -- auto_resize without validate ----------------------------------------------------------


def _big_jpeg(size: tuple[int, int] = (3000, 2200)) -> bytes:
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize(size).convert("RGB").save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("client_resizes", "call_resizes"),
    [pytest.param(False, True, id="per-call"), pytest.param(True, None, id="client-wide")],
)
async def test_auto_resize_resizes_even_with_validate_false(
    emulator: Emulator, client_resizes: bool, call_resizes: bool | None
) -> None:
    """auto_resize asked for is done with validate=False too (it reads the header to know), instead of
    sending the image unresized to a 400; other problems still go unchecked, for the API to judge."""
    async with client_for(emulator, validate=False, auto_resize=client_resizes) as client:
        result = await client.merge_face(make_image(), _big_jpeg(), auto_resize=call_resizes)
        with pytest.raises(na.BadRequestError) as raised:
            await client.merge_face(b"this is not an image", make_image(), auto_resize=call_resizes)
    assert result.to_pil().size == (2048, round(2200 * 2048 / 3000))
    assert raised.value.reason == "INVALID_IMAGE_FORMAT"
    assert emulator.stats.requests == 2
