"""A job's output file name and its content agree, and no result is written over the ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import novita_async as na
from novita_async._manifest import BadRow
from novita_async.emulator import Emulator

from .batch_support import client_for, collect, ledger_lines, write_csv, write_inputs

pytestmark = pytest.mark.anyio


def _rows(tmp_path: Path, outputs: list[tuple[str, str]]) -> Path:
    pairs = write_inputs(tmp_path / "in", len(outputs))
    return write_csv(tmp_path / "in" / "m.csv", ("face_image", "image", "output", "response_image_type"),
                     [(f.name, i.name, out, kind) for (f, i), (out, kind) in zip(pairs, outputs, strict=True)])


def test_a_manifest_output_that_is_no_image_name_or_contradicts_its_type_is_a_bad_row(tmp_path: Path) -> None:
    """`ledger.jsonl` (a result written over the ledger) and `x.jpg` typed png are refused, naming
    the row and the fix; `y.jpg` with no type is a jpeg job, whatever the batch's default."""
    manifest = _rows(tmp_path, [("ledger.jsonl", ""), ("x.jpg", "png"), ("y.jpg", ""), ("plain", "webp")])
    rows = list(na.read_manifest(manifest))
    assert isinstance(rows[0], BadRow) and isinstance(rows[1], BadRow)
    assert "row 2" in str(rows[0].error) and "not an image file name" in str(rows[0].error)
    assert rows[0].error.rule == "bad_output"
    assert "names a jpeg file but response_image_type is png" in str(rows[1].error)
    assert isinstance(rows[2], na.MergeJob) and rows[2].response_image_type == "jpeg"
    assert isinstance(rows[3], na.MergeJob) and rows[3].response_image_type == "webp"


async def test_batch_results_are_what_their_names_say_and_the_ledger_stays_a_ledger(
    emulator: Emulator, tmp_path: Path
) -> None:
    """Through the batch: the bad rows fail alone, y.jpg holds a JPEG although the batch's default
    is png, and the ledger keeps one JSON line per job."""
    manifest = _rows(tmp_path, [("ledger.jsonl", ""), ("x.jpg", "png"), ("y.jpg", "")])
    out = tmp_path / "out"
    async with client_for(emulator) as client:
        results = await collect(client.batch(na.read_manifest(manifest), output_dir=out,
                                             ledger=out / "ledger.jsonl", progress=False))
    assert sorted(r.status for r in results) == ["failed", "failed", "ok"]
    with Image.open(out / "y.jpg") as image:
        assert image.format == "JPEG"
    lines = ledger_lines(out / "ledger.jsonl")
    assert len(lines) == 3 and all(isinstance(line, dict) for line in lines)
    assert emulator.stats.requests == 1


async def test_a_library_job_is_refused_its_output_over_the_ledger_and_typed_by_its_name(
    emulator: Emulator, tmp_path: Path
) -> None:
    """MergeJob objects get the same rules: the ledger is not an output; a.webp is a WebP."""
    (face, image), = write_inputs(tmp_path / "in", 1)
    out = tmp_path / "out"
    ledger = out / "ledger.jsonl"
    jobs = [na.MergeJob(face, image, output="ledger.jsonl", id="over"),
            na.MergeJob(face, image, output="a.webp", id="webp"),
            na.MergeJob(face, image, output="b.png", id="clash", response_image_type="jpeg")]
    async with client_for(emulator) as client:
        results = {r.job.id: r for r in await collect(client.batch(jobs, output_dir=out, ledger=ledger,
                                                                   progress=False))}
    assert isinstance(results["over"].error, na.ConfigurationError)
    assert "over the ledger" in str(results["over"].error)
    assert isinstance(results["clash"].error, na.ConfigurationError)
    assert results["webp"].ok
    with Image.open(out / "a.webp") as result:
        assert result.format == "WEBP"
    assert sorted(json.loads(line)["id"] for line in ledger.read_text().splitlines()) == ["clash", "over", "webp"]
