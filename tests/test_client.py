"""NovitaClient end to end against the real emulator on 127.0.0.1."""

from __future__ import annotations

import contextlib
import gc
import gzip
import io
import itertools
import os
import re
import stat
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import anyio
import pytest
from PIL import Image

import novita_async as na
from novita_async._config import DEFAULT_BASE_URL
from novita_async._errors import error_from_response
from novita_async._pacing import Pacer
from novita_async._sources import _encode_pil
from novita_async.emulator import Emulator, Faults, job_key

from .conftest import FAST_RETRY, flat_image, make_image, noise_png

pytestmark = pytest.mark.anyio

FACE = make_image(seed=1)
TARGET = make_image(size=(96, 80), seed=2)
PIL_FORMATS = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}
#: A fixed pace so fast that a 429's cool-down (a multiple of its interval) is negligible.
FAST_PACE = 600_000.0
H = TypeVar("H", bound=io.IOBase)


def client_for(emu: Emulator, **kwargs: Any) -> na.NovitaClient:
    """A client for the emulator, with retries that do not sleep unless told otherwise."""
    kwargs.setdefault("api_key", emu.api_key)
    kwargs.setdefault("retry", FAST_RETRY)
    return na.NovitaClient(base_url=emu.url, **kwargs)


def assert_no_chunking(emu: Emulator) -> None:
    """Every request the emulator saw had an exact Content-Length."""
    assert emu.stats.chunked_requests == 0
    assert emu.stats.missing_content_length == 0


async def wait_idle(emu: Emulator) -> None:
    """Wait (briefly) until the emulator has no request in flight."""
    for _ in range(200):
        if emu.stats.in_flight == 0:
            return
        await anyio.sleep(0.005)
    raise AssertionError(f"{emu.stats.in_flight} requests still in flight")


class ReadOnlyStream:
    """A file-like object with read() and nothing else (no seek, tell or seekable)."""

    def __init__(self, data: bytes) -> None:
        self._buffer = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._buffer.read(size)


class GrowingFile(io.BytesIO):
    """A seekable file that gains bytes at its end every time it is read."""

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        position = self.tell()
        self.seek(0, io.SEEK_END)
        self.write(b"\0" * 16)
        self.seek(position)
        return data


# -- inputs --------------------------------------------------------------------------


@pytest.fixture
def closing() -> Iterator[contextlib.ExitStack]:
    """Closes whatever a test opened."""
    with contextlib.ExitStack() as stack:
        yield stack


def _pipe_reader(stack: contextlib.ExitStack) -> io.BufferedReader:
    read_fd, write_fd = os.pipe()
    with open(write_fd, "wb") as writer:
        writer.write(FACE)  # far below a pipe's buffer: no reader needed yet
    return stack.enter_context(open(read_fd, "rb"))


def _offset_file(stack: contextlib.ExitStack, tmp_path: Path) -> Any:
    path = tmp_path / "padded.bin"
    path.write_bytes(b"some header bytes" + FACE)
    handle = stack.enter_context(path.open("rb"))
    handle.seek(len(b"some header bytes"))
    return handle


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "face.png"
    path.write_bytes(FACE)
    return path


INPUTS: dict[str, Callable[[contextlib.ExitStack, Path], Any]] = {
    "str-path": lambda stack, tmp: str(_saved(tmp)),
    "pathlib": lambda stack, tmp: _saved(tmp),
    "bytes": lambda stack, tmp: FACE,
    "bytearray": lambda stack, tmp: bytearray(FACE),
    "memoryview": lambda stack, tmp: memoryview(FACE),
    "open-file": lambda stack, tmp: stack.enter_context(_saved(tmp).open("rb")),
    "file-at-offset": _offset_file,
    "bytesio-at-offset": lambda stack, tmp: _at(io.BytesIO(b"xyz" + FACE), 3),
    "pipe": lambda stack, tmp: _pipe_reader(stack),
    "read-only-object": lambda stack, tmp: ReadOnlyStream(FACE),
}


def _at(handle: H, offset: int) -> H:
    handle.seek(offset)
    return handle


@pytest.mark.parametrize("kind", [pytest.param(k, id=k) for k in INPUTS])
async def test_each_input_kind(
    emulator: Emulator, closing: contextlib.ExitStack, tmp_path: Path, kind: str
) -> None:
    """Every accepted input kind uploads exactly the image's bytes (validation on)."""
    value = INPUTS[kind](closing, tmp_path)
    async with client_for(emulator) as client:
        assert client.validate
        result = await client.merge_face(value, TARGET)
    assert result.attempts == 1
    assert result.data is not None
    assert emulator.stats.successes == {job_key(FACE, TARGET): 1}
    assert_no_chunking(emulator)


@pytest.mark.parametrize("kind", [pytest.param(k, id=k) for k in ("open-file", "file-at-offset", "pipe")])
async def test_input_is_sent_again_on_retry(
    emulator_factory: Callable[..., Emulator], closing: contextlib.ExitStack, tmp_path: Path,
    kind: str,
) -> None:
    """File objects (seekable or not) are sent whole again by a retry."""
    value = INPUTS[kind](closing, tmp_path)
    async with emulator_factory(faults=Faults(fail_first=2)) as emu, client_for(emu) as client:
        result = await client.merge_face(TARGET, value)
    assert result.attempts == 3
    assert emu.stats.attempts == {job_key(TARGET, FACE): 3}
    assert emu.stats.successes == {job_key(TARGET, FACE): 1}


async def test_pil_image_input(emulator: Emulator) -> None:
    """A PIL.Image.Image is encoded and uploaded."""
    image = Image.open(io.BytesIO(FACE))
    async with client_for(emulator) as client:
        result = await client.merge_face(image, Image.open(io.BytesIO(TARGET)))
    assert result.data is not None
    face_sent = _encode_pil(Image.open(io.BytesIO(FACE)))
    target_sent = _encode_pil(Image.open(io.BytesIO(TARGET)))
    assert emulator.stats.successes == {job_key(face_sent, target_sent): 1}


