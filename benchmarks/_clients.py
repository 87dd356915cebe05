"""The peers, each written the way its users would write it.

Every runner does the same jobs: ``jobs`` merges of one face and one image
(paths), ``concurrency`` at a time, each result written to
``out_dir/job-<i>.png``.  A runner returns an :class:`Outcome`; the child
process around it does the measuring (see ``_child.py``).

1. ``official``: ``novita-client`` 0.7.1, Novita's synchronous SDK, pointed at
   the emulator with its own ``base_url`` argument, one client shared by a
   ``ThreadPoolExecutor`` of the same width.  The result comes back as a base64
   string; the user decodes it and writes the file.  (The SDK defaults to jpeg;
   we ask for png like the others, so the server does the same work.)
2. ``naive``: the aiohttp client most users write: whole files read and
   base64-encoded in memory, ``json.dumps``, ``asyncio.gather`` under a
   semaphore, ``await resp.json()``, ``b64decode``, write the file.  Its
   connector limit is raised to the concurrency (aiohttp's default of 100
   would otherwise cap it at 128).
3. ``novita_async``: ``NovitaClient(max_concurrency=C)`` with default settings
   and ``client.batch(...)`` over a lazy generator of ``MergeJob``.

Not a peer: ``exchange`` (:data:`REFERENCE`) moves the same bytes and does
nothing else, as a reference for the CPU target (see :func:`run_exchange`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CLIENTS", "REFERENCE", "GridSpec", "Outcome", "preload", "run_client"]

#: The peers, in the order they appear in tables and charts.
CLIENTS = ("official", "naive", "novita_async")
#: The reference run beside the peers in the cells the CPU target judges.
REFERENCE = "exchange"


@dataclass(frozen=True)
class GridSpec:
    """One cell of the grid, for one client."""

    url: str
    api_key: str
    face: str
    image: str
    concurrency: int
    jobs: int
    out_dir: str

    def output(self, index: int) -> Path:
        """Where job ``index`` writes its result."""
        return Path(self.out_dir) / f"job-{index}.png"


@dataclass
class Outcome:
    """What a runner did."""

    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    elapsed: float = 0.0  # seconds from the first job started to the last one done
    done_at: list[float] = field(default_factory=list)  # perf_counter() as each job finished

    def settled_rate(self, concurrency: int) -> float:
        """Jobs per second once the first ``concurrency`` jobs are done.

        The first round pays the cold start (connections, lazy imports, the
        output folder's first files) that a long batch pays once; a closed loop
        of C workers then finishes N - C jobs between the C-th completion and
        the last.  With fewer than three rounds this is the whole-run rate.
        """
        times = sorted(self.done_at)
        if len(times) < 3 * concurrency or times[-1] <= times[concurrency - 1]:
            return self.ok / self.elapsed if self.elapsed > 0 else 0.0
        return (len(times) - concurrency) / (times[-1] - times[concurrency - 1])

    def fail(self, exc: BaseException) -> None:
        """Count a failed job, keeping the first few messages."""
        self.failed += 1
        if len(self.errors) < 3:
            self.errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")


def run_official(spec: GridSpec) -> Outcome:
    """novita-client 0.7.1 in a thread pool."""
    import base64
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from novita_client import NovitaClient

    client = NovitaClient(api_key=spec.api_key, base_url=spec.url)
    outcome = Outcome()

    def one(index: int) -> None:
        response = client.merge_face(image=spec.image, face_image=spec.face,
                                     response_image_type="png")
        data = base64.b64decode(response.image_file)
        with open(spec.output(index), "wb") as handle:
            handle.write(data)
        outcome.done_at.append(time.perf_counter())  # list.append is atomic under the GIL

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=spec.concurrency) as pool:
        futures = [pool.submit(one, index) for index in range(spec.jobs)]
        for future in as_completed(futures):
            error = future.exception()
            if error is None:
                outcome.ok += 1
            else:
                outcome.fail(error)
    outcome.elapsed = time.perf_counter() - started
    return outcome


async def _gather_jobs(spec: GridSpec, one: Callable[[Any, int], Awaitable[None]],
                       outcome: Outcome) -> Outcome:
    """``one(session, index)`` for every job, gathered on one aiohttp session of the cell's width."""
    import asyncio

    import aiohttp

    connector = aiohttp.TCPConnector(limit=spec.concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(session, i) for i in range(spec.jobs)),
                                       return_exceptions=True)
        outcome.elapsed = time.perf_counter() - started
    for result in results:
        if isinstance(result, BaseException):
            outcome.fail(result)
        else:
            outcome.ok += 1
    return outcome


