"""The emulator's own limits: a byte budget for the bodies it holds, and a body read timeout."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import pytest

import novita_async as na
from novita_async.emulator import Emulator, EmulatorStats
from novita_async.emulator._budget import BodyBudget

from .batch_support import EmulatorFactory
from .conftest import FAST_RETRY, make_image, request_json

pytestmark = pytest.mark.anyio

FACE = make_image(seed=1)
TARGET = make_image(size=(96, 80), seed=2)
#: The body the client sends for FACE and TARGET (the emulator reserves its length).
BODY = json.dumps(request_json(FACE, TARGET)).encode()

#: Opens a raw connection that sends a request head and part of its body, then stalls.
OpenStalled = Callable[..., Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


# -- the budget on its own ------------------------------------------------------------


def test_a_free_budget_is_taken_without_waiting() -> None:
    """With room and nobody waiting, a reservation completes in one step: small bodies
    are not slowed down by the budget."""
    stats = EmulatorStats()
    budget = BodyBudget(100, stats)
    step = budget.acquire(60)
    with pytest.raises(StopIteration):
        step.send(None)
    assert (budget.held, stats.peak_body_bytes_held, stats.body_waits) == (60, 60, 0)


async def test_waiters_are_let_in_first_come_first_served() -> None:
    """A reservation that would fit queues behind an earlier one that does not, so a large
    body is not starved by small ones; both are let in when room is made."""
    stats = EmulatorStats()
    budget = BodyBudget(100, stats)
    await budget.acquire(60)
    order: list[int] = []

    async def take(size: int) -> None:
        await budget.acquire(size)
        order.append(size)

    async with anyio.create_task_group() as group:
        group.start_soon(take, 60)
        await anyio.sleep(0.01)
        group.start_soon(take, 10)  # fits now (60 + 10), but 60 waits first
        await anyio.sleep(0.01)
        assert order == [] and stats.body_waits == 2
        budget.release(60)
    assert order == [60, 10]
    assert budget.held == stats.body_bytes_held == 70
    assert stats.peak_body_bytes_held == 70


async def test_a_body_over_the_whole_budget_is_let_in_alone() -> None:
    """A reservation larger than the budget waits until nothing is held, then goes alone."""
    stats = EmulatorStats()
    budget = BodyBudget(100, stats)
    await budget.acquire(10)
    granted = asyncio.Event()

    async def take() -> None:
        await budget.acquire(250)
        granted.set()

    async with anyio.create_task_group() as group:
        group.start_soon(take)
        await anyio.sleep(0.01)
        assert not granted.is_set()
        budget.release(10)
    assert budget.held == stats.peak_body_bytes_held == 250


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    """A waiter whose request is cancelled (client gone) takes nothing, and those queued
    behind it that fit are let in at once."""
    stats = EmulatorStats()
    budget = BodyBudget(100, stats)
    await budget.acquire(60)
    let_in = asyncio.Event()

    async def small() -> None:
        await budget.acquire(10)
        let_in.set()

    async with anyio.create_task_group() as group:
        async with anyio.create_task_group() as doomed:
            doomed.start_soon(budget.acquire, 80)
            await anyio.sleep(0.01)
            group.start_soon(small)  # fits, but queues behind the 80
            await anyio.sleep(0.01)
            assert not let_in.is_set()
            doomed.cancel_scope.cancel()
        with anyio.fail_after(1):
            await let_in.wait()
    assert budget.held == 70
    budget.release(70)
    await budget.acquire(100)  # nothing is left queued
    assert budget.held == 100


async def test_bytes_granted_to_a_waiter_cancelled_before_it_ran_are_given_back() -> None:
    """If room is made and the waiter is cancelled before it resumes, its grant is released."""
    stats = EmulatorStats()
    budget = BodyBudget(100, stats)
    await budget.acquire(100)
    waiter = asyncio.ensure_future(budget.acquire(50))
    await asyncio.sleep(0.01)
    budget.release(100)  # grants the 50 at once...
    assert budget.held == 50
    waiter.cancel()  # ...to a task that is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert budget.held == stats.body_bytes_held == 0


# -- the budget in the emulator -------------------------------------------------------


def client_for(emu: Emulator) -> na.NovitaClient:
    """A real client for the emulator, with retries that do not sleep."""
    return na.NovitaClient(api_key=emu.api_key, base_url=emu.url, retry=FAST_RETRY)


async def merge_at_once(emu: Emulator, count: int) -> list[na.MergeFaceResult]:
    """``count`` concurrent merges of FACE into TARGET through one real client."""
    results: list[na.MergeFaceResult] = []
    async with client_for(emu) as client:

        async def one() -> None:
            results.append(await client.merge_face(FACE, TARGET))

        async with anyio.create_task_group() as group:
            for _ in range(count):
                group.start_soon(one)
    return results


@pytest.fixture
async def client_body(emulator: Emulator) -> int:
    """Bytes of the body the client sends for FACE and TARGET: what one call reserves."""
    await merge_at_once(emulator, 1)
    assert emulator.stats.body_bytes_held == 0
    return emulator.stats.peak_body_bytes_held


async def test_a_call_reserves_its_content_length(emulator: Emulator) -> None:
    """A request reserves exactly its Content-Length while it is handled, then gives it back."""
    host, port = emulator.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request_head(emulator, len(BODY)) + BODY)
    with anyio.fail_after(5):
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    writer.close()
    stats = await settled(emulator)
    assert (stats.peak_body_bytes_held, stats.body_bytes_held, stats.body_waits) == (len(BODY), 0, 0)


async def test_concurrent_bodies_stay_within_the_budget(
    emulator_factory: EmulatorFactory, client_body: int,
) -> None:
    """Six concurrent calls with room for two bodies: all succeed, never more than two bodies
    are held, and the others wait for room (unread) while in flight."""
    budget = int(2.5 * client_body)
    async with emulator_factory(max_body_bytes_held=budget, latency=0.05) as emu:
        results = await merge_at_once(emu, 6)
        stats = emu.stats
    assert len(results) == 6 and all(r.attempts == 1 for r in results)
    assert stats.peak_body_bytes_held <= budget
    assert stats.peak_body_bytes_held == 2 * client_body
    assert stats.peak_in_flight == 6 and stats.body_waits >= 4
    assert stats.body_bytes_held == 0 and stats.statuses == {200: 6}


async def test_bodies_over_the_whole_budget_are_served_one_at_a_time(
    emulator_factory: EmulatorFactory, client_body: int,
) -> None:
    """A budget smaller than one body does not deadlock: each is served alone."""
    async with emulator_factory(max_body_bytes_held=client_body // 2, latency=0.02) as emu:
        results = await merge_at_once(emu, 3)
        stats = emu.stats
    assert len(results) == 3
    assert stats.peak_body_bytes_held == client_body
    assert stats.body_waits >= 1 and stats.body_bytes_held == 0


async def test_the_budget_is_given_back_on_error_answers(emulator_factory: EmulatorFactory) -> None:
    """Refused requests (a wrong Content-Type, invalid JSON, no face, an injected fault)
    hold nothing afterwards."""
    async with emulator_factory(max_body_bytes_held=len(BODY)) as emu:
        host, port = emu.url.removeprefix("http://").rsplit(":", 1)
        for content_type, body in (("text/plain", BODY), ("application/json", b"{not json")):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(request_head(emu, len(body), content_type=content_type) + body)
            with anyio.fail_after(5):
                assert (await reader.readline()).startswith(b"HTTP/1.1 400")
            writer.close()
        assert emu.stats.body_bytes_held == 0
        assert emu.stats.statuses == {400: 2}


async def test_waiting_for_budget_does_not_count_against_the_read_timeout(
    emulator_factory: EmulatorFactory, client_body: int,
) -> None:
    """A request that waits for room longer than body_read_timeout is still served: the
    timeout counts from when its body starts being read."""
    async with emulator_factory(max_body_bytes_held=client_body, latency=0.3, body_read_timeout=0.1) as emu:
        results = await merge_at_once(emu, 2)
        stats = emu.stats
    assert [r.attempts for r in results] == [1, 1]
    assert (stats.body_waits, stats.body_read_timeouts, stats.peak_body_bytes_held) == (1, 0, client_body)


# -- stalled and vanished uploads -----------------------------------------------------


def request_head(emu: Emulator, length: int, *, key: str | None = None,
                 content_type: str = "application/json") -> bytes:
    """The head of a merge-face request announcing ``length`` body bytes."""
    return (f"POST /v3/merge-face HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Authorization: Bearer {key or emu.api_key}\r\nContent-Length: {length}\r\n\r\n").encode()


@pytest.fixture
async def stalled() -> AsyncIterator[OpenStalled]:
    """Open raw loopback connections that send a request head and part of its body, then stall."""
    writers: list[asyncio.StreamWriter] = []

    async def open_stalled(emu: Emulator, *, key: str | None = None, sent: int = 10,
                           length: int = 1000) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = emu.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writers.append(writer)
        writer.write(request_head(emu, length, key=key) + b"{" * sent)
        await writer.drain()
        return reader, writer

    yield open_stalled
    for writer in writers:
        writer.close()


async def closed_by_server(reader: asyncio.StreamReader, within: float = 5.0) -> bytes:
    """Whatever the server sent before it closed the connection (fails if it did not)."""
    received = b""
    with anyio.fail_after(within):
        try:
            while chunk := await reader.read(65536):
                received += chunk
        except ConnectionResetError:
            pass  # an abort with unread bytes is a reset: closed all the same
    return received


async def settled(emu: Emulator) -> EmulatorStats:
    """The emulator's stats once no request is in flight (waits briefly)."""
    for _ in range(200):
        if emu.stats.in_flight == 0:
            break
        await anyio.sleep(0.01)
    return emu.stats


