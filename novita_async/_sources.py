"""Input images as re-readable byte sources with a size known up front.

An upload needs its exact length before the first byte goes out (so the
request has a Content-Length and no chunked encoding) and must be readable
once per attempt.  Each kind of input the client accepts becomes one
:class:`ImageSource` here; validation and resizing live in ``_images``.

A binary file object is read from its position at the call to its end, again
by every attempt, and its position is left where it was.  A seekable one may
be shared by concurrent calls: a plain file opened with ``open(path, "rb")``
is read by position (``pread``) on a duplicate of its descriptor, so no call
moves the position another relies on; any other seekable object (``BytesIO``,
a wrapper) is read under a lock of its own, each read seeking to its place and
back.  A stream that cannot seek (a pipe, a socket) is read whole, once; a
second call given the same stream is refused rather than sent an empty image.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, TypeVar, Union

import anyio.to_thread

from novita_async._errors import InvalidImageError, SourceChangedError
from novita_async._fileio import THREADS_ONLY, FileCalls, folder_of

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["ImageInput", "ImageSource", "buffer_source", "close_sources", "describe_input"]

#: What ``merge_face`` accepts for each image.
ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes], "Image.Image"]

T = TypeVar("T")


class ImageSource:
    """A validated-size input that can be streamed again for every attempt.

    Attributes:
        input_name: ``"face_image"`` or ``"image"``, for messages.
        description: What the input is, for messages (a path, or a type and size).
        size: Exact length in bytes.
    """

    input_name: str
    description: str
    size: int

    def chunks(self, chunk_size: int) -> AsyncIterator[bytes | memoryview]:
        """Yield the bytes in pieces of ``chunk_size`` (the last may be shorter).

        Raises:
            SourceChangedError: the input is shorter or longer than ``size`` now.
        """
        raise NotImplementedError

    def open_sync(self) -> BinaryIO:
        """A seekable binary stream at the image's start, for header checks (blocking)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release anything the header check kept open for the upload (idempotent)."""

    def _changed(self, got: int) -> SourceChangedError:
        return SourceChangedError(
            f"{self.input_name} ({self.description}) changed while it was being uploaded: "
            f"expected {self.size} bytes, read {got}. The request was aborted and not retried; "
            "make sure nothing writes to the file during the upload.",
            input_name=self.input_name,
            source=self.description,
            rule="changed",
        )


@dataclass
class _BufferSource(ImageSource):
    """Bytes already in memory; chunks are zero-copy memoryview slices."""

    input_name: str
    description: str
    view: memoryview

    def __post_init__(self) -> None:
        self.view = self.view.cast("B") if self.view.ndim != 1 or self.view.format != "B" else self.view
        self.size = self.view.nbytes

    async def chunks(self, chunk_size: int) -> AsyncIterator[bytes | memoryview]:
        for start in range(0, self.size, chunk_size):
            yield self.view[start : start + chunk_size]

    def open_sync(self) -> BinaryIO:
        return io.BytesIO(self.view)


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