async def run_naive(spec: GridSpec) -> Outcome:
    """The aiohttp client most users write."""
    import asyncio
    import base64
    import json

    import aiohttp

    outcome = Outcome()
    semaphore = asyncio.Semaphore(spec.concurrency)
    headers = {"Authorization": f"Bearer {spec.api_key}", "Content-Type": "application/json"}
    url = f"{spec.url}/v3/merge-face"

    async def one(session: aiohttp.ClientSession, index: int) -> None:
        async with semaphore:
            # Blocking reads and writes on the event loop: what most users write.
            with open(spec.face, "rb") as handle:  # noqa: ASYNC230
                face = base64.b64encode(handle.read()).decode()
            with open(spec.image, "rb") as handle:  # noqa: ASYNC230
                image = base64.b64encode(handle.read()).decode()
            payload = json.dumps({"face_image_file": face, "image_file": image,
                                  "extra": {"response_image_type": "png"}})
            async with session.post(url, data=payload, headers=headers) as response:
                response.raise_for_status()
                body = await response.json()
            data = base64.b64decode(body["image_file"])
            with open(spec.output(index), "wb") as handle:  # noqa: ASYNC230
                handle.write(data)
            outcome.done_at.append(time.perf_counter())

    return await _gather_jobs(spec, one, outcome)


#: Size of the views the exchange reference hands aiohttp (each one send).
_EXCHANGE_PIECE = 512 * 1024


async def run_exchange(spec: GridSpec) -> Outcome:
    """The HTTP exchange alone: what moving a cell's bytes through aiohttp costs.

    Not a client anyone would use: the request body is built once, before
    the run (no reading, no encoding per job), and handed to aiohttp as views
    of it (no copies); each answer is taken piece by piece as it arrives and
    dropped (no joining, no JSON, no decoding, no file).  What is left is the
    least an aiohttp client pays per job to send this body and take this
    answer over loopback, beside the floor's idealised socket costs.
    """
    import asyncio
    import base64
    import json

    import aiohttp

    with open(spec.face, "rb") as handle:  # noqa: ASYNC230  # once, before the measured jobs
        face = base64.b64encode(handle.read()).decode()
    with open(spec.image, "rb") as handle:  # noqa: ASYNC230
        image = base64.b64encode(handle.read()).decode()
    body = memoryview(json.dumps({"face_image_file": face, "image_file": image,
                                  "extra": {"response_image_type": "png"}}).encode())
    del face, image
    outcome = Outcome()
    semaphore = asyncio.Semaphore(spec.concurrency)
    # An exact length: an async iterable body would otherwise go chunked.
    headers = {"Authorization": f"Bearer {spec.api_key}", "Content-Type": "application/json",
               "Content-Length": str(len(body))}
    url = f"{spec.url}/v3/merge-face"

    async def pieces() -> AsyncIterator[memoryview]:
        for start in range(0, len(body), _EXCHANGE_PIECE):
            yield body[start : start + _EXCHANGE_PIECE]

    async def one(session: aiohttp.ClientSession) -> None:
        async with semaphore, session.post(url, data=pieces(), headers=headers) as response:
            response.raise_for_status()
            async for _piece in response.content.iter_chunks():
                pass
        outcome.done_at.append(time.perf_counter())

    return await _gather_jobs(spec, lambda session, _index: one(session), outcome)


async def run_novita_async(spec: GridSpec) -> Outcome:
    """novita_async with default settings and its batch API."""
    import novita_async as na

    outcome = Outcome()
    async with na.NovitaClient(api_key=spec.api_key, base_url=spec.url,
                               max_concurrency=spec.concurrency) as client:
        jobs = (na.MergeJob(spec.face, spec.image, id=f"job-{i}") for i in range(spec.jobs))
        started = time.perf_counter()
        async for result in client.batch(jobs, output_dir=spec.out_dir):
            if result.status == na.JobStatus.OK:
                outcome.ok += 1
                outcome.done_at.append(time.perf_counter())
            else:
                outcome.fail(result.error or RuntimeError(str(result.status)))
        outcome.elapsed = time.perf_counter() - started
    return outcome


def preload(name: str) -> None:
    """Import what a peer needs, so the idle baseline includes its imports."""
    import asyncio  # noqa: F401
    import base64  # noqa: F401
    import json  # noqa: F401

    if name == "official":
        import novita_client  # noqa: F401
    elif name in ("naive", REFERENCE):
        import aiohttp  # noqa: F401
    else:
        import novita_async._images  # noqa: F401  # imported lazily by the first check


def run_client(name: str, spec: GridSpec) -> Outcome:
    """Run one peer on one cell (in this process)."""
    import asyncio

    if name == "official":
        return run_official(spec)
    if name == "naive":
        return asyncio.run(run_naive(spec))
    if name == "novita_async":
        return asyncio.run(run_novita_async(spec))
    if name == REFERENCE:
        return asyncio.run(run_exchange(spec))
    raise ValueError(f"unknown client {name!r}; known: {', '.join((*CLIENTS, REFERENCE))}")