async def test_a_stalled_body_is_dropped_and_its_budget_released(
    emulator_factory: EmulatorFactory, stalled: OpenStalled,
) -> None:
    """A client that sends part of its body and stalls is disconnected without an answer
    after body_read_timeout, and the bytes it reserved are given back."""
    async with emulator_factory(body_read_timeout=0.3) as emu:
        reader, _ = await stalled(emu, length=1000)
        assert await closed_by_server(reader) == b""
        stats = await settled(emu)
        assert stats.body_read_timeouts == 1
        assert stats.peak_body_bytes_held == 1000 and stats.body_bytes_held == 0
        assert stats.statuses == {}  # no answer was sent
        async with client_for(emu) as client:  # and the emulator serves on
            assert (await client.merge_face(FACE, TARGET)).attempts == 1


async def test_a_stalled_body_without_a_valid_key_is_dropped_too(
    emulator_factory: EmulatorFactory, stalled: OpenStalled,
) -> None:
    """The body of a refused key is read (and dropped) under the same timeout."""
    async with emulator_factory(body_read_timeout=0.3) as emu:
        reader, _ = await stalled(emu, key="sk_wrong")
        assert await closed_by_server(reader) == b""
        assert (await settled(emu)).body_read_timeouts == 1


async def test_a_waiting_request_is_served_once_a_stalled_one_is_dropped(
    emulator_factory: EmulatorFactory, stalled: OpenStalled, client_body: int,
) -> None:
    """A stalled upload holding the whole budget delays the next request only until the
    read timeout drops it; the wait for budget does not count against the waiter's timeout."""
    async with emulator_factory(max_body_bytes_held=client_body, body_read_timeout=0.3) as emu:
        reader, _ = await stalled(emu, length=client_body)
        await anyio.sleep(0.05)  # the stalled request holds the budget first
        async with client_for(emu) as client:
            with anyio.fail_after(5):
                result = await client.merge_face(FACE, TARGET)
        assert result.attempts == 1
        assert await closed_by_server(reader) == b""
        stats = await settled(emu)
        assert (stats.body_read_timeouts, stats.body_waits) == (1, 1)
        assert stats.peak_body_bytes_held == client_body and stats.body_bytes_held == 0


async def test_a_client_that_goes_away_gives_its_budget_back(
    emulator_factory: EmulatorFactory, stalled: OpenStalled,
) -> None:
    """Clients that disconnect mid-body, or while waiting for budget, hold nothing after."""
    async with emulator_factory(max_body_bytes_held=1500, body_read_timeout=30) as emu:
        _, reading = await stalled(emu, length=1000)
        await anyio.sleep(0.05)
        _, waiting = await stalled(emu, length=1000, sent=0)
        await anyio.sleep(0.05)
        assert (emu.stats.body_bytes_held, emu.stats.body_waits) == (1000, 1)
        waiting.close()
        await anyio.sleep(0.05)
        reading.close()
        stats = await settled(emu)
        assert stats.in_flight == 0 and stats.body_bytes_held == 0
        assert stats.body_read_timeouts == 0
        async with client_for(emu) as client:
            with anyio.fail_after(5):
                assert (await client.merge_face(FACE, TARGET)).attempts == 1
