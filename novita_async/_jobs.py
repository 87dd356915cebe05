"""Batch jobs and their results: MergeJob in, JobResult out."""

from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

from novita_async._config import RESPONSE_IMAGE_TYPES
from novita_async._errors import ConfigurationError

if TYPE_CHECKING:
    from novita_async._result import MergeFaceResult
    from novita_async._sources import ImageInput

__all__ = [
    "JobResult", "JobStatus", "MergeJob", "hash_id", "is_fatal", "job_identity", "output_extension",
    "output_name_problem", "type_of_output",
]

#: File extension for each response type.
_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def output_extension(image_type: str) -> str:
    """The file extension for a response image type (``jpeg`` -> ``jpg``)."""
    return _EXTENSIONS[image_type]


#: Result formats by an output file's extension.
_TYPE_OF_SUFFIX = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def type_of_output(path: str | os.PathLike[str]) -> str | None:
    """The response image type an output's extension names (``x.jpg`` -> ``jpeg``), or None."""
    return _TYPE_OF_SUFFIX.get(PurePath(path).suffix.lower())


def output_name_problem(output: str | os.PathLike[str], image_type: str | None) -> str | None:
    """Why a result of ``image_type`` (None: not chosen) cannot be named ``output``, or None.

    A file's content must be what its name says: a JPEG named ``.png``, or a
    result named ``.jsonl`` (over a ledger), misleads every program that
    opens it.  A name with no extension says nothing, and may hold any type.
    """
    if not PurePath(output).suffix:
        return None
    implied = type_of_output(output)
    if implied is None:
        return f"output {str(output)!r} is not an image file name; end it in .png, .jpg, .jpeg or .webp"
    if image_type is not None and image_type != implied:
        return f"output {str(output)!r} names a {implied} file but response_image_type is {image_type}; make them agree"
    return None


@dataclass(frozen=True)
class MergeJob:
    """One merge in a batch.

    Args:
        face_image: The face to put in (path, bytes, file object or PIL image).
        image: The picture that receives it.
        output: Where to write the result, a ``str`` or ``os.PathLike`` path;
            relative paths go under the batch's ``output_dir``. None:
            ``<output_dir>/<id>.<ext>``, or in memory when the batch has no
            ``output_dir``.
        id: A stable id (a ``str``) for the ledger and resume; derived from
            the inputs when None (see :func:`job_identity`).
        response_image_type: Overrides the batch's type for this job.

    Raises:
        ConfigurationError: ``id`` is not a str, ``output`` is not a non-empty
            str or ``os.PathLike`` (bytes are not taken), or
            ``response_image_type`` is not png, webp or jpeg.

    Example:
        >>> MergeJob("faces/a.jpg", "photos/b.jpg", id="a-b").id
        'a-b'
    """

    face_image: ImageInput
    image: ImageInput
    output: str | os.PathLike[str] | None = None
    id: str | None = None
    response_image_type: str | None = None

    def __post_init__(self) -> None:
        # Checked here, where the caller made the job: found out in the batch,
        # a wrong id or output would fail far from its cause.
        _check_id(self.id)
        _check_job_output(self.output)
        if self.response_image_type is not None and self.response_image_type not in RESPONSE_IMAGE_TYPES:
            raise ConfigurationError(
                f"MergeJob response_image_type {self.response_image_type!r} is not one of "
                f"{', '.join(RESPONSE_IMAGE_TYPES)}; pass one of them (lower case), or None for the batch's"
            )

    def with_id(self, job_id: str) -> MergeJob:
        """A copy with ``id`` set."""
        return replace(self, id=job_id)


def _shown(value: object) -> str:
    """A wrong value for a message: its type and the start of its repr."""
    return f"{type(value).__name__} {value!r:.40}"


def _check_id(job_id: object) -> None:
    """Refuse a MergeJob id that is not a str: it names the ledger line and the output file."""
    if job_id is not None and not isinstance(job_id, str):
        raise ConfigurationError(
            f"MergeJob id must be a str, got {_shown(job_id)}; pass id=str(...), or None for one "
            "derived from the inputs"
        )


