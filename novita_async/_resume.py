"""What an earlier run of a batch settled, as its ledger says: the jobs not to send again.

A job is settled when its last ledger line is ``ok``, its output still
exists and neither input file has another size than when it was done
(skipped), or when the API found no face in it and neither input file has
changed since (failed at once with :class:`NoFaceFoundBeforeError`; the same
two files would get the same answer, and the request would still spend a turn
of the account's rate limit).  Settled jobs keep their ledger records: nothing
a later run does to them is written over them.

A done job whose input has another size now is new data at the same path (a
frame rewritten daily): its old result is not this input's, so it is sent
again.  Sizes only: a copy or a fresh checkout of the same files changes their
modification times, and must not send every job again.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from novita_async._errors import NoFaceFoundBeforeError
from novita_async._fileio import FileCalls, folder_of
from novita_async._jobs import JobResult, JobStatus, MergeJob
from novita_async._ledger import Ledger, input_fingerprint
from novita_async._summary import BatchSummary

__all__ = ["fingerprint_before_upload", "settled_before"]

logger = logging.getLogger("novita_async")


def settled_before(
    ledger: Ledger | None, job: MergeJob, output: Path | None, *, resend_no_face: bool,
    summary: BatchSummary | None = None,
) -> JobResult | None:
    """The result of a job an earlier run settled, else None (the job is to be sent).

    ``output`` is where the job's result goes; None when it is not known (a
    manifest row that cannot be read now): then a done job is taken as done.
    A done job whose inputs changed size is counted in ``summary.inputs_changed``.
    """
    if ledger is None or job.id is None:
        return None
    if ledger.is_done(job.id) and (output is None or output.exists()):
        changed = ledger.changed_input(job)
        if changed is None:
            return JobResult(job=job, status=JobStatus.SKIPPED, output=output)
        name, then, now = changed
        logger.info("job %s was done, but its %s %s is %d bytes now, %d then: not skipped",
                    job.id, name, getattr(job, name), now, then)
        if summary is not None:
            summary.inputs_changed += 1
    if resend_no_face:
        return None
    earlier = ledger.no_face_before(job)
    if earlier is None:
        return None
    not_again = NoFaceFoundBeforeError(
        status=400, reason="IMAGE_NO_FACE_DETECTED",
        message=f"not sent again, as neither input file has changed since ({earlier}); "
                "resend_no_face=True (--resend-no-face) sends it anyway")
    return JobResult(job=job, status=JobStatus.FAILED, error=not_again, output=output)


async def fingerprint_before_upload(files: FileCalls, job: MergeJob) -> list[list[int]] | None:
    """The job's :func:`input_fingerprint`, read where the client does its file calls for them.

    Taken before the upload: a file fixed while its request is in flight must
    not be recorded as the one that had no face.
    """
    paths = [value for value in (job.face_image, job.image) if isinstance(value, (str, os.PathLike))]
    if len(paths) != 2:
        return None
    folders = tuple(folder_of(path) for path in paths)
    return await files.run(folders, lambda: input_fingerprint(job))
