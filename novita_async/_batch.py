"""The batch engine: a lazy job stream in, one JobResult per job out.

Structure: :class:`BatchRun` is what the caller holds and iterates; an
:class:`_Engine` does the work in one runner task that owns an anyio task
group with the producer (it takes a job from the stream only when a slot is
free, so a 10-million-row manifest costs memory for a few jobs, not for the
manifest) and one task per running job.  Every job ends as exactly one
:class:`JobResult`: written to the ledger first, then counted, then handed to
the consumer.

The runner never refers back to the :class:`BatchRun`, so when the consumer
drops it (``break`` out of ``async for client.batch(...)``) the run is freed at
once and cancels its runner: an abandoned batch leaks no task, connection or
temporary file.  ``async with`` (or :meth:`BatchRun.aclose`) does the same and
also waits until everything has stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterable, Callable, Iterable, Sized
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread

from novita_async._arguments import check_job_stream
from novita_async._client import send_gate
from novita_async._errors import (
    DuplicateJobError,
    JobNotAttemptedError,
    NoFaceFoundBeforeError,
    OutputError,
)
from novita_async._gate import SendGate
from novita_async._handoff import Handoff
from novita_async._jobs import (
    JobResult,
    JobStatus,
    MergeJob,
    is_fatal,
    job_identity,
)
from novita_async._jobstream import END, JobStream
from novita_async._ledger import Ledger
from novita_async._manifest import BadRow
from novita_async._output import sweep_stale_temp_files
from novita_async._places import JobPlaces
from novita_async._resume import fingerprint_before_upload, settled_before
from novita_async._summary import BatchSummary, Progress

if TYPE_CHECKING:
    from novita_async._client import NovitaClient

__all__ = ["BatchRun"]

logger = logging.getLogger("novita_async")


class _Interrupted(Exception):
    """Raised at a job's send gate after a graceful stop: the job is left for a re-run."""


