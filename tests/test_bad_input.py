"""The bad-input corpus end to end: each bad input refused clearly, before anything is sent.

The corpus is built by the tests (nothing is committed): empty and text files,
truncated PNG and JPEG, 4096x4096, over 30 MB, a decompression bomb, CMYK and
16-bit images, animated GIF and PNG, a directory, a missing path, an
unreadable file and a manifest with bad rows; plus valid inputs, an
EXIF-rotated JPEG among them, that must go through.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from PIL import Image

import novita_async as na
from novita_async.emulator import Emulator, EmulatorConfig

from .conftest import make_image
from .test_reliability import record_figures

pytestmark = pytest.mark.anyio

_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Bad:
    """A corpus entry: its path and the rule its error must name."""

    path: Path
    rule: str


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb(side: int = 20_000) -> bytes:
    """A complete, valid 1-bit PNG of side x side pixels (400 Mpx) in about 50 KB."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    block = row * 1000
    idat = b"".join(compressor.compress(block) for _ in range(side // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def exif_rotated_jpeg() -> bytes:
    """A valid JPEG stored landscape with EXIF orientation 6 (display rotated 90 degrees)."""
    image = Image.open(io.BytesIO(make_image((160, 120), fmt="JPEG")))
    exif = Image.Exif()
    exif[_ORIENTATION] = 6
    return _save(image, "JPEG", exif=exif.tobytes())


def build_corpus(folder: Path) -> tuple[dict[str, Path], dict[str, Bad]]:
    """Write the valid inputs and the bad ones; return (valid by name, bad by name)."""
    folder.mkdir(parents=True, exist_ok=True)

    def write(name: str, data: bytes) -> Path:
        path = folder / name
        path.write_bytes(data)
        return path

    valid = {
        "face": write("face.png", make_image((128, 128), seed=1)),
        "image": write("image.jpg", make_image((160, 128), fmt="JPEG", seed=2)),
        "exif_rotated": write("exif_rotated.jpg", exif_rotated_jpeg()),
    }
    png, jpeg = make_image((128, 128), seed=3), make_image((128, 128), fmt="JPEG", seed=4)
    over = write("over_30mb.jpg", jpeg)
    with over.open("r+b") as handle:
        handle.truncate(31 * 1024 * 1024)  # sparse: costs no disk
    (folder / "a_directory.png").mkdir()
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0))]
    bad = {
        "empty": Bad(write("empty.png", b""), "empty"),
        "text_named_png": Bad(write("notes.png", b"this is a text file, not a picture\n"), "format"),
        "truncated_png": Bad(write("truncated.png", png[: len(png) * 6 // 10]), "truncated"),
        "truncated_jpeg": Bad(write("truncated.jpg", jpeg[: len(jpeg) * 6 // 10]), "truncated"),
        "side_4096": Bad(write("side_4096.png", _save(Image.new("L", (4096, 4096), 90), "PNG",
                                                       compress_level=1)), "max_resolution"),
        "over_30mb": Bad(over, "max_size"),
        "decompression_bomb": Bad(write("bomb.png", decompression_bomb()), "max_resolution"),
        "cmyk": Bad(write("cmyk.jpg", _save(Image.new("CMYK", (64, 64), (0, 80, 160, 0)), "JPEG")),
                    "color_mode"),
        "sixteen_bit": Bad(write("sixteen_bit.png", _save(Image.new("I;16", (64, 64), 30000), "PNG")),
                           "color_mode"),
        "animated_gif": Bad(write("animated.gif", _save(frames[0], "GIF", save_all=True,
                                                        append_images=frames[1:])), "format"),
        "animated_png": Bad(write("animated.png", _save(frames[0], "PNG", save_all=True,
                                                        append_images=frames[1:])), "animated"),
        "directory": Bad(folder / "a_directory.png", "not_a_file"),
        "missing": Bad(folder / "missing.png", "not_found"),
    }
    return valid, bad


# -- through the Python API: typed errors --------------------------------------------


async def test_corpus_through_the_api_typed_errors_nothing_sent(tmp_path: Path) -> None:
    """Every bad input is an InvalidImageError naming the input and the rule; only valid jobs reach the server."""
    valid, bad = build_corpus(tmp_path / "corpus")
    # As root, permission bits do not stop reads: a path under a regular file is
    # one no user can read.
    bad["unreadable"] = Bad(bad["text_named_png"].path / "unreadable.png", "unreadable")
    jobs: list[na.MergeJob] = []
    for name, entry in bad.items():
        # Alternate the slot, so both input names are checked.
        as_face = len(jobs) % 2 == 0
        face, image = (entry.path, valid["image"]) if as_face else (valid["face"], entry.path)
        jobs.append(na.MergeJob(str(face), str(image), id=name))
    good = [
        na.MergeJob(str(valid["face"]), str(valid["image"]), id="ok"),
        na.MergeJob(str(valid["exif_rotated"]), str(valid["image"]), id="ok_exif_face"),
        na.MergeJob(str(valid["face"]), str(valid["exif_rotated"]), id="ok_exif_image"),
    ]
    jobs[3:3] = good[:1]  # valid jobs between the bad ones: the batch goes on
    jobs.extend(good[1:])
    async with Emulator(EmulatorConfig(engine="composite")) as emulator, na.NovitaClient(
        api_key=emulator.api_key, base_url=emulator.url, max_concurrency=4
    ) as client:
        results = {r.job.id: r async for r in client.batch(jobs, output_dir=tmp_path / "out", progress=False)}
        requests = emulator.stats.requests
    assert len(results) == len(jobs)
    for job in good:
        result = results[job.id]
        assert result.status == na.JobStatus.OK, result.error
        assert result.result is not None and result.result.to_pil().size[0] > 0
    assert requests == len(good)  # nothing that failed a local check was sent
    for index, (name, entry) in enumerate(bad.items()):
        error = results[name].error
        assert results[name].status == na.JobStatus.FAILED
        assert isinstance(error, na.InvalidImageError), (name, error)
        assert error.rule == entry.rule, (name, str(error))
        assert error.input_name == ("face_image" if index % 2 == 0 else "image")
        message = str(error)
        assert str(entry.path) in message and f"[rule {entry.rule}]" in message, message
        assert results[name].attempts == 0


async def test_exif_rotated_jpeg_is_accepted_as_it_is(tmp_path: Path) -> None:
    """An EXIF-rotated JPEG passes the checks and merges; its bytes are sent unchanged."""
    valid, _ = build_corpus(tmp_path / "corpus")
    async with Emulator(EmulatorConfig(engine="composite")) as emulator, na.NovitaClient(
        api_key=emulator.api_key, base_url=emulator.url
    ) as client:
        result = await client.merge_face(valid["exif_rotated"], valid["image"])
        seen = set(emulator.stats.successes)
    from novita_async.emulator import job_key

    assert job_key(valid["exif_rotated"].read_bytes(), valid["image"].read_bytes()) in seen
    assert result.attempts == 1 and result.to_pil().size == (160, 128)


# -- through the command line: the ledger, the messages, the exit code ------------------


def _drop_dac_prefix() -> list[str] | None:
    """A command prefix under which root cannot read a mode-000 file; [] when not root; None if impossible."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}", "--"]


async def test_corpus_through_the_cli_manifest(tmp_path: Path) -> None:
    """A manifest of the whole corpus and bad rows: each bad row a clear ledger line, the rest merged, exit 1."""
    _, bad = build_corpus(tmp_path / "corpus")
    prefix = _drop_dac_prefix()
    if prefix is not None:
        unreadable = tmp_path / "corpus" / "unreadable.png"
        unreadable.write_bytes(make_image(seed=5))
        unreadable.chmod(0)
        bad["unreadable"] = Bad(unreadable, "unreadable")
    folder = tmp_path / "corpus"
    rows = ["face_image,image,id,response_image_type"]
    for index, (name, entry) in enumerate(bad.items()):
        relative = entry.path.relative_to(folder)
        rows.append(f"{relative},image.jpg,{name}," if index % 2 == 0 else f"face.png,{relative},{name},")
        if index == 4:
            rows.append("face.png,image.jpg,ok,png")
    rows += [
        ",image.jpg,row_empty_face,",  # a required value left empty
        "face.png,image.jpg,row_extra_field,,surplus",  # one field too many
        "face.png,image.jpg,row_bad_type,gif",  # not a response type
        "exif_rotated.jpg,image.jpg,ok_exif_face,",
        "face.png,exif_rotated.jpg,ok_exif_image,webp",
    ]
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    async with Emulator(EmulatorConfig(engine="composite")) as emulator:
        command = [
            *(prefix or []), sys.executable, "-m", "novita_async", "batch", str(manifest), "-o", str(out),
            "--api-key", emulator.api_key, "--base-url", emulator.url, "--no-progress",
        ]
        done = await anyio.run_process(command, check=False)
        requests = emulator.stats.requests
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr  # some jobs failed; no crash, no usage error
    assert "Traceback" not in stderr
    assert requests == 3  # only the three valid jobs were sent
    ledger = {r["id"]: r for r in map(json.loads, (out / "ledger.jsonl").read_text().splitlines())}
    for name in ("ok", "ok_exif_face", "ok_exif_image"):
        assert ledger[name]["status"] == "ok"
        with Image.open(ledger[name]["output"]) as image:
            image.load()
    refused: Counter[str] = Counter()
    for name, entry in bad.items():
        record = ledger[name]
        assert record["status"] == "failed", record
        message = record["error_message"]
        assert os.path.basename(entry.path) in message, message  # names the input
        assert f"failed {name}: " in stderr  # and the user is told on the terminal
        rule = (record["error_reason"] or "").partition(":")[2]
        refused[rule] += 1
        if record["error_type"] == "InvalidImageError":
            assert rule == entry.rule and f"[rule {entry.rule}]" in message, record
        else:  # the manifest reader refuses a path that is not a file before the client sees it
            assert record["error_type"] == "ManifestError", record
            assert rule == {"not_found": "missing_file", "not_a_file": "not_a_file"}[entry.rule], record
            assert ("is a folder" if rule == "not_a_file" else "not found") in message, record
    bad_rows = ["face_image is empty", "5 fields, the header has 4", "response_image_type 'gif' is not one of"]
    for words in bad_rows:
        record = next(r for r in ledger.values() if words in (r["error_message"] or ""))
        assert record["status"] == "failed" and record["error_type"] == "ManifestError"
        assert " row " in record["error_message"], record  # names the row
        refused[f"manifest:{(record['error_reason'] or '').partition(':')[2]}"] += 1
    assert len(ledger) == len(bad) + len(bad_rows) + 3
    record_figures("bad_input", inputs_refused=sum(refused.values()), refused_by_rule=dict(refused),
                   valid_sent=requests, unreadable_checked=prefix is not None)
