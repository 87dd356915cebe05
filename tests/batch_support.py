"""Helpers shared by the batch, ledger, manifest, summary and CLI tests (not a test module)."""

from __future__ import annotations

import asyncio
import csv
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

import novita_async as na
from novita_async.emulator import Emulator, EmulatorConfig, EmulatorStats

from .conftest import FAST_RETRY, make_image

#: The ``emulator_factory`` fixture: makes an emulator from EmulatorConfig's keywords.
EmulatorFactory = Callable[..., Emulator]

#: Retries that never sleep, with attempts enough that injected faults (a few
#: percent each) cannot exhaust a job: 0.3 ** 12 is about 5e-7.
PATIENT_RETRY = na.RetryPolicy(max_attempts=12, initial_wait=0.0, max_wait=0.0, max_retry_after=0.05)


def client_for(emulator: Emulator, **kwargs: object) -> na.NovitaClient:
    """A client for ``emulator``, with retries that do not sleep; ``kwargs`` override the defaults."""
    kwargs.setdefault("retry", FAST_RETRY)
    return na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, **kwargs)  # type: ignore[arg-type]  # test kwargs


async def collect(run: na.BatchRun) -> list[na.JobResult]:
    """Every result of a run, closing it afterwards."""
    async with run:
        return [result async for result in run]


def job_images(index: int) -> tuple[bytes, bytes]:
    """A distinct (face, image) pair for job ``index``: the emulator keys jobs by image hashes."""
    face = make_image((64, 64), color=(200, 120, 80), seed=index)
    target = make_image((80, 64), color=(40 + index % 200, 160, 90), seed=index + 1)
    return face, target


def memory_jobs(count: int, *, prefix: str = "job") -> list[na.MergeJob]:
    """``count`` jobs with in-memory inputs and ids ``{prefix}{i}``."""
    return [na.MergeJob(*job_images(i), id=f"{prefix}{i}") for i in range(count)]


def write_inputs(folder: Path, count: int, *, start: int = 0) -> list[tuple[Path, Path]]:
    """Write ``count`` distinct input pairs as PNG files under ``folder``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for index in range(start, start + count):
        face, target = job_images(index)
        face_path, target_path = folder / f"face{index:03d}.png", folder / f"photo{index:03d}.png"
        face_path.write_bytes(face)
        target_path.write_bytes(target)
        pairs.append((face_path, target_path))
    return pairs


def write_folder_inputs(root: Path, count: int, *, start: int = 0) -> tuple[Path, Path]:
    """Write ``count`` pairs as ``root/faces/fNN.png`` and ``root/images/iNN.png``; return both folders."""
    faces, images = root / "faces", root / "images"
    faces.mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    for index in range(start, start + count):
        face, target = job_images(index)
        (faces / f"f{index:02d}.png").write_bytes(face)
        (images / f"i{index:02d}.png").write_bytes(target)
    return faces, images


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    """A CSV manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def csv_manifest(folder: Path, count: int) -> Path:
    """A CSV manifest of ``count`` jobs with inputs in ``folder/in`` (paths relative to it)."""
    pairs = write_inputs(folder / "in", count)
    rows = [(f.relative_to(folder), t.relative_to(folder)) for f, t in pairs]
    return write_csv(folder / "manifest.csv", ("face_image", "image"), rows)


def ledger_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a ledger, parsed (fails the test if one is not JSON)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_valid_image(path: Path, fmt: str | None = None) -> None:
    """``path`` is a complete image (of format ``fmt`` when given)."""
    with Image.open(path) as image:
        image.verify()
        if fmt is not None:
            assert image.format == fmt, f"{path} is {image.format}, not {fmt}"


def temp_files(folder: Path) -> list[Path]:
    """Temporary result files left under ``folder``."""
    return sorted(folder.rglob("*.part"))


def results_in(folder: Path) -> list[Path]:
    """Result images under ``folder`` (not the ledger, not temporaries)."""
    return sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".jpg", ".webp") and p.is_file())


def batch_tasks() -> list[asyncio.Task[Any]]:
    """Tasks of ours still alive (the runner and job tasks are named after novita_async)."""
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("novita")]


class ThreadedEmulator:
    """The emulator on its own event loop in a thread, for code that calls ``asyncio.run``.

    Example:
        >>> with ThreadedEmulator(EmulatorConfig(engine="composite")) as emu:  # doctest: +SKIP
        ...     main(["merge", "a.png", "b.png", "-o", "c.png", "--base-url", emu.url, ...])
    """

    def __init__(self, config: EmulatorConfig) -> None:
        self._config = config
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="emulator", daemon=True)
        self._emulator: Emulator | None = None
        self._stop: asyncio.Event | None = None

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with Emulator(self._config) as emulator:
            self._emulator = emulator
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> ThreadedEmulator:
        self._thread.start()
        assert self._ready.wait(10), "the emulator did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def url(self) -> str:
        """Base URL of the running emulator."""
        assert self._emulator is not None
        return self._emulator.url

    @property
    def api_key(self) -> str:
        """A key it accepts."""
        assert self._emulator is not None
        return self._emulator.api_key

    @property
    def stats(self) -> EmulatorStats:
        """Its live counters (read them once the client is done)."""
        assert self._emulator is not None
        return self._emulator.stats


def numbered(items: Iterator[Any], counter: list[int]) -> Iterator[Any]:
    """Pass ``items`` through, counting in ``counter[0]`` how many were taken."""
    for item in items:
        counter[0] += 1
        yield item
