"""Shards: split one job stream among N workers, each doing its own part.

N workers given the same manifest and shard indexes 0..N-1 together do every
job exactly once, with no coordination: a job belongs to the shard that the
hash of its output's name picks (its id, when the output is the default
``<id>.<ext>``), so two rows naming one output meet in one shard, which
refuses the second, rather than two workers writing the file in turn.  Ids
are the batch's own (:func:`job_identity`), so a shard's ledger resumes like
any other.  The hash is SHA-256, not ``hash()``, which is salted per process
and would give each worker a different split.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import TypeVar, overload

from novita_async._jobs import MergeJob, job_identity
from novita_async._manifest import BadRow
from novita_async._places import output_key

__all__ = [
    "assign_id",
    "default_ledger",
    "parse_shard",
    "shard_jobs",
    "shard_ledger_name",
    "shard_of",
    "shard_rpm",
]

T = TypeVar("T")


def shard_of(job_id: str, count: int) -> int:
    """The shard (0..count-1) a job id (or any key) belongs to; the same on every machine and run.

    ``shard_jobs`` keys a job by its output's name (see the module): for a job
    whose output is the default ``<id>.<ext>``, that is its id.

    Example:
        >>> shard_of("face1__photo1", 1)
        0
    """
    if count < 1:
        raise ValueError(f"shard count must be >= 1, got {count}")
    digest = hashlib.sha256(job_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % count


def _check(index: int, count: int) -> None:
    if count < 1:
        raise ValueError(f"shard count must be >= 1, got {count}")
    if not 0 <= index < count:
        raise ValueError(f"shard index must be in 0..{count - 1} for {count} shards, got {index}")


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"K/N"`` (shard K of N, K counted from 0) into ``(K, N)``.

    Raises:
        ValueError: not of the form K/N, or K outside 0..N-1.

    Example:
        >>> parse_shard("1/3")
        (1, 3)
    """
    index_text, sep, count_text = text.strip().partition("/")
    try:
        if not sep:
            raise ValueError
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ValueError(
            f"shard {text!r} is not K/N (e.g. 0/4 for the first of four workers)"
        ) from None
    _check(index, count)
    return index, count


def shard_rpm(requests_per_minute: float | None, count: int) -> float | None:
    """One worker's share of the account's pace: ``rpm / count`` (None stays None)."""
    return None if requests_per_minute is None else requests_per_minute / count


def shard_ledger_name(index: int, count: int) -> str:
    """The default ledger file name of a shard: ``ledger.shard-K-of-N.jsonl``."""
    return f"ledger.shard-{index}-of-{count}.jsonl"


def assign_id(item: T, position: int) -> tuple[str, T]:
    """An item's id as the batch will see it, and the item to pass on.

    A MergeJob gets its id fixed now; ``position`` is its 0-based place in the
    whole stream (what ``job-<index>`` ids count).
    """
    if isinstance(item, MergeJob):
        # Fix the id before filtering: a job without paths falls back to its
        # position, which must be its place in the FULL stream, not in the shard.
        job_id = job_identity(item, position)
        return job_id, item.with_id(job_id)  # type: ignore[return-value]  # T is MergeJob here
    if isinstance(item, BadRow):
        return item.id, item  # reported by exactly one shard
    # Anything else the batch reports as an error; one shard does it.
    return f"job-{position}", item


def _shard_key(item: T, position: int) -> tuple[str, T]:
    """What picks an item's shard (a job's :func:`output_key`, else its id), and the item to pass on."""
    job_id, item = assign_id(item, position)
    if isinstance(item, MergeJob):
        return output_key(item), item
    return job_id, item


@overload
def shard_jobs(jobs: AsyncIterable[T], index: int, count: int) -> AsyncIterator[T]: ...
@overload
def shard_jobs(jobs: Iterable[T], index: int, count: int) -> Iterator[T]: ...
def shard_jobs(
    jobs: Iterable[T] | AsyncIterable[T], index: int, count: int
) -> Iterator[T] | AsyncIterator[T]:
    """Keep the jobs of shard ``index`` of ``count``, lazily; pass the result to ``client.batch``.

    Every job gets its deterministic id first (:func:`~novita_async.job_identity`
    semantics, with positions counted over the whole stream), so workers that
    run the same stream with ``index = 0..count-1`` do each job exactly once.
    Give each worker its own ledger, and ``requests_per_minute`` of the
    account's total divided by ``count``.

    Args:
        jobs: An iterable or async iterable of :class:`~novita_async.MergeJob`
            (manifest rows that failed to parse are passed through to one shard).
        index: This worker's shard, 0..count-1.
        count: Number of workers.

    Example:
        >>> jobs = na.read_manifest("manifest.csv")  # doctest: +SKIP
        >>> async with na.NovitaClient(requests_per_minute=60 / 4) as client:  # doctest: +SKIP
        ...     async for r in client.batch(na.shard_jobs(jobs, 2, 4), output_dir="out",
        ...                                 ledger="out/ledger.shard-2-of-4.jsonl"):
        ...         ...
    """
    _check(index, count)
    if isinstance(jobs, AsyncIterable):
        return _shard_async(jobs, index, count)
    return _shard_sync(jobs, index, count)


def _shard_sync(jobs: Iterable[T], index: int, count: int) -> Iterator[T]:
    for position, item in enumerate(jobs):
        key, job = _shard_key(item, position)
        if shard_of(key, count) == index:
            yield job


async def _shard_async(jobs: AsyncIterable[T], index: int, count: int) -> AsyncIterator[T]:
    position = 0
    try:
        async for item in jobs:
            key, job = _shard_key(item, position)
            position += 1
            if shard_of(key, count) == index:
                yield job
    finally:
        # Closing this filter (the batch was abandoned) closes the source now,
        # not whenever the garbage collector gets to it.
        aclose = getattr(jobs, "aclose", None)
        if aclose is not None:
            await aclose()


def default_ledger(output_dir: Path, shard: tuple[int, int] | None) -> Path:
    """The ledger a batch uses when none is given: one per shard under ``output_dir``."""
    if shard is None:
        return output_dir / "ledger.jsonl"
    return output_dir / shard_ledger_name(*shard)