class _Engine:
    """The working half of a batch; the runner task refers only to this."""

    def __init__(
        self,
        client: NovitaClient,
        jobs: Iterable[Any] | AsyncIterable[Any],
        *,
        output_dir: Path | None,
        ledger: Path | None,
        ordered: bool,
        progress: Any,
        summary: BatchSummary,
        response_image_type: str,
        total: int | None,
        prefetch: int | None,
        resend_no_face: bool = False,
    ) -> None:
        self._client = client
        self._resend_no_face = resend_no_face
        # Input fingerprints of the jobs in flight, for their ledger lines.
        self._sent_inputs: dict[str, list[list[int]] | None] = {}
        self._jobs = jobs
        self.output_dir = output_dir
        self._ledger_path = ledger
        self.summary = summary
        self.response_image_type = response_image_type
        self._progress_spec, self._total = progress, total
        concurrency = client.max_concurrency
        # Jobs alive at once: every request slot busy plus a few prepared ahead.
        extra = prefetch if prefetch is not None else max(2, concurrency // 4)
        self._slots = anyio.Semaphore(concurrency + extra)
        # Ordered: results may wait for a slow predecessor, but only this many.
        self._window = anyio.Semaphore(4 * concurrency + 16) if ordered else None
        self._reorder: dict[int, JobResult | None] = {}
        self._next_index = 0
        self._flush_lock = anyio.Lock()
        self._fatal: BaseException | None = None
        self._stopping = False
        # Checked before each attempt goes out; closing it ends the waits of
        # jobs queued for their pacing turn or a retry (a stop is then prompt).
        self._send_gate = SendGate(self._gate)
        self._ledger: Ledger | None = None
        self._warned_position_ids = False
        self._ledger_failed = False  # a line could not be written: no more are tried
        self._group: anyio.abc.TaskGroup | None = None
        self._progress: Progress | None = None
        self.source_error: BaseException | None = None
        self._places = JobPlaces(output_dir, ledger, response_image_type)

    def stop(self) -> None:
        if not self._stopping:
            self._stopping = True
            self.summary.interrupted = True
            logger.info("batch stopping: no new jobs; waiting for those in flight")
            self._send_gate.close()

    # -- runner ----------------------------------------------------------
    async def run(self, send: Handoff[JobResult]) -> None:
        self.summary.started = time.monotonic()
        try:
            try:
                # A session every request would refuse fails the run, not each job in turn.
                self._client._refuse_unusable_session()
                if self._ledger_path is not None:
                    # Loading a resumed run's ledger reads every line: not on the loop.
                    self._ledger = await anyio.to_thread.run_sync(Ledger, self._ledger_path)
                # After the ledger: a run refused for a ledger in use shows no empty bar.
                self._progress = Progress(self._progress_spec, total=self._total)
                if self.output_dir is not None:
                    # A killed run leaves hidden temporary files (never partial
                    # results under final names); clear those of dead writers.
                    removed = await anyio.to_thread.run_sync(sweep_stale_temp_files, self.output_dir)
                    if removed:
                        logger.info("removed %d temporary file(s) left by an interrupted run", removed)
                async with anyio.create_task_group() as group:
                    self._group = group
                    await self._produce(group, send)
            finally:
                send.end()
            # The last result's ledger line may wait for the consumer (see _emit).
            await send.settled()
        finally:
            self.summary.finished = time.monotonic()
            if self._ledger is not None:
                self._ledger.close()
            if self._progress is not None:
                self._progress.close()
        if self.source_error is not None:
            raise self.source_error

    def _release(self) -> None:
        self._slots.release()
        if self._window is not None:
            self._window.release()

    async def _produce(self, group: anyio.abc.TaskGroup, send: Handoff[JobResult]) -> None:
        source = JobStream(self._jobs)
        index = 0
        try:
            while True:
                # Take a slot before the job: the stream is read only as fast
                # as jobs can run, whatever its length.
                if self._window is not None:
                    await self._window.acquire()
                await self._slots.acquire()
                if self._stopping:
                    self._release()
                    return
                try:
                    item = await source.next()
                except Exception as exc:
                    # An unreadable stream (a manifest's disk went away): stop
                    # like Ctrl-C, let jobs in flight finish, then raise it.
                    self._release()
                    self.source_error = exc
                    logger.error("batch stopping: cannot read the next job: %s", exc)
                    return
                if item is END:
                    self._release()
                    return
                if self._fatal is not None:
                    # Drain: every job of the stream gets its record, none is sent.
                    await self._emit(send, index, self._not_attempted(item, index))
                    self._slots.release()
                else:
                    immediate = self._resolve(item, index)
                    if isinstance(immediate, JobResult):
                        await self._emit(send, index, immediate)
                        self._slots.release()
                    else:
                        job, output = immediate
                        group.start_soon(self._run_job, send, index, job, output)
                index += 1
        finally:
            await source.close()

    def _resolve(self, item: Any, index: int) -> JobResult | tuple[MergeJob, Path | None]:
        """Give the job its id and output; a bad row or a settled job resolves at once."""
        if isinstance(item, BadRow):
            job = MergeJob(face_image="", image="", id=item.id)
            # Done in an earlier run, its row unreadable now (an input moved
            # away): its record stands rather than a failure written over it.
            return self._settled(job, None) or JobResult(job=job, status=JobStatus.FAILED, error=item.error)
        if not isinstance(item, MergeJob):
            error = TypeError(f"batch jobs must be MergeJob objects, got {type(item).__name__}")
            return JobResult(job=MergeJob("", "", id=f"job-{index}"), status=JobStatus.FAILED, error=error)
        job, output, refused = self._places.place(item, index)
        if self._ledger is not None and item.id is None and job.id == f"job-{index}":
            self._warn_position_ids()
        if refused is not None:
            # No output in its record: it is not this job's to report.
            return JobResult(job=job, status=JobStatus.FAILED, error=refused)
        return self._settled(job, output) or (job, output)

    def _warn_position_ids(self) -> None:
        """Say once that jobs with in-memory inputs and no id are resumed by their place in the stream."""
        if self._warned_position_ids:
            return
        self._warned_position_ids = True
        logger.warning(
            "jobs without an id whose inputs are not file paths (bytes, file objects, PIL images) "
            "are known to the ledger by their place in the job stream (job-<index>): a re-run takes "
            "the job at the same place as done, whatever its images are now. Give each job an id "
            "of your own (MergeJob(..., id=...)) if the stream can change between runs")

    def _settled(self, job: MergeJob, output: Path | None) -> JobResult | None:
        return settled_before(self._ledger, job, output, resend_no_face=self._resend_no_face,
                              summary=self.summary)

    def _not_attempted(self, item: Any, index: int) -> JobResult:
        """The record of a job the stopped batch will not send; a job an earlier run
        settled keeps that outcome (a "not attempted" line would write over it)."""
        if isinstance(item, MergeJob):
            job = item.with_id(job_identity(item, index))
            output = self._places.output_for(job)
        else:
            job, output = MergeJob("", "", id=getattr(item, "id", None) or f"job-{index}"), None
        error = JobNotAttemptedError(f"not attempted: the batch stopped early ({self.summary.stop_reason})",
                                     cause=self._fatal)
        return self._settled(job, output) or JobResult(job=job, status=JobStatus.NOT_ATTEMPTED, error=error)

    def _gate(self) -> BaseException | None:
        """Checked just before each attempt is sent."""
        if self._fatal is not None:
            return JobNotAttemptedError(f"not sent: the batch stopped early ({self.summary.stop_reason})",
                                        cause=self._fatal)
        if self._stopping:
            return _Interrupted()
        return None

    @property
    def fatal(self) -> BaseException | None:
        """The error that stopped the run early, if one did."""
        return self._fatal

    def _set_fatal(self, exc: BaseException) -> None:
        if self._fatal is None:
            self._fatal = exc
            self.summary.stop_reason = f"{type(exc).__name__}: {exc}"
            logger.error("batch stopping early: %s", exc)
            self._send_gate.close()

    async def _run_job(self, send: Handoff[JobResult], index: int, job: MergeJob,
                       output: Path | None) -> None:
        record = None
        try:
            if self._ledger is not None:
                self._sent_inputs[job.id or ""] = await fingerprint_before_upload(self._client._files, job)
            record = await self._attempt_job(job, output)
            await self._emit(send, index, record)
        finally:
            # A result held by the consumer has its line (and fingerprint) written later.
            if record is None or not self._held_by_consumer(record):
                self._sent_inputs.pop(job.id or "", None)
            self._slots.release()

    async def _attempt_job(self, job: MergeJob, output: Path | None) -> JobResult | None:
        """Run one job to its end state; None when a graceful stop left it for a re-run."""
        started = time.monotonic()
        try:
            token = send_gate.set(self._send_gate)
            try:
                result = await self._client.merge_face(
                    job.face_image, job.image,
                    response_image_type=job.response_image_type or self.response_image_type,
                    output=output,
                )
            finally:
                send_gate.reset(token)
        except _Interrupted:
            # Left for the next run: no ledger line, nothing half-written.
            return None
        except JobNotAttemptedError as exc:
            # Stopped at the gate, maybe after transient failures: the attempt
            # the gate refused was never sent.
            return JobResult(job=job, status=JobStatus.NOT_ATTEMPTED, error=exc, output=output,
                             attempts=max(0, exc.attempts - 1), elapsed=time.monotonic() - started)
        except Exception as exc:
            # Whatever one job raises ends that job only, never the batch.
            if is_fatal(exc):
                self._set_fatal(exc)
            return JobResult(job=job, status=JobStatus.FAILED, error=exc, output=output,
                             attempts=getattr(exc, "attempts", 0), elapsed=time.monotonic() - started)
        return JobResult(job=job, status=JobStatus.OK, result=result, output=output,
                         attempts=result.attempts, elapsed=result.elapsed)

    def _record(self, result: JobResult) -> None:
        # A duplicate's line would replace the earlier job's record of the same id;
        # a job not sent again for its earlier "no face" keeps that record.
        if (result.status != JobStatus.SKIPPED
                and not isinstance(result.error, (DuplicateJobError, NoFaceFoundBeforeError))
                and not self._held_by_consumer(result)):
            self._write_ledger(result)
        self.summary.add(result)
        if self._progress is not None:
            self._progress.update(result, self.summary)

    def _held_by_consumer(self, result: JobResult) -> bool:
        """Whether the result exists only in memory: its "ok" is recorded once the consumer is done with it.

        Recorded earlier, a result the consumer never got (it stopped with an
        error first) would be skipped by a re-run, its image lost for good.
        """
        return self._ledger is not None and result.status == JobStatus.OK and result.output is None

    def _write_ledger(self, result: JobResult) -> None:
        ledger = self._ledger
        if ledger is not None and not self._ledger_failed:
            try:
                ledger.append(result, self._sent_inputs.pop(result.job.id or "", None))
            except OSError as exc:
                # Without its ledger a batch cannot resume: stop taking jobs.  The
                # file stays open, and locked, until the run ends: another run must
                # not start on it while the jobs in flight here finish.
                self._ledger_failed = True
                self._set_fatal(OutputError(f"cannot write the ledger {ledger.path}: {exc.strerror or exc}"))

    async def _emit(self, send: Handoff[JobResult], index: int, result: JobResult | None) -> None:
        """Record a result durably, count it, then hand it to the consumer.

        ``None`` marks a job left undone by a graceful stop: nothing to record,
        but the ordered window must move past its index.
        """
        if result is not None:
            self._record(result)
        try:
            if self._window is None:
                if result is not None:
                    await send.send(result, on_done=self._on_done(result))
                return
            self._reorder[index] = result
            async with self._flush_lock:
                while self._next_index in self._reorder:
                    ready = self._reorder.pop(self._next_index)
                    self._next_index += 1
                    if ready is not None:
                        await send.send(ready, on_done=self._on_done(ready))
                    self._window.release()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            # The consumer is gone: nobody will read another result, stop all.
            if self._group is not None:
                self._group.cancel_scope.cancel()


    def _on_done(self, result: JobResult) -> Callable[[], None] | None:
        if not self._held_by_consumer(result):
            return None
        return lambda: self._write_ledger(result)


class BatchRun:
    """A running batch: iterate it for :class:`JobResult` objects.

    Use ``async for`` directly, or ``async with client.batch(...) as run`` to
    close it deterministically.  ``run.summary`` is live throughout.  Breaking
    out of ``async for r in client.batch(...)`` cancels the jobs still running;
    if you keep the run in a variable, close it (``async with`` or
    :meth:`aclose`) to do the same.

    Example:
        >>> async with client.batch(jobs, output_dir="out", ledger="out/ledger.jsonl") as run:  # doctest: +SKIP
        ...     async for result in run:
        ...         print(result.job.id, result.status)
        ...     print(run.summary.line())
    """

    def __init__(
        self,
        client: NovitaClient,
        jobs: Iterable[MergeJob | BadRow] | AsyncIterable[MergeJob | BadRow],
        *,
        output_dir: str | os.PathLike[str] | None = None,
        ledger: str | os.PathLike[str] | None = None,
        ordered: bool = False,
        progress: Any = None,
        summary: BatchSummary | None = None,
        response_image_type: str = "png",
        total: int | None = None,
        prefetch: int | None = None,
        resend_no_face: bool = False,
    ) -> None:
        # Checked now, where the caller made the batch, not by its runner task at the first job.
        check_job_stream(jobs)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.ordered = ordered
        self.response_image_type = response_image_type
        self.summary = summary if summary is not None else BatchSummary()
        if total is None and isinstance(jobs, Sized):
            total = len(jobs)
        self._engine = _Engine(
            client, jobs, output_dir=self.output_dir,
            ledger=Path(ledger) if ledger is not None else None, ordered=ordered,
            progress=progress, summary=self.summary, response_image_type=response_image_type,
            total=total, prefetch=prefetch, resend_no_face=resend_no_face,
        )
        self._task: asyncio.Task[None] | None = None
        self._handoff: Handoff[JobResult] | None = None
        self._closed = False

    # -- consumer side ---------------------------------------------------
    def __aiter__(self) -> BatchRun:
        return self

    async def __anext__(self) -> JobResult:
        if self._task is None:
            if self._closed:
                raise StopAsyncIteration
            # Unbuffered: a job's result waits for the consumer, and so does its slot.
            self._handoff = Handoff[JobResult]()
            self._task = asyncio.get_running_loop().create_task(
                self._engine.run(self._handoff), name="novita-batch")
        assert self._handoff is not None
        try:
            return await self._handoff.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            pass
        if self._closed:
            raise StopAsyncIteration
        await self._task  # the runner's own error (an unreadable job stream), if any
        raise StopAsyncIteration

    async def __aenter__(self) -> BatchRun:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close(done=exc_type is None)

    @property
    def stop_error(self) -> BaseException | None:
        """The error that stopped the batch early (a wrong key, an empty balance...), else None."""
        return self._engine.fatal

    def stop(self) -> None:
        """Stop gracefully: take no new jobs, let those in flight finish.

        Iterate on to receive the in-flight jobs' results; the iteration then
        ends.  Jobs not sent yet, including those waiting for their pacing turn
        or a retry, stop at once and are left without a ledger line, for a
        re-run.  Call it from the event loop's thread.
        """
        self._engine.stop()

    async def aclose(self) -> None:
        """Cancel whatever is still running and wait until it has stopped. Idempotent.

        The consumer counts as done with the last result it received: with a
        ledger and no ``output_dir``, that result's line is written now (it
        is not when ``async with`` ends with an error, so a re-run does it again).
        """
        await self._close(done=True)

    async def _close(self, *, done: bool) -> None:
        self._closed = True
        if self._handoff is not None:
            # Before the runner is cancelled: the last result's ledger line
            # (when the consumer is done with it) needs the ledger still open.
            self._handoff.close(done=done)
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            # wait() rather than `await task`: the runner's cancellation must
            # not be mistaken for (or swallow) a cancellation of the caller.
            await asyncio.wait([task])
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            logger.debug("batch runner ended with %r", task.exception())

    def __del__(self) -> None:
        # The consumer dropped the run (`break` out of `async for`): cancel the
        # runner, which cleans up in its own task as structured concurrency
        # requires (temporary files removed, ledger closed).
        task = getattr(self, "_task", None)
        if task is not None and not task.done():
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                if not task.get_loop().is_closed():
                    task.cancel()
        handoff = getattr(self, "_handoff", None)
        if handoff is not None:
            handoff.close(done=False)