async def test_a_16_bit_pil_image_is_sent_scaled_not_clipped(emulator: Emulator) -> None:
    """A 16-bit greyscale PIL image goes out scaled to 8 bits (mid-grey stays mid-grey); Pillow's
    own conversion would send every value above 255 as white."""
    wide = Image.new("I;16", (64, 64))
    wide.putdata([(x * 1024 + y * 16) % 65536 for y in range(64) for x in range(64)])
    sent = _encode_pil(wide)
    with Image.open(io.BytesIO(sent)) as image:
        grey = image.convert("L")
        assert 127 <= grey.getpixel((32, 0)) <= 128  # 32768 / 257 = 127.5 (clipped: 255)
        assert 254 <= grey.getpixel((63, 63)) <= 255  # 65520 / 257 = 254.9
        assert grey.getpixel((0, 1)) == 0  # 16 / 257 rounds down
    async with client_for(emulator) as client:
        result = await client.merge_face(wide, TARGET)
    assert result.data is not None
    assert emulator.stats.successes == {job_key(sent, TARGET): 1}


async def test_a_float_pil_image_is_refused_before_sending(emulator: Emulator) -> None:
    """A float PIL image (mode F) has no one scale to 8 bits: refused, naming the rule and the fix."""
    async with client_for(emulator) as client:
        with pytest.raises(na.InvalidImageError) as caught:
            await client.merge_face(Image.new("F", (64, 64), 0.5), TARGET)
    assert caught.value.rule == "color_mode" and "Scale it to 8 bits per channel yourself" in str(caught.value)
    assert emulator.stats.requests == 0


async def test_unsupported_input_type(emulator: Emulator) -> None:
    """An unsupported input is refused locally, before any request."""
    async with client_for(emulator) as client:
        with pytest.raises(na.InvalidImageError, match="unsupported input type"):
            await client.merge_face(12345, TARGET)  # type: ignore[arg-type]  # deliberately wrong
    assert emulator.stats.requests == 0


async def test_missing_file(emulator: Emulator, tmp_path: Path) -> None:
    """A path that does not exist is refused locally, naming the input."""
    async with client_for(emulator) as client:
        with pytest.raises(na.InvalidImageError) as info:
            await client.merge_face(FACE, tmp_path / "nope.png")
    assert info.value.input_name == "image"
    assert info.value.rule == "not_found"
    assert emulator.stats.requests == 0


# -- outputs -------------------------------------------------------------------------


@pytest.mark.parametrize("image_type", ["png", "webp", "jpeg"])
async def test_each_output_type_in_memory(emulator: Emulator, image_type: str) -> None:
    """The result is an image in the requested format, kept in memory."""
    async with client_for(emulator) as client:
        result = await client.merge_face(FACE, TARGET, response_image_type=image_type)
    assert result.image_type == image_type
    assert result.path is None
    assert result.data is not None
    with Image.open(io.BytesIO(result.data)) as image:
        assert image.format == PIL_FORMATS[image_type]
        assert image.size == (96, 80)


@pytest.mark.parametrize("image_type", ["png", "webp", "jpeg"])
async def test_each_output_type_to_a_file(emulator: Emulator, tmp_path: Path, image_type: str) -> None:
    """output= streams the result to that file (folders created), leaving nothing else behind."""
    out = tmp_path / "deep" / "folder" / f"merged.{image_type}"
    async with client_for(emulator) as client:
        result = await client.merge_face(FACE, TARGET, response_image_type=image_type, output=out)
    assert result.path == out
    assert result.data is None
    assert os.listdir(out.parent) == [out.name]
    with Image.open(out) as image:
        assert image.format == PIL_FORMATS[image_type]
        assert image.size == (96, 80)
    assert result.read_bytes() == out.read_bytes()


async def test_output_file_after_retries(
    emulator_factory: Callable[..., Emulator], tmp_path: Path
) -> None:
    """A body cut short is retried; the file holds the complete image and no partial remains."""
    out = tmp_path / "merged.png"
    faults = Faults(fail_first=2, fail_first_kind="truncate")
    async with emulator_factory(faults=faults) as emu, client_for(emu) as client:
        result = await client.merge_face(FACE, TARGET, output=out)
    assert result.attempts == 3
    assert os.listdir(tmp_path) == ["merged.png"]
    with Image.open(out) as image:
        image.load()
        assert image.size == (96, 80)


async def test_failed_job_leaves_no_file(emulator: Emulator, tmp_path: Path) -> None:
    """An error answer creates neither the output nor a temporary file."""
    async with client_for(emulator) as client:
        with pytest.raises(na.NoFaceDetectedError):
            await client.merge_face(flat_image(), TARGET, output=tmp_path / "out.png")
    assert os.listdir(tmp_path) == []


async def test_output_that_is_a_folder_is_refused_before_sending(emulator: Emulator, tmp_path: Path) -> None:
    """An output path that is an existing folder is an OutputError before any request, even once
    its parent folder is known to be writable; nothing is left behind."""
    blocker = tmp_path / "taken"
    blocker.mkdir()
    async with client_for(emulator) as client:
        await client.merge_face(FACE, TARGET, output=tmp_path / "first.png")  # the folder is now known
        with pytest.raises(na.OutputError, match=r"taken is an existing folder.*taken/merged\.png"):
            await client.merge_face(FACE, TARGET, output=blocker)
    assert emulator.stats.requests == 1  # only the first merge was sent
    assert sorted(os.listdir(tmp_path)) == ["first.png", "taken"]
    assert os.listdir(blocker) == []


