"""Inputs that are not images the client can read: an InvalidImageError naming the input and the fix,
nothing sent; and inputs near those rules that are sent (WebP with trailing bytes, every sync
binary file object, also under mypy --strict)."""

from __future__ import annotations

import base64
import gzip
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest
from PIL import Image

import novita_async as na
from novita_async.emulator import Emulator, job_key

from .conftest import FAST_RETRY, make_image

pytestmark = pytest.mark.anyio

FACE = make_image(seed=1)
TARGET = make_image(size=(96, 80), seed=2)
ROOT = Path(na.__file__).resolve().parent.parent


def _client(emulator: Emulator) -> na.NovitaClient:
    return na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=FAST_RETRY)


async def _refused(
    emulator: Emulator, face: object, tmp_path: Path, *, ledger: bool = True
) -> tuple[na.InvalidImageError, str]:
    """The error for ``face`` from merge_face, checked to match the batch's, and the ledger's line for it.

    The other input is a path: with two paths the check runs where the
    client runs file calls for their folders, which it looks up.
    """
    ledger_path, target = tmp_path / "ledger.jsonl", tmp_path / "target.png"
    target.write_bytes(TARGET)
    async with _client(emulator) as client:
        with pytest.raises(na.InvalidImageError) as info:
            await client.merge_face(face, target)  # type: ignore[arg-type]  # deliberately wrong
        jobs = [na.MergeJob(face, target, id="j")]  # type: ignore[arg-type]  # deliberately wrong
        run = client.batch(jobs, ledger=ledger_path if ledger else None, progress=False)
        results = [r async for r in run]
    assert [(r.status, type(r.error)) for r in results] == [(na.JobStatus.FAILED, na.InvalidImageError)]
    assert str(results[0].error) == str(info.value)
    assert emulator.stats.requests == 0
    assert info.value.input_name == "face_image"
    assert str(info.value).startswith("face_image (")
    return info.value, ledger_path.read_text() if ledger else ""


# -- str inputs that are not paths ----------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("face\0.png", id="nul"),
        pytest.param("faces/a\0b/face.png", id="nul-in-folder"),
        pytest.param(FACE.decode("latin-1"), id="bytes-decoded-to-str"),
    ],
)
async def test_a_str_with_a_nul_is_refused_by_name(emulator: Emulator, tmp_path: Path, text: str) -> None:
    """A str path holding a NUL is an InvalidImageError (not a bare ValueError), by call and in a batch."""
    error, _ = await _refused(emulator, text, tmp_path, ledger=False)
    assert error.rule == "invalid_path"
    assert "NUL character" in str(error)
    assert "pass it as bytes" in str(error)
    assert "\0" not in str(error)  # shown escaped


async def test_a_nul_in_a_folder_with_a_ledger(emulator: Emulator, tmp_path: Path) -> None:
    """A batch with a ledger refuses a path whose folder holds a NUL like any bad input (job failed)."""
    error, _ = await _refused(emulator, "faces/a\0b/face.png", tmp_path)
    assert error.rule == "invalid_path"


async def test_an_empty_str_is_refused_as_empty(emulator: Emulator, tmp_path: Path) -> None:
    """"" is refused as an empty path, not as "a directory" (Path("") is the current folder)."""
    error, _ = await _refused(emulator, "", tmp_path)
    assert error.rule == "invalid_path"
    assert "empty string" in str(error)
    assert "directory" not in str(error)


@pytest.mark.parametrize(
    ("text", "rule", "hint"),
    [
        pytest.param(base64.b64encode(FACE * 20).decode(), "unreadable", "base64.b64decode(text)",
                     id="base64-too-long-for-a-path"),
        pytest.param(base64.b64encode(FACE[:120]).decode(), "not_found", "base64.b64decode(text)",
                     id="short-base64"),
        pytest.param("data:image/png;base64," + base64.b64encode(FACE * 20).decode(), "unreadable",
                     "data: URL", id="data-url"),
    ],
)
async def test_image_content_given_as_str_is_shown_short_with_a_hint(
    emulator: Emulator, tmp_path: Path, text: str, rule: str, hint: str
) -> None:
    """A base64 str (as an older SDK took) is refused as a path in a short message saying to pass bytes."""
    error, ledger = await _refused(emulator, text, tmp_path)
    assert error.rule == rule
    assert hint in str(error) and "pass it as bytes" in str(error)
    assert len(str(error)) < 800 and len(error.source) < 300
    if len(text) > 1000:
        assert f"({len(text)} characters)" in error.source
    assert len(ledger) < 2000  # the batch's ledger line does not carry the string either


async def test_a_missing_path_gets_no_base64_hint(emulator: Emulator, tmp_path: Path) -> None:
    """An ordinary path that is not there is just "no such file", shown whole."""
    path = str(tmp_path / "faces" / "missing-face.png")
    error, _ = await _refused(emulator, path, tmp_path)
    assert (error.rule, error.source) == ("not_found", path)
    assert "bytes" not in str(error)


# -- file objects and PIL images that cannot be read ----------------------------------------


async def test_an_async_file_is_refused_up_front(emulator: Emulator, tmp_path: Path) -> None:
    """anyio.open_file() is refused naming the input and the fix; no coroutine is left unawaited."""
    path = tmp_path / "face.png"
    path.write_bytes(FACE)
    async with await anyio.open_file(path, "rb") as handle:
        error, _ = await _refused(emulator, handle, tmp_path)
        assert await handle.tell() == 0
    assert error.rule == "type"
    assert error.source == str(path)
    assert "async file object (AsyncFile)" in str(error)
    assert "Pass the path, a sync binary file" in str(error)


