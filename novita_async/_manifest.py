"""Job streams from a manifest file (CSV or JSONL) or from two folders of images.

Both read lazily: rows become jobs one at a time as the batch asks for them.
A row that cannot become a job (a missing value, a bad type, unparseable
JSON) becomes a :class:`BadRow` that the batch reports with its row number,
and the other rows go on.  A manifest whose header lacks a required column
is refused whole, before any job runs.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from novita_async._config import RESPONSE_IMAGE_TYPES
from novita_async._errors import NovitaError
from novita_async._jobs import MergeJob, output_extension

__all__ = ["BadRow", "ManifestError", "jobs_from_folders", "read_manifest", "IMAGE_SUFFIXES"]

REQUIRED_COLUMNS = ("face_image", "image")
OPTIONAL_COLUMNS = ("output", "id", "response_image_type")
#: Files taken from folders for ``--faces/--images``.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})


class ManifestError(NovitaError, ValueError):
    """A manifest (or one of its rows) cannot be read.

    Attributes:
        row: 1-based row number (the header is row 1 in a CSV), or None for
            a problem with the whole manifest.
    """

    def __init__(self, message: str, *, row: int | None = None) -> None:
        super().__init__(message)
        self.row = row
        self.rule = "manifest"


@dataclass(frozen=True)
class BadRow:
    """A manifest row that could not become a job; the batch records it as failed."""

    id: str
    error: ManifestError


def _resolve(base: Path, value: str) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def _row_to_job(fields: dict[str, Any], row: int, base: Path, where: str) -> MergeJob | BadRow:
    def bad(message: str) -> BadRow:
        return BadRow(f"row-{row}", ManifestError(f"{where} row {row}: {message}", row=row))

    values: dict[str, str | None] = {}
    for name in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS):
        value = fields.get(name)
        if value is not None and not isinstance(value, str):
            return bad(f"{name} must be a string, got {type(value).__name__}")
        values[name] = value.strip() if isinstance(value, str) and value.strip() else None
    for name in REQUIRED_COLUMNS:
        if values[name] is None:
            return bad(f"{name} is empty; give the image's path")
    image_type = values["response_image_type"]
    if image_type is not None and image_type not in RESPONSE_IMAGE_TYPES:
        return bad(f"response_image_type {image_type!r} is not one of {', '.join(RESPONSE_IMAGE_TYPES)}")
    face, image = values["face_image"], values["image"]
    assert face is not None and image is not None
    output = values["output"]
    return MergeJob(
        face_image=_resolve(base, face),
        image=_resolve(base, image),
        # Outputs stay relative: the batch puts them under its output folder.
        output=output,
        id=values["id"],
        response_image_type=image_type,
    )


def _read_csv(path: Path) -> Iterator[MergeJob | BadRow]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ManifestError(f"{path}: the manifest is empty; it needs a header row "
                                f"'{','.join(REQUIRED_COLUMNS)}'") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ManifestError(
                f"{path}: the header lacks column(s) {', '.join(missing)}; it has "
                f"{', '.join(header) or 'nothing'}. Expected: face_image,image[,output][,id]"
                "[,response_image_type]"
            )
        for row_number, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue  # blank lines are not jobs
            if len(row) != len(header):
                yield BadRow(f"row-{row_number}", ManifestError(
                    f"{path} row {row_number}: {len(row)} fields, the header has {len(header)}",
                    row=row_number))
                continue
            yield _row_to_job(dict(zip(header, row)), row_number, path.parent, str(path))


def _read_jsonl(path: Path) -> Iterator[MergeJob | BadRow]:
    with path.open(encoding="utf-8") as handle:
        for row_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except ValueError as exc:
                yield BadRow(f"row-{row_number}", ManifestError(
                    f"{path} row {row_number}: not valid JSON ({exc.msg})", row=row_number))
                continue
            if not isinstance(fields, dict):
                yield BadRow(f"row-{row_number}", ManifestError(
                    f"{path} row {row_number}: expected a JSON object", row=row_number))
                continue
            yield _row_to_job(fields, row_number, path.parent, str(path))


def read_manifest(path: str | os.PathLike[str]) -> Iterator[MergeJob | BadRow]:
    """Jobs from a CSV (``.csv``) or JSONL (``.jsonl``/``.json``/``.ndjson``) manifest, lazily.

    Columns/keys: ``face_image``, ``image`` (required), ``output``, ``id``,
    ``response_image_type``. Relative paths resolve against the manifest's folder.

    Raises:
        ManifestError: the file is missing, empty, or its header lacks a column
            (raised on the first ``next()``; use :func:`check_manifest` to fail early).
    """
    manifest = Path(path)
    if not manifest.is_file():
        raise ManifestError(f"{manifest}: no such manifest file")
    if manifest.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        return _read_jsonl(manifest)
    return _read_csv(manifest)


def check_manifest(path: str | os.PathLike[str]) -> Iterator[MergeJob | BadRow]:
    """Like :func:`read_manifest`, but header problems raise now, not at the first job."""
    rows = read_manifest(path)
    first = next(rows, None)
    return rows if first is None else itertools.chain([first], rows)


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ManifestError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ManifestError(f"{folder}: no .png, .jpg, .jpeg or .webp files in it")
    return files


def jobs_from_folders(
    faces: str | os.PathLike[str], images: str | os.PathLike[str], *, pair: str = "zip",
    response_image_type: str = "png",
) -> Iterator[MergeJob]:
    """Jobs pairing two folders: ``zip`` (1st with 1st...) or ``product`` (every face on every image).

    Outputs are named ``{face}__{image}.{ext}`` and ids ``{face}__{image}``,
    so they are the same on every run.
    """
    face_files, image_files = _images_in(Path(faces)), _images_in(Path(images))
    if pair == "zip":
        pairs: Iterator[tuple[Path, Path]] = zip(face_files, image_files)
    elif pair == "product":
        pairs = itertools.product(face_files, image_files)
    else:
        raise ManifestError(f"--pair must be 'zip' or 'product', not {pair!r}")
    ext = output_extension(response_image_type)
    for face, image in pairs:
        name = f"{face.stem}__{image.stem}"
        yield MergeJob(str(face), str(image), output=f"{name}.{ext}", id=name)