def _pread_full(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset`` unless the file ends first; return the bytes read (blocking)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            break
        done += got
    return done


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
            async for chunk in _read_exactly(self, handle.read, chunk_size):
                yield chunk
        finally:
            await anyio.to_thread.run_sync(handle.close)

    async def _pread_chunks(self, chunk_size: int) -> AsyncIterator[memoryview]:
        """Read the file into one reused buffer, a chunk at a time (Linux).

        A read of pages already in the page cache (the common case: an input
        just written, or read by the header check) is a memcpy, cheaper than
        the thread hop that would carry it (~65 us of CPU on an idle machine,
        several wake-ups on a busy one): ``preadv2(RWF_NOWAIT)`` does it on the
        event loop and answers EAGAIN instead of waiting for the disk, and
        only then does the read block: in a worker thread, or on the loop where
        the client runs this folder's file calls there (a file system without
        the flag, such as tmpfs, whose reads are memcpys too).  Each chunk is a
        view of the same buffer, valid until the next one is asked for (the encoder
        consumes it at once), so a file costs one buffer, not one per chunk.
        """
        opened, self._opened = self._opened, None
        fd = opened.fileno() if opened is not None else await self._run(partial(_open_read, self.path))
        try:
            # At least one byte: the check for a file that grew reads into it.
            buffer = memoryview(bytearray(max(1, min(chunk_size, self.size))))
            offset = 0
            while offset < self.size:
                want = min(chunk_size, self.size - offset)
                piece = buffer[:want]
                got = _pread_cached(fd, piece, offset)
                if got is None or 0 < got < want:
                    done = got or 0
                    done += await self._run(partial(_pread_full, fd, piece[done:], offset + done))
                    got = done
                if got < want:
                    raise self._changed(offset + got)
                offset += want
                yield piece
            # One more byte means the file grew while we read it.
            extra = _pread_cached(fd, buffer[:1], offset)
            if extra is None:
                extra = await self._run(partial(_pread_full, fd, buffer[:1], offset))
            if extra:
                raise self._changed(self.size + 1)
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
        # Buffered for Pillow's small reads; closing the reader leaves the file open.
        return io.BufferedReader(_NonClosing(handle, 0))

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


@dataclass
class _DescriptorSource(ImageSource):
    """A caller's plain file object on a regular file, read by position (``pread``).

    The reads never touch the object's shared position: one object can feed
    several concurrent calls, and the caller finds its position where it was.
    They go through a duplicate of its descriptor, made at the first read: a
    handle closed by its owner mid-call cannot make us read another file that
    reused the number.
    """

    input_name: str
    description: str
    handle: IO[bytes]
    start: int
    size: int
    _fd: int | None = field(default=None, init=False, repr=False, compare=False)

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = os.dup(self.handle.fileno())
        return self._fd

    async def chunks(self, chunk_size: int) -> AsyncIterator[bytes | memoryview]:
        fd = self._descriptor()
        # One reused buffer, as for paths: the encoder consumes each chunk at once.
        buffer = memoryview(bytearray(max(1, min(chunk_size, self.size))))
        offset = 0
        while offset < self.size:
            want = min(chunk_size, self.size - offset)
            piece = buffer[:want]
            got = await anyio.to_thread.run_sync(_pread_full, fd, piece, self.start + offset)
            if got < want:
                raise self._changed(offset + got)
            offset += want
            yield piece
        # One more byte means the file grew while we read it.
        if await anyio.to_thread.run_sync(_pread_full, fd, buffer[:1], self.start + offset):
            raise self._changed(self.size + 1)

    def open_sync(self) -> BinaryIO:
        fd, start = self._descriptor(), self.start

        def read_into(view: memoryview, offset: int) -> int:
            return os.preadv(fd, [view], start + offset)

        # Buffered: Pillow's header parsing makes many small reads.
        return io.BufferedReader(_PositionalReader(read_into, self.size))

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


@dataclass
class _FileObjectSource(ImageSource):
    """Any other seekable binary file object, read under its own lock.

    Each read takes the object's lock, seeks to its place, reads and seeks
    back to where the caller left it: calls sharing the object take turns
    and never see each other's position.
    """

    input_name: str
    description: str
    handle: IO[bytes]
    start: int
    size: int
    lock: threading.RLock = field(repr=False, compare=False)

    def _read_at(self, offset: int, count: int) -> bytes:
        """Up to ``count`` bytes at ``offset`` from the image's start (blocking)."""
        with self.lock:
            self.handle.seek(self.start + offset)
            try:
                return self.handle.read(count)
            finally:
                self.handle.seek(self.start)

    async def chunks(self, chunk_size: int) -> AsyncIterator[bytes | memoryview]:
        offset = 0

        def read(count: int) -> bytes:
            nonlocal offset
            data = self._read_at(offset, count)
            offset += len(data)
            return data

        async for chunk in _read_exactly(self, read, chunk_size):
            yield chunk

    def open_sync(self) -> BinaryIO:
        def read_into(view: memoryview, offset: int) -> int:
            data = self._read_at(offset, len(view))[: len(view)]
            view[: len(data)] = data
            return len(data)

        # Buffered: Pillow's header parsing makes many small reads.
        return io.BufferedReader(_PositionalReader(read_into, self.size))


class _PositionalReader(io.RawIOBase):
    """A read-only stream of the image's ``size`` bytes with a position of its own.

    ``read_into(view, offset)`` fills ``view`` from ``offset`` bytes into the
    image and returns the count; the stream never moves the caller's object.
    """

    def __init__(self, read_into: Callable[[memoryview, int], int], size: int) -> None:
        super().__init__()
        self._read_into, self._size, self._position = read_into, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")[: max(0, self._size - self._position)]
        count = self._read_into(view, self._position) if len(view) else 0
        self._position += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position


class _NonClosing(io.RawIOBase):
    """A view of a file object that rebases offsets and never closes it."""

    def __init__(self, handle: IO[bytes], start: int) -> None:
        super().__init__()
        self._handle, self._start = handle, start

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._handle.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            offset += self._start
        return self._handle.seek(offset, whence) - self._start

    def tell(self) -> int:
        return self._handle.tell() - self._start

    def close(self) -> None:
        # The owner closes the handle; only this view is closed.
        io.RawIOBase.close(self)


async def _read_exactly(
    source: ImageSource, read: Callable[[int], bytes], chunk_size: int
) -> AsyncIterator[bytes]:
    """Read exactly ``source.size`` bytes in chunks with ``read`` (blocking, sequential),
    refusing a file that changed size."""
    remaining = source.size
    carry = b""
    while remaining > 0:
        want = min(chunk_size - len(carry), remaining)
        data = await anyio.to_thread.run_sync(read, want)
        if not data:
            raise source._changed(source.size - remaining)
        if len(data) > want:
            # A file object that ignores the size asked for would make the body
            # longer than its Content-Length; treat it like a file that grew.
            raise source._changed(source.size - remaining + len(data))
        remaining -= len(data)
        # Short reads (pipes, custom streams) are topped up so every chunk but
        # the last stays a whole multiple of the requested size.
        data = carry + data if carry else data
        if remaining > 0 and len(data) < chunk_size:
            carry = data
            continue
        carry = b""
        yield data
    # One more byte means the file grew while we read it.
    if await anyio.to_thread.run_sync(read, 1):
        raise source._changed(source.size + 1)


def close_sources(sources: Iterable[ImageSource]) -> None:
    """Close every source; they hold only read-only files, whose close loses nothing."""
    for source in sources:
        with contextlib.suppress(OSError):
            source.close()


def describe_input(value: object) -> str:
    """A short description of an input for messages; never its contents."""
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value) if isinstance(os.fspath(value), str) else repr(value)
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


