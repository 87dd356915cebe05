"""A batch's job stream: jobs pulled one at a time from an iterable or an async iterable."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

import anyio

__all__ = ["END", "End", "JobStream"]

#: Longest wait for a job stream to close itself after the batch ends, seconds.
_CLOSE_TIMEOUT = 5.0


class End:
    """The job stream is exhausted."""


END = End()


class JobStream:
    """Pulls jobs one at a time from an iterable or an async iterable."""

    def __init__(self, jobs: Iterable[Any] | AsyncIterable[Any]) -> None:
        self._async: AsyncIterator[Any] | None = None
        self._sync: Iterator[Any] | None = None
        if isinstance(jobs, AsyncIterable):
            self._async = aiter(jobs)
        else:
            self._sync = iter(jobs)

    async def next(self) -> Any:
        """The next job, or ``END``."""
        if self._async is not None:
            try:
                return await anext(self._async)
            except StopAsyncIteration:
                return END
        assert self._sync is not None
        # next() runs on the loop: manifest rows are cheap to read, and a
        # thread hop per row would cost more than the read.
        return next(self._sync, END)

    async def close(self) -> None:
        """Close a generator source now (its files, cursors...), not at garbage collection."""
        if self._async is not None:
            aclose = getattr(self._async, "aclose", None)
            if aclose is not None:
                # Shielded: this runs when the batch is being cancelled too.
                with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                    await aclose()
        elif self._sync is not None:
            close = getattr(self._sync, "close", None)
            if close is not None:
                close()
