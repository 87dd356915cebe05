"""The streamed request body: exact length, same bytes every attempt, refusal of changed inputs."""

from __future__ import annotations

import base64
import io
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import novita_async as na
from novita_async import _sources
from novita_async._config import READ_CHUNK
from novita_async._encode import RequestBody, b64_length, body_parts, build_extra, coalesce
from novita_async._source_base import pread_full
from novita_async._sources import ImageSource, buffer_source

from .conftest import request_json, source_from_input

pytestmark = pytest.mark.anyio

FACE = bytes(range(256)) * 41 + b"tail"  # 10 500 bytes, not a multiple of 3
IMAGE = b"\x89PNG" + bytes(reversed(range(256))) * 13  # 3 332 bytes


async def collect(body: RequestBody) -> bytes:
    """Run one attempt's stream to the end."""
    return b"".join([piece async for piece in body.stream()])




class ShortReader(io.RawIOBase):
    """A seekable binary stream that returns at most ``limit`` bytes per read."""

    def __init__(self, data: bytes, limit: int) -> None:
        super().__init__()
        self._buffer = io.BytesIO(data)
        self.limit = limit
        self.reads: list[int] = []

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._buffer.seek(offset, whence)

    def tell(self) -> int:
        return self._buffer.tell()

    def read(self, size: int | None = -1) -> bytes:
        want = self.limit if size is None or size < 0 else min(size, self.limit)
        data = self._buffer.read(want)
        self.reads.append(len(data))
        return data


class GreedyReader(io.BytesIO):
    """A file object that returns more bytes than asked for (a broken read())."""

    def read(self, size: int | None = -1) -> bytes:
        return super().read(-1 if size is None or size < 0 else size + 3)


@pytest.mark.parametrize("size", [pytest.param(n, id=str(n)) for n in (0, 1, 2, 3, 4, 5, 6, 100, 101)])
def test_b64_length(size: int) -> None:
    """b64_length matches the stdlib's padded encoding."""
    assert b64_length(size) == len(base64.b64encode(b"\0" * size))


def test_build_extra() -> None:
    """The output type is always sent; the enterprise plan only when asked for."""
    assert build_extra("png", False) == {"response_image_type": "png"}
    assert build_extra("jpeg", True) == {
        "response_image_type": "jpeg", "enterprise_plan": {"enabled": True},
    }


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(None, id="no-extra"),
        pytest.param({"response_image_type": "webp"}, id="type"),
        pytest.param({"response_image_type": "png", "enterprise_plan": {"enabled": True}},
                     id="enterprise"),
    ],
)
def test_body_parts_make_valid_json(extra: dict[str, Any] | None) -> None:
    """prefix + b64 + middle + b64 + suffix is the JSON document expected."""
    prefix, middle, suffix = body_parts(extra)
    raw = prefix + base64.b64encode(b"face") + middle + base64.b64encode(b"img") + suffix
    assert json.loads(raw) == request_json(b"face", b"img", extra)


@pytest.mark.parametrize("chunk_size", [pytest.param(n, id=str(n)) for n in (3, 300, 3 * 1024, READ_CHUNK)])
@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(None, id="no-extra"),
        pytest.param(build_extra("jpeg", True), id="extra"),
    ],
)
async def test_stream_matches_stdlib_and_content_length(
    chunk_size: int, extra: dict[str, Any] | None
) -> None:
    """The streamed body is exactly content_length bytes and equals the stdlib's JSON."""
    body = RequestBody(buffer_source(FACE, "face_image", "face"),
                       buffer_source(IMAGE, "image", "image"), extra, chunk_size=chunk_size)
    raw = await collect(body)
    assert body.content_length == len(raw)
    assert json.loads(raw) == request_json(FACE, IMAGE, extra)
    assert body.error is None


async def test_empty_inputs_still_give_valid_json() -> None:
    """Zero-byte inputs stream as empty strings with the exact length."""
    body = RequestBody(buffer_source(b"", "face_image", "e"), buffer_source(b"", "image", "e"))
    raw = await collect(body)
    assert len(raw) == body.content_length
    assert json.loads(raw) == {"face_image_file": "", "image_file": ""}


async def test_stream_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    """Each stream() is a fresh generator: a second attempt sends the same body again."""
    path = tmp_path / "face.bin"
    path.write_bytes(FACE)
    handle = io.BytesIO(b"xx" + IMAGE)
    handle.seek(2)
    body = RequestBody(await source_from_input(path, "face_image"),
                       await source_from_input(handle, "image"), chunk_size=999)
    first_stream, second_stream = body.stream(), body.stream()
    assert first_stream is not second_stream
    first = await collect(body)
    second = await collect(body)
    assert first == second
    assert json.loads(first) == request_json(FACE, IMAGE, None)


@pytest.mark.parametrize("chunk_size", [pytest.param(n, id=str(n)) for n in (1, 2, 4, 1000, READ_CHUNK + 1)])
def test_chunk_size_must_be_a_multiple_of_3(chunk_size: int) -> None:
    """A chunk size that would put padding mid-string is refused."""
    source = buffer_source(b"abc", "face_image", "x")
    with pytest.raises(ValueError, match="multiple of 3"):
        RequestBody(source, source, chunk_size=chunk_size)