def _make_special(path: Path, kind: str) -> None:
    """Put a FIFO, a symbolic link or a character device (like /dev/null's) at ``path``."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        (path.parent / "target.png").write_bytes(b"kept")
        path.symlink_to(path.parent / "target.png")
    else:
        try:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("making a device node needs root")


SPECIAL_OUTPUTS = [
    pytest.param("fifo", "a named pipe (FIFO)", stat.S_ISFIFO, id="fifo"),
    pytest.param("symlink", "a symbolic link", stat.S_ISLNK, id="symlink"),
    pytest.param("chardev", "a character device", stat.S_ISCHR, id="device"),
]


@pytest.mark.parametrize(("kind", "named", "still"), SPECIAL_OUTPUTS)
async def test_output_that_is_not_a_regular_file_is_refused_before_sending(
    emulator: Emulator, tmp_path: Path, kind: str, named: str, still: Callable[[int], bool]
) -> None:
    """A device, pipe or link at the output path is refused before any request and left as it
    was: the result's rename would have replaced it (as root, ``output="/dev/null"`` put a file
    where the device was)."""
    special = tmp_path / "special.png"
    _make_special(special, kind)
    async with client_for(emulator) as client:
        with pytest.raises(na.OutputError) as caught:
            await client.merge_face(FACE, TARGET, output=special)
    assert f"the output {special} is {named}, not a regular file" in str(caught.value)
    assert still(os.lstat(special).st_mode) and emulator.stats.requests == 0
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".part")]


@pytest.mark.parametrize(("kind", "named", "still"), SPECIAL_OUTPUTS)
async def test_save_refuses_a_path_that_is_not_a_regular_file(
    emulator: Emulator, tmp_path: Path, kind: str, named: str, still: Callable[[int], bool]
) -> None:
    """``save()`` leaves a device, pipe or link in place too, and names it."""
    special = tmp_path / "special.png"
    _make_special(special, kind)
    async with client_for(emulator) as client:
        result = await client.merge_face(FACE, TARGET)
    with pytest.raises(na.OutputError, match=f"is {re.escape(named)}, not a regular file"):
        result.save(special)
    assert still(os.lstat(special).st_mode)


async def test_save_into_a_file_in_the_way_is_an_output_error_naming_the_path(
    emulator: Emulator, tmp_path: Path
) -> None:
    """A folder that cannot be made (a file in the way) is an OutputError naming the path asked
    for, not a raw OSError naming a temporary file."""
    (tmp_path / "afile").write_bytes(b"x")
    async with client_for(emulator) as client:
        result = await client.merge_face(FACE, TARGET)
    with pytest.raises(na.OutputError, match=f"cannot write {re.escape(str(tmp_path))}/afile/r.png: "):
        result.save(tmp_path / "afile" / "r.png")


async def test_a_result_name_near_the_file_system_limit_is_written(emulator: Emulator, tmp_path: Path) -> None:
    """A legal 250-byte result name is written, by merge_face and by save(): the temporary file's
    name is cut to fit (it was the result's name plus a tag, over 255 bytes, and the merge failed
    after it was paid for)."""
    out = tmp_path / "merged" / ("é" * 123 + ".png")  # 246 + 4 bytes
    async with client_for(emulator) as client:
        await client.merge_face(FACE, TARGET, output=out)
        in_memory = await client.merge_face(FACE, TARGET)
    copy = in_memory.save(tmp_path / "saved" / out.name)
    for path in (out, copy):
        with Image.open(path) as image:
            assert image.format == "PNG"
        assert os.listdir(path.parent) == [out.name]


async def test_save_and_to_pil(emulator: Emulator, tmp_path: Path) -> None:
    """save() writes the same bytes; to_pil() gives a loaded image, for both kinds of result."""
    async with client_for(emulator) as client:
        in_memory = await client.merge_face(FACE, TARGET, response_image_type="webp")
        on_disk = await client.merge_face(FACE, TARGET, output=tmp_path / "disk.png")
    assert in_memory.data is not None
    saved = in_memory.save(tmp_path / "copies" / "saved.webp")
    assert saved.read_bytes() == in_memory.data
    image = in_memory.to_pil()
    assert (image.format, image.size) == ("WEBP", (96, 80))
    copy = on_disk.save(str(tmp_path / "copy.png"))
    assert copy.read_bytes() == (tmp_path / "disk.png").read_bytes()
    assert on_disk.to_pil().size == (96, 80)
    assert sorted(os.listdir(tmp_path)) == ["copies", "copy.png", "disk.png"]
    assert "bytes" in repr(in_memory) and "disk.png" in repr(on_disk)


async def test_requests_have_exact_content_length(emulator: Emulator, tmp_path: Path) -> None:
    """Bodies are sent with Content-Length, never chunked, whatever the input kind."""
    path = tmp_path / "face.png"
    path.write_bytes(FACE)
    async with client_for(emulator) as client:
        await client.merge_face(path, TARGET)
        with path.open("rb") as handle:
            await client.merge_face(handle, bytearray(TARGET))
        await client.merge_face(Image.open(io.BytesIO(FACE)), memoryview(TARGET))
    assert emulator.stats.requests == 3
    assert_no_chunking(emulator)


async def test_enterprise_plan_is_sent(emulator: Emulator) -> None:
    """enterprise_plan=True reaches the server; the default does not ask for it."""
    async with client_for(emulator) as client:
        await client.merge_face(FACE, TARGET)
        assert emulator.stats.enterprise_requests == 0
        await client.merge_face(FACE, TARGET, enterprise_plan=True)
    assert emulator.stats.enterprise_requests == 1


# -- errors end to end ------------------------------------------------------------------

ERROR_CASES = [
    # id, emulator settings, client settings, face, error class, reason, attempts
    pytest.param({}, {"api_key": "sk_wrong"}, FACE, na.AuthenticationError, "INVALID_API_KEY", 1,
                 id="wrong-key"),
    pytest.param({}, {}, flat_image(), na.NoFaceDetectedError, "IMAGE_NO_FACE_DETECTED", 1,
                 id="no-face"),
    pytest.param({"balance": 0}, {}, FACE, na.InsufficientBalanceError,
                 "BILLING_BALANCE_NOT_ENOUGH", 1, id="no-balance"),
    pytest.param({"faults": Faults(fail_first=99, fail_first_kind="500")}, {}, FACE,
                 na.ServerError, "CREATE_TASK_FAILED", 5, id="500-exhausted"),
    pytest.param({"faults": Faults(fail_first=99, fail_first_kind="502_html")}, {}, FACE,
                 na.ServerError, None, 5, id="502-html-exhausted"),
    pytest.param({"faults": Faults(fail_first=99, fail_first_kind="503")}, {}, FACE,
                 na.ServerError, "SERVICE_UNAVAILABLE", 5, id="503-exhausted"),
    pytest.param({"faults": Faults(fail_first=99, fail_first_kind="huge_error")}, {}, FACE,
                 na.ServerError, "TASK_FAILED", 5, id="huge-error-body"),
    pytest.param({"faults": Faults(fail_first=99, fail_first_kind="429")},
                 {"requests_per_minute": FAST_PACE}, FACE, na.RateLimitError,
                 "RATE_LIMIT_EXCEEDED", 5, id="429-exhausted"),
    pytest.param({"faults": Faults(fail_first=99, fail_first_kind="drop")}, {}, FACE,
                 na.APIConnectionError, None, 5, id="drop-exhausted"),
    pytest.param({"faults": Faults(fail_first=99, fail_first_kind="truncate")}, {}, FACE,
                 na.InvalidResponseError, None, 5, id="truncate-exhausted"),
    pytest.param({"faults": Faults(fail_first=99, fail_first_kind="bad_json")}, {}, FACE,
                 na.InvalidResponseError, None, 1, id="bad-json-not-retried"),
    pytest.param({"faults": Faults(fail_first=99, fail_first_kind="no_image_file")}, {}, FACE,
                 na.InvalidResponseError, None, 1, id="no-image-file-not-retried"),
    pytest.param({"faults": Faults(fail_first=99, fail_first_kind="bad_base64")}, {}, FACE,
                 na.InvalidResponseError, None, 1, id="bad-base64-not-retried"),
]


@pytest.mark.parametrize(("emu_kwargs", "client_kwargs", "face", "cls", "reason", "attempts"),
                         ERROR_CASES)
async def test_error_classes_end_to_end(
    emulator_factory: Callable[..., Emulator], emu_kwargs: dict[str, Any],
    client_kwargs: dict[str, Any], face: bytes, cls: type[na.NovitaError], reason: str | None,
    attempts: int,
) -> None:
    """Each failure reaches the caller as its own class, retried only when transient."""
    async with emulator_factory(**emu_kwargs) as emu, client_for(emu, **client_kwargs) as client:
        with pytest.raises(cls) as info:
            await client.merge_face(face, TARGET)
    error = info.value
    assert type(error) is cls
    assert error.attempts == attempts
    assert emu.stats.requests == attempts
    assert error.retryable is (attempts > 1)
    if isinstance(error, na.APIStatusError):
        assert error.reason == reason
        assert len(error.body) <= 64 * 1024
        assert len(str(error)) < 500
    assert error.__cause__ is None or not isinstance(error, na.APIStatusError)


async def test_502_html_message(emulator_factory: Callable[..., Emulator]) -> None:
    """A proxy's HTML page maps by status: ServerError, reason None, a summary as message."""
    faults = Faults(rates={"502_html": 1.0})
    async with (
        emulator_factory(faults=faults) as emu,
        client_for(emu, retry=na.RetryPolicy(max_attempts=1)) as client,
    ):
        with pytest.raises(na.ServerError) as info:
            await client.merge_face(FACE, TARGET)
    assert info.value.status == 502
    assert info.value.reason is None
    assert "HTML" in info.value.message


