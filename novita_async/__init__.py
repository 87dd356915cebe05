"""novita_async: an asyncio client for Novita's Merge Face API, built for bulk work.

Example:
    >>> import novita_async as na
    >>> async def main() -> None:  # doctest: +SKIP
    ...     async with na.NovitaClient() as client:
    ...         result = await client.merge_face("face.jpg", "photo.jpg", output="out.png")
"""

from novita_async._batch import BatchRun
from novita_async._client import NovitaClient
from novita_async._config import RetryPolicy, Timeout
from novita_async._errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ClientClosedError,
    ConfigurationError,
    DuplicateJobError,
    InsufficientBalanceError,
    InvalidImageError,
    InvalidResponseError,
    JobNotAttemptedError,
    LedgerInUseError,
    NoFaceDetectedError,
    NoFaceFoundBeforeError,
    NotFoundError,
    NovitaError,
    OutputError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    SourceChangedError,
)
from novita_async._jobs import JobResult, JobStatus, MergeJob
from novita_async._manifest import ManifestError, jobs_from_folders, read_manifest
from novita_async._pacing import Pacer, PacerProtocol
from novita_async._result import MergeFaceResult
from novita_async._shard import shard_jobs, shard_of
from novita_async._status import RunStatus, run_status
from novita_async._summary import BatchSummary
from novita_async._version import __version__

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BatchRun",
    "BatchSummary",
    "ClientClosedError",
    "ConfigurationError",
    "DuplicateJobError",
    "InsufficientBalanceError",
    "InvalidImageError",
    "InvalidResponseError",
    "JobNotAttemptedError",
    "JobResult",
    "JobStatus",
    "LedgerInUseError",
    "ManifestError",
    "MergeFaceResult",
    "MergeJob",
    "NoFaceDetectedError",
    "NoFaceFoundBeforeError",
    "NotFoundError",
    "NovitaClient",
    "NovitaError",
    "OutputError",
    "Pacer",
    "PacerProtocol",
    "PermissionDeniedError",
    "RateLimitError",
    "RetryPolicy",
    "RunStatus",
    "ServerError",
    "SourceChangedError",
    "Timeout",
    "__version__",
    "jobs_from_folders",
    "read_manifest",
    "run_status",
    "shard_jobs",
    "shard_of",
]
