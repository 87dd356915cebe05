"""Job streams from a manifest file (CSV or JSONL) or from two folders of images.

Both read lazily: rows become jobs one at a time as the batch asks for them.
A row that cannot become a job (a missing value, a bad type, unparseable
JSON, an image file that is not there) becomes a :class:`BadRow` that the
batch reports as failed with its row number, and the other rows go on.  A
manifest that is missing, empty, or whose header lacks a required column is
refused whole, when it is opened, before any job runs; so is a CSV with a
header row but no rows under it.

Job ids are deterministic for a manifest: the row's ``id`` when it has one,
else a hash of the row's values as written (paths before they are resolved),
so the same manifest gives the same ids from any working directory.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from novita_async._config import RESPONSE_IMAGE_TYPES
from novita_async._errors import NovitaError
from novita_async._jobs import MergeJob, hash_id, output_extension, output_name_problem, type_of_output
from novita_async._ledger import is_ledger_record

__all__ = [
    "IMAGE_SUFFIXES",
    "BadRow",
    "ManifestError",
    "check_manifest",
    "jobs_from_folders",
    "read_manifest",
]

logger = logging.getLogger("novita_async")

REQUIRED_COLUMNS = ("face_image", "image")
OPTIONAL_COLUMNS = ("output", "id", "response_image_type")
#: Files taken from folders for ``--faces/--images``.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_EXPECTED = "face_image,image[,output][,id][,response_image_type]"


class ManifestError(NovitaError, ValueError):
    """A manifest (or one of its rows) cannot be read.

    Attributes:
        row: 1-based row number (the header is row 1 in a CSV, each line is a
            row in a JSONL file), or None for a problem with the whole manifest.
        rule: What is wrong: ``manifest`` (the whole file), ``missing_value``,
            ``field_count``, ``bad_json``, ``bad_value``, ``bad_type``, ``bad_output``,
            ``missing_file``, ``not_a_file`` (a folder where an image should be), or
            ``open_quote`` (a CSV quote never closed: the manifest stops being read there).
    """

    def __init__(self, message: str, *, row: int | None = None, rule: str = "manifest") -> None:
        super().__init__(message)
        self.row = row
        self.rule = rule


@dataclass(frozen=True)
class BadRow:
    """A manifest row that could not become a job; the batch records it as failed.

    Attributes:
        id: The job's id when the row names its images (so a fixed row later
            replaces this record in the ledger), else ``row-<n>``.
        error: What is wrong, with the row number.
    """

    id: str
    error: ManifestError


def _resolve(base: Path, value: str) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def _row_to_job(fields: dict[str, Any], row: int, base: Path, where: str) -> MergeJob | BadRow:
    job_id = f"row-{row}"

    def bad(message: str, rule: str) -> BadRow:
        return BadRow(job_id, ManifestError(f"{where} row {row}: {message}", row=row, rule=rule))

    values: dict[str, str | None] = {}
    for name in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS):
        value = fields.get(name)
        if value is not None and not isinstance(value, str):
            return bad(f"{name} must be a string, got {type(value).__name__}", "bad_value")
        values[name] = value.strip() if isinstance(value, str) and value.strip() else None
    for name in REQUIRED_COLUMNS:
        if values[name] is None:
            return bad(f"{name} is empty; give the image's path", "missing_value")
    face, image = values["face_image"], values["image"]
    assert face is not None and image is not None
    image_type = values["response_image_type"]
    # The id comes from the row as written: resolving the paths first would
    # make it depend on where the manifest was opened from.
    job_id = values["id"] or hash_id(face, image, values["output"], image_type)
    output = values["output"]
    if output is not None and (PurePath(output).is_absolute() or ".." in PurePath(output).parts):
        # A manifest may come from someone else: it names files inside the
        # output folder, never elsewhere on the machine.
        return bad(f"output {output!r} is outside the output folder; give a relative path "
                   "without '..'", "bad_output")
    if image_type is not None and image_type not in RESPONSE_IMAGE_TYPES:
        return bad(f"response_image_type {image_type!r} is not one of {', '.join(RESPONSE_IMAGE_TYPES)}",
                   "bad_type")
    if output is not None:
        problem = output_name_problem(output, image_type)
        if problem is not None:
            return bad(problem, "bad_output")
        image_type = image_type or type_of_output(output)  # over the batch's default type (--type)
    face_path, image_path = _resolve(base, face), _resolve(base, image)
    for name, value, path in (("face_image", face, face_path), ("image", image, image_path)):
        if os.path.isdir(path):  # it exists: "not found" would send the user looking in vain
            return bad(f"{name} {value!r} is a folder, not an image file ({path})", "not_a_file")
        if not os.path.isfile(path):
            return bad(f"{name} file {value!r} not found (looked for {path})", "missing_file")
    return MergeJob(
        face_image=face_path,
        image=image_path,
        # Outputs stay relative: the batch puts them under its output folder.
        output=values["output"],
        id=job_id,
        response_image_type=image_type,
    )


def _csv_header(path: Path) -> list[str]:
    """The header of a CSV manifest, checked, once a row follows it (reads up to its first row)."""
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        reader = csv.reader(handle)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ManifestError(f"{path}: the manifest is empty; it needs a header row "
                                f"'{','.join(REQUIRED_COLUMNS)}'") from None
        except csv.Error as exc:
            raise ManifestError(f"{path}: the header row cannot be read: {exc}") from None
        _check_columns(path, header)
        if not _has_a_row(reader):
            # As an empty file is: a run of nothing would pass for a run that did its work.
            raise ManifestError(f"{path}: the manifest is empty: it has a header row but no rows; "
                                "add a row per job under it")
    return header


def _has_a_row(reader: Iterator[list[str]]) -> bool:
    """Whether a CSV reader past the header has a row that is not blank (an unreadable one counts)."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return False
        except csv.Error:
            return True  # a bad row is a row: it is reported with its number
        if any(cell.strip() for cell in row):
            return True