async def test_wrong_path_is_not_found(emulator: Emulator) -> None:
    """A base URL with a wrong path gets 404 API_NOT_FOUND, raised as NotFoundError, not retried."""
    async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url + "/wrong",
                               retry=FAST_RETRY) as client:
        with pytest.raises(na.NotFoundError) as info:
            await client.merge_face(FACE, TARGET)
    assert info.value.status == 404
    assert info.value.reason == "API_NOT_FOUND"
    assert info.value.attempts == 1
    assert emulator.stats.requests == 0


async def test_missing_key_header(emulator: Emulator) -> None:
    """The client always sends a key, so ask directly: no key is 400 MISSING_API_KEY -> auth error."""
    async with aiohttp.ClientSession() as session, session.post(
        f"{emulator.url}/v3/merge-face", json={"face_image_file": "", "image_file": ""}
    ) as response:
        body = await response.read()
        error = error_from_response(response.status, response.headers, body)
    assert isinstance(error, na.AuthenticationError)
    assert (error.status, error.reason) == (400, "MISSING_API_KEY")


async def test_forbidden_is_never_retried(emulator: Emulator) -> None:
    """A 403 is raised after one request, even with retries available."""
    async with client_for(emulator, api_key="sk_not_this_one") as client:
        with pytest.raises(na.AuthenticationError):
            await client.merge_face(FACE, TARGET)
    assert emulator.stats.requests == 1


@pytest.mark.parametrize(
    ("kind", "client_kwargs"),
    [
        pytest.param("503", {}, id="503"),
        pytest.param("500", {}, id="500"),
        pytest.param("502_html", {}, id="502-html"),
        pytest.param("drop", {}, id="drop"),
        pytest.param("truncate", {}, id="truncate"),
        pytest.param("429", {"requests_per_minute": FAST_PACE}, id="429"),
    ],
)
async def test_retry_then_success(
    emulator_factory: Callable[..., Emulator], kind: str, client_kwargs: dict[str, Any]
) -> None:
    """Two transient failures, then success: three attempts, one result."""
    faults = Faults(fail_first=2, fail_first_kind=kind)
    async with emulator_factory(faults=faults) as emu, client_for(emu, **client_kwargs) as client:
        result = await client.merge_face(FACE, TARGET)
    assert result.attempts == 3
    assert result.data is not None
    assert emu.stats.requests == 3
    assert emu.stats.faults == {kind: 2}


async def test_retry_after_is_honoured(emulator_factory: Callable[..., Emulator]) -> None:
    """A 429 with Retry-After: 1 makes the client wait about a second before retrying."""
    policy = na.RetryPolicy(max_attempts=3, initial_wait=0.0, max_wait=0.0, max_retry_after=5.0)
    faults = Faults(fail_first=1, fail_first_kind="429_retry_after")
    async with emulator_factory(faults=faults) as emu, client_for(emu, retry=policy) as client:
        started = time.monotonic()
        result = await client.merge_face(FACE, TARGET)
        elapsed = time.monotonic() - started
    assert result.attempts == 2
    assert 0.95 <= elapsed < 3.0
    assert isinstance(client.pacer, Pacer)
    assert client.pacer.rate_limited == 1


async def test_retry_after_is_capped_by_the_policy(emulator_factory: Callable[..., Emulator]) -> None:
    """max_retry_after caps the server's wait, for the retry and the shared cool-down alike."""
    faults = Faults(fail_first=2, fail_first_kind="429_retry_after")
    # A fixed pace: the adaptive one would (rightly) slow down after a 429 on its own.
    async with (
        emulator_factory(faults=faults) as emu,
        client_for(emu, requests_per_minute=FAST_PACE) as client,
    ):
        started = time.monotonic()
        result = await client.merge_face(FACE, TARGET)
        elapsed = time.monotonic() - started
    assert result.attempts == 3
    assert isinstance(client.pacer, Pacer)
    assert client.pacer.rate_limited == 2
    assert elapsed < 0.9


async def test_slow_answer_times_out(emulator_factory: Callable[..., Emulator]) -> None:
    """An answer slower than Timeout.total is APITimeoutError after every attempt."""
    faults = Faults(rates={"slow": 1.0}, slow_seconds=30)
    policy = na.RetryPolicy(max_attempts=2, initial_wait=0.0, max_wait=0.0)
    async with emulator_factory(faults=faults) as emu:
        async with client_for(emu, timeout=na.Timeout(total=0.3), retry=policy) as client:
            started = time.monotonic()
            with pytest.raises(na.APITimeoutError) as info:
                await client.merge_face(FACE, TARGET)
            elapsed = time.monotonic() - started
        assert info.value.attempts == 2
        assert emu.stats.requests == 2
        assert 0.55 <= elapsed < 2.0
        await wait_idle(emu)  # the server dropped the abandoned handlers


