"""Property tests of the streaming code: the request body encoder, and the decoder over a real socket.

The request body must be, byte for byte, what ``json.dumps`` (compact
separators) with stdlib base64 produces, for any input bytes, any chunk size
and any way a source hands its bytes over (memory, file, file object, short
reads, pipes), and its length must be the advertised Content-Length.  An input
that changes size while it is read must stop the body early, never send it
short or long.  The decoder's own chunk-split properties live in
``test_decode.py``; here it gets a body split by a real server and socket.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from novita_async import _b64, _encode
from novita_async._config import Timeout
from novita_async._encode import RequestBody, build_extra
from novita_async._errors import SourceChangedError
from novita_async._output import MemorySink
from novita_async._sources import ImageSource
from novita_async._transport import send_merge_request

from .conftest import serving, source_from_input, split

_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Mostly small (where the padding edge cases are), sometimes several chunks' worth.
_DATA = st.binary(max_size=64) | st.binary(min_size=65, max_size=5000)
_CHUNK_SIZES = st.integers(min_value=1, max_value=700).map(lambda n: 3 * n)
_EXTRAS = st.builds(build_extra, st.sampled_from(["png", "webp", "jpeg"]), st.booleans())
_KINDS = st.sampled_from(["bytes", "bytearray", "memoryview", "path", "bytesio", "offset", "short", "pipe"])
_READ_LIMITS = st.lists(st.integers(min_value=1, max_value=97), min_size=1, max_size=6)


class ShortReads(io.RawIOBase):
    """A seekable stream whose reads return fewer bytes than asked, in a given cycle of sizes."""

    def __init__(self, data: bytes, limits: list[int], seekable: bool = True) -> None:
        super().__init__()
        self._data, self._limits, self._seekable = io.BytesIO(data), limits, seekable
        self._calls = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._seekable

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if not self._seekable:
            raise io.UnsupportedOperation("seek")
        return self._data.seek(offset, whence)

    def tell(self) -> int:
        return self._data.tell()

    def read(self, size: int | None = -1) -> bytes:
        limit = self._limits[self._calls % len(self._limits)]
        self._calls += 1
        want = limit if size is None or size < 0 else min(size, limit)
        if size is None or size < 0:  # read-all: as a pipe does, in pieces
            return b"".join(iter(lambda: self._data.read(limit), b""))
        return self._data.read(want)


def reference_body(face: bytes, image: bytes, extra: dict[str, Any] | None) -> bytes:
    """The body as json.dumps with stdlib base64 writes it (compact separators, same key order)."""
    doc: dict[str, Any] = {
        "face_image_file": base64.b64encode(face).decode("ascii"),
        "image_file": base64.b64encode(image).decode("ascii"),
    }
    if extra:
        doc["extra"] = extra
    return json.dumps(doc, separators=(",", ":")).encode()


@contextlib.contextmanager
def codec(name: str) -> Iterator[None]:
    """Use the stdlib encoder instead of pybase64 inside the block."""
    namespace = vars(_encode)  # the encoder imported the codec by name: swap it there
    original = namespace["b64encode"]
    if name == "stdlib":
        namespace["b64encode"] = _b64._stdlib_b64encode
    try:
        yield
    finally:
        namespace["b64encode"] = original


async def make_source(data: bytes, kind: str, name: str, folder: Path, limits: list[int]) -> ImageSource:
    """An ImageSource over ``data`` of the given kind."""
    if kind == "bytes":
        return await source_from_input(data, name)
    if kind == "bytearray":
        return await source_from_input(bytearray(data), name)
    if kind == "memoryview":
        return await source_from_input(memoryview(b"xx" + data + b"yy")[2 : 2 + len(data)], name)
    if kind == "path":
        path = folder / f"{name}.bin"
        path.write_bytes(data)
        return await source_from_input(path, name)
    if kind == "bytesio":
        return await source_from_input(io.BytesIO(data), name)
    if kind == "offset":  # a file object positioned after a header that is not part of the image
        handle = io.BytesIO(b"HEADER-NOT-SENT" + data)
        handle.seek(15)
        return await source_from_input(handle, name)
    if kind == "short":
        return await source_from_input(ShortReads(data, limits), name)
    assert kind == "pipe"
    return await source_from_input(ShortReads(data, limits, seekable=False), name)


async def stream_all(body: RequestBody) -> list[bytes]:
    """One attempt's body pieces, as bytes."""
    pieces = []
    async for piece in body.stream():
        assert isinstance(piece, (bytes, bytearray, memoryview))  # what aiohttp can send
        pieces.append(bytes(piece))
    return pieces