def _check_columns(path: Path, header: list[str]) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ManifestError(
            f"{path}: the header lacks column(s) {', '.join(missing)}; it has "
            f"{', '.join(h for h in header if h) or 'nothing'}. Expected: {_EXPECTED}"
        )
    unknown = [c for c in header if c and c not in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)]
    if unknown:
        # Extra columns (notes, labels) are allowed, but a misspelt "output"
        # would silently drop every row's output name: say so once.
        logger.warning("%s: column(s) %s are not used (known columns: %s)", path, ", ".join(unknown),
                       ", ".join((*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)))


def _read_csv(path: Path, header: list[str]) -> Iterator[MergeJob | BadRow]:
    # surrogateescape: a row with bytes that are not UTF-8 still reads (its
    # paths then name the files as the file system spells them).
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        reader = csv.reader(handle)
        next(reader, None)  # the header, checked by _csv_header
        for row_number in itertools.count(2):
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield BadRow(f"row-{row_number}", ManifestError(
                    f"{path} row {row_number}: unreadable ({exc})", row=row_number, rule="bad_value"))
                continue
            if not any(cell.strip() for cell in row):
                continue  # blank lines are not jobs
            if any("\n" in cell or "\r" in cell for cell in row):
                # No path has a line break: a quote left open has read on into
                # the rows below it (to the end of the file, or to the next
                # quote).  Those rows cannot be told apart, so the manifest
                # stops here rather than pass them over in silence.
                raise ManifestError(
                    f"{path} row {row_number}: a quoted value runs over a line break, so a closing "
                    f'quote (") is missing; the rows after it cannot be read. Close the quote and '
                    "run again (rows done already are skipped)", row=row_number, rule="open_quote")
            if len(row) != len(header):
                yield BadRow(f"row-{row_number}", ManifestError(
                    f"{path} row {row_number}: {len(row)} fields, the header has {len(header)}",
                    row=row_number, rule="field_count"))
                continue
            yield _row_to_job(dict(zip(header, row, strict=True)), row_number, path.parent, str(path))


def _read_jsonl(path: Path) -> Iterator[MergeJob | BadRow]:
    # utf-8-sig: a byte-order mark (some Windows editors write one) is not row 1's JSON.
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as handle:
        for row_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except ValueError as exc:
                message = getattr(exc, "msg", str(exc))
                yield BadRow(f"row-{row_number}", ManifestError(
                    f"{path} row {row_number}: not valid JSON ({message})", row=row_number,
                    rule="bad_json"))
                continue
            if not isinstance(fields, dict):
                yield BadRow(f"row-{row_number}", ManifestError(
                    f"{path} row {row_number}: expected a JSON object with keys {_EXPECTED}",
                    row=row_number, rule="bad_json"))
                continue
            yield _row_to_job(fields, row_number, path.parent, str(path))


def read_manifest(path: str | os.PathLike[str]) -> Iterator[MergeJob | BadRow]:
    """Jobs from a CSV (``.csv``) or JSONL (``.jsonl``/``.json``/``.ndjson``) manifest, lazily.

    Columns/keys: ``face_image``, ``image`` (required), ``output``, ``id``,
    ``response_image_type``. Relative image paths resolve against the
    manifest's folder; ``output`` is a relative path inside the batch's output
    folder (an absolute one or one with ``..`` makes its row bad).  Rows are
    read as the batch asks for them; a bad row comes out as a :class:`BadRow`
    (failed, with its row number) and the others go on.

    Raises:
        ManifestError: now, if the file is missing, empty (a CSV with only its
            header row too), or its header lacks a required column.

    Example:
        >>> async for r in client.batch(read_manifest("jobs.csv"), output_dir="out"):  # doctest: +SKIP
        ...     print(r.job.id, r.status)
    """
    manifest = Path(path)
    if manifest.is_dir():
        raise ManifestError(f"{manifest} is a folder: give the manifest's .csv or .jsonl file")
    if not manifest.is_file():
        raise ManifestError(f"{manifest}: no such manifest file")
    try:
        if manifest.suffix.lower() in _JSONL_SUFFIXES:
            _check_jsonl_start(manifest)
            return _read_jsonl(manifest)
        header = _csv_header(manifest)
    except OSError as exc:
        raise ManifestError(f"{manifest}: cannot read it: {exc.strerror or exc}") from None
    return _read_csv(manifest, header)


