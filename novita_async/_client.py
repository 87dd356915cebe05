"""NovitaClient: the async merge-face client."""

from __future__ import annotations

import contextvars
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio

from novita_async._arguments import check_base_url, check_client_types, check_max_concurrency, check_output
from novita_async._config import (
    API_KEY_ENV,
    MERGE_FACE_PATH,
    RESPONSE_IMAGE_TYPES,
    RetryPolicy,
    Timeout,
    check_number,
    env_api_key,
    env_base_url,
)
from novita_async._encode import RequestBody, build_extra
from novita_async._errors import (
    APITimeoutError,
    ConfigurationError,
    NovitaError,
    RateLimitError,
)
from novita_async._fileio import FileCalls, FileIO, folder_of
from novita_async._gate import SendGate
from novita_async._lifecycle import ClientLifecycle
from novita_async._output import FileSink, MemorySink, Sink, check_writable
from novita_async._pacing import Pacer, PacerProtocol
from novita_async._prepare import prepare_inputs
from novita_async._result import MergeFaceResult
from novita_async._retry import RetryBudgetSpent, RetryDeadline, retry_call
from novita_async._sources import close_sources
from novita_async._transport import check_session, send_merge_request

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, Iterable
    from types import TracebackType

    from novita_async._batch import BatchRun
    from novita_async._jobs import MergeJob
    from novita_async._manifest import BadRow
    from novita_async._sources import ImageInput
    from novita_async._summary import BatchSummary

__all__ = ["NovitaClient"]

#: Set by a batch around each of its jobs (each job runs in its own task, so
#: its own context): the gate each attempt passes just before it is sent (see
#: ``_gate``).  This is how a batch that is stopping keeps queued jobs and
#: retries from going out.
send_gate: contextvars.ContextVar[SendGate | None] = contextvars.ContextVar(
    "novita_async_send_gate", default=None
)