@_SETTINGS
@given(
    face=_DATA, image=_DATA, chunk=_CHUNK_SIZES, extra=st.none() | _EXTRAS,
    face_kind=_KINDS, image_kind=_KINDS, limits=_READ_LIMITS, name=st.sampled_from(["pybase64", "stdlib"]),
)
def test_body_is_json_dumps_with_stdlib_base64(
    face: bytes, image: bytes, chunk: int, extra: dict[str, Any] | None, face_kind: str, image_kind: str,
    limits: list[int], name: str,
) -> None:
    """For any bytes, chunk size and source kind the body equals json.dumps + base64, at the advertised length."""
    expected = reference_body(face, image, extra)

    async def run(folder: Path) -> None:
        body = RequestBody(
            await make_source(face, face_kind, "face_image", folder, limits),
            await make_source(image, image_kind, "image", folder, limits),
            extra, chunk_size=chunk,
        )
        assert body.content_length == len(expected)
        first = await stream_all(body)
        assert b"".join(first) == expected
        # Every attempt gets a fresh generator with the same bytes.
        assert b"".join(await stream_all(body)) == expected
        assert body.error is None

    with tempfile.TemporaryDirectory() as folder, codec(name):
        anyio.run(run, Path(folder))


@_SETTINGS
@given(data=st.binary(min_size=1, max_size=3000), chunk=_CHUNK_SIZES, change=st.integers(-3000, 3000),
       which=st.sampled_from(["face_image", "image"]), kind=st.sampled_from(["path", "bytesio"]))
def test_input_that_changes_size_never_gives_a_wrong_length_body(
    data: bytes, chunk: int, change: int, which: str, kind: str
) -> None:
    """An input that shrinks or grows after measuring stops the body with SourceChangedError, within its length."""
    if change == 0 or len(data) + change < 0:
        change = 1
    changed = data[: len(data) + change] if change < 0 else data + b"\xab" * change
    other = b"other image bytes"

    async def run(folder: Path) -> None:
        handle = io.BytesIO(data)
        if kind == "path":
            source = await make_source(data, kind, which, folder, [1])
            (folder / f"{which}.bin").write_bytes(changed)
        else:  # the caller rewrites its file object after handing it over
            source = await source_from_input(handle, which)
            handle.seek(0)
            handle.truncate()
            handle.write(changed)
        other_source = await source_from_input(other, "image" if which == "face_image" else "face_image")
        face, image = (source, other_source) if which == "face_image" else (other_source, source)
        body = RequestBody(face, image, None, chunk_size=chunk)
        sent = 0
        with pytest.raises(SourceChangedError) as caught:
            async for piece in body.stream():
                sent += len(piece)
        assert sent < body.content_length  # stopped early: never a full-length body of wrong bytes
        assert body.error is caught.value
        assert caught.value.input_name == which and caught.value.rule == "changed"

    with tempfile.TemporaryDirectory() as folder:
        anyio.run(run, Path(folder))


# -- the decoder behind a real socket --------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    image=st.binary(min_size=1, max_size=20_000),
    sizes=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=5),
    escape_slashes=st.booleans(), spaces=st.sampled_from(["", " ", "\n  "]), type_first=st.booleans(),
)
def test_decoder_over_a_socket_matches_json_loads(
    image: bytes, sizes: list[int], escape_slashes: bool, spaces: str, type_first: bool
) -> None:
    """A success body written by a server in any split arrives decoded exactly as json.loads + b64decode."""
    literal = json.dumps(base64.b64encode(image).decode())
    if escape_slashes:
        literal = literal.replace("/", "\\/")
    members = [f'"image_file"{spaces}:{spaces}{literal}', f'"image_type"{spaces}:{spaces}"webp"']
    if type_first:
        members.reverse()
    body = ("{" + spaces + f",{spaces}".join(members) + spaces + "}").encode()
    parsed = json.loads(body)
    expected = base64.b64decode(parsed["image_file"])

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        for piece in split(body, sizes):
            await response.write(piece)
        return response

    async def run() -> None:
        import aiohttp

        async with serving(handler) as url, aiohttp.ClientSession() as session:
            sink = MemorySink()
            request = RequestBody(await source_from_input(b"f", "face_image"),
                                  await source_from_input(b"i", "image"), None)
            image_type = await send_merge_request(
                session, f"{url}/v3/merge-face", "sk_test", request, sink, Timeout(total=10.0),
            )
            await sink.commit()
        assert sink.data == expected
        assert image_type == parsed["image_type"]

    anyio.run(run)
