"""Manifests (CSV, JSONL) and folder pairing: jobs, deterministic ids, and bad rows reported per row."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import novita_async as na
from novita_async._cli import main
from novita_async._manifest import BadRow, ManifestError
from novita_async.emulator import Emulator, EmulatorConfig

from .batch_support import ThreadedEmulator, write_csv, write_inputs
from .conftest import FAST_RETRY

pytestmark = pytest.mark.anyio


def jobs_of(path: Path) -> list[na.MergeJob | BadRow]:
    """Every row of a manifest."""
    return list(na.read_manifest(path))


def test_csv_rows_become_jobs_with_paths_resolved_against_the_manifest(tmp_path: Path) -> None:
    """Relative paths resolve against the manifest's folder; output stays relative; columns map to fields."""
    (face, image), = write_inputs(tmp_path / "in", 1)
    manifest = write_csv(tmp_path / "m.csv", ("image", "face_image", "output", "id", "response_image_type"),
                         [("in/photo000.png", str(face), "sub/r.webp", "", "webp")])
    [job] = jobs_of(manifest)
    assert isinstance(job, na.MergeJob)
    assert Path(str(job.image)) == image and Path(str(job.face_image)) == face
    assert job.output == "sub/r.webp" and job.response_image_type == "webp"
    assert job.id is not None and len(job.id) == 20


def test_jsonl_rows_become_jobs(tmp_path: Path) -> None:
    """JSONL takes the same keys; an explicit id is kept."""
    write_inputs(tmp_path / "in", 2)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"face_image": "in/face000.png", "image": "in/photo000.png", "id": "first"}\n'
        "\n"
        '{"face_image": "in/face001.png", "image": "in/photo001.png", "response_image_type": "jpeg"}\n'
    )
    first, second = jobs_of(manifest)
    assert isinstance(first, na.MergeJob) and isinstance(second, na.MergeJob)
    assert first.id == "first" and second.response_image_type == "jpeg"
    assert Path(str(second.image)) == tmp_path / "in" / "photo001.png"


def test_ids_are_deterministic_whatever_the_working_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same manifest gives the same ids read twice, relatively or absolutely, from any folder."""
    write_inputs(tmp_path / "data" / "in", 3)
    manifest = write_csv(tmp_path / "data" / "m.csv", ("face_image", "image"),
                         [(f"in/face{i:03d}.png", f"in/photo{i:03d}.png") for i in range(3)])
    ids = [job.id for job in jobs_of(manifest)]
    monkeypatch.chdir(tmp_path / "data")
    assert [job.id for job in jobs_of(Path("m.csv"))] == ids
    monkeypatch.chdir(tmp_path)
    assert [job.id for job in jobs_of(Path("data/m.csv"))] == ids
    assert len(set(ids)) == 3


def test_csv_quirks_are_read(tmp_path: Path) -> None:
    """A BOM, spaces around names, quoted commas and blank lines are all fine."""
    folder = tmp_path / "a, b"
    write_inputs(folder, 1)
    manifest = tmp_path / "m.csv"
    manifest.write_text('\ufeff face_image , image \n\n"a, b/face000.png","a, b/photo000.png"\n,\n',
                        encoding="utf-8")
    [job] = jobs_of(manifest)
    assert isinstance(job, na.MergeJob) and Path(str(job.face_image)).is_file()


@pytest.mark.parametrize(
    ("suffix", "text", "row", "rule", "says"),
    [
        pytest.param(".csv", "face_image,image\nin/face000.png,\n", 2, "missing_value", "image is empty",
                     id="csv-missing-value"),
        pytest.param(".csv", "face_image,image\nin/face000.png,in/photo000.png,extra\n", 2, "field_count",
                     "3 fields", id="csv-field-count"),
        pytest.param(".csv", "face_image,image,response_image_type\nin/face000.png,in/photo000.png,gif\n", 2,
                     "bad_type", "'gif'", id="csv-bad-type"),
        pytest.param(".csv", "face_image,image\nin/face000.png,in/nope.png\n", 2, "missing_file", "nope.png",
                     id="csv-missing-file"),
        pytest.param(".jsonl", '{"face_image": "in/face000.png", "image": \n', 1, "bad_json", "not valid JSON",
                     id="jsonl-bad-json"),
        pytest.param(".jsonl", '["in/face000.png", "in/photo000.png"]\n', 1, "bad_json", "JSON object",
                     id="jsonl-not-object"),
        pytest.param(".jsonl", '{"face_image": "in/face000.png", "image": 7}\n', 1, "bad_value", "string",
                     id="jsonl-bad-value"),
        pytest.param(".jsonl", '{"image": "in/photo000.png"}\n', 1, "missing_value", "face_image is empty",
                     id="jsonl-missing-key"),
        pytest.param(".csv", "face_image,image,output\nin/face000.png,in/photo000.png,../escape.png\n", 2,
                     "bad_output", "outside the output folder", id="csv-output-climbs-out"),
        pytest.param(".jsonl", '{"face_image": "in/face000.png", "image": "in/photo000.png", '
                     '"output": "/tmp/elsewhere.png"}\n', 1, "bad_output", "'/tmp/elsewhere.png'",
                     id="jsonl-output-absolute"),
    ],
)
def test_a_bad_row_becomes_a_bad_row_naming_its_number(
    tmp_path: Path, suffix: str, text: str, row: int, rule: str, says: str
) -> None:
    """Each kind of bad row is reported with its row number, and the rows after it still read."""
    write_inputs(tmp_path / "in", 2)
    if suffix == ".jsonl":
        good = '{"face_image": "in/face001.png", "image": "in/photo001.png"}\n'
    else:
        header = text.partition("\n")[0]
        good = ("in/face001.png,in/photo001.png" + ",png" * ("response_image_type" in header)
                + ",r.png" * ("output" in header) + "\n")
    manifest = tmp_path / f"m{suffix}"
    manifest.write_text(text + good)
    bad, after = jobs_of(manifest)
    assert isinstance(bad, BadRow) and isinstance(after, na.MergeJob)
    assert bad.error.row == row and bad.error.rule == rule
    assert f"row {row}:" in str(bad.error) and says in str(bad.error)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        pytest.param("face,image\na.png,b.png\n", "lacks column(s) face_image", id="missing-column"),
        pytest.param("", "empty", id="empty"),
    ],
)
def test_a_manifest_without_its_columns_is_refused_at_once(tmp_path: Path, text: str, says: str) -> None:
    """A header without a required column (or no header) raises ManifestError when opened, not mid-batch."""
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(ManifestError, match=r"lacks|empty") as info:
        na.read_manifest(manifest)
    assert says in str(info.value) and info.value.row is None


@pytest.mark.parametrize("text", ["", "\n  \n"], ids=["empty", "blank-lines"])
def test_an_empty_jsonl_manifest_is_refused_at_once(tmp_path: Path, text: str) -> None:
    """A JSONL manifest without a row is refused when opened, as an empty CSV is."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(text)
    with pytest.raises(ManifestError, match="the manifest is empty; it needs one JSON object per line"):
        na.read_manifest(manifest)