@pytest.mark.parametrize("seconds", [pytest.param(0.5, id="short"), pytest.param(300.0, id="over-the-default-read")])
def test_a_timeout_in_seconds_is_the_whole_attempt(seconds: float) -> None:
    """timeout=N (--timeout N) allows N seconds of silence too: a 300 s attempt is not cut at the
    default 120 s read limit while the server merges."""
    client = na.NovitaClient(api_key="sk_test", base_url="http://127.0.0.1:9", timeout=seconds)
    assert (client.timeout.total, client.timeout.read) == (seconds, seconds)
    assert client.timeout.connect == min(10.0, seconds)


async def test_read_timeout_on_a_dripping_answer(emulator_factory: Callable[..., Emulator]) -> None:
    """A body that trickles slower than Timeout.read times out even within the total."""
    faults = Faults(rates={"drip": 1.0}, drip_interval=1.0)
    async with emulator_factory(faults=faults) as emu:
        async with client_for(emu, timeout=na.Timeout(total=20, read=0.2),
                              retry=na.RetryPolicy(max_attempts=1)) as client:
            started = time.monotonic()
            with pytest.raises(na.APITimeoutError):
                await client.merge_face(FACE, TARGET)
            assert time.monotonic() - started < 1.5
        await wait_idle(emu)


@pytest.mark.parametrize("output", ["memory", "file"])
async def test_a_connection_idle_longer_than_the_read_timeout_is_reused_cleanly(
    emulator: Emulator, tmp_path: Path, output: str
) -> None:
    """The read timeout guards a read in flight, never a connection waiting in the pool.

    aiohttp 3.14.0 and 3.14.1 armed it again on a connection already back in the pool
    (aio-libs/aiohttp#12953): once idle for longer, the next call's first attempt on it
    failed at once with a spurious read timeout, costing a retry (or the job, with
    retries off).  Those versions are excluded from the dependencies; this keeps it so.
    """
    target = tmp_path / "out.png" if output == "file" else None
    async with client_for(emulator, timeout=na.Timeout(total=10, read=0.2),
                          max_concurrency=1) as client:
        await client.merge_face(FACE, TARGET, output=target)
        await anyio.sleep(0.5)
        again = await client.merge_face(FACE, TARGET, output=target)
    assert again.attempts == 1
    assert emulator.stats.requests == 2


async def test_a_connection_the_server_closed_while_idle_costs_no_attempt(
    emulator_factory: Callable[..., Emulator],
) -> None:
    """Servers close idle keep-alive connections; the next call opens a new one, first time."""
    async with emulator_factory(keepalive_timeout=0.1) as emu, client_for(emu, max_concurrency=1) as client:
        for _ in range(3):
            result = await client.merge_face(FACE, TARGET)
            assert result.attempts == 1
            await anyio.sleep(0.4)  # the emulator closes the connection meanwhile
        assert emu.stats.requests == 3
        assert emu.stats.connections == 3


async def test_calls_in_a_row_share_one_kept_alive_connection(emulator: Emulator) -> None:
    """The client keeps its connection alive: no new TCP (or TLS) handshake per call."""
    async with client_for(emulator, max_concurrency=1) as client:
        for _ in range(3):
            assert (await client.merge_face(FACE, TARGET)).attempts == 1
    assert emulator.stats.requests == 3
    assert emulator.stats.connections == 1


async def test_cancellation_stops_at_once(
    emulator_factory: Callable[..., Emulator], tmp_path: Path
) -> None:
    """Cancelling a call mid-request does not retry it and leaves no temporary file."""
    async with emulator_factory(faults=Faults(rates={"slow": 1.0}, slow_seconds=30)) as emu:
        async with client_for(emu) as client:
            with anyio.move_on_after(0.2) as scope:
                await client.merge_face(FACE, TARGET, output=tmp_path / "out.png")
        assert scope.cancelled_caught
        assert emu.stats.requests == 1
        assert os.listdir(tmp_path) == []
        await wait_idle(emu)


async def test_server_gone_then_back(emulator: Emulator) -> None:
    """A paused server is a connection error; once resumed the same client works again."""
    async with client_for(emulator, retry=na.RetryPolicy(max_attempts=2, initial_wait=0.0,
                                                         max_wait=0.0)) as client:
        await client.merge_face(FACE, TARGET)
        await emulator.pause()
        with pytest.raises(na.APIConnectionError) as info:
            await client.merge_face(FACE, TARGET)
        assert info.value.attempts == 2
        assert isinstance(info.value.__cause__, Exception)
        await emulator.resume()
        assert (await client.merge_face(FACE, TARGET)).attempts == 1


async def test_local_error_mid_upload_is_not_retried(emulator: Emulator) -> None:
    """An input that changes while it is sent raises SourceChangedError, once, unretried."""
    async with client_for(emulator) as client:
        with pytest.raises(na.SourceChangedError) as info:
            await client.merge_face(GrowingFile(FACE), TARGET)
    error = info.value
    assert error.attempts == 1
    assert error.input_name == "face_image"
    assert emulator.stats.requests <= 1
    assert emulator.stats.successes == {}
    # The cause is the aborted connection; the error itself is ours, not aiohttp's.
    assert "aiohttp" not in type(error).__module__
    await wait_idle(emulator)


# -- concurrency -------------------------------------------------------------------------


async def test_concurrency_cap(emulator_factory: Callable[..., Emulator]) -> None:
    """40 concurrent calls with max_concurrency=4 never have more than 4 requests in flight."""
    async with emulator_factory(latency=0.05) as emu, client_for(emu, max_concurrency=4) as client:
        results: list[na.MergeFaceResult] = []

        async def one(seed: int) -> None:
            results.append(await client.merge_face(make_image(seed=seed), TARGET))

        async with anyio.create_task_group() as group:
            for seed in range(40):
                group.start_soon(one, seed)
    assert len(results) == 40
    assert emu.stats.peak_in_flight == 4
    assert emu.stats.requests == 40
    assert_no_chunking(emu)


