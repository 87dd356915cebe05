"""novita_async-only scenarios: manifest scale and pacing against a rate limit."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["ManifestSpec", "PacingSpec", "run_manifest", "run_pacing"]


@dataclass(frozen=True)
class ManifestSpec:
    """A lazy CSV manifest of ``rows`` rows, of which the first ``stop_after`` run."""

    url: str
    api_key: str
    manifest: str
    rows: int
    concurrency: int
    stop_after: int
    out_dir: str


@dataclass(frozen=True)
class PacingSpec:
    """Run for ``duration`` seconds against a rate-limited emulator.

    ``rpm`` None means the adaptive pace (no client rate); ``warmup`` seconds
    at the start are left out of the settled figures.
    """

    url: str
    api_key: str
    face: str
    image: str
    concurrency: int
    rpm: float | None
    duration: float
    warmup: float
    out_dir: str


async def run_manifest(spec: ManifestSpec) -> dict[str, Any]:
    """Stream a manifest through ``client.batch``; stop after ``stop_after`` results."""
    import novita_async as na

    ok = failed = 0
    first_result_at: float | None = None
    started_at = time.monotonic()
    async with na.NovitaClient(api_key=spec.api_key, base_url=spec.url,
                               max_concurrency=spec.concurrency) as client:
        jobs = na.read_manifest(spec.manifest)
        async with client.batch(jobs, output_dir=spec.out_dir) as run:
            async for result in run:
                if first_result_at is None:
                    first_result_at = time.monotonic()
                if result.status == na.JobStatus.OK:
                    ok += 1
                else:
                    failed += 1
                if ok + failed >= spec.stop_after:
                    break
    finished_at = time.monotonic()
    return {
        "ok": ok, "failed": failed, "started_at": started_at,
        "first_result_at": first_result_at, "elapsed": finished_at - started_at,
    }


def _emulator_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/_emulator/stats", timeout=30) as response:
        data: dict[str, Any] = json.load(response)
    return data


async def run_pacing(spec: PacingSpec) -> dict[str, Any]:
    """Jobs without end for ``duration`` seconds, then a graceful stop."""
    import anyio
    import anyio.to_thread

    import novita_async as na

    def jobs() -> Iterator[na.MergeJob]:
        index = 0
        while True:
            yield na.MergeJob(spec.face, spec.image, id=f"job-{index}")
            index += 1

    done: list[float] = []
    failed = 0
    errors: list[str] = []
    snapshot: dict[str, Any] = {}
    async with na.NovitaClient(api_key=spec.api_key, base_url=spec.url,
                               max_concurrency=spec.concurrency,
                               requests_per_minute=spec.rpm) as client:
        started = time.monotonic()
        async with client.batch(jobs(), output_dir=spec.out_dir) as run:

            async def stop_later() -> None:
                await anyio.sleep(spec.duration)
                run.stop()

            async def snapshot_after_warmup() -> None:
                await anyio.sleep(spec.warmup)
                snapshot["stats"] = await anyio.to_thread.run_sync(_emulator_stats, spec.url)

            async with anyio.create_task_group() as group:
                group.start_soon(stop_later)
                group.start_soon(snapshot_after_warmup)
                async for result in run:
                    if result.status == na.JobStatus.OK:
                        done.append(time.monotonic() - started)
                    elif result.status == na.JobStatus.FAILED:
                        failed += 1
                        if len(errors) < 3:
                            errors.append(f"{type(result.error).__name__}: {result.error}")
        final_rate = client.pacer.rate
    end = await anyio.to_thread.run_sync(_emulator_stats, spec.url)
    warm = snapshot.get("stats", end)
    settled = [t for t in done if spec.warmup <= t <= spec.duration]
    window_requests = end["requests"] - warm["requests"]
    window_429 = end["statuses"].get("429", 0) - warm["statuses"].get("429", 0)
    return {
        "ok": len(done), "failed": failed, "errors": errors,
        "settled_throughput": len(settled) / (spec.duration - spec.warmup),
        "requests": end["requests"], "rate_limited": end["statuses"].get("429", 0),
        "window_requests": window_requests, "window_rate_limited": window_429,
        "final_rate_per_minute": final_rate * 60 if final_rate else None,
        "elapsed": time.monotonic() - started,
    }
