"""Input images as re-readable byte sources with a size known up front.

An upload needs its exact length before the first byte goes out (so the
request has a Content-Length and no chunked encoding) and must be readable
once per attempt.  Each kind of input the client accepts becomes one
:class:`ImageSource`: files on disk here, in-memory bytes in ``_source_base``,
a caller's file objects in ``_file_objects``, PIL images encoded here (one
image object may feed many concurrent calls); validation and resizing live in
``_images``.

A ``str`` is always a path.  Text that cannot be one (empty, with a NUL) is
refused by name, and a path that is not found but looks like an image's
content (base64, as an older SDK took it) gets a hint to pass bytes; messages
show at most a few hundred characters of it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import os
import re
import stat
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, TypeVar, Union

import anyio.to_thread

from novita_async._errors import InvalidImageError
from novita_async._file_objects import file_object_source
from novita_async._fileio import THREADS_ONLY, FileCalls, Handover, folder_of
from novita_async._source_base import (
    BufferSource,
    ImageSource,
    PositionalReader,
    positional_chunks,
    pread_full,
    read_exactly,
)

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["BinaryReader", "ImageInput", "ImageSource", "buffer_source", "close_sources", "describe_input"]


class BinaryReader(Protocol):
    """A sync binary file object, as the client reads one: ``read(size)`` gives bytes.

    That is all it needs: ``seek`` and ``tell`` are used when the object has
    them (it is then read from its position by every attempt, see
    ``_file_objects``), and a stream without them is read once.  ``open(path,
    "rb")``, ``BytesIO``, ``GzipFile``, a ``zipfile`` member and raw
    ``io.RawIOBase`` streams all fit (a raw stream's ``read`` may answer
    None, which is taken as no data); text files and async files do not.
    """

    def read(self, size: int = -1, /) -> bytes | None: ...


#: What ``merge_face`` accepts for each image.
ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryReader, "Image.Image"]

T = TypeVar("T")


#: Files up to this size are read whole for the header check (bytes).
_READ_WHOLE_BELOW = 1024 * 1024

#: preadv2's flag for "only what is in the page cache, never wait for the disk"
#: (Linux >= 4.14); None where reads must always go to a worker thread.
_RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None) if hasattr(os, "preadv") else None


def _open_read(path: Path) -> int:
    """Open ``path`` for reading; return the file descriptor (blocking)."""
    return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))


def _pread_cached(fd: int, view: memoryview, offset: int) -> int | None:
    """Read into ``view`` from the page cache only; None when that would mean waiting.

    0 is the end of the file.  A short count means only part was cached (or
    the file ends there): the caller reads the rest with a blocking read.
    """
    assert _RWF_NOWAIT is not None
    try:
        return os.preadv(fd, [view], offset, _RWF_NOWAIT)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return None  # a file system (or kernel) without the flag: read in a thread
        raise


@dataclass
class _PathSource(ImageSource):
    """A file on disk; a read that could wait for the disk goes to a worker thread."""

    input_name: str
    description: str
    path: Path
    size: int
    #: Where reads that cannot be made without waiting run (the client's, in a client).
    files: FileCalls = field(default=THREADS_ONLY, repr=False, compare=False)
    #: What the header check read of a small file, kept for the next upload.
    _checked: bytes | None = field(default=None, init=False, repr=False, compare=False)
    #: The file the header check opened, kept for the next upload: the upload
    #: then needs no open of its own and no thread hop to make it.
    _opened: io.FileIO | None = field(default=None, init=False, repr=False, compare=False)

    async def chunks(self, chunk_size: int) -> AsyncIterator[bytes | memoryview]:
        checked, self._checked = self._checked, None
        if checked is not None:
            # The bytes just checked are the bytes sent, with no second read
            # (and no thread hop); a retry reads the file again.
            view = memoryview(checked)
            for start in range(0, self.size, chunk_size):
                yield view[start : start + chunk_size]
            return
        if 0 < self.size <= chunk_size:
            # One call instead of four (open, read, check for growth, close):
            # most inputs fit one chunk, and where the call goes to a worker
            # thread each hop costs CPU and a wake-up on the request's path.
            yield await self._run(self._read_whole)
            return
        if _RWF_NOWAIT is not None:
            async for piece in self._pread_chunks(chunk_size):
                yield piece
            return
        handle = await anyio.to_thread.run_sync(self.path.open, "rb")
        try:
            async for chunk in read_exactly(self, handle.read, chunk_size):
                yield chunk
        finally:
            await anyio.to_thread.run_sync(handle.close)

    async def _pread_chunks(self, chunk_size: int) -> AsyncIterator[memoryview]:
        """Read the file by position, a chunk at a time, on the event loop when it can (Linux).

        A read of pages already in the page cache (the common case: an input
        just written, or read by the header check) is a memcpy, cheaper than
        the thread hop that would carry it (~65 us of CPU on an idle machine,
        several wake-ups on a busy one): ``preadv2(RWF_NOWAIT)`` does it on the
        event loop and answers EAGAIN instead of waiting for the disk, and
        only then does the read block: in a worker thread, or on the loop where
        the client runs this folder's file calls there (a file system without
        the flag, such as tmpfs, whose reads are memcpys too).
        """
        opened, self._opened = self._opened, None
        if opened is not None:
            fd = opened.fileno()
        else:
            # Cancelled while the open runs in a worker thread, this call would
            # lose the descriptor it returns: the handover closes it.
            fd = await Handover(partial(_open_read, self.path), os.close).run_in(self._run)

        async def read_at(view: memoryview, offset: int) -> int:
            got = _pread_cached(fd, view, offset)
            if got is not None and not 0 < got < len(view):
                return got  # all of it, or the end of the file
            done = got or 0
            return done + await self._run(partial(pread_full, fd, view[done:], offset + done))

        try:
            async for piece in positional_chunks(self, chunk_size, read_at):
                yield piece
        finally:
            if opened is not None:
                opened.close()
            else:
                os.close(fd)

    def _run(self, call: Callable[[], T]) -> Awaitable[T]:
        """Run a blocking read where the client runs this folder's file calls."""
        return self.files.run((folder_of(self.path),), call)

    def open_sync(self) -> BinaryIO:
        if self.size <= _READ_WHOLE_BELOW:
            # One read, then Pillow's many small seeks and reads cost no system
            # call: each one in a worker thread gives up and re-takes the GIL,
            # which on a busy event loop means waiting for it.  (Unbuffered:
            # a buffered open adds an lseek and an ioctl for nothing here.)
            with self.path.open("rb", buffering=0) as handle:
                data = handle.readall()
            if len(data) == self.size:
                self._checked = data
            return io.BytesIO(data)
        if _RWF_NOWAIT is None:
            return self.path.open("rb")
        handle = self.path.open("rb", buffering=0)
        self.close()
        self._opened = handle
        fd = handle.fileno()

        def read_into(view: memoryview, offset: int) -> int:
            return os.preadv(fd, [view], offset)

        # Buffered for Pillow's small reads; closing the reader leaves the file open.
        return io.BufferedReader(PositionalReader(read_into, self.size))

    def close(self) -> None:
        opened, self._opened = self._opened, None
        if opened is not None:
            opened.close()

    def _read_whole(self) -> bytes:
        """Read a file of at most one chunk (blocking), refusing one that changed size."""
        # Unbuffered: one read(2) of size + 1 bytes returns the whole file, and
        # a byte more if it grew (a regular file reads short only at its end).
        with self.path.open("rb", buffering=0) as handle:
            data = handle.read(self.size + 1)
        if len(data) != self.size:
            raise self._changed(len(data))
        return data