async def test_fixed_pace_spaces_requests(emulator: Emulator) -> None:
    """requests_per_minute spaces request starts evenly."""
    async with client_for(emulator, requests_per_minute=600) as client:
        assert client.requests_per_minute == 600
        # A first call pays one-time costs (lazy imports, the first connection) between
        # its turn and its arrival, which shortened the first gap to 0.03 s in a CI run:
        # the starts measured are those of the four calls after it.
        await client.merge_face(FACE, TARGET)
        async with anyio.create_task_group() as group:
            for _ in range(4):
                group.start_soon(client.merge_face, FACE, TARGET)
    starts = list(emulator.stats.started_at)[1:]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(gaps) == 3
    # Booked 0.1 s apart; arrival jitter on a busy machine may shift one a little.
    assert starts[-1] - starts[0] >= 0.28, gaps
    assert min(gaps) >= 0.05, gaps


def _shared_plain_file(stack: contextlib.ExitStack, path: Path) -> Any:
    handle = stack.enter_context(path.open("rb"))
    handle.seek(7)  # the image starts after a preamble: each call reads from here
    return handle


class SlowSeek(io.BytesIO):
    """A BytesIO that lets other threads run right after each seek, as a slow device would."""

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        position = super().seek(offset, whence)
        time.sleep(0.0005)
        return position


SHARED: dict[str, Callable[[contextlib.ExitStack, Path], Any]] = {
    "open-file": _shared_plain_file,
    "unbuffered-file": lambda stack, path: _at(stack.enter_context(path.open("rb", buffering=0)), 7),
    "bytesio": lambda stack, path: _at(io.BytesIO(path.read_bytes()), 7),
    "slow-seek": lambda stack, path: _at(SlowSeek(path.read_bytes()), 7),
}


@pytest.mark.parametrize("validate", [pytest.param(True, id="checked"), pytest.param(False, id="unchecked")])
@pytest.mark.parametrize("kind", [pytest.param(k, id=k) for k in SHARED])
async def test_one_file_object_shared_by_concurrent_calls(
    emulator: Emulator, closing: contextlib.ExitStack, tmp_path: Path, kind: str, validate: bool
) -> None:
    """Eight concurrent calls given one file object each send its image whole and unmixed,
    and leave its position where it was (a body of the right length with mixed-up
    chunks would be a different image: the emulator's key would not match)."""
    face = big_png(4)  # several upload chunks: interleaved reads would mix them up
    path = tmp_path / "face.bin"
    path.write_bytes(b"PREAMBL" + face)
    handle = SHARED[kind](closing, path)
    targets = [make_image(size=(96, 80), seed=10 + i) for i in range(8)]
    async with client_for(emulator, validate=validate) as client:
        async with anyio.create_task_group() as group:
            for target in targets:
                group.start_soon(client.merge_face, handle, target)
        assert handle.tell() == 7
        await client.merge_face(handle, targets[0])  # and it can be used again
    assert emulator.stats.successes == {job_key(face, t): 2 if t is targets[0] else 1 for t in targets}
    assert_no_chunking(emulator)


async def test_file_object_whose_descriptor_is_not_its_content(
    emulator: Emulator, tmp_path: Path
) -> None:
    """A GzipFile (its fileno() is the compressed file's) uploads what read() gives, not the descriptor's bytes."""
    packed = tmp_path / "face.png.gz"
    with gzip.open(packed, "wb") as writer:
        writer.write(FACE)
    async with client_for(emulator) as client:
        with gzip.open(packed, "rb") as handle:
            await client.merge_face(handle, TARGET)
    assert emulator.stats.successes == {job_key(FACE, TARGET): 1}


async def test_a_stream_shared_by_concurrent_calls_is_read_by_one(
    emulator: Emulator, closing: contextlib.ExitStack
) -> None:
    """A pipe given to two concurrent calls is sent by one; the other is refused, naming the
    input and the fix, instead of an "empty image"."""
    stream = _pipe_reader(closing)
    async with client_for(emulator) as client:
        results = await _gather(client.merge_face(stream, TARGET), client.merge_face(stream, FACE))
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1, results
    error = errors[0]
    assert isinstance(error, na.InvalidImageError)
    assert (error.input_name, error.rule) == ("face_image", "consumed")
    assert "path or the bytes" in str(error)
    assert emulator.stats.requests == 1


async def _gather(*calls: Any) -> list[Any]:
    """Run coroutines concurrently; their results or exceptions, in order."""
    results: list[Any] = [None] * len(calls)

    async def one(index: int, call: Any) -> None:
        try:
            results[index] = await call
        except Exception as exc:
            results[index] = exc

    async with anyio.create_task_group() as group:
        for index, call in enumerate(calls):
            group.start_soon(one, index, call)
    return results


async def _until_in_flight(emu: Emulator) -> None:
    """Wait (briefly) until the emulator is handling a request."""
    for _ in range(400):
        if emu.stats.in_flight:
            return
        await anyio.sleep(0.005)
    raise AssertionError("no request reached the emulator")


async def test_closing_the_client_during_a_call_is_client_closed_error(
    emulator_factory: Callable[..., Emulator],
) -> None:
    """aclose() while a request is in flight ends the call with ClientClosedError (a NovitaError),
    not aiohttp's "Session is closed" from a retry on the closed session."""
    async with emulator_factory(latency=2.0) as emu:
        client = client_for(emu)
        call = _gather(client.merge_face(FACE, TARGET))
        async with anyio.create_task_group() as group:
            results: list[Any] = []

            async def run() -> None:
                results.extend(await call)

            group.start_soon(run)
            await _until_in_flight(emu)
            await client.aclose()
        assert isinstance(results[0], na.ClientClosedError), results
        assert "closed" in str(results[0])


async def _close_while_waiting(client: na.NovitaClient, calls: int, *, settle: float = 0.2) -> list[Any]:
    """Start ``calls`` merges, close the client while they wait, and return their outcomes.

    The waits the calls are in last ten seconds or more; closing must end them
    at once, so the whole exchange has to finish well inside that.
    """
    results: list[Any] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:

            async def run() -> None:
                results.extend(await _gather(*(client.merge_face(FACE, TARGET) for _ in range(calls))))

            group.start_soon(run)
            await anyio.sleep(settle)  # checked and booked: now waiting
            await client.aclose()
    return results


async def test_closing_the_client_ends_a_wait_for_the_pace_at_once(emulator: Emulator) -> None:
    """Calls waiting for their pace turn when the client closes raise ClientClosedError at once,
    sending nothing (at 6 a minute they would otherwise wait 10 and 20 s, then raise)."""
    client = client_for(emulator, requests_per_minute=6)
    await client.merge_face(FACE, TARGET)
    results = await _close_while_waiting(client, 2)
    assert all(isinstance(r, na.ClientClosedError) for r in results), results
    assert emulator.stats.requests == 1