def _check_jsonl_start(path: Path) -> None:
    """Refuse now a JSONL manifest that has no row, or is not JSON Lines at all (reads its first row).

    A whole JSON array, or a ledger, read row by row would fail every line as
    a bad job (and a run's own ledger, appended to as it is read, without end).
    """
    with path.open("rb") as handle:
        first = next((line.strip() for line in handle if line.strip()), None)
    if first is None:
        raise ManifestError(f"{path}: the manifest is empty; it needs one JSON object per line "
                            f"with keys {_EXPECTED}")
    first = first.removeprefix(b"\xef\xbb\xbf")
    try:
        fields = json.loads(first)
    except ValueError:
        if first.startswith(b"["):  # an array opened here, its items on the lines below
            raise ManifestError(f"{path}: the manifest is a JSON array over many lines; write it as "
                                f"JSON Lines, one object per line with keys {_EXPECTED}") from None
        return  # a bad row, reported with its number as the others go on
    if isinstance(fields, dict) and is_ledger_record(fields):
        raise ManifestError(f"{path}: this is a ledger (its lines have 'id' and 'status'), not a "
                            f"manifest: give the manifest the run read (keys {_EXPECTED}); a ledger "
                            "goes with --ledger")


def check_manifest(path: str | os.PathLike[str]) -> Iterator[MergeJob | BadRow]:
    """The same as :func:`read_manifest` (which now checks the header at once); kept for callers."""
    return read_manifest(path)


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ManifestError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ManifestError(f"{folder}: no .png, .jpg, .jpeg or .webp files in it")
    stems: dict[str, Path] = {}
    for file in files:
        other = stems.setdefault(file.stem, file)
        if other is not file:
            # Outputs are named after stems: two of them would write one file.
            raise ManifestError(f"{folder}: {other.name} and {file.name} have the same name; "
                                "output names would clash (rename one)")
    return files


def jobs_from_folders(
    faces: str | os.PathLike[str], images: str | os.PathLike[str], *, pair: str = "zip",
    response_image_type: str = "png",
) -> Iterator[MergeJob]:
    """Jobs pairing two folders: ``zip`` (1st with 1st...) or ``product`` (every face on every image).

    Files are taken in name order.  Outputs are named ``{face}__{image}.{ext}``
    and ids ``{face}__{image}`` (file names without extensions), so they are
    the same on every run.

    Raises:
        ManifestError: now, if a folder is missing or has no images, or ``pair``
            is not ``zip`` or ``product``.

    Example:
        >>> [j.id for j in jobs_from_folders("faces", "photos", pair="product")]  # doctest: +SKIP
        ['anna__beach', 'anna__city', 'ben__beach', 'ben__city']
    """
    if pair not in ("zip", "product"):
        raise ManifestError(f"pair must be 'zip' or 'product', not {pair!r}")
    if response_image_type not in RESPONSE_IMAGE_TYPES:
        raise ManifestError(f"response_image_type {response_image_type!r} is not one of "
                            f"{', '.join(RESPONSE_IMAGE_TYPES)}")
    face_files, image_files = _images_in(Path(faces)), _images_in(Path(images))
    if pair == "zip" and len(face_files) != len(image_files):
        logger.warning("zip pairing: %d faces and %d images; the last %d %s no partner",
                       len(face_files), len(image_files), abs(len(face_files) - len(image_files)),
                       "faces have" if len(face_files) > len(image_files) else "images have")
    return _FolderJobs(face_files, image_files, pair, output_extension(response_image_type))


class _FolderJobs(Iterator[MergeJob]):
    """The jobs pairing two folders' files, made as they are taken.

    ``len()`` is the number of jobs in all, known from the two listings, so a
    batch's progress bar has a total and an ETA.
    """

    def __init__(self, face_files: list[Path], image_files: list[Path], pair: str, ext: str) -> None:
        self._count = (min(len(face_files), len(image_files)) if pair == "zip"
                       else len(face_files) * len(image_files))
        pairs = (zip(face_files, image_files, strict=False) if pair == "zip"
                 else itertools.product(face_files, image_files))
        self._jobs = (_folder_job(face, image, ext) for face, image in pairs)

    def __len__(self) -> int:
        return self._count

    def __next__(self) -> MergeJob:
        return next(self._jobs)


def _folder_job(face: Path, image: Path, ext: str) -> MergeJob:
    name = f"{face.stem}__{image.stem}"
    return MergeJob(str(face), str(image), output=f"{name}.{ext}", id=name)
