"""A caller's binary file objects as input sources.

A file object is read from its position at the call to its end, again by
every attempt, and its position is left where it was.  A seekable one may be
shared by concurrent calls: a plain file opened with ``open(path, "rb")`` is
read by position (``pread``) on a duplicate of its descriptor, so no call
moves the position another relies on; any other seekable object (``BytesIO``,
a wrapper) is read under a lock of its own, each read seeking to its place and
back.  A stream that cannot seek (a pipe, a socket) is read whole, once; a
second call given the same stream is refused rather than sent an empty image.
An async file object (``anyio.open_file``, ``aiofiles``) is refused up front:
its methods answer coroutines, which only the caller's event loop can run.
"""

from __future__ import annotations

import inspect
import io
import os
import stat
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import IO, BinaryIO

import anyio.to_thread

from novita_async._errors import InvalidImageError
from novita_async._source_base import (
    BufferSource,
    ImageSource,
    PositionalReader,
    positional_chunks,
    pread_full,
    read_exactly,
)

__all__ = ["at_its_end", "file_object_source"]


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
        fd, start = self._descriptor(), self.start

        def read_at(view: memoryview, offset: int) -> Awaitable[int]:
            return anyio.to_thread.run_sync(pread_full, fd, view, start + offset)

        async for piece in positional_chunks(self, chunk_size, read_at):
            yield piece

    def open_sync(self) -> BinaryIO:
        fd, start = self._descriptor(), self.start

        def read_into(view: memoryview, offset: int) -> int:
            return os.preadv(fd, [view], start + offset)

        # Buffered: Pillow's header parsing makes many small reads.
        return io.BufferedReader(PositionalReader(read_into, self.size))

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
                return self.handle.read(count) or b""  # a raw stream may answer None
            finally:
                self.handle.seek(self.start)

    async def chunks(self, chunk_size: int) -> AsyncIterator[bytes | memoryview]:
        offset = 0

        def read(count: int) -> bytes:
            nonlocal offset
            data = self._read_at(offset, count)
            offset += len(data)
            return data

        async for chunk in read_exactly(self, read, chunk_size):
            yield chunk

    def open_sync(self) -> BinaryIO:
        def read_into(view: memoryview, offset: int) -> int:
            data = self._read_at(offset, len(view))[: len(view)]
            view[: len(data)] = data
            return len(data)

        # Buffered: Pillow's header parsing makes many small reads.
        return io.BufferedReader(PositionalReader(read_into, self.size))


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


def _is_async_file(value: object) -> bool:
    """Whether a file object's methods are coroutine functions (an async file)."""
    return any(inspect.iscoroutinefunction(getattr(value, name, None)) for name in ("read", "seek", "tell"))


def file_object_source(value: object, input_name: str, description: str) -> ImageSource:
    """The source for a binary file object: measured where it stands, never left moved."""

    def fail(rule: str, what: str, fix: str) -> InvalidImageError:
        return InvalidImageError(
            f"{input_name} ({description}): {what} [rule {rule}]. {fix}",
            input_name=input_name, source=description, rule=rule,
        )

    def refuse_async(result: object = None) -> InvalidImageError:
        if inspect.iscoroutine(result):
            result.close()  # never awaited, on purpose: no "never awaited" warning
        return fail("type", f"it is an async file object ({type(value).__name__}); the client reads "
                            "only sync ones",
                    "Pass the path, a sync binary file (open(path, 'rb')) or its bytes (await f.read()).")

    if _is_async_file(value):
        raise refuse_async()
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
                if inspect.isawaitable(start):  # an async file that _is_async_file missed
                    raise refuse_async(start)
                end = handle.seek(0, io.SEEK_END)
                handle.seek(start)
            return _FileObjectSource(input_name, description, handle, start, max(0, end - start),
                                     lock)
        # A pipe cannot be measured or replayed: take it in once.
        with _lock_for(handle):
            data = handle.read()
            if inspect.isawaitable(data):  # an async file that _is_async_file missed
                raise refuse_async(data)
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
    return BufferSource(input_name, description, memoryview(bytes(data)))


def at_its_end(source: ImageSource, problem: InvalidImageError) -> InvalidImageError:
    """``problem``, or for an "empty" stream read from past its start, the error that says why.

    An image written into a stream and passed without a seek is read from
    where it is: there is nothing left, and "the file is empty" would send
    the caller looking at the wrong thing.
    """
    start = getattr(source, "start", 0) if isinstance(source, (_DescriptorSource, _FileObjectSource)) else 0
    if problem.rule != "empty" or start <= 0:
        return problem
    error = InvalidImageError(
        f"{source.input_name} ({source.description}): the stream is at its end (position {start}): "
        "it is read from where it is, and nothing is left [rule empty]. Call seek(0) on it before "
        "passing it, or pass its bytes.",
        input_name=source.input_name, source=source.description, rule="empty",
    )
    error.__cause__ = problem
    return error


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