async def test_closing_the_client_ends_a_wait_for_a_request_slot_at_once(
    emulator_factory: Callable[..., Emulator],
) -> None:
    """A call queued behind max_concurrency when the client closes raises ClientClosedError at
    once, not when the slow request ahead of it ends (on the caller's session, which aclose()
    leaves open, that request goes on)."""
    async with emulator_factory(latency=30.0) as emu, aiohttp.ClientSession() as session:
        client = client_for(emu, max_concurrency=1, session=session)
        queued: list[Any] = []
        ended = anyio.Event()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as group:
                group.start_soon(client.merge_face, FACE, TARGET)  # holds the only slot
                await _until_in_flight(emu)

                async def run() -> None:
                    queued.extend(await _gather(client.merge_face(FACE, TARGET)))
                    ended.set()

                group.start_soon(run)
                await anyio.sleep(0.2)  # queued for the slot
                await client.aclose()
                await ended.wait()
                group.cancel_scope.cancel()  # the request in flight would take 30 s
        assert isinstance(queued[0], na.ClientClosedError), queued
        assert emu.stats.requests == 1


async def test_closing_the_client_ends_a_retry_back_off_at_once(
    emulator_factory: Callable[..., Emulator],
) -> None:
    """A call sleeping before its retry when the client closes raises ClientClosedError at once."""
    faults = Faults(fail_first=1, fail_first_kind="503")
    async with emulator_factory(faults=faults) as emu:
        retry = na.RetryPolicy(max_attempts=3, initial_wait=30.0, max_wait=30.0)
        client = client_for(emu, retry=retry)
        results = await _close_while_waiting(client, 1, settle=0.5)
        assert isinstance(results[0], na.ClientClosedError), results
        assert emu.stats.requests == 1


async def test_a_caller_session_closed_during_use_is_client_closed_error(emulator: Emulator) -> None:
    """An injected session its owner closed is ClientClosedError, saying whose session it was."""
    async with aiohttp.ClientSession() as session:
        client = client_for(emulator, session=session)
        await client.merge_face(FACE, TARGET)
    with pytest.raises(na.ClientClosedError, match="session given"):
        await client.merge_face(FACE, TARGET)
    assert emulator.stats.requests == 1


# -- lifecycle and configuration -----------------------------------------------------------


async def test_use_after_close(emulator: Emulator) -> None:
    """A closed client refuses work with ClientClosedError; closing twice is fine."""
    client = client_for(emulator)
    async with client:
        await client.merge_face(FACE, TARGET)
    assert client.closed
    with pytest.raises(na.ClientClosedError):
        await client.merge_face(FACE, TARGET)
    with pytest.raises(na.ClientClosedError):
        async with client:
            pass
    await client.aclose()
    assert emulator.stats.requests == 1


async def test_works_without_async_with(emulator: Emulator) -> None:
    """The session is created on first use; aclose() releases it."""
    client = client_for(emulator)
    try:
        assert (await client.merge_face(FACE, TARGET)).data is not None
    finally:
        await client.aclose()
    assert client.closed


async def test_injected_session_is_used_and_left_open(emulator: Emulator) -> None:
    """A caller's session is used as is and not closed by the client."""
    async with aiohttp.ClientSession() as session:
        async with client_for(emulator, session=session) as client:
            await client.merge_face(FACE, TARGET)
        assert not session.closed
    assert emulator.stats.requests == 1


async def test_invalid_response_image_type(emulator: Emulator) -> None:
    """An unknown output type is a ConfigurationError before anything is sent."""
    async with client_for(emulator) as client:
        with pytest.raises(na.ConfigurationError, match="gif"):
            await client.merge_face(FACE, TARGET, response_image_type="gif")
    assert emulator.stats.requests == 0


@pytest.mark.parametrize("key", [pytest.param(None, id="none"), pytest.param("  ", id="blank")])
def test_missing_key_is_a_configuration_error(key: str | None) -> None:
    """No key (the environment is stripped by conftest) fails at construction."""
    with pytest.raises(na.ConfigurationError, match="NOVITA_API_KEY"):
        na.NovitaClient(api_key=key)


@pytest.mark.parametrize("value", [pytest.param(0, id="zero"), pytest.param(-1, id="negative"),
                                   pytest.param(2.5, id="float")])
def test_bad_max_concurrency(value: Any) -> None:
    """max_concurrency must be a positive int."""
    with pytest.raises(na.ConfigurationError, match="max_concurrency"):
        na.NovitaClient(api_key="sk_x", max_concurrency=value)