async def test_short_reads_still_give_whole_chunks() -> None:
    """A file object returning fewer bytes than asked still yields full chunks but the last."""
    reader = ShortReader(FACE, limit=7)
    source = await source_from_input(reader, "face_image")
    assert source.size == len(FACE)
    chunks = [bytes(c) async for c in source.chunks(30)]
    assert b"".join(chunks) == FACE
    assert all(len(c) == 30 for c in chunks[:-1])
    assert 0 < len(chunks[-1]) <= 30
    assert max(reader.reads) <= 7


async def test_short_reads_give_a_correct_body() -> None:
    """With short reads the body still encodes each chunk without stray padding."""
    body = RequestBody(await source_from_input(ShortReader(FACE, limit=5), "face_image"),
                       await source_from_input(ShortReader(IMAGE, limit=11), "image"), chunk_size=12)
    raw = await collect(body)
    assert len(raw) == body.content_length
    assert json.loads(raw) == request_json(FACE, IMAGE, None)


@pytest.mark.parametrize(
    ("new_content", "got"),
    [
        pytest.param(FACE[:-10], len(FACE) - 10, id="shrinks"),
        pytest.param(FACE + b"more", len(FACE) + 1, id="grows"),
    ],
)
async def test_path_that_changes_after_stat(tmp_path: Path, new_content: bytes, got: int) -> None:
    """A file that shrinks or grows between stat and upload raises SourceChangedError."""
    path = tmp_path / "face.png"
    path.write_bytes(FACE)
    source = await source_from_input(path, "face_image")
    path.write_bytes(new_content)
    body = RequestBody(source, buffer_source(IMAGE, "image", "image"), chunk_size=300)
    with pytest.raises(na.SourceChangedError, match=f"expected {len(FACE)} bytes, read {got}") as info:
        await collect(body)
    assert info.value.input_name == "face_image"
    assert info.value.rule == "changed"
    assert not info.value.retryable
    assert body.error is info.value