class _AwaitingReader:
    """A file object whose read() and tell() are plain methods that answer coroutines."""

    def seekable(self) -> bool:
        return True

    def tell(self) -> object:
        return self._answer()

    def read(self, size: int = -1) -> object:
        return self._answer()

    async def _answer(self) -> bytes:
        return FACE  # pragma: no cover - never awaited


async def test_a_file_object_answering_coroutines_is_refused(emulator: Emulator, tmp_path: Path) -> None:
    """A wrapper whose methods are not coroutine functions but answer coroutines is refused too."""
    error, _ = await _refused(emulator, _AwaitingReader(), tmp_path)
    assert error.rule == "type"
    assert "async file object" in str(error)


async def test_a_closed_pil_image_is_refused(emulator: Emulator, tmp_path: Path) -> None:
    """A PIL image closed before the call is an InvalidImageError, not Pillow's ValueError."""
    image = Image.open(io.BytesIO(FACE))
    image.close()
    error, _ = await _refused(emulator, image, tmp_path)
    assert error.rule == "unreadable"
    assert "Operation on closed image" in str(error)


@pytest.mark.parametrize("kind", ["bytesio", "file"])
async def test_a_stream_left_at_its_end_is_named_as_such(emulator: Emulator, tmp_path: Path, kind: str) -> None:
    """An image written into a stream and passed without seek(0): the error says the stream is at
    its end and to seek(0), not that the file is empty."""
    stream: io.BufferedRandom | io.BytesIO = (
        io.BytesIO() if kind == "bytesio" else (tmp_path / "face.png").open("w+b"))
    with stream:
        stream.write(FACE)
        async with _client(emulator) as client:
            with pytest.raises(na.InvalidImageError) as caught:
                await client.merge_face(stream, TARGET)
    assert caught.value.rule == "empty"
    assert f"the stream is at its end (position {len(FACE)})" in str(caught.value)
    assert "Call seek(0) on it before passing it" in str(caught.value)
    assert emulator.stats.requests == 0


# -- inputs near the rules that are sent ----------------------------------------------------


def _webp() -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(FACE)).save(buffer, format="WEBP")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "trailer",
    [pytest.param(b"\0\0", id="two-bytes"), pytest.param(b"junk" * 100, id="tool-trailer")],
)
async def test_a_webp_with_trailing_bytes_is_sent(emulator: Emulator, trailer: bytes) -> None:
    """Bytes after a complete WebP's declared RIFF size are accepted, as after a PNG's IEND or a JPEG's EOI."""
    face = _webp() + trailer
    async with _client(emulator) as client:
        await client.merge_face(face, TARGET)
    assert emulator.stats.successes == {job_key(face, TARGET): 1}


async def test_a_webp_cut_short_is_still_refused(emulator: Emulator) -> None:
    """A WebP shorter than its declared RIFF size is refused as incomplete."""
    async with _client(emulator) as client:
        with pytest.raises(na.InvalidImageError) as info:
            await client.merge_face(_webp()[:-2], TARGET)
    assert info.value.rule == "truncated"
    assert emulator.stats.requests == 0


async def test_gzip_and_raw_file_objects_are_sent(emulator: Emulator, tmp_path: Path) -> None:
    """A GzipFile and an io.RawIOBase are inputs, at run time and to mypy (this file is type-checked)."""
    packed, plain = tmp_path / "face.png.gz", tmp_path / "target.png"
    with gzip.open(packed, "wb") as writer:
        writer.write(FACE)
    plain.write_bytes(TARGET)
    async with _client(emulator) as client:
        with gzip.open(packed, "rb") as face:
            raw: io.RawIOBase = io.FileIO(plain)
            with raw:
                await client.merge_face(face, raw)
    assert emulator.stats.successes == {job_key(FACE, TARGET): 1}


def test_input_annotation_under_mypy_strict(tmp_path: Path) -> None:
    """Sync binary file objects type-check as inputs under mypy --strict; async and text files do not."""
    pytest.importorskip("mypy")
    snippet = tmp_path / "typed_inputs.py"
    snippet.write_text(textwrap.dedent("""\
        import gzip
        import io
        import tempfile
        import zipfile

        import anyio

        import novita_async as na


        async def send(client: na.NovitaClient, raw: io.RawIOBase, text: io.TextIOWrapper) -> None:
            with gzip.open("face.png.gz", "rb") as packed:
                await client.merge_face(packed, raw)
                na.MergeJob(packed, io.BufferedReader(raw))
            with zipfile.ZipFile("faces.zip") as archive, archive.open("face.png") as member:
                await client.merge_face(member, "photo.jpg")
            with tempfile.SpooledTemporaryFile() as spooled, open("face.png", "rb") as plain:
                await client.merge_face(spooled, plain)
            await client.merge_face(io.BytesIO(b"..."), "photo.jpg")
            # Refused: each ignore must be needed (strict warns about unused ones).
            async with await anyio.open_file("face.png", "rb") as async_file:
                await client.merge_face(async_file, "photo.jpg")  # type: ignore[arg-type]
            await client.merge_face(text, "photo.jpg")  # type: ignore[arg-type]
    """))
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "--strict",
         "--follow-imports", "silent", "--cache-dir", str(tmp_path / "mypy_cache"), str(snippet)],
        cwd=ROOT, capture_output=True, text=True, timeout=100,
    )
    assert done.returncode == 0, done.stdout + done.stderr