class NovitaClient:
    """Async client for Novita's Merge Face API, built for many calls at once.

    One client owns one ``aiohttp.ClientSession``: create it once, share it
    across tasks, and close it with ``async with`` or :meth:`aclose`.

    Args:
        api_key: The API key (``sk_...``); defaults to ``$NOVITA_API_KEY``.
        base_url: Defaults to ``$NOVITA_BASE_URL``, else ``https://api.novita.ai``.
        timeout: Per-attempt limits: a :class:`Timeout`, or seconds for the total.
        retry: When to retry transient failures (:class:`RetryPolicy`); by
            default 5 attempts under a fixed pace, 10 under the adaptive one.
        max_concurrency: Requests in flight at most, across everything the
            client does.
        requests_per_minute: A fixed pace for request starts; None adapts to
            the server's 429s instead.
        auto_resize: Downsize oversized inputs (and convert CMYK/16-bit ones)
            before upload instead of refusing them.
        validate: Check inputs with Pillow before upload (format, size,
            resolution, truncation). Turn off only for inputs already checked.
        session: An ``aiohttp.ClientSession`` to use instead of creating one
            (the client then does not close it).  Its ``raise_for_status``,
            ``auto_decompress``, ``timeout`` and default ``Authorization`` /
            ``Content-Type`` headers do not apply to the client's requests;
            one with ``auth=`` is refused.
        pacer: A pace shared with other clients (any :class:`PacerProtocol`,
            e.g. one :class:`Pacer` for several clients, or the Ray actor-backed
            pacer of ``novita_async.ray``) instead of the client's own; give
            it or ``requests_per_minute``, not both.
        file_io: Where reading inputs and writing results happens: ``"auto"``
            on the event loop for folders on local file systems while each
            call stays under 5 ms (a worker thread otherwise, and for good
            once a folder is slow); ``"threads"`` always in worker threads.

    A client belongs to the event loop it is first used in (its connections
    do): with ``asyncio.run()``, create it inside the coroutine, not once for
    several runs.

    Raises:
        ConfigurationError: no API key, a malformed base URL, a session the
            client cannot use, or an argument of the wrong type or out of
            range (named in the message).

    Example:
        >>> async with NovitaClient() as client:  # doctest: +SKIP
        ...     result = await client.merge_face("face.jpg", "photo.jpg", output="out.png")
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        timeout: Timeout | float | None = None,
        retry: RetryPolicy | None = None,
        max_concurrency: int = 8,
        requests_per_minute: float | None = None,
        auto_resize: bool = False,
        validate: bool = True,
        session: aiohttp.ClientSession | None = None,
        pacer: PacerProtocol | None = None,
        file_io: FileIO = "auto",
    ) -> None:
        check_client_types(api_key=api_key, base_url=base_url, retry=retry, session=session, pacer=pacer,
                     auto_resize=auto_resize, validate=validate)
        key = api_key if api_key is not None else env_api_key()
        if not key or not key.strip():
            raise ConfigurationError(
                f"no API key: pass api_key=... or set the {API_KEY_ENV} environment variable "
                "(keys start with 'sk_')"
            )
        check_max_concurrency(max_concurrency)
        if session is not None:
            check_session(session)
        if requests_per_minute is not None:
            check_number("requests_per_minute", requests_per_minute, above=True)
        self._api_key = key.strip()
        self.base_url = check_base_url(base_url or env_base_url())
        self.timeout = Timeout.of(timeout)
        self.max_concurrency = max_concurrency
        self.auto_resize = auto_resize
        self.validate = validate
        if pacer is not None and requests_per_minute is not None:
            raise ConfigurationError(
                "give requests_per_minute or pacer, not both: a shared pacer sets its own pace"
            )
        self.pacer: PacerProtocol = pacer if pacer is not None else Pacer(requests_per_minute)
        self.retry = retry if retry is not None else RetryPolicy.default_for(fixed_pace=self.pacer.fixed)
        self._limiter = anyio.CapacityLimiter(max_concurrency)
        self._files = FileCalls(file_io)
        self._writable_folders: set[Path] = set()  # output folders already probed
        self._life = ClientLifecycle(session, max_concurrency)

    def __repr__(self) -> str:
        # Never the key, not even a prefix of it.
        return (
            f"NovitaClient(base_url={self.base_url!r}, max_concurrency={self.max_concurrency}, "
            f"requests_per_minute={self.requests_per_minute}, state={self._life.state!r})"
        )

    @property
    def requests_per_minute(self) -> float | None:
        """The fixed pace, or None when the pace adapts to 429s."""
        return self.pacer.rate * 60.0 if self.pacer.fixed and self.pacer.rate else None

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` has been called."""
        return self._life.closed

    async def __aenter__(self) -> NovitaClient:
        self._life.session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP session (if the client created it). Idempotent.

        Raises:
            ClientClosedError: called in another event loop than the client's
                while that loop still runs (close it from its own loop).
        """
        await self._life.close()

    async def _sleep(self, seconds: float, gate: SendGate | None) -> None:
        """A retry's back-off, ended early by aclose() or by the batch's gate closing."""
        with self._life.closing.waiting():
            await (gate.sleep(seconds) if gate is not None else anyio.sleep(seconds))

    def _refuse_unusable_session(self) -> None:
        """Raise now what every request on the caller's session would raise (a batch checks first).

        Raises:
            ConfigurationError: the session would send ``.netrc`` credentials for the API's host.
        """
        self._life.refuse_unusable_session(f"{self.base_url}{MERGE_FACE_PATH}")

    async def merge_face(
        self,
        face_image: ImageInput,
        image: ImageInput,
        *,
        response_image_type: str = "png",
        enterprise_plan: bool = False,
        output: str | os.PathLike[str] | None = None,
        auto_resize: bool | None = None,
    ) -> MergeFaceResult:
        """Put the face from ``face_image`` onto the face in ``image``.

        Args:
            face_image: The face to put in: a path (a ``str`` is always a path),
                bytes, a binary file object or a ``PIL.Image.Image``.  A file
                object is read from its current position to its end (again by
                each retry) and its position is left where it was; a seekable
                one may be shared by concurrent calls, a stream that cannot
                seek is read once.
            image: The picture that receives the face (same kinds).
            response_image_type: ``"png"``, ``"webp"`` or ``"jpeg"``.
            enterprise_plan: Use Novita's dedicated enterprise endpoints.
            output: Stream the result to this file (atomically); None keeps it
                in memory as ``result.data``.
            auto_resize: Override the client's ``auto_resize`` for this call.

        Returns:
            The merged image with the attempts and seconds it took.

        Raises:
            ConfigurationError: an argument of the wrong type or value (nothing was sent).
            ClientClosedError: the client was closed before or during the call.
            InvalidImageError: an input failed a local check (nothing was sent).
            APIStatusError: the API refused the request (subclass per status).
            APIConnectionError: no answer after the retry budget.
            OutputError: the result could not be written to ``output``.

        Example:
            >>> result = await client.merge_face("face.jpg", "photo.jpg")  # doctest: +SKIP
            >>> result.image_type, len(result.data)  # doctest: +SKIP
            ('png', 1048576)
        """
        session = self._life.session()
        gate = send_gate.get()
        if response_image_type not in RESPONSE_IMAGE_TYPES:
            raise ConfigurationError(
                f"response_image_type {response_image_type!r} is not one of "
                f"{', '.join(RESPONSE_IMAGE_TYPES)}"
            )
        extra = build_extra(response_image_type, enterprise_plan)
        if auto_resize is not None and not isinstance(auto_resize, bool):
            raise ConfigurationError(
                f"auto_resize must be True, False or None (the client's), got {auto_resize!r}"
            )
        started = time.monotonic()
        resize = self.auto_resize if auto_resize is None else auto_resize
        out_path = check_output(output)
        face, target = await prepare_inputs(((face_image, "face_image"), (image, "image")), files=self._files,
                                            validate=self.validate, auto_resize=resize, output=out_path)
        try:
            body = RequestBody(face, target, extra)
            if out_path is not None and out_path.parent not in self._writable_folders:
                # Before anything is sent: a result with nowhere to go is a paid request lost.
                # Once per folder: probing creates and deletes a file, which per job
                # cost a batch of small images ~0.5 ms of CPU each (and ext4 slows
                # down allocating inodes past recently deleted ones).
                await self._files.run((folder_of(out_path),), lambda: check_writable(out_path))
                if len(self._writable_folders) >= 1024:
                    self._writable_folders.clear()
                self._writable_folders.add(out_path.parent)

            deadline = RetryDeadline(self.retry.total_timeout)

            async def attempt(number: int) -> tuple[str, Sink]:
                self._life.check_open(session)  # a retry after aclose() must not reach aiohttp
                sink: Sink = FileSink(out_path, self._files) if out_path is not None else MemorySink()
                try:
                    image_type = await self._attempt(session, body, sink, response_image_type, gate,
                                                     number, deadline)
                    await sink.commit()
                except NovitaError as exc:
                    await sink.discard()
                    if exc.retryable and (self.closed or session.closed):
                        # Closing the session cut this attempt off: no retry can succeed.
                        raise self._life.closed_error() from exc
                    raise
                except BaseException:
                    await sink.discard()
                    raise
                return image_type, sink

            (image_type, sink), attempts = await retry_call(
                attempt, self.retry, what="merge-face", deadline=deadline,
                sleep=lambda seconds: self._sleep(seconds, gate))
            data = sink.data if isinstance(sink, MemorySink) else None
            return MergeFaceResult(
                image_type=image_type, path=out_path, data=data,
                attempts=attempts, elapsed=time.monotonic() - started,
            )
        finally:
            # The header check may have kept a file open for the first upload.
            close_sources((face, target))

    async def _attempt(
        self,
        session: aiohttp.ClientSession,
        body: RequestBody,
        sink: Sink,
        requested: str,
        gate: SendGate | None,
        number: int,
        deadline: RetryDeadline,
    ) -> str:
        """Attempt ``number``: take a slot, wait for the pace, send, stream the answer.

        Raises:
            RetryBudgetSpent: a retry's wait for the pace would pass the retry
                budget (``deadline``); nothing was sent.
        """
        acquired = False
        queued = anyio.current_time()
        try:
            # Not bounded by the retry budget, nor counted in it: a retry queues
            # for a slot like any call, and Timeout.pool bounds that.
            with anyio.fail_after(self.timeout.pool), self._life.closing.waiting():
                await self._limiter.acquire()
                acquired = True
        except TimeoutError:
            raise APITimeoutError(
                f"waited {self.timeout.pool:g} s for a free request slot "
                f"(max_concurrency={self.max_concurrency}); raise Timeout.pool or the concurrency"
            ) from None
        if not acquired:  # aclose() ended the wait
            raise self._life.closed_error()
        try:
            if number == 1:  # the budget's clock has not started: no cancel scope to pay for
                await self._wait_for_pace(gate)
            else:
                deadline.exclude(anyio.current_time() - queued)
                # A 429 cool-down may outlast the retry budget: the retry is then not made.
                with anyio.CancelScope(deadline=deadline.waits_end(number)) as budget:
                    await self._wait_for_pace(gate)
                if budget.cancelled_caught:
                    raise RetryBudgetSpent
            # The waits above may have outlasted the client: nothing awaits
            # between this check and aiohttp's own.
            self._life.check_open(session)
            deadline.start()  # the retry budget runs from the first attempt's send
            try:
                image_type = await send_merge_request(
                    session, f"{self.base_url}{MERGE_FACE_PATH}", self._api_key, body, sink,
                    self.timeout,
                )
            except RateLimitError as exc:
                # The shared cool-down obeys the same cap as the retry wait: a
                # server asking for an hour must not stall every job for an hour.
                retry_after = exc.retry_after
                if retry_after is not None:
                    retry_after = min(retry_after, self.retry.max_retry_after)
                self.pacer.on_rate_limited(retry_after)
                raise
            self.pacer.on_success()
            return image_type or requested
        finally:
            self._limiter.release()

    async def _wait_for_pace(self, gate: SendGate | None) -> None:
        """Wait for this client's turn of the pace; aclose() or the batch's gate closing ends it."""
        if gate is None:
            await self._life.closing.admit(self.pacer.wait_turn)
        else:
            await self._life.closing.admit(lambda: gate.admit(self.pacer.wait_turn))

    def batch(
        self,
        jobs: Iterable[MergeJob | BadRow] | AsyncIterable[MergeJob | BadRow],
        *,
        output_dir: str | os.PathLike[str] | None = None,
        ledger: str | os.PathLike[str] | None = None,
        ordered: bool = False,
        progress: Any = None,
        response_image_type: str = "png",
        summary: BatchSummary | None = None,
        total: int | None = None,
        resend_no_face: bool = False,
    ) -> BatchRun:
        """Run many merges concurrently; iterate the result for one :class:`JobResult` per job.

        Args:
            jobs: Any iterable or async iterable of :class:`MergeJob`, consumed
                lazily: only about ``max_concurrency`` jobs exist at a time.
            output_dir: Folder for results (``<id>.<ext>`` unless a job names
                its ``output``); None keeps results in memory.
            ledger: A JSONL file recording every finished job; re-running with
                the same ledger skips jobs already done, and does not send again
                a job the API found no face in while its two input files are
                unchanged (it fails at once with :class:`NoFaceFoundBeforeError`).
            ordered: Yield results in input order (a bounded reorder window).
            progress: True, False, None (a bar when stderr is a terminal), a
                tqdm-like object, or a callable taking each JobResult.
            response_image_type: Output type for jobs that do not set one.
            summary: A :class:`BatchSummary` to fill (also ``run.summary``).
            total: How many jobs to expect, for the progress bar's total and ETA
                (taken from ``len(jobs)`` when it has one).
            resend_no_face: Send the jobs an earlier run found no face in even
                if their input files are unchanged.

        Returns:
            A :class:`BatchRun`: an async iterator (and async context manager).

        Example:
            >>> jobs = (na.MergeJob(f, "photo.jpg") for f in faces)  # doctest: +SKIP
            >>> async for r in client.batch(jobs, output_dir="out", ledger="out/ledger.jsonl"):
            ...     print(r.job.id, r.status)
        """
        from novita_async._batch import BatchRun

        self._life.session()
        if response_image_type not in RESPONSE_IMAGE_TYPES:
            raise ConfigurationError(
                f"response_image_type {response_image_type!r} is not one of {', '.join(RESPONSE_IMAGE_TYPES)}"
            )
        return BatchRun(self, jobs, output_dir=output_dir, ledger=ledger, ordered=ordered,
                        progress=progress, summary=summary, response_image_type=response_image_type,
                        total=total, resend_no_face=resend_no_face)
