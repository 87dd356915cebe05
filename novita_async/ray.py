"""Merge faces over a Ray Data dataset, with one rate budget for the whole cluster.

Needs the ``[ray]`` extra (``pip install 'novita_async[ray]'``).  Ray is
imported only when a function here is called, so ``import novita_async``
never pays for it.

How it works: :func:`merge_faces` adds a ``map_batches`` stage run by a pool
of actors.  Each actor owns one :class:`~novita_async.NovitaClient` on an
event loop of its own (a background thread, alive as long as the actor), and
runs each batch's merges concurrently through the batch engine.  The API's
rate limit belongs to the account, not to the actor, so every client draws
its turns from one shared pacer: a named Ray actor (:func:`shared_pacer`)
that spaces request starts at the account's pace, and on a 429 from any
actor applies a cool-down (and, with no fixed pace, a cut of the adaptive
one) that every actor then waits out.  A row that fails is a row with an
error, never a failed Ray task.

Example:
    >>> import ray
    >>> from novita_async.ray import merge_faces
    >>> ds = ray.data.from_items([{"face_image": "/data/f1.jpg", "image": "/data/p1.jpg"}])  # doctest: +SKIP
    >>> out = merge_faces(ds, output_dir="/data/out", requests_per_minute=10)  # doctest: +SKIP
    >>> out.select_columns(["output_path", "status", "error"]).take(1)  # doctest: +SKIP
    [{'output_path': '/data/out/3fa2....png', 'status': 'ok', 'error': None}]
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import os
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import anyio

from novita_async._client import NovitaClient
from novita_async._config import RESPONSE_IMAGE_TYPES, env_api_key, env_base_url
from novita_async._errors import ConfigurationError, DuplicateJobError
from novita_async._jobs import JobResult, JobStatus, MergeJob, is_fatal, job_identity
from novita_async._pacing import Pacer
from novita_async._places import JobPlaces, _file_key

__all__ = ["ActorPacer", "Booking", "merge_faces", "shared_pacer"]

logger = logging.getLogger("novita_async")

T = TypeVar("T")

#: Client options that cannot travel to the actors or that this module sets itself.
_RESERVED_CLIENT_KWARGS = frozenset({"session", "pacer", "requests_per_minute", "max_concurrency"})


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ImportError(
            "novita_async.ray needs Ray Data: install the extra with "
            "pip install 'novita_async[ray]'"
        ) from exc
    return ray


class Booking(NamedTuple):
    """A start slot booked with the shared pacer.

    Attributes:
        delay: Seconds the caller must wait before it starts (0: start now).
        rate: The shared pace, requests per second (None: unthrottled).
        epoch: The pacer's 429 count when the slot was booked.
        start: When the slot begins, on the pacer's monotonic clock (seconds).
    """

    delay: float
    rate: float | None
    epoch: int
    start: float


class _PaceKeeper:
    """The shared pacer's state (run as a Ray actor; plain Python, so it tests without Ray).

    A token-spacing scheduler: :meth:`reserve` books the next start slot and
    returns how long the caller must sleep, so callers never hold a lock
    across a sleep and a slow caller never delays the others.
    The pacing rules are :class:`~novita_async._pacing.Pacer`'s, unchanged:
    the cluster behaves as one client whose requests happen to start in
    several processes.  As in ``Pacer.wait_turn``:

    * a slot booked before a 429 is not used at the old pace: each booking
      carries an epoch, bumped by every 429, and a caller whose epoch is
      stale when it wakes books again (without this, 8 requests in flight
      against a 120/min limit drew twice the 429s and ended at half the limit);
    * a caller cancelled before its turn gives its slot back, and the next
      bookings take the slots given back before new ones (without this, a
      batch broken off with 30 calls queued at 6 a minute would leave the next
      call waiting five minutes behind slots nobody uses).
    """

    def __init__(self, requests_per_minute: float | None = None) -> None:
        self._pacer = Pacer(requests_per_minute)
        self._rpm = requests_per_minute
        self._epoch = 0
        # Starts of the slots given back in this epoch, earliest first.  Kept
        # here, not in the Pacer: its schedule is booked through its public
        # reserve() only, so a slot given back is handed out again from here.
        self._returned: list[float] = []
        self.reservations = 0

    def configure(self, requests_per_minute: float | None) -> None:
        """Change the pace (a no-op when it is the same)."""
        if requests_per_minute != self._rpm:
            self._pacer = Pacer(requests_per_minute)
            self._rpm = requests_per_minute
            self._returned.clear()

    def reserve(self) -> Booking:
        """Book a start: a slot given back if one is still ahead, else the next one of the pace."""
        self.reservations += 1
        now = time.monotonic()
        while self._returned and self._returned[0] <= now:
            self._returned.pop(0)  # its time has passed
        start = self._returned.pop(0) if self._returned else now + self._pacer.reserve(now)
        return Booking(start - now, self._pacer.rate, self._epoch, start)

    def rebook(self, epoch: int) -> Booking:
        """After sleeping to a slot booked in ``epoch``: go now if no 429 came since, else book again."""
        if epoch == self._epoch:
            return Booking(0.0, self._pacer.rate, epoch, time.monotonic())
        return self.reserve()

    def give_back(self, booking: Booking) -> None:
        """A caller was cancelled before its slot: let the next booking have it.

        Ignored once the slot has passed, after a 429 (the schedule started
        again from the cool-down), and with no pace (slots are not spaced).
        """
        if booking.epoch != self._epoch or self._pacer.rate is None or booking.start <= time.monotonic():
            return
        bisect.insort(self._returned, booking.start)

    def on_success(self) -> None:
        """A request somewhere succeeded."""
        self._pacer.on_success()

    def on_rate_limited(self, retry_after: float | None) -> None:
        """A request somewhere got a 429 (``retry_after``: the server's hint, seconds): slow everyone."""
        self._pacer.on_rate_limited(retry_after)
        # Every 429, even one the pacer counts as part of an overshoot it has
        # already answered: re-booking once too often costs a call, not a 429.
        self._epoch += 1
        self._returned.clear()

    def stats(self) -> dict[str, Any]:
        """Reservations, slots waiting to be taken again, 429s reported, and the pace now (per minute)."""
        rate = self._pacer.rate
        return {
            "reservations": self.reservations,
            "returned": len(self._returned),
            "rate_limited": self._pacer.rate_limited,
            "requests_per_minute": rate * 60.0 if rate is not None else None,
            "fixed": self._pacer.fixed,
        }


def _pacer_name(api_key: str, base_url: str) -> str:
    # One budget per account and endpoint; a hash, so the key never shows in
    # Ray's dashboard or state API.
    digest = hashlib.sha256(f"{base_url}\0{api_key}".encode()).hexdigest()[:16]
    return f"novita_async.pacer.{digest}"


def shared_pacer(
    *,
    requests_per_minute: float | None = None,
    api_key: str | None = None,
    base_url: str | None = None,
    name: str | None = None,
) -> Any:
    """The cluster-wide pacer for an account: a named Ray actor, created once.

    Every :func:`merge_faces` call with the same key and base URL (in the same
    Ray namespace) shares it, so datasets processed at once still keep to one
    budget.  Wrap it in an :class:`ActorPacer` to give it to a client of your own.

    Args:
        requests_per_minute: The account's pace; None adapts to 429s (AIMD).
            Changes the pace of an existing pacer of that name.
        api_key: Defaults to ``$NOVITA_API_KEY``; only its hash names the actor.
        base_url: Defaults to ``$NOVITA_BASE_URL`` or the public endpoint.
        name: The actor's name, instead of one derived from key and URL.

    Returns:
        A Ray actor handle with ``reserve`` and ``rebook`` (each gives a
        :class:`Booking`), ``give_back``, ``on_success``, ``on_rate_limited``
        and ``stats`` methods.
    """
    ray = _import_ray()
    if name is None:
        key = api_key if api_key is not None else env_api_key()
        name = _pacer_name(key or "", base_url or env_base_url())
    actor_class = ray.remote(num_cpus=0, max_restarts=-1)(_PaceKeeper)
    handle = actor_class.options(name=name, get_if_exists=True).remote(requests_per_minute)
    ray.get(handle.configure.remote(requests_per_minute))
    return handle


class ActorPacer:
    """A :class:`~novita_async.PacerProtocol` backed by a :func:`shared_pacer` actor.

    Each attempt asks the actor for a start slot (one small actor call, two
    when it has to wait) and sleeps until it comes; successes and 429s are
    reported without waiting.
    Ray runs one caller's calls to an actor in order, so a 429 reported here
    is applied before this process's next booking.

    Example:
        >>> pacer = ActorPacer(shared_pacer(requests_per_minute=10), fixed=True)  # doctest: +SKIP
        >>> client = NovitaClient(pacer=pacer)  # doctest: +SKIP
    """

    def __init__(self, actor: Any, *, fixed: bool, rate: float | None = None) -> None:
        """Wrap ``actor`` (a :func:`shared_pacer` handle); ``fixed``: whether it has a set pace."""
        self._actor = actor
        self._fixed = fixed
        self._rate = rate

    @property
    def fixed(self) -> bool:
        """Whether the shared pace is fixed."""
        return self._fixed

    @property
    def rate(self) -> float | None:
        """The shared pace (requests per second) as of this process's last booking."""
        return self._rate

    async def wait_turn(self) -> None:
        """Book a slot with the shared pacer and sleep until it (again, if a 429 came meanwhile).

        Cancelled before its turn, it gives the slot back to the shared pacer.
        """
        # Ray's ObjectRefs are awaitable from any asyncio loop.
        booked = self._actor.reserve.remote()
        try:
            booking: Booking = await booked
            self._rate = booking.rate
            while booking.delay > 0:
                await anyio.sleep(booking.delay)
                booked = self._actor.rebook.remote(booking.epoch)
                booking = await booked
                self._rate = booking.rate
        except BaseException as exc:
            if not isinstance(exc, Exception):  # cancelled (an error: the actor is gone)
                # The reference, not its value: a booking still on its way here
                # is given back too (Ray resolves it for the actor).  Ray runs
                # one caller's calls to an actor in order, so this process's
                # next booking can already take the slot.
                self._actor.give_back.remote(booked)
            raise

    def on_success(self) -> None:
        """Report a success (the adaptive pace grows a little)."""
        self._actor.on_success.remote()

    def on_rate_limited(self, retry_after: float | None) -> None:
        """Report a 429: every actor's next start waits out the cool-down."""
        self._actor.on_rate_limited.remote(retry_after)


def _as_input(value: Any, column: str) -> bytes | str:
    """A cell as an image input: bytes as they are, a string as a path."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)  # numpy's str_ is a str
    raise TypeError(f"column {column!r} holds {type(value).__name__}; expected a path or bytes")


def _row_id(face: bytes | str, image: bytes | str) -> str:
    """A deterministic id (and output name) for a row: from its paths, else its content."""
    if isinstance(face, str) and isinstance(image, str):
        return job_identity(MergeJob(face, image), 0)
    digest = hashlib.sha256()
    for part in (face, image):
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:20]


class _IdClaims:
    """Which row each job id (or output file) of a merge_faces run belongs to.

    Run as one Ray actor per run (plain Python, so it tests without Ray): the
    batch engine finds a repeated id within one block, but blocks run in
    separate actors, and two rows of one id there would both be sent and
    write the same file, the later over the earlier.  Each block claims its
    ids first; a claim names the row by its inputs, so the same id with the
    same inputs is the same job again (Ray runs a block again when a worker
    died, and may not be told apart from a repeated row) and is let through,
    while the same id with other inputs is refused.  About 200 bytes an id;
    restarted after a crash, it has forgotten the claims made before.
    """

    def __init__(self) -> None:
        self._rows: dict[str, str] = {}

    def claim(self, claims: list[tuple[str, str]]) -> list[bool]:
        """For each ``(key, inputs)``: whether the key is this row's (first claimed, or by the same inputs)."""
        return [self._rows.setdefault(key, inputs) == inputs for key, inputs in claims]


class _MergeFaces:
    """The ``map_batches`` UDF: one client per actor, on a loop thread of its own.

    The loop lives as long as the actor, so the client's connection pool and
    the shared pacer's adapter survive from batch to batch; a batch is handed
    to the loop and ``__call__`` blocks until all its rows have ended.
    """

    def __init__(
        self,
        *,
        pacer: Any,
        fixed: bool,
        face_column: str,
        image_column: str,
        id_column: str | None,
        output_column: str,
        output_dir: str | None,
        response_image_type: str,
        client_options: dict[str, Any],
        claims: Any = None,
    ) -> None:
        self._columns = (face_column, image_column)
        self._id_column = id_column
        self._output_column = output_column
        self._output_dir = output_dir
        self._type = response_image_type
        self._claims = claims
        # Output names as the batch engine gives them (its rule, not a copy).
        self._places = (JobPlaces(Path(output_dir), None, response_image_type)
                        if output_dir is not None else None)
        self._fatal: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="novita-async-loop",
                                        daemon=True)
        self._thread.start()
        options = dict(client_options)

        async def open_client() -> NovitaClient:
            client = NovitaClient(pacer=ActorPacer(pacer, fixed=fixed), **options)
            return await client.__aenter__()

        self._client = self._run(open_client())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Merge every row of the batch; return the batch with the result columns added."""
        import numpy as np

        for column in self._columns:
            if column not in batch:
                raise KeyError(f"merge_faces: the dataset has no column {column!r}; "
                               f"it has {', '.join(batch) or 'none'}")
        rows = self._run(self._merge_batch(batch))
        out = dict(batch)
        names = (self._output_column, "status", "error", "error_reason")
        for position, name in enumerate(names):
            # Object arrays: bytes and None side by side, never numpy's
            # fixed-width strings (which would strip trailing NUL bytes).
            array = np.empty(len(rows), dtype=object)
            array[:] = [row[position] for row in rows]
            out[name] = array
        return out

    async def _merge_batch(self, batch: dict[str, Any]) -> list[tuple[Any, str, str | None, str | None]]:
        face_column, image_column = self._columns
        count = len(batch[face_column])
        rows: list[tuple[Any, str, str | None, str | None] | None] = [None] * count
        jobs: list[tuple[int, MergeJob]] = []
        inputs: dict[int, str] = {}  # each row's inputs, as a hash of its paths or bytes
        for index in range(count):
            try:
                face = _as_input(batch[face_column][index], face_column)
                image = _as_input(batch[image_column][index], image_column)
            except TypeError as exc:
                rows[index] = (None, JobStatus.FAILED, str(exc), "TypeError")
                continue
            inputs[index] = _row_id(face, image)
            job_id = str(batch[self._id_column][index]) if self._id_column is not None else inputs[index]
            jobs.append((index, MergeJob(face, image, id=job_id)))
        if self._fatal is not None:
            message = f"not attempted: an earlier batch hit {type(self._fatal).__name__}: {self._fatal}"
            for index, _ in jobs:
                rows[index] = (None, JobStatus.NOT_ATTEMPTED, message, type(self._fatal).__name__)
            jobs = []
        if jobs and self._claims is not None:
            jobs = await self._claim(jobs, inputs, rows)
        if jobs:
            # ordered=True: results come back in job order, so they line up with the rows.
            run = self._client.batch([job for _, job in jobs], output_dir=self._output_dir,
                                     ordered=True, progress=False,
                                     response_image_type=self._type)
            async with run:
                results = [result async for result in run]
            for (index, _), result in zip(jobs, results, strict=True):
                rows[index] = self._row(result)
        return [row for row in rows if row is not None]

    async def _claim(
        self, jobs: list[tuple[int, MergeJob]], inputs: dict[int, str],
        rows: list[tuple[Any, str, str | None, str | None] | None],
    ) -> list[tuple[int, MergeJob]]:
        """The jobs whose id (and output) no row of another block holds; the others fail as duplicates."""
        keys: list[tuple[str, Path | None]] = []
        for _, job in jobs:
            assert job.id is not None
            output = self._places.output_for(job) if self._places is not None else None
            keys.append((_file_key(output) if output is not None else job.id, output))
        claims = [(key, inputs[index]) for (key, _), (index, _) in zip(keys, jobs, strict=True)]
        granted = await self._claims.claim.remote(claims)
        kept: list[tuple[int, MergeJob]] = []
        for (index, job), (_, output), mine in zip(jobs, keys, granted, strict=True):
            if mine:
                kept.append((index, job))
                continue
            assert job.id is not None
            what = f"would write {output}, the output of" if output is not None else "repeats the id of"
            error = DuplicateJobError(
                f"job {job.id!r} {what} another row, with other inputs, so it was not sent (that "
                "row is); give each row its own id", job_id=job.id,
                output=str(output) if output is not None else None)
            rows[index] = self._row(JobResult(job=job, status=JobStatus.FAILED, error=error, output=output))
        return kept

    def _row(self, result: JobResult) -> tuple[Any, str, str | None, str | None]:
        error = result.error
        if error is not None and is_fatal(error) and self._fatal is None:
            # Every later row would fail the same way: stop sending from this actor.
            self._fatal = error
        if result.status != JobStatus.OK:
            return None, result.status, str(error) if error is not None else None, result.error_reason
        if self._output_dir is not None:
            value: Any = str(result.output)
        else:
            value = result.result.data if result.result is not None else None
        return value, result.status, None, None

    def __del__(self) -> None:
        # Ray Data drops the UDF when the actor retires: close the session
        # while its loop still runs, then stop the loop.
        loop = getattr(self, "_loop", None)
        client = getattr(self, "_client", None)
        if loop is None or loop.is_closed():
            return
        try:
            if client is not None and loop.is_running():
                asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(timeout=10)
        except Exception:  # best effort at teardown: nobody to report to
            logger.debug("closing the client of a Ray actor failed", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)


def merge_faces(
    ds: Any,
    *,
    face_column: str = "face_image",
    image_column: str = "image",
    output_dir: str | os.PathLike[str] | None = None,
    output_column: str | None = None,
    id_column: str | None = None,
    api_key: str | None = None,
    base_url: str | None = None,
    requests_per_minute: float | None = None,
    concurrency: int = 2,
    max_concurrency: int = 8,
    batch_size: int = 32,
    response_image_type: str = "png",
    num_cpus: float = 0.5,
    pacer: Any = None,
    **client_kwargs: Any,
) -> Any:
    """Merge the face of each row into its image; return the dataset with result columns.

    Lazy, as Ray Data is: nothing is sent until the returned dataset is
    consumed (``take``, ``write_*``, ``materialize``...).  Every row comes out
    once, with ``status`` (``"ok"``, ``"failed"`` or ``"not_attempted"``),
    ``error`` (the message) and ``error_reason`` (the API's reason, such as
    ``IMAGE_NO_FACE_DETECTED``) added; the input columns stay.

    Args:
        ds: A ``ray.data.Dataset`` whose face and image columns hold paths
            (read by the workers: absolute, on storage every node sees) or bytes.
        face_column: Column of faces to put in.
        image_column: Column of pictures that receive them.
        output_dir: Write results there (as ``<id>.<ext>``, atomically) and add
            their paths as ``output_path``; None adds the images' bytes as
            ``merged_image`` instead.
        output_column: Name of that column instead of the default.
        id_column: A column of unique row ids, used for output names; default:
            a hash of the row's paths, or of its bytes.  A row whose id (or
            output file) another row with other inputs holds fails with
            ``DuplicateJobError``, unsent, wherever the two fall: within a
            block, the later row; across blocks, the one whose block claims
            it second.  Rows alike in id and inputs are one job: across
            blocks each is sent (Ray re-runs a block whose worker died, and
            that cannot be told apart), and both write the same result.
        api_key: Defaults to ``$NOVITA_API_KEY`` read here, on the driver. It
            travels to the actors in their constructor arguments.
        base_url: Defaults to ``$NOVITA_BASE_URL``, else the public endpoint.
        requests_per_minute: The account's pace, shared by all actors; None
            adapts to 429s (one shared adaptive pace).
        concurrency: Actors in the pool.
        max_concurrency: Requests in flight per actor.
        batch_size: Rows per batch handed to an actor; a few times
            ``max_concurrency`` keeps its requests busy across a batch's end.
        response_image_type: ``"png"``, ``"webp"`` or ``"jpeg"``.
        num_cpus: CPUs reserved per actor; the work is mostly waiting on the
            network, hence less than one.
        pacer: A :func:`shared_pacer` handle to use (default: the account's).
        **client_kwargs: More :class:`~novita_async.NovitaClient` options
            (``timeout``, ``retry``, ``auto_resize``, ``validate``).  With
            no ``requests_per_minute``, ``retry`` defaults to 10 attempts,
            as the adaptive pace finds the limit through 429s.

    Raises:
        ImportError: Ray Data is not installed.
        ConfigurationError: no API key, a bad option or URL (raised here, not
            in the workers).

    Example:
        >>> ds = ray.data.read_parquet("s3://bucket/pairs/")  # doctest: +SKIP
        >>> merged = merge_faces(ds, requests_per_minute=600, concurrency=4)  # doctest: +SKIP
        >>> merged.filter(lambda r: r["status"] != "ok").count()  # doctest: +SKIP
        0
    """
    ray = _import_ray()
    if response_image_type not in RESPONSE_IMAGE_TYPES:
        raise ConfigurationError(f"response_image_type {response_image_type!r} is not one of "
                                 f"{', '.join(RESPONSE_IMAGE_TYPES)}")
    reserved = _RESERVED_CLIENT_KWARGS & set(client_kwargs)
    if reserved:
        raise ConfigurationError(f"merge_faces sets {', '.join(sorted(reserved))} itself; "
                                 "use requests_per_minute, max_concurrency or pacer")
    if concurrency < 1 or batch_size < 1:
        raise ConfigurationError("concurrency and batch_size must be >= 1")
    key = api_key if api_key is not None else env_api_key()
    url = base_url or env_base_url()
    options = {"api_key": key, "base_url": url, "max_concurrency": max_concurrency, **client_kwargs}
    # Fail here, on the driver, for a missing key or a bad option: in the
    # actors the same error would surface only once the dataset runs.
    NovitaClient(**options)
    handle = pacer if pacer is not None else shared_pacer(
        requests_per_minute=requests_per_minute, api_key=key, base_url=url)
    if output_column is None:
        output_column = "output_path" if output_dir is not None else "merged_image"
    # One per run, held by the plan below for as long as the dataset lives.
    # Ids of their own (hashes of the inputs) clash only for rows alike.
    claims = (ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_IdClaims).remote()
              if id_column is not None else None)
    return ds.map_batches(
        _MergeFaces,
        fn_constructor_kwargs={
            "pacer": handle,
            "fixed": requests_per_minute is not None,
            "face_column": face_column,
            "image_column": image_column,
            "id_column": id_column,
            "output_column": output_column,
            "output_dir": os.fspath(output_dir) if output_dir is not None else None,
            "response_image_type": response_image_type,
            "client_options": options,
            "claims": claims,
        },
        batch_size=batch_size,
        batch_format="numpy",
        # A fixed pool (not `concurrency=`, deprecated since Ray 2.51): the
        # shared pacer, not the pool size, sets the request rate.
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
    )