def test_a_missing_manifest_is_refused(tmp_path: Path) -> None:
    """No such file: ManifestError naming it; a folder is named as one."""
    with pytest.raises(ManifestError, match="no such manifest"):
        na.read_manifest(tmp_path / "nope.csv")
    with pytest.raises(ManifestError, match=r"is a folder: give the manifest's \.csv or \.jsonl file"):
        na.read_manifest(tmp_path)


def test_an_unused_column_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A column the manifest does not use (a misspelt "output") is named once in a warning."""
    write_inputs(tmp_path / "in", 1)
    manifest = write_csv(tmp_path / "m.csv", ("face_image", "image", "ouput"),
                         [("in/face000.png", "in/photo000.png", "r.png")])
    with caplog.at_level(logging.WARNING, logger="novita_async"):
        [job] = jobs_of(manifest)
    assert isinstance(job, na.MergeJob) and job.output is None
    assert [r.getMessage() for r in caplog.records] == [
        f"{manifest}: column(s) ouput are not used (known columns: face_image, image, output, id, "
        "response_image_type)"]


async def test_bad_rows_fail_alone_in_a_batch(emulator: Emulator, tmp_path: Path) -> None:
    """A batch over a manifest with bad rows reports each as failed with its row, and does the others."""
    write_inputs(tmp_path / "in", 4)
    manifest = write_csv(tmp_path / "m.csv", ("face_image", "image"), [
        ("in/face000.png", "in/photo000.png"),
        ("in/face001.png", ""),
        ("in/face002.png", "in/missing.png"),
        ("in/face003.png", "in/photo003.png"),
    ])
    async with na.NovitaClient(api_key=emulator.api_key, base_url=emulator.url, retry=FAST_RETRY) as client, \
            client.batch(na.read_manifest(manifest), output_dir=tmp_path / "out",
                         ledger=tmp_path / "out" / "ledger.jsonl", ordered=True, progress=False) as run:
        results = [r async for r in run]
    assert [r.status for r in results] == ["ok", "failed", "failed", "ok"]
    assert "row 3:" in str(results[1].error) and "row 4:" in str(results[2].error)
    assert run.summary.failed == {"ManifestError:missing_value": 1, "ManifestError:missing_file": 1}
    assert emulator.stats.requests == 2


@pytest.mark.parametrize(
    ("pair", "expected"),
    [
        pytest.param("zip", ["face000__photo000", "face001__photo001"], id="zip"),
        pytest.param("product", ["face000__photo000", "face000__photo001", "face001__photo000",
                                 "face001__photo001"], id="product"),
    ],
)
def test_folder_pairing_names_outputs_after_both_files(tmp_path: Path, pair: str, expected: list[str]) -> None:
    """zip pairs in name order, product takes every combination; outputs are {face}__{image}.{ext}."""
    write_inputs(tmp_path / "in", 2)
    faces, images = tmp_path / "faces", tmp_path / "images"
    faces.mkdir()
    images.mkdir()
    for index in range(2):
        (tmp_path / "in" / f"face{index:03d}.png").rename(faces / f"face{index:03d}.png")
        (tmp_path / "in" / f"photo{index:03d}.png").rename(images / f"photo{index:03d}.png")
    (faces / "notes.txt").write_text("not an image")
    stream = na.jobs_from_folders(faces, images, pair=pair, response_image_type="jpeg")
    assert len(stream) == len(expected)  # type: ignore[arg-type]  # known up front: a progress bar's total
    jobs = list(stream)
    assert [job.id for job in jobs] == expected
    assert [job.output for job in jobs] == [f"{name}.jpg" for name in expected]
    assert [Path(str(job.face_image)).parent for job in jobs] == [faces] * len(expected)


@pytest.mark.parametrize(
    ("setup", "says"),
    [
        pytest.param("missing", "not a folder", id="missing-folder"),
        pytest.param("empty", "no .png", id="no-images"),
        pytest.param("clash", "same name", id="stem-clash"),
        pytest.param("pair", "zip' or 'product", id="bad-pair"),
    ],
)
def test_folder_problems_are_refused_at_once(tmp_path: Path, setup: str, says: str) -> None:
    """A missing or empty folder, clashing names or a bad pairing raise ManifestError before any job."""
    faces = tmp_path / "faces"
    images = tmp_path / "images"
    write_inputs(images, 1)
    if setup != "missing":
        faces.mkdir()
    if setup in ("clash", "pair"):
        (faces / "a.png").write_bytes((images / "face000.png").read_bytes())
    if setup == "clash":
        (faces / "a.jpg").write_bytes(b"x")
    with pytest.raises(ManifestError, match=says):
        na.jobs_from_folders(faces, images, pair="diagonal" if setup == "pair" else "zip")


def test_zip_with_unequal_folders_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """zip over 3 faces and 1 image makes 1 job and says 2 faces have no partner."""
    pairs = write_inputs(tmp_path / "in", 3)
    for folder in ("faces", "images"):
        (tmp_path / folder).mkdir()
    for face, _ in pairs:
        face.rename(tmp_path / "faces" / face.name)
    pairs[0][1].rename(tmp_path / "images" / pairs[0][1].name)
    with caplog.at_level(logging.WARNING, logger="novita_async"):
        jobs = list(na.jobs_from_folders(tmp_path / "faces", tmp_path / "images"))
    assert [job.id for job in jobs] == ["face000__photo000"]
    assert "the last 2 faces have no partner" in caplog.text


@pytest.mark.parametrize("suffix", [pytest.param(".csv", id="csv"), pytest.param(".jsonl", id="jsonl")])
def test_manifest_rows_are_read_as_they_are_asked_for(tmp_path: Path, suffix: str) -> None:
    """Rows are streamed from the file, not loaded when it is opened: rows appended later are still read."""
    write_inputs(tmp_path / "in", 1)
    manifest = tmp_path / f"m{suffix}"
    row = ("in/face000.png,in/photo000.png\n" if suffix == ".csv"
           else '{"face_image": "in/face000.png", "image": "in/photo000.png"}\n')
    manifest.write_text(("face_image,image\n" if suffix == ".csv" else "") + row)
    rows = na.read_manifest(manifest)
    assert isinstance(next(rows), na.MergeJob)
    with manifest.open("a") as handle:
        handle.write(row * 5000)
    assert len(list(rows)) == 5000


@pytest.mark.parametrize("text", [
    pytest.param("face_image,image\n", id="header-only"),
    pytest.param("\ufeffface_image,image,output", id="header-without-newline"),
    pytest.param("face_image,image\n\n , \n\n", id="header-and-blank-rows"),
])
def test_a_csv_with_a_header_but_no_rows_is_refused_at_once(tmp_path: Path, text: str) -> None:
    """A CSV with its header row and nothing under it is empty, as an empty file is: refused when opened."""
    manifest = tmp_path / "m.csv"
    manifest.write_text(text, encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        na.read_manifest(manifest)
    assert str(info.value) == (f"{manifest}: the manifest is empty: it has a header row but no rows; "
                               "add a row per job under it")
    assert info.value.row is None and info.value.rule == "manifest"


def test_a_header_with_only_a_bad_row_is_not_empty(tmp_path: Path) -> None:
    """One row under the header, even a bad one, is a job: reported as a bad row, not as an empty manifest."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("face_image,image\n\nin/face000.png,\n")
    [bad] = jobs_of(manifest)
    assert isinstance(bad, BadRow) and bad.error.rule == "missing_value" and bad.error.row == 3