async def test_key_and_url_from_the_environment(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NOVITA_API_KEY and NOVITA_BASE_URL are used when no argument is given."""
    monkeypatch.setenv("NOVITA_API_KEY", emulator.api_key)
    monkeypatch.setenv("NOVITA_BASE_URL", emulator.url + "/")
    async with na.NovitaClient(retry=FAST_RETRY) as client:
        assert client.base_url == emulator.url
        await client.merge_face(FACE, TARGET)
    assert emulator.stats.successes == {job_key(FACE, TARGET): 1}


def test_arguments_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Explicit api_key and base_url override the environment."""
    monkeypatch.setenv("NOVITA_API_KEY", "sk_from_env")
    monkeypatch.setenv("NOVITA_BASE_URL", "https://env.example")
    client = na.NovitaClient(api_key="sk_explicit", base_url="https://api.example.com")
    assert client.base_url == "https://api.example.com"
    assert "env.example" not in repr(client)


def test_default_base_url() -> None:
    """Without argument or environment the public endpoint (over HTTPS) is used; nothing is sent."""
    client = na.NovitaClient(api_key="sk_x")
    assert client.base_url == DEFAULT_BASE_URL
    assert client.base_url.startswith("https://")


def test_repr_never_shows_the_key() -> None:
    """repr names the URL and limits, never any part of the key."""
    client = na.NovitaClient(api_key="sk_live_abcdef123456", base_url="https://api.example.com")
    text = repr(client)
    assert "api.example.com" in text and "max_concurrency" in text
    assert "sk_" not in text and "abcdef" not in text and "123456" not in text


@pytest.mark.parametrize(
    "base_url",
    [
        pytest.param("ftp://example.com", id="ftp"),
        pytest.param("api.example.com", id="no-scheme"),
        pytest.param("https://", id="no-host"),
    ],
)
def test_malformed_base_url(base_url: str) -> None:
    """A base URL that is not http(s)://host is a ConfigurationError."""
    with pytest.raises(na.ConfigurationError, match="base_url"):
        na.NovitaClient(api_key="sk_x", base_url=base_url)


# -- the key never leaks -------------------------------------------------------------------

SECRET = "sk_live_TopSecret_0123456789abcdef"
OTHER_SECRET = "sk_live_WrongSecret_fedcba9876543210"


async def test_key_never_appears_in_logs_or_errors(
    emulator_factory: Callable[..., Emulator], caplog: pytest.LogCaptureFixture
) -> None:
    """Successes, API errors, retries and local errors never show the key anywhere."""
    caplog.set_level("DEBUG")
    errors: list[BaseException] = []
    faults = Faults(rates={"500": 0.3, "drop": 0.2}, seed=3)
    async with emulator_factory(api_keys=(SECRET,), faults=faults) as emu:
        async with client_for(emu, api_key=SECRET) as client:
            for seed in range(6):
                try:
                    await client.merge_face(make_image(seed=seed), TARGET)
                except na.NovitaError as exc:
                    errors.append(exc)
            for bad in (flat_image(), GrowingFile(FACE)):
                with pytest.raises(na.NovitaError) as info:
                    await client.merge_face(bad, TARGET)
                errors.append(info.value)
            client_text = repr(client)
        async with client_for(emu, api_key=OTHER_SECRET) as client:
            with pytest.raises(na.AuthenticationError) as auth:
                await client.merge_face(FACE, TARGET)
            errors.append(auth.value)
    assert emu.stats.faults  # some retries happened and were logged
    assert any("retrying" in record.getMessage() for record in caplog.records)
    texts = [caplog.text, client_text]
    for error in errors:
        texts += [str(error), repr(error), "".join(traceback.format_exception(error))]
        if isinstance(error, na.APIStatusError):
            texts.append(error.body.decode("utf-8", "replace"))
    for text in texts:
        assert SECRET not in text
        assert OTHER_SECRET not in text


async def test_unreadable_input_mid_upload_is_not_retried(emulator: Emulator) -> None:
    """A file object whose reads fail during the upload is an InvalidImageError, sent once."""

    class Failing(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            raise OSError(5, "Input/output error")

    # Validation off: it would read the object first and refuse it before any request.
    async with client_for(emulator, validate=False) as client:
        with pytest.raises(na.InvalidImageError) as info:
            await client.merge_face(FACE, Failing(TARGET))
    assert info.value.rule == "unreadable"
    assert info.value.attempts == 1
    assert emulator.stats.requests <= 1
    await wait_idle(emulator)


async def test_text_mode_file_is_refused(emulator: Emulator, tmp_path: Path) -> None:
    """A file opened in text mode is refused locally with a hint to use 'rb'."""
    path = tmp_path / "face.png"
    path.write_bytes(FACE)
    async with client_for(emulator) as client:
        with (
            path.open(encoding="latin-1") as handle,
            pytest.raises(na.InvalidImageError, match="binary mode") as info,
        ):
            await client.merge_face(handle, TARGET)  # type: ignore[arg-type]  # deliberately text
    assert info.value.rule == "type"
    assert emulator.stats.requests == 0


def big_png(seed: int) -> bytes:
    """A valid noise PNG over 1 MiB (the size above which the header check keeps the file open)."""
    data = noise_png(seed, 620)
    assert len(data) > 1024 * 1024
    return data


def open_files() -> int:
    """File descriptors this process has open (Linux)."""
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors through /proc")
async def test_large_inputs_leave_no_file_open(
    emulator_factory: Callable[..., Emulator], tmp_path: Path
) -> None:
    """Files the header check keeps open for the upload are closed on every path:
    a success, a retried success, a bad second input, and a job cancelled before sending."""
    face, image, bad = tmp_path / "face.png", tmp_path / "image.png", tmp_path / "bad.png"
    face.write_bytes(big_png(1))
    image.write_bytes(big_png(2))
    bad.write_bytes(b"not an image at all" * 100)
    with warnings.catch_warnings(record=True) as caught:
        # A file left open is closed when collected, with a ResourceWarning: record them.
        warnings.simplefilter("always", ResourceWarning)
        async with emulator_factory(faults=Faults(fail_first=1)) as emu, client_for(emu) as client:
            await client.merge_face(image, face, output=tmp_path / "warm.png")  # opens the session's socket
            before = open_files()
            result = await client.merge_face(face, image, output=tmp_path / "out.png")
            assert result.attempts == 2  # the retry read the files again, from a fresh open
            with Image.open(tmp_path / "out.png") as merged:
                assert merged.size == (620, 620)
            with pytest.raises(na.InvalidImageError, match="image"):
                await client.merge_face(face, bad)
            assert emu.stats.requests == 4  # warm and out, 2 attempts each; the bad pair was never sent
            assert open_files() == before
        async with emulator_factory() as emu, client_for(emu, requests_per_minute=1) as slow:
            await slow.merge_face(face, image)
            with anyio.move_on_after(0.5) as scope:
                # Checked (files kept open), then waiting a minute for its turn: cancelled there.
                await slow.merge_face(face, image)
            assert scope.cancelled_caught
            assert emu.stats.requests == 1
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors through /proc")
async def test_without_validation_inputs_are_still_read_once_and_closed(
    emulator: Emulator, tmp_path: Path
) -> None:
    """validate=False skips the checks, not the single open: results match and no file stays open."""
    face, image = tmp_path / "face.png", tmp_path / "image.png"
    face.write_bytes(big_png(3))
    image.write_bytes(TARGET)  # a small file: read whole when opened
    async with client_for(emulator, validate=False) as client:
        first = await client.merge_face(face, image)
        before = open_files()
        second = await client.merge_face(face, image)
        assert open_files() == before
    assert first.data == second.data and first.data is not None
    with Image.open(io.BytesIO(first.data)) as merged:
        assert merged.size == (96, 80)
    assert emulator.stats.requests == 2


async def test_result_files_get_the_mode_a_plain_open_gives(client: na.NovitaClient, tmp_path: Path) -> None:
    """Streamed and saved results are readable like any file this process creates (0666 less the umask)."""
    umask = os.umask(0o027)
    try:
        result = await client.merge_face(FACE, TARGET, output=tmp_path / "out.png")
        copy = result.save(tmp_path / "copy.png")
    finally:
        os.umask(umask)
    for path in (tmp_path / "out.png", copy):
        assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(os.listdir(tmp_path)) == ["copy.png", "out.png"]