def _check_job_output(output: object) -> None:
    """Refuse a MergeJob output that is not a file path (bytes, a number, an empty string)."""
    if output is None:
        return
    path = os.fspath(output) if isinstance(output, (str, os.PathLike)) else None
    if not isinstance(path, str) or not path:
        raise ConfigurationError(
            f"MergeJob output must be the path of the result file (a non-empty str or os.PathLike), "
            f"got {_shown(output)}; pass output=None for <output_dir>/<id>.<ext>"
        )


def _describe_for_id(value: object) -> str | None:
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value) if isinstance(os.fspath(value), str) else None
    return None


def job_identity(job: MergeJob, index: int) -> str:
    """A deterministic id for a job: its own, else a hash of its paths, else its position.

    Path-based ids survive rows being inserted or reordered in a manifest;
    jobs with in-memory inputs fall back to ``job-<index>`` (stable as long
    as the job stream is).
    """
    if job.id:
        return job.id
    face, image = _describe_for_id(job.face_image), _describe_for_id(job.image)
    if face is None or image is None:
        return f"job-{index}"
    output = os.fspath(job.output) if job.output is not None else None
    return hash_id(face, image, str(output) if output is not None else None, job.response_image_type)


def hash_id(face: str, image: str, output: str | None, response_image_type: str | None) -> str:
    """A job id from its paths, output and type as written: 20 hex digits of SHA-256 (pure)."""
    key = "\0".join((face, image, output or "", response_image_type or ""))
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:20]


class JobStatus:
    """The end states of a job in a batch (plain strings, as in the ledger)."""

    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"
    NOT_ATTEMPTED = "not_attempted"


@dataclass(frozen=True)
class JobResult:
    """How one job of a batch ended.

    Attributes:
        job: The job, with its ``id`` filled in.
        status: ``"ok"``, ``"failed"``, ``"skipped"`` (done in an earlier run,
            found in the ledger) or ``"not_attempted"`` (the batch stopped first).
        result: The merge result when ``status == "ok"``.
        error: The error when the job failed or was not attempted.
        output: Where the result is (or would have been) written.
        attempts: Attempts made (0 when none).
        elapsed: Seconds spent on this job.
    """

    job: MergeJob
    status: str
    result: MergeFaceResult | None = None
    error: BaseException | None = None
    output: Path | None = None
    attempts: int = 0
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        """True for a job that is done (now, or in an earlier run)."""
        return self.status in (JobStatus.OK, JobStatus.SKIPPED)

    @property
    def error_reason(self) -> str | None:
        """The API's reason for a failure, else the error's class name."""
        if self.error is None:
            return None
        reason = getattr(self.error, "reason", None)
        if isinstance(reason, str) and reason:
            return reason
        rule = getattr(self.error, "rule", None)
        if isinstance(rule, str) and rule:
            return f"{type(self.error).__name__}:{rule}"
        return type(self.error).__name__


def is_fatal(error: BaseException) -> bool:
    """Errors after which every later job would fail too: stop the batch.

    A wrong key or base URL (404), an empty balance, a closed client, and a
    results disk that is full or read-only: sending more jobs would only pay
    for results that cannot be kept, or fail the same way.
    """
    from novita_async._errors import (
        AuthenticationError,
        ClientClosedError,
        InsufficientBalanceError,
        NotFoundError,
        OutputError,
        PermissionDeniedError,
    )

    if isinstance(error, OutputError):
        cause = error.__cause__
        return isinstance(cause, OSError) and cause.errno in _DISK_FULL_OR_READ_ONLY
    return isinstance(error, (AuthenticationError, PermissionDeniedError, InsufficientBalanceError,
                              ClientClosedError, NotFoundError))


#: errno values of a write that fails for every file on that disk.
_DISK_FULL_OR_READ_ONLY = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


