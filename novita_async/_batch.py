"""The batch engine: a lazy job stream in, one JobResult per job out.

Structure: one runner task owns an anyio task group with the producer (pulls
jobs only when a slot is free, so a 10-million-row manifest costs memory for
a few jobs, not for the manifest) and one task per running job.  Every job
ends as exactly one :class:`JobResult`: written to the ledger first, then
counted, then handed to the consumer.  The runner is cancelled when the
consumer stops iterating (``break``, ``aclose()``, garbage collection), so an
abandoned batch leaks no task, connection or temporary file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio

from novita_async._errors import JobNotAttemptedError, NovitaError
from novita_async._jobs import JobResult, JobStatus, MergeJob, is_fatal, job_identity, output_extension
from novita_async._ledger import Ledger
from novita_async._manifest import BadRow
from novita_async._summary import BatchSummary, Progress

if TYPE_CHECKING:
    from novita_async._client import NovitaClient

__all__ = ["BatchRun"]

logger = logging.getLogger("novita_async")


class _Interrupted(Exception):
    """Raised at a job's send gate after a graceful stop: the job is left for a re-run."""


async def _aiterate(jobs: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(jobs, AsyncIterable):
        async for job in jobs:
            yield job
    else:
        # next() runs on the loop: manifest rows are cheap to read, and a
        # thread hop per row would cost more than the read.
        for job in jobs:
            yield job


def _safe_name(job_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@+=" else "_" for c in job_id)[:200] or "job"


class BatchRun:
    """A running batch: iterate it for :class:`JobResult` objects.

    Use ``async for`` directly, or ``async with client.batch(...) as run`` to
    close it deterministically.  ``run.summary`` is live throughout.

    Example:
        >>> async with client.batch(jobs, output_dir="out", ledger="out/ledger.jsonl") as run:  # doctest: +SKIP
        ...     async for result in run:
        ...         print(result.job.id, result.status)
        ...     print(run.summary.line())
    """

    def __init__(
        self,
        client: NovitaClient,
        jobs: Iterable[MergeJob] | AsyncIterable[MergeJob],
        *,
        output_dir: str | os.PathLike[str] | None = None,
        ledger: str | os.PathLike[str] | None = None,
        ordered: bool = False,
        progress: Any = None,
        summary: BatchSummary | None = None,
        response_image_type: str = "png",
        total: int | None = None,
        prefetch: int | None = None,
    ) -> None:
        self._client = client
        self._jobs = jobs
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self._ledger_path = Path(ledger) if ledger is not None else None
        self.ordered = ordered
        self.summary = summary or BatchSummary()
        self.response_image_type = response_image_type
        if total is None and hasattr(jobs, "__len__"):
            total = len(jobs)
        self._progress_spec, self._total = progress, total
        concurrency = client.max_concurrency
        # Jobs alive at once: every request slot busy plus a few prepared ahead.
        self._slots = anyio.Semaphore(concurrency + (prefetch if prefetch is not None else max(2, concurrency // 4)))
        self._window = anyio.Semaphore(4 * concurrency + 16) if ordered else None
        self._send, self._receive = anyio.create_memory_object_stream[JobResult](0)
        self._reorder: dict[int, JobResult | None] = {}
        self._progress: Progress | None = None
        self._next_index = 0
        self._flush_lock = anyio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._fatal: BaseException | None = None
        self._stopping = False
        self._ledger: Ledger | None = None

    # -- consumer side ---------------------------------------------------
    def __aiter__(self) -> BatchRun:
        return self

    async def __anext__(self) -> JobResult:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="novita-batch")
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            await self._task
            raise StopAsyncIteration from None

    async def __aenter__(self) -> BatchRun:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def stop(self) -> None:
        """Stop gracefully: take no new jobs, let those in flight finish."""
        if not self._stopping:
            self._stopping = True
            self.summary.interrupted = True
            logger.info("batch stopping: no new jobs; waiting for those in flight")

    async def aclose(self) -> None:
        """Cancel whatever is still running and release everything. Idempotent."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._receive.close()

    def __del__(self) -> None:
        # `break` out of `async for` drops the last reference: cancel the runner
        # (it cleans up in its own task, as structured concurrency requires).
        task = getattr(self, "_task", None)
        if task is not None and not task.done():
            task.cancel()

    # -- runner ----------------------------------------------------------
    async def _run(self) -> None:
        self._progress = progress = Progress(self._progress_spec, total=self._total)
        self._ledger = Ledger(self._ledger_path) if self._ledger_path is not None else None
        try:
            async with self._send:
                async with anyio.create_task_group() as group:
                    await self._produce(group)
        finally:
            self.summary.finished = time.monotonic()
            if self._ledger is not None:
                self._ledger.close()
            progress.close()

    async def _produce(self, group: anyio.abc.TaskGroup) -> None:
        index = 0
        iterator = _aiterate(self._jobs)
        try:
            async for item in iterator:
                if self._window is not None:
                    await self._window.acquire()
                if self._fatal is not None or self._stopping:
                    if self._window is not None:
                        self._window.release()
                    if self._fatal is not None:
                        await self._emit(index, self._not_attempted(item, index))
                        index += 1
                        continue  # drain: every job of the stream gets its record
                    break
                immediate = self._resolve(item, index)
                if isinstance(immediate, JobResult):
                    await self._emit(index, immediate)
                else:
                    job, output = immediate
                    await self._slots.acquire()
                    group.start_soon(self._run_job, index, job, output)
                index += 1
        finally:
            with contextlib.suppress(Exception):
                await iterator.aclose()  # type: ignore[attr-defined]  # async generator

    def _resolve(self, item: Any, index: int) -> JobResult | tuple[MergeJob, Path | None]:
        """Give the job its id and output; a bad row or a done job resolves at once."""
        if isinstance(item, BadRow):
            job = MergeJob(face_image="", image="", id=item.id)
            return JobResult(job=job, status=JobStatus.FAILED, error=item.error)
        if not isinstance(item, MergeJob):
            error = TypeError(f"batch jobs must be MergeJob objects, got {type(item).__name__}")
            return JobResult(job=MergeJob("", "", id=f"job-{index}"), status=JobStatus.FAILED, error=error)
        job = item.with_id(job_identity(item, index))
        assert job.id is not None
        output = self._output_for(job)
        ledger = self._ledger
        if ledger is not None and ledger.is_done(job.id) and (output is None or output.exists()):
            return JobResult(job=job, status=JobStatus.SKIPPED, output=output)
        return job, output

    def _output_for(self, job: MergeJob) -> Path | None:
        if job.output is not None:
            path = Path(job.output)
            return self.output_dir / path if self.output_dir is not None and not path.is_absolute() else path
        if self.output_dir is None:
            return None
        assert job.id is not None
        ext = output_extension(job.response_image_type or self.response_image_type)
        return self.output_dir / f"{_safe_name(job.id)}.{ext}"

    def _not_attempted(self, item: Any, index: int) -> JobResult:
        job = item.with_id(job_identity(item, index)) if isinstance(item, MergeJob) else MergeJob(
            "", "", id=getattr(item, "id", f"job-{index}"))
        error = JobNotAttemptedError(f"not attempted: the batch stopped early ({self.summary.stop_reason})",
                                     cause=self._fatal)
        return JobResult(job=job, status=JobStatus.NOT_ATTEMPTED, error=error)

    def _gate(self) -> BaseException | None:
        """Checked just before each attempt is sent."""
        if self._fatal is not None:
            return JobNotAttemptedError(f"not sent: the batch stopped early ({self.summary.stop_reason})",
                                        cause=self._fatal)
        if self._stopping:
            return _Interrupted()
        return None

    async def _run_job(self, index: int, job: MergeJob, output: Path | None) -> None:
        started = time.monotonic()
        try:
            try:
                result = await self._client._merge(
                    job.face_image, job.image,
                    response_image_type=job.response_image_type or self.response_image_type,
                    output=output, gate=self._gate,
                )
            except _Interrupted:
                # Left for the next run: no ledger line, nothing half-written.
                await self._emit(index, None)
                return
            except (NovitaError, OSError, ValueError) as exc:
                attempts = getattr(exc, "attempts", 0)
                status = JobStatus.NOT_ATTEMPTED if (
                    isinstance(exc, JobNotAttemptedError) and attempts <= 1) else JobStatus.FAILED
                record = JobResult(job=job, status=status, error=exc, output=output,
                                   attempts=attempts if status == JobStatus.FAILED else 0,
                                   elapsed=time.monotonic() - started)
                if is_fatal(exc) and self._fatal is None:
                    self._fatal = exc
                    self.summary.stop_reason = f"{type(exc).__name__}: {exc}"
                    logger.error("batch stopping early: %s", exc)
            else:
                record = JobResult(job=job, status=JobStatus.OK, result=result, output=output,
                                   attempts=result.attempts, elapsed=result.elapsed)
            await self._emit(index, record)
        finally:
            self._slots.release()

    async def _emit(self, index: int, result: JobResult | None) -> None:
        """Record a result durably, count it, then hand it to the consumer.

        ``None`` marks a job left undone by a graceful stop: nothing to record,
        but the ordered window must move past its index.
        """
        if result is not None:
            if self._ledger is not None and result.status != JobStatus.SKIPPED:
                self._ledger.append(result)
            self.summary.add(result)
            if self._progress is not None:
                self._progress.update(result, self.summary)
        if self._window is None:
            if result is not None:
                await self._send.send(result)
            return
        self._reorder[index] = result
        async with self._flush_lock:
            while self._next_index in self._reorder:
                ready = self._reorder.pop(self._next_index)
                self._next_index += 1
                if ready is not None:
                    await self._send.send(ready)
                self._window.release()
