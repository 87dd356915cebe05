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
import hashlib
import logging
import os
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from novita_async._client import NovitaClient
from novita_async._config import RESPONSE_IMAGE_TYPES, env_api_key, env_base_url
from novita_async._errors import ConfigurationError, DuplicateJobError
from novita_async._jobs import JobResult, JobStatus, MergeJob, is_fatal, job_identity
from novita_async._places import JobPlaces, _file_key
from novita_async._ray_pacer import ActorPacer, Booking, import_ray, shared_pacer

__all__ = ["ActorPacer", "Booking", "merge_faces", "shared_pacer"]

logger = logging.getLogger("novita_async")

T = TypeVar("T")

#: Client options that cannot travel to the actors or that this module sets itself.
_RESERVED_CLIENT_KWARGS = frozenset({"session", "pacer", "requests_per_minute", "max_concurrency"})


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
    ray = import_ray()
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