def _encode_pil(image: Image.Image) -> bytes:
    """Encode a Pillow image for upload: JPEG stays JPEG, everything else PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    if getattr(image, "format", None) == "JPEG" and image.mode in ("RGB", "L"):
        image.save(buffer, format="JPEG", quality=95)
    else:
        # Low compression: the upload is local-to-server bandwidth, zlib level 6
        # costs several times more CPU for a few percent.
        image.save(buffer, format="PNG", compress_level=1)
    del Image
    return buffer.getvalue()


def _stat_path(path: Path, input_name: str, description: str) -> int:
    def fail(rule: str, what: str, fix: str) -> InvalidImageError:
        return InvalidImageError(
            f"{input_name} ({description}): {what} [rule {rule}]. {fix}",
            input_name=input_name, source=description, rule=rule,
        )

    try:
        info = path.stat()
    except FileNotFoundError:
        raise fail("not_found", "no such file",
                   "Check the path (relative paths resolve against the current folder).") from None
    except PermissionError:
        raise fail("unreadable", "permission denied", "Make the file readable by this user.") from None
    except OSError as exc:
        raise fail("unreadable", f"cannot be read ({exc.strerror})", "Check the path.") from None
    if stat.S_ISDIR(info.st_mode):  # from the stat just made: no second one
        raise fail("not_a_file", "is a directory, not an image file", "Pass the path of an image file.")
    if not os.access(path, os.R_OK):
        raise fail("unreadable", "permission denied", "Make the file readable by this user.")
    return info.st_size


def _source_sync(value: object, input_name: str, files: FileCalls = THREADS_ONLY) -> ImageSource:
    description = describe_input(value)
    if isinstance(value, (str, os.PathLike)):
        path = Path(os.fspath(value))
        return _PathSource(input_name, description, path, _stat_path(path, input_name, description),
                           files)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _BufferSource(input_name, description, memoryview(value))
    if _is_pil_image(value):
        data = _encode_pil(value)  # type: ignore[arg-type]  # checked by _is_pil_image
        return _BufferSource(input_name, f"PIL image ({len(data)} bytes encoded)", memoryview(data))
    if isinstance(value, io.TextIOBase):
        raise InvalidImageError(
            f"{input_name} ({description}): file object is open in text mode [rule type]. "
            "Open the file in binary mode ('rb').",
            input_name=input_name, source=description, rule="type",
        )
    if hasattr(value, "read"):
        return _file_object_source(value, input_name, description)
    raise InvalidImageError(
        f"{input_name}: unsupported input type {type(value).__name__} [rule type]. Pass a path "
        "(str or os.PathLike), bytes, a binary file object or a PIL.Image.Image.",
        input_name=input_name, source=description, rule="type",
    )


#: One lock per seekable file object read with seek and read (see _FileObjectSource).
_LOCKS: weakref.WeakKeyDictionary[object, threading.RLock] = weakref.WeakKeyDictionary()
#: For the rare object that cannot be weakly referenced or hashed: one lock for all of them.
_SHARED_LOCK = threading.RLock()
#: Guards _LOCKS and _CONSUMED (sources are made in worker threads).
_REGISTRY_LOCK = threading.Lock()
#: Streams that cannot seek, already read whole by a call: a second read gets nothing.
_CONSUMED: weakref.WeakSet[object] = weakref.WeakSet()
#: Plain files, whose bytes are their descriptor's bytes: safe to read by position.
#: (A subclass, or a GzipFile whose fileno() is the compressed file's, is not.)
_PLAIN_FILE_TYPES = (io.FileIO, io.BufferedReader, io.BufferedRandom)


def _lock_for(handle: object) -> threading.RLock:
    with _REGISTRY_LOCK:
        try:
            lock = _LOCKS.get(handle)
            if lock is None:
                lock = _LOCKS[handle] = threading.RLock()
        except TypeError:  # not weakly referenceable, or not hashable
            return _SHARED_LOCK
        return lock


def _plain_file_descriptor(handle: object) -> int | None:
    """The descriptor of a plain file object on a regular file, else None."""
    if not hasattr(os, "preadv") or type(handle) not in _PLAIN_FILE_TYPES:
        return None
    if type(handle) is not io.FileIO and type(getattr(handle, "raw", None)) is not io.FileIO:
        return None
    fd: int = handle.fileno()  # type: ignore[attr-defined]  # one of _PLAIN_FILE_TYPES
    return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None


def _file_object_source(value: object, input_name: str, description: str) -> ImageSource:
    """The source for a binary file object: measured where it stands, never left moved."""

    def fail(rule: str, what: str, fix: str) -> InvalidImageError:
        return InvalidImageError(
            f"{input_name} ({description}): {what} [rule {rule}]. {fix}",
            input_name=input_name, source=description, rule=rule,
        )

    handle: IO[bytes] = value  # type: ignore[assignment]  # duck-typed file object
    if getattr(handle, "closed", False) is True:
        raise fail("unreadable", "the file object is closed",
                   "Pass it while it is open (inside its 'with' block), or pass the path instead.")
    try:
        readable = getattr(handle, "readable", None)
        if readable is not None and not readable():
            raise fail("unreadable", "the file object is not open for reading",
                       "Open the file for reading ('rb').")
        if getattr(handle, "seekable", lambda: False)():
            fd = _plain_file_descriptor(handle)
            if fd is not None:
                if handle.writable():
                    handle.flush()  # bytes still in its buffer are not in the file yet
                start = handle.tell()
                size = max(0, os.fstat(fd).st_size - start)
                return _DescriptorSource(input_name, description, handle, start, size)
            lock = _lock_for(handle)
            with lock:
                start = handle.tell()
                end = handle.seek(0, io.SEEK_END)
                handle.seek(start)
            return _FileObjectSource(input_name, description, handle, start, max(0, end - start),
                                     lock)
        # A pipe cannot be measured or replayed: take it in once.
        with _lock_for(handle):
            data = handle.read()
            first = _remember_consumed(handle)
    except InvalidImageError:
        raise
    except (OSError, ValueError) as exc:
        raise fail("unreadable", f"the file object cannot be read ({type(exc).__name__}: {exc})",
                   "Pass the path or the bytes instead.") from exc
    if not isinstance(data, (bytes, bytearray)):
        raise fail("type", f"file object returned {type(data).__name__}, not bytes",
                   "Open the file in binary mode ('rb').")
    if not data and not first:
        raise fail("consumed",
                   "this stream cannot seek and was already read by another input or call "
                   "(a stream is read once)",
                   "Pass the path or the bytes instead, or a new stream per input.")
    return _BufferSource(input_name, description, memoryview(bytes(data)))


def _remember_consumed(handle: object) -> bool:
    """Mark a stream as read whole; False if it was already (caller holds its lock)."""
    with _REGISTRY_LOCK:
        try:
            if handle in _CONSUMED:
                return False
            _CONSUMED.add(handle)
        except TypeError:  # cannot be tracked: say nothing more than "empty"
            pass
        return True


def buffer_source(data: bytes, input_name: str, description: str) -> ImageSource:
    """An in-memory source (used for images resized by ``auto_resize``)."""
    return _BufferSource(input_name, description, memoryview(data))
