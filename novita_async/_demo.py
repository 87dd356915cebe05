"""``novita-async demo``: the whole offline path in one command.

Starts the emulator in-process, makes sample inputs (public-domain portraits
with variations when the ``[local]`` extra is installed, drawn faces
otherwise), runs a batch through the real client with a progress bar and a
ledger, and writes a contact sheet (face, target, result per row) so a person
can look at the results instead of reading about them.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio.to_thread
from PIL import Image

from novita_async._client import NovitaClient
from novita_async._config import RetryPolicy
from novita_async._jobs import MergeJob
from novita_async._manifest import read_manifest
from novita_async._samples import cartoon_face, contact_sheet, sample_pairs
from novita_async.emulator import Emulator, EmulatorConfig

__all__ = ["demo_command", "make_demo_inputs"]

#: Rows shown on the contact sheet (a sheet of a 10,000-job batch would be unreadable).
_SHEET_ROWS = 16


def _drawn_pairs(n: int, seed: int = 0) -> Iterator[tuple[str, Image.Image, str, Image.Image]]:
    """Pairs of drawn faces, for machines without the [local] extra."""
    rng = random.Random(seed)
    skins = [(224, 172, 140), (160, 110, 80), (250, 210, 180), (120, 80, 60)]
    for index in range(n):
        face = cartoon_face((384, 384), skin=rng.choice(skins), seed=rng.randrange(10**6))
        target = cartoon_face((512, 512), skin=rng.choice(skins), seed=rng.randrange(10**6))
        yield f"drawn{index}a", face, f"drawn{index}b", target


def make_demo_inputs(folder: Path, jobs: int) -> tuple[Path, str]:
    """Write ``jobs`` input pairs and a CSV manifest into ``folder``; return (manifest, source)."""
    inputs = folder / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    try:
        # sample_pairs raises for missing packages at once, not at the first pair.
        all_pairs = sample_pairs(jobs)
        source = "public-domain portraits (NASA, US Navy) with flips, crops, scales and colour shifts"
    except (RuntimeError, ImportError):
        all_pairs = _drawn_pairs(jobs)
        source = "drawn faces (install the [local] extra for real portraits)"
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["face_image", "image", "output", "id"])
        for index, (face_name, face, target_name, target) in enumerate(all_pairs):
            face_path = inputs / f"{index:04d}_face.jpg"
            target_path = inputs / f"{index:04d}_target.jpg"
            face.convert("RGB").save(face_path, quality=92)
            target.convert("RGB").save(target_path, quality=92)
            job_id = f"{index:04d}_{face_name}__{target_name}"
            writer.writerow([face_path.relative_to(folder), target_path.relative_to(folder),
                             f"{job_id}.png", job_id])
    return manifest, source


def write_contact_sheet(folder: Path, manifest: Path, results: Path, rows: int = _SHEET_ROWS) -> Path:
    """A PNG of the first ``rows`` jobs: face, target, result (grey when it failed)."""
    tiles: list[tuple[Image.Image, Image.Image, Image.Image | None]] = []
    labels: list[str] = []
    for job in read_manifest(manifest):
        if len(tiles) >= rows:
            break
        if not isinstance(job, MergeJob):
            continue
        output = results / str(job.output)
        result = Image.open(output).convert("RGB") if output.exists() else None
        tiles.append((Image.open(str(job.face_image)).convert("RGB"),
                      Image.open(str(job.image)).convert("RGB"), result))
        labels.append(str(job.id))
    sheet = contact_sheet(tiles, labels=labels)
    path = folder / "contact_sheet.png"
    sheet.save(path)
    return path


async def demo_command(args: argparse.Namespace) -> int:
    """Run the demo; returns the CLI exit code."""
    from novita_async._cli_batch import check_output_folder, run_batch_command
    from novita_async._cli_common import UsageError, say

    folder = Path(args.output_dir)
    check_output_folder(folder)
    say(f"making {args.jobs} sample jobs in {folder / 'inputs'} ...")
    try:
        manifest, source = await anyio.to_thread.run_sync(make_demo_inputs, folder, args.jobs)
    except OSError as exc:  # a read-only or full disk, no permission
        raise UsageError(f"cannot write the demo's inputs in {folder}: {exc.strerror or exc}") from None
    async with Emulator(EmulatorConfig(latency=args.latency)) as emulator:
        say(f"emulator on {emulator.url} (merge engine: {emulator.engine}); inputs: {source}")
        async with NovitaClient(api_key=emulator.api_key, base_url=emulator.url,
                                max_concurrency=args.concurrency,
                                retry=RetryPolicy(initial_wait=0.2, max_wait=2.0)) as client:
            code, _ = await run_batch_command(
                client, read_manifest(manifest), output_dir=folder / "results",
                ledger=folder / "ledger.jsonl", progress=False if args.no_progress else None,
                total=args.jobs,
            )
    sheet = await anyio.to_thread.run_sync(write_contact_sheet, folder, manifest, folder / "results")
    say(f"contact sheet (face | target | result): {sheet}")
    sys.stdout.write(f"{sheet}\n")
    return code
