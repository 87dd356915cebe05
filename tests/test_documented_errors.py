"""Errors the API documents that the emulator sends on demand, through the real client:
504 from a gateway, 403 BILLING_AUTH_FAILED and API_NOT_ALLOWED, 400 INVALID_IMAGE_SIZE."""

from __future__ import annotations

import pytest

import novita_async as na
from novita_async._jobs import is_fatal
from novita_async.emulator import Faults, job_key

from .batch_support import PATIENT_RETRY, EmulatorFactory, client_for, collect, memory_jobs
from .conftest import FAST_RETRY, make_image

pytestmark = pytest.mark.anyio

FACE = make_image(seed=1)
TARGET = make_image(size=(96, 80), seed=2)


#: The 403s that say a valid key may not do this: every later job would fail too.
FORBIDDEN = [
    pytest.param("billing_auth_failed", "BILLING_AUTH_FAILED", id="billing-auth-failed"),
    pytest.param("api_not_allowed", "API_NOT_ALLOWED", id="api-not-allowed"),
]


# -- one call ---------------------------------------------------------------------------


async def test_a_504_html_page_is_retried_and_the_job_succeeds(emulator_factory: EmulatorFactory) -> None:
    """Two gateway timeouts with a proxy's HTML page, then success: three attempts, one result."""
    faults = Faults(fail_first=2, fail_first_kind="504_html")
    async with emulator_factory(faults=faults) as emu, client_for(emu) as client:
        result = await client.merge_face(FACE, TARGET)
    assert (result.attempts, emu.stats.requests, emu.stats.faults) == (3, 3, {"504_html": 2})
    assert result.data is not None


async def test_504s_that_never_end_surface_as_a_server_error(emulator_factory: EmulatorFactory) -> None:
    """Out of attempts, the 504 surfaces as a ServerError that says the body was HTML."""
    faults = Faults(fail_first=99, fail_first_kind="504_html")
    async with emulator_factory(faults=faults) as emu, client_for(emu) as client:
        with pytest.raises(na.ServerError) as info:
            await client.merge_face(FACE, TARGET)
    error = info.value
    assert (error.status, error.reason, error.retryable) == (504, None, True)
    assert "HTML" in error.message and error.body.startswith(b"<html>")
    assert error.attempts == emu.stats.requests == FAST_RETRY.max_attempts


@pytest.mark.parametrize(("kind", "reason"), FORBIDDEN)
async def test_a_forbidden_403_is_a_permission_error_sent_once(
    emulator_factory: EmulatorFactory, kind: str, reason: str,
) -> None:
    """BILLING_AUTH_FAILED and API_NOT_ALLOWED raise PermissionDeniedError (not an
    authentication error: the key is valid) with the reason kept, and are not retried."""
    faults = Faults(fail_first=99, fail_first_kind=kind)
    async with emulator_factory(faults=faults) as emu, client_for(emu) as client:
        with pytest.raises(na.PermissionDeniedError) as info:
            await client.merge_face(FACE, TARGET)
    error = info.value
    assert not isinstance(error, na.AuthenticationError)
    assert (error.status, error.reason, error.retryable, error.attempts) == (403, reason, False, 1)
    assert error.message  # the API's human text, not a summary of the body
    assert emu.stats.requests == 1 and emu.stats.attempts[job_key(FACE, TARGET)] == 1
    assert is_fatal(error)


async def test_invalid_image_size_is_a_bad_request_sent_once(emulator_factory: EmulatorFactory) -> None:
    """400 INVALID_IMAGE_SIZE is a BadRequestError with its reason, not retried, and only
    the job's own failure (it does not stop a batch)."""
    faults = Faults(fail_first=99, fail_first_kind="invalid_image_size")
    async with emulator_factory(faults=faults) as emu, client_for(emu) as client:
        with pytest.raises(na.BadRequestError) as info:
            await client.merge_face(FACE, TARGET)
    error = info.value
    assert (error.status, error.reason, error.retryable, error.attempts) == (400, "INVALID_IMAGE_SIZE", False, 1)
    assert emu.stats.requests == 1
    assert not is_fatal(error)


# -- in a batch -------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "reason"), FORBIDDEN)
async def test_a_forbidden_403_stops_a_batch_early(
    emulator_factory: EmulatorFactory, kind: str, reason: str,
) -> None:
    """The first 403 stops the batch: jobs in flight end failed with the reason, the rest
    are recorded not_attempted with the 403 as their cause, and none is retried."""
    concurrency, count = 4, 30
    async with emulator_factory(faults=Faults(rates={kind: 1.0}), latency=0.02) as emu:
        async with client_for(emu, max_concurrency=concurrency) as client:
            run = client.batch(memory_jobs(count), progress=False)
            results = await collect(run)
        requests = emu.stats.requests
    failed = [r for r in results if r.status == "failed"]
    not_attempted = [r for r in results if r.status == "not_attempted"]
    assert len(results) == count and len(failed) + len(not_attempted) == count
    assert 1 <= len(failed) <= concurrency
    assert all(isinstance(r.error, na.PermissionDeniedError) and r.attempts == 1 for r in failed)
    assert {r.error_reason for r in failed} == {reason}
    assert run.summary.stop_reason is not None and "PermissionDeniedError" in run.summary.stop_reason
    assert run.summary.failed == {reason: len(failed)}
    for result in not_attempted:
        assert isinstance(result.error, na.JobNotAttemptedError)
        assert isinstance(result.error.cause, na.PermissionDeniedError)
        assert result.attempts == 0
    assert requests == len(failed) <= concurrency


async def test_invalid_image_size_fails_its_jobs_only(emulator_factory: EmulatorFactory) -> None:
    """INVALID_IMAGE_SIZE on some jobs fails those jobs, once each; the batch runs to the end."""
    count = 24
    faults = Faults(rates={"invalid_image_size": 0.3}, seed=11)
    async with emulator_factory(faults=faults) as emu:
        async with client_for(emu, max_concurrency=4) as client:
            run = client.batch(memory_jobs(count), progress=False)
            results = await collect(run)
        stats = emu.stats
    failed = [r for r in results if r.status == "failed"]
    assert 0 < len(failed) < count, "the seed gives a mix of failures and successes"
    assert sum(r.ok for r in results) == count - len(failed)
    assert {r.error_reason for r in failed} == {"INVALID_IMAGE_SIZE"}
    assert all(isinstance(r.error, na.BadRequestError) and r.attempts == 1 for r in failed)
    assert run.summary.stop_reason is None and run.summary.not_attempted == 0
    assert stats.requests == count  # nothing retried
    assert stats.faults == {"invalid_image_size": len(failed)}


async def test_a_batch_through_504s_ends_ok(emulator_factory: EmulatorFactory) -> None:
    """Gateway timeouts on a third of attempts: every job ends ok, by retrying."""
    count = 20
    async with emulator_factory(faults=Faults(rates={"504_html": 0.3}, seed=5)) as emu:
        async with client_for(emu, max_concurrency=4, retry=PATIENT_RETRY) as client:
            results = await collect(client.batch(memory_jobs(count), progress=False))
        stats = emu.stats
    assert [r.status for r in results].count("ok") == count
    assert stats.faults["504_html"] > 0
    assert sum(r.attempts for r in results) == stats.requests == count + stats.faults["504_html"]