@pytest.mark.parametrize(("name", "text", "says"), [
    pytest.param("m.csv", "face_image,image\n", "it has a header row but no rows", id="csv-header-only"),
    pytest.param("m.csv", "", "it needs a header row", id="csv-empty"),
    pytest.param("m.jsonl", "\n \n", "it needs one JSON object per line", id="jsonl-blank-lines"),
])
def test_cli_refuses_an_empty_manifest_with_exit_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, says: str
) -> None:
    """`batch` over a manifest without a row: one line naming the file, exit 2; no output folder or ledger."""
    manifest = tmp_path / name
    manifest.write_text(text)
    out = tmp_path / "out"
    code = main(["batch", str(manifest), "-o", str(out), "--no-progress", "--base-url", "http://127.0.0.1:9",
                 "--api-key", "sk_test"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"novita-async: error: {manifest}: the manifest is empty") and says in err
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_cli_rerun_of_a_manifest_whose_rows_are_all_done_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every row done before is not an empty manifest: the re-run skips them all and exits 0."""
    pairs = write_inputs(tmp_path / "in", 2)
    manifest = write_csv(tmp_path / "in" / "m.csv", ("face_image", "image"), [(f.name, i.name) for f, i in pairs])
    with ThreadedEmulator(EmulatorConfig(engine="composite")) as emu:
        argv = ["batch", str(manifest), "-o", str(tmp_path / "out"), "--no-progress",
                "--base-url", emu.url, "--api-key", emu.api_key]
        assert main(argv) == 0
        capsys.readouterr()
        assert main(argv) == 0
        assert emu.stats.requests == 2
    assert "ok 0, failed 0, skipped 2 (resumed)" in capsys.readouterr().err


def test_an_unclosed_quote_stops_the_manifest_at_its_row(tmp_path: Path) -> None:
    """A quote never closed would read every row below it as one value: the rows before it
    come out, then the manifest stops with an error naming the row and the fix."""
    write_inputs(tmp_path / "in", 3)
    rows = ["face_image,image", "in/face000.png,in/photo000.png", '"in/face001.png,in/photo001.png',
            "in/face002.png,in/photo002.png"]
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(rows) + "\n")
    jobs = na.read_manifest(manifest)
    first = next(jobs)
    assert isinstance(first, na.MergeJob) and str(first.face_image).endswith("face000.png")
    with pytest.raises(na.ManifestError) as caught:
        next(jobs)
    assert (caught.value.row, caught.value.rule) == (3, "open_quote")
    assert "row 3: a quoted value runs over a line break" in str(caught.value)
    assert "Close the quote and run again" in str(caught.value)


def test_a_jsonl_manifest_may_start_with_a_byte_order_mark(tmp_path: Path) -> None:
    """A UTF-8 BOM (as some editors write) is not part of row 1, as in a CSV."""
    write_inputs(tmp_path / "in", 1)
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b'\xef\xbb\xbf{"face_image": "in/face000.png", "image": "in/photo000.png"}\n')
    [job] = jobs_of(manifest)
    assert isinstance(job, na.MergeJob) and str(job.image).endswith("photo000.png")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        pytest.param('[\n  {"face_image": "in/face000.png", "image": "in/photo000.png"}\n]\n',
                     "is a JSON array over many lines; write it as JSON Lines", id="json-array"),
        pytest.param('{"id":"abc","status":"ok","output":"out/abc.png"}\n',
                     "this is a ledger (its lines have 'id' and 'status'), not a manifest", id="a-ledger"),
    ],
)
def test_a_jsonl_file_that_is_not_json_lines_of_jobs_is_refused_whole(
    tmp_path: Path, text: str, says: str
) -> None:
    """A whole JSON array, or a run's ledger, is refused when opened, not failed line by line."""
    write_inputs(tmp_path / "in", 1)
    manifest = tmp_path / "m.json"
    manifest.write_text(text)
    with pytest.raises(na.ManifestError) as caught:
        na.read_manifest(manifest)
    assert says in str(caught.value) and caught.value.row is None
