"""What every input source shares: the :class:`ImageSource` interface, in-memory
bytes, and the reading pieces the file-backed kinds are built from."""

from __future__ import annotations

import errno
import io
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import anyio.to_thread

from novita_async._errors import SourceChangedError

__all__ = ["BufferSource", "ImageSource", "PositionalReader", "positional_chunks", "pread_full",
           "read_exactly"]


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
class BufferSource(ImageSource):
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


def pread_full(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset`` unless the file ends first; return the bytes read (blocking)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            break
        done += got
    return done


async def positional_chunks(
    source: ImageSource, chunk_size: int, read_at: Callable[[memoryview, int], Awaitable[int]]
) -> AsyncIterator[memoryview]:
    """``source``'s bytes read by position into one reused buffer, refusing a file that changed size.

    ``read_at(view, offset)`` fills ``view`` from ``offset`` bytes into the
    image unless it ends first, and returns the count.  Each chunk is a view
    of the same buffer, valid until the next one is asked for (the encoder
    consumes it at once), so an input costs one buffer, not one per chunk.
    """
    # At least one byte: the check for a file that grew reads into it.
    buffer = memoryview(bytearray(max(1, min(chunk_size, source.size))))
    offset = 0
    while offset < source.size:
        want = min(chunk_size, source.size - offset)
        piece = buffer[:want]
        got = await read_at(piece, offset)
        if got < want:
            raise source._changed(offset + got)
        offset += want
        yield piece
    # One more byte means the file grew while we read it.
    if await read_at(buffer[:1], offset):
        raise source._changed(source.size + 1)


async def read_exactly(
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


class PositionalReader(io.RawIOBase):
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