def close_sources(sources: Iterable[ImageSource]) -> None:
    """Close every source; they hold only read-only files, whose close loses nothing."""
    for source in sources:
        with contextlib.suppress(OSError):
            source.close()


#: Longest path shown whole in messages (characters); a longer one is cut in the middle.
_SHOWN_CHARS = 200


def _shown(text: str) -> str:
    """A path as messages show it: control characters escaped, a very long one cut.

    A ``str`` is always a path, but callers pass other text too (an image's
    base64, as an older SDK took it; bytes decoded to str): a message, and
    the ledger line that records it, must not carry megabytes of it.
    """
    if len(text) > _SHOWN_CHARS:
        return f"{_shown(text[:120])}...{_shown(text[-40:])} ({len(text)} characters)"
    return text if text.isprintable() else repr(text)


def describe_input(value: object) -> str:
    """A short description of an input for messages; never its contents."""
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        return _shown(text) if isinstance(text, str) else repr(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"{type(value).__name__} ({memoryview(value).nbytes} bytes)"
    name = getattr(value, "name", None)
    if isinstance(name, str):
        return name
    return type(value).__name__


def _is_pil_image(value: object) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return False
    return isinstance(value, Image.Image)


@dataclass(eq=False)
class _SharedEncode:
    """The calls encoding one PIL image object right now (see :func:`_encode_pil`)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Calls holding this entry; the last one out removes it.
    users: int = 0
    #: The latest encode's bytes, and the ticket it took as it began.
    data: bytes | None = None
    begun: int = -1


#: PIL images being encoded now, by id(): an entry lives only while a call is
#: using the image, which keeps the image alive, so its id is not reused
#: meanwhile.  (By id: Pillow's images define __eq__, so they are unhashable.)
_ENCODING: dict[int, _SharedEncode] = {}
#: Guards _ENCODING, each entry's ``users`` and the tickets (encodes run in worker threads).
_ENCODING_LOCK = threading.Lock()
#: One sequence orders every call's request and every encode's start.
_TICKETS = itertools.count()


def _encode_pil(image: Image.Image) -> bytes:
    """Encode a Pillow image for upload (blocking); concurrent calls may share the image object.

    Pillow is not safe for two threads on one image object: a lazily opened
    image (``Image.open``) is read from its file on first use, which is then
    closed, and ``save`` keeps its options on the image object.  So the calls
    given one image object take turns under its lock, and none copies it.
    A call that had to wait takes the bytes of an encode that began after it
    asked: made while that call was in flight, of the image as it was then,
    they are what its own encode would have sent.  A wave of concurrent calls
    (one face onto many photos) thus encodes the image at most twice, not once
    per call.  Nothing is kept once no call is using the image, so a change
    made to it between calls is always sent.
    """
    key = id(image)
    with _ENCODING_LOCK:
        shared = _ENCODING.get(key)
        if shared is None:
            shared = _ENCODING[key] = _SharedEncode()
        shared.users += 1
        asked = next(_TICKETS)
    try:
        with shared.lock:
            if shared.data is not None and shared.begun > asked:
                return shared.data
            with _ENCODING_LOCK:
                begun = next(_TICKETS)
            data = _encode_pil_now(image)
            shared.data, shared.begun = data, begun
            return data
    finally:
        with _ENCODING_LOCK:
            shared.users -= 1
            if not shared.users:
                del _ENCODING[key]


#: 16-bit (and 32-bit integer) greyscale modes, sent scaled to 8 bits as
#: ``auto_resize`` does for files; float images (mode F) have no one scale.
_WIDE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def _encode_pil_now(image: Image.Image) -> bytes:
    """Encode a Pillow image for upload: JPEG stays JPEG, everything else PNG (the caller holds its lock)."""
    from PIL import Image

    from novita_async._images import to_8bit

    buffer = io.BytesIO()
    if image.mode in _WIDE_MODES:
        # Scaled, not clipped: Pillow's own convert("RGB") maps every 16-bit
        # value above 255 to white.
        image = to_8bit(image, keep_alpha=False)
    elif image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    if getattr(image, "format", None) == "JPEG" and image.mode in ("RGB", "L"):
        image.save(buffer, format="JPEG", quality=95)
    else:
        # Low compression: the upload is local-to-server bandwidth, zlib level 6
        # costs several times more CPU for a few percent.
        image.save(buffer, format="PNG", compress_level=1)
    del Image
    return buffer.getvalue()


#: Text of base64's alphabets (standard and URL-safe), once whitespace is taken out.
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
#: How the base64 of a PNG, a JPEG and a WebP begins.
_IMAGE_BASE64_STARTS = ("iVBORw0KGgo", "/9j/", "UklGR")


def _content_hint(text: str) -> str:
    """A hint for a path that holds an image's content rather than a path; "" when it does not look so.

    An older SDK took images as base64 strings, and bytes decoded to str
    turn up too; a ``str`` is always a path here, never guessed to be data.
    """
    fix = " A str is always a path; to send an image's content, pass it as bytes"
    if text[:5].lower() == "data:":
        return f"{fix} (for a data: URL, base64.b64decode(url.partition(',')[2]))."
    compact = "".join(text.split())
    if (len(compact) >= 64 or compact.startswith(_IMAGE_BASE64_STARTS)) and _BASE64_TEXT.fullmatch(compact):
        return f"{fix} (if it is base64 text, base64.b64decode(text))."
    if "\0" in text:
        return f"{fix}."
    return ""


def _path_fail(input_name: str, description: str, hint: str) -> Callable[[str, str, str], InvalidImageError]:
    """The error maker for a path's problems: names the input, the problem, the fix and ``hint``."""

    def fail(rule: str, what: str, fix: str) -> InvalidImageError:
        return InvalidImageError(
            f"{input_name} ({description}): {what} [rule {rule}]. {fix}{hint}",
            input_name=input_name, source=description, rule=rule,
        )

    return fail


def _path_of(text: str, input_name: str, description: str) -> Path:
    """``text`` as a path, refusing text no file can be named by (rule ``invalid_path``)."""
    if not text:
        # Path("") is ".", the current folder: say what was really given.
        raise _path_fail(input_name, "''", "")(
            "invalid_path", "the path is an empty string", "Pass the path of an image file.")
    if "\0" in text:
        # os.stat would raise a bare ValueError ("embedded null byte").
        raise _path_fail(input_name, description, _content_hint(text))(
            "invalid_path", "the path contains a NUL character, so it cannot name a file",
            "Pass the path of an image file.")
    return Path(text)


def _stat_path(path: Path, input_name: str, description: str) -> int:
    fail = _path_fail(input_name, description, "")

    def missing(rule: str, what: str, fix: str) -> InvalidImageError:
        return _path_fail(input_name, description, _content_hint(str(path)))(rule, what, fix)

    try:
        info = path.stat()
    except FileNotFoundError:
        raise missing("not_found", "no such file",
                      "Check the path (relative paths resolve against the current folder).") from None
    except PermissionError:
        raise fail("unreadable", "permission denied", "Make the file readable by this user.") from None
    except OSError as exc:
        raise missing("unreadable", f"cannot be read ({exc.strerror})", "Check the path.") from None
    if stat.S_ISDIR(info.st_mode):  # from the stat just made: no second one
        raise fail("not_a_file", "is a directory, not an image file", "Pass the path of an image file.")
    if not os.access(path, os.R_OK):
        raise fail("unreadable", "permission denied", "Make the file readable by this user.")
    return info.st_size


def _source_sync(value: object, input_name: str, files: FileCalls = THREADS_ONLY) -> ImageSource:
    description = describe_input(value)
    if isinstance(value, (str, os.PathLike)):
        path = _path_of(os.fsdecode(os.fspath(value)), input_name, description)
        return _PathSource(input_name, description, path, _stat_path(path, input_name, description),
                           files)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return BufferSource(input_name, description, memoryview(value))
    if _is_pil_image(value):
        if getattr(value, "mode", None) == "F":
            raise InvalidImageError(
                f"{input_name} ({description}): a 32-bit float PIL image (mode F) has no one scale "
                "to 8 bits [rule color_mode]. Scale it to 8 bits per channel yourself (mode L or "
                "RGB) and pass that.",
                input_name=input_name, source=description, rule="color_mode",
            )
        try:
            data = _encode_pil(value)  # type: ignore[arg-type]  # checked by _is_pil_image
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            # A closed image, or a lazily opened one whose file is cut short or gone.
            raise InvalidImageError(
                f"{input_name} ({description}): the PIL image cannot be read or encoded "
                f"({type(exc).__name__}: {exc}) [rule unreadable]. Pass it while it is open "
                "(inside its 'with' block), or pass the file's path.",
                input_name=input_name, source=description, rule="unreadable",
            ) from exc
        return BufferSource(input_name, f"PIL image ({len(data)} bytes encoded)", memoryview(data))
    if isinstance(value, io.TextIOBase):
        raise InvalidImageError(
            f"{input_name} ({description}): file object is open in text mode [rule type]. "
            "Open the file in binary mode ('rb').",
            input_name=input_name, source=description, rule="type",
        )
    if hasattr(value, "read"):
        return file_object_source(value, input_name, description)
    raise InvalidImageError(
        f"{input_name}: unsupported input type {type(value).__name__} [rule type]. Pass a path "
        "(str or os.PathLike), bytes, a binary file object or a PIL.Image.Image.",
        input_name=input_name, source=description, rule="type",
    )


def buffer_source(data: bytes, input_name: str, description: str) -> ImageSource:
    """An in-memory source (used for images resized by ``auto_resize``)."""
    return BufferSource(input_name, description, memoryview(data))
