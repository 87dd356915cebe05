"""Where a batch's jobs write: each job's id and output, each taken once per run.

A job's output is its own (``MergeJob.output``, under the output folder when
relative) or ``<output_dir>/<id>.<ext>``.  A run refuses a job that repeats an
earlier job's id or output (it would be done twice, or written over the other
job's result), an output that is the run's ledger, and an output whose name
does not say what it would hold (see :func:`~novita_async._jobs.output_name_problem`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

from novita_async._errors import ConfigurationError, DuplicateJobError, NovitaError
from novita_async._jobs import MergeJob, job_identity, output_extension, output_name_problem, type_of_output
from novita_async._output import NAME_MAX_BYTES, cut_to_bytes

__all__ = ["JobPlaces", "output_key"]


#: The longest extension a default output name gets (``.webp``).
_LONGEST_EXTENSION = len(".webp")
#: Bytes a cut id keeps, hash suffix included: the 200 characters an ASCII id
#: has always been cut to, which leave room for the longer name of the
#: temporary file written beside the result (``.<name>.~<host>-<pid>~<random>.part``).
_CUT_BYTES = 200
#: Hex digits of the full id's SHA-256 ending a cut name, so two long ids
#: that share their first ~180 bytes keep their own files.
_HASH_DIGITS = 16


def _safe_name(job_id: str) -> str:
    """The file name stem for ``job_id``: characters a file name cannot keep made ``_``, then cut (pure).

    An id whose name fits the file system keeps the name it has always had
    (earlier runs' results are found by it on resume: a renamed result would
    be paid for again).  A longer one, which no earlier run could write, is
    cut to :data:`_CUT_BYTES` bytes of UTF-8, ending ``~<hash>`` of the full
    id: ``~`` is never kept in an uncut name, so a cut name is no other id's.
    """
    stem = "".join(c if c.isalnum() or c in "-_.@+=" else "_" for c in job_id)[:200] or "job"
    if len(stem.encode("utf-8")) + _LONGEST_EXTENSION <= NAME_MAX_BYTES:
        return stem
    digest = hashlib.sha256(job_id.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_DIGITS]
    budget = _CUT_BYTES - len(digest) - 1
    return f"{cut_to_bytes(stem, budget)}~{digest}"


def output_key(job: MergeJob) -> str:
    """A name that two jobs writing one file share: the job's output without its extension (pure).

    The job's own output (as written, relative to the output folder), else its
    id as the default ``<id>.<ext>`` names it.  Shards split jobs by it, so two
    rows of one manifest that name one output land in one shard, which refuses
    the second (:class:`DuplicateJobError`) instead of two workers writing the
    file in turn.  ``job`` has its id.
    """
    if job.output is not None:
        stem = os.path.splitext(os.path.normpath(os.fspath(job.output)))[0]
    else:
        assert job.id is not None
        stem = _safe_name(job.id)
    return os.path.normcase(stem)


def _file_key(path: Path) -> str:
    # One spelling per file: "out/a.png" and "out/./a.png" are the same output.
    return os.path.normcase(os.path.abspath(path))


class JobPlaces:
    """The ids and outputs a run has given its jobs.

    Args:
        output_dir: The batch's output folder, or None (results in memory).
        ledger: The run's ledger file, which no job may write over.
        response_image_type: The batch's default result format.
    """

    def __init__(self, output_dir: Path | None, ledger: Path | None, response_image_type: str) -> None:
        self.output_dir = output_dir
        self._ledger_key = _file_key(ledger) if ledger is not None else None
        self.response_image_type = response_image_type
        # Every id and output path this run has taken (about 100 bytes each).
        self._seen_ids: set[str] = set()
        self._claimed_outputs: set[str] = set()

    def output_for(self, job: MergeJob) -> Path | None:
        """Where the job's result goes (None: in memory); ``job`` has its id."""
        if job.output is not None:
            path = Path(job.output)
            return self.output_dir / path if self.output_dir is not None and not path.is_absolute() else path
        if self.output_dir is None:
            return None
        assert job.id is not None
        ext = output_extension(job.response_image_type or self.response_image_type)
        return self.output_dir / f"{_safe_name(job.id)}.{ext}"

    def place(self, item: MergeJob, index: int) -> tuple[MergeJob, Path | None, NovitaError | None]:
        """The job with its id (and the format its output names), its output, and why it may not run (or None).

        A job that may run takes its id and output for the rest of the run.
        """
        job_id = job_identity(item, index)
        job = item.with_id(job_id)
        output = self.output_for(job)
        if output is None:
            return job, None, self._claim(job_id, None)
        if job.output is not None:
            if _file_key(output) == self._ledger_key:
                return job, output, ConfigurationError(
                    f"job {job_id!r} would write its result over the ledger {output}; give it another output")
            problem = output_name_problem(output, job.response_image_type)
            if problem is not None:
                return job, output, ConfigurationError(f"job {job_id!r}: {problem}")
            if job.response_image_type is None:
                # A result named x.jpg is a JPEG whatever the batch's default type.
                job = replace(job, response_image_type=type_of_output(output))
        return job, output, self._claim(job_id, output)

    def _claim(self, job_id: str, output: Path | None) -> DuplicateJobError | None:
        """Take the job's id and output for this run, or say which an earlier job has."""
        if job_id in self._seen_ids:
            return DuplicateJobError(
                f"job {job_id!r} repeats the id of an earlier job in this run, so it was not sent "
                "(the earlier job's result stands); give each job its own id", job_id=job_id)
        where = _file_key(output) if output is not None else None
        if where is not None and where in self._claimed_outputs:
            return DuplicateJobError(
                f"job {job_id!r} would write {output}, the output of an earlier job in this run, so it "
                "was not sent; give it its own output (ids that differ only in characters other than "
                "letters, digits and -_.@+= give the same file name)", job_id=job_id, output=str(output))
        self._seen_ids.add(job_id)
        if where is not None:
            self._claimed_outputs.add(where)
        return None