@pytest.mark.parametrize(
    "cached",
    [
        pytest.param(lambda fd, view, offset: None, id="nothing-cached"),
        pytest.param(lambda fd, view, offset: pread_full(fd, view[: len(view) // 2], offset)
                     if len(view) > 1 else None, id="half-cached"),
    ],
)
@pytest.mark.parametrize("grow", [False, True], ids=["same", "grows"])
async def test_path_read_when_the_page_cache_misses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cached: Any, grow: bool
) -> None:
    """Pages not (or partly) in the page cache are read in a worker thread, with the same bytes and checks."""
    if _sources._RWF_NOWAIT is None:
        pytest.skip("no preadv2(RWF_NOWAIT) on this system")
    monkeypatch.setattr(_sources, "_pread_cached", cached)
    path = tmp_path / "face.png"
    path.write_bytes(FACE)
    source = await source_from_input(path, "face_image")
    if grow:
        path.write_bytes(FACE + b"x")
    body = RequestBody(source, buffer_source(IMAGE, "image", "image"), chunk_size=300)
    if grow:
        with pytest.raises(na.SourceChangedError, match=f"read {len(FACE) + 1}"):
            await collect(body)
    else:
        assert json.loads(await collect(body)) == request_json(FACE, IMAGE, None)


async def test_empty_path_that_grows_is_refused(tmp_path: Path) -> None:
    """A file measured empty that has a byte by upload time is refused, not sent empty."""
    path = tmp_path / "face.png"
    path.write_bytes(b"")
    source = await source_from_input(path, "face_image")
    path.write_bytes(b"x")
    body = RequestBody(source, buffer_source(IMAGE, "image", "image"), chunk_size=300)
    with pytest.raises(na.SourceChangedError):
        await collect(body)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param("truncate", id="shrinks"),
        pytest.param("append", id="grows"),
    ],
)
async def test_file_object_that_changes_after_measuring(change: str) -> None:
    """A seekable file object whose length changes after it was measured is refused."""
    handle = io.BytesIO(IMAGE)
    source = await source_from_input(handle, "image")
    if change == "truncate":
        handle.truncate(len(IMAGE) // 2)
    else:
        handle.seek(0, io.SEEK_END)
        handle.write(b"extra bytes")
    body = RequestBody(buffer_source(FACE, "face_image", "face"), source, chunk_size=300)
    with pytest.raises(na.SourceChangedError):
        await collect(body)
    assert isinstance(body.error, na.SourceChangedError)


async def test_file_object_returning_too_much_is_refused() -> None:
    """A read() that returns more than asked cannot overrun Content-Length."""
    source: ImageSource = await source_from_input(GreedyReader(IMAGE), "image")
    body = RequestBody(buffer_source(FACE, "face_image", "face"), source, chunk_size=300)
    with pytest.raises(na.SourceChangedError):
        await collect(body)


async def test_error_is_cleared_by_the_next_stream(tmp_path: Path) -> None:
    """body.error describes the last attempt only: a new stream() clears it."""
    path = tmp_path / "face.png"
    path.write_bytes(FACE)
    body = RequestBody(await source_from_input(path, "face_image"),
                       buffer_source(IMAGE, "image", "image"))
    path.write_bytes(FACE[:10])
    with pytest.raises(na.SourceChangedError):
        await collect(body)
    assert body.error is not None
    path.write_bytes(FACE)
    assert json.loads(await collect(body)) == request_json(FACE, IMAGE, None)
    assert body.error is None


class FailingReader(io.BytesIO):
    """A seekable file object whose reads fail (a disk error, a dropped network share)."""

    def read(self, size: int | None = -1) -> bytes:
        raise OSError(5, "Input/output error")


@pytest.mark.parametrize("how", [pytest.param("deleted", id="file-deleted"),
                                 pytest.param("closed", id="file-object-closed"),
                                 pytest.param("failing", id="read-raises")])
async def test_unreadable_input_is_an_image_error(tmp_path: Path, how: str) -> None:
    """An input that cannot be read during the upload is an InvalidImageError, not a bare OSError."""
    path = tmp_path / "face.png"
    path.write_bytes(FACE)
    if how == "deleted":
        source = await source_from_input(path, "face_image")
        path.unlink()
    elif how == "closed":
        handle = path.open("rb")
        source = await source_from_input(handle, "face_image")
        handle.close()
    else:
        source = await source_from_input(FailingReader(FACE), "face_image")
    body = RequestBody(source, buffer_source(IMAGE, "image", "image"))
    with pytest.raises(na.InvalidImageError, match="could not be read") as info:
        await collect(body)
    assert info.value.rule == "unreadable"
    assert info.value.input_name == "face_image"
    assert not info.value.retryable
    assert body.error is info.value


async def pieces_of(sizes: list[int], limit: int) -> tuple[list[bytes | memoryview], list[bytes]]:
    """Run ``coalesce`` over pieces of the given sizes (distinct bytes); return (outputs, inputs)."""
    inputs = [bytes([index % 251]) * size for index, size in enumerate(sizes)]

    async def source() -> AsyncIterator[bytes | memoryview]:
        for piece in inputs:
            yield piece

    return [piece async for piece in coalesce(source(), limit)], inputs


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), max_size=30), limit=st.integers(1, 400))
def test_coalesce_keeps_the_bytes_and_merges_all_it_can(sizes: list[int], limit: int) -> None:
    """The bytes are unchanged, and no two neighbouring writes would have fitted in one."""
    outputs, inputs = anyio.run(pieces_of, sizes, limit)
    assert b"".join(outputs) == b"".join(inputs)
    lengths = [len(piece) for piece in outputs]
    assert all(a + b > limit for a, b in itertools.pairwise(lengths))
    # Only a piece that is larger on its own makes a write larger than the limit.
    assert all(n <= max([limit, *sizes]) for n in lengths)
    assert all(len(out) <= limit or any(out is piece for piece in inputs) for out in outputs)


async def test_a_small_body_is_the_prefix_then_one_write() -> None:
    """The JSON prefix goes alone (aiohttp joins it with the headers), the rest in one write."""
    body = RequestBody(buffer_source(FACE, "face_image", "face"), buffer_source(IMAGE, "image", "image"))
    prefix, *rest = [bytes(piece) async for piece in body.stream()]
    assert prefix == b'{"face_image_file":"'
    assert len(rest) == 1
    assert len(prefix) + len(rest[0]) == body.content_length


async def test_coalesce_sends_large_pieces_uncopied() -> None:
    """A piece of the limit or more goes out as the same object."""
    big = b"x" * 100_000

    async def source() -> AsyncIterator[bytes | memoryview]:
        yield big
        yield big

    written = [piece async for piece in coalesce(source(), 100_000)]
    assert len(written) == 2
    assert written[0] is big and written[1] is big


async def test_coalesce_never_copies_a_large_piece_to_glue_a_small_one() -> None:
    """A few bytes before a full piece go out alone: the large piece is not copied."""
    big = b"y" * 1000

    async def source() -> AsyncIterator[bytes | memoryview]:
        yield b"z" * 300
        yield b"m" * 16
        yield big
        yield b"s" * 16

    outputs = [piece async for piece in coalesce(source(), 1000)]
    assert [len(piece) for piece in outputs] == [316, 1000, 16]
    assert outputs[1] is big


async def test_coalesce_holds_no_full_piece() -> None:
    """A piece that fills a write goes out before the next piece is asked for (bounded memory)."""
    asked: list[int] = []
    full = b"z" * 1000

    async def source() -> AsyncIterator[bytes | memoryview]:
        for index in range(3):
            asked.append(index)
            yield full

    async for piece in coalesce(source(), 1000):
        assert piece is full
        assert len(asked) == 1  # yielded before the next piece was read
        asked.clear()
