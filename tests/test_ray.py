"""novita_async.ray: Ray Data actors against an emulator in another process.

Ray workers are processes of their own, so the emulator runs as a subprocess
on 127.0.0.1 (not in the test's loop) and is read over HTTP: its counters,
and the start time of every request it got, to measure the pace it saw.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import novita_async as na
from novita_async.emulator import DEFAULT_API_KEY, job_key

from .conftest import flat_image, make_image

pytestmark = [
    pytest.mark.ray,
    # Ray's own internals warn about Ray's own deprecated settings (seen with
    # Ray 2.60: DataContext copies itself field by field); not ours to fix.
    pytest.mark.filterwarnings(r"ignore::DeprecationWarning:ray\..*"),
]

ray = pytest.importorskip("ray", reason="needs the [ray] extra: pip install 'novita_async[ray]'")
pytest.importorskip("ray.data", reason="needs Ray Data: pip install 'novita_async[ray]'")

from novita_async import ray as na_ray  # noqa: E402 - only once Ray is known to be there
from novita_async._ray_pacer import _PaceKeeper  # noqa: E402

#: The emulator, plus a route with every request's start time (monotonic seconds).
_EMULATOR = """
import asyncio, json, sys
from aiohttp import web
from novita_async.emulator import Emulator, EmulatorConfig

async def main():
    emulator = Emulator(EmulatorConfig(**json.loads(sys.argv[1])))

    async def started_at(request):
        return web.json_response(list(emulator.stats.started_at))

    emulator.app.router.add_get("/_test/started_at", started_at)
    await emulator.start()
    print(emulator.url, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """One local Ray instance (2 CPUs) for the module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


class _Served:
    """An emulator subprocess and what it saw."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as answer:
            return json.loads(answer.read())

    def stats(self) -> dict[str, Any]:
        """The emulator's counters."""
        result: dict[str, Any] = self._get("/_emulator/stats")
        return result

    def started_at(self) -> list[float]:
        """Start times of every request, sorted (seconds)."""
        return sorted(self._get("/_test/started_at"))


@pytest.fixture
def serve() -> Iterator[Callable[..., _Served]]:
    """Start emulators as subprocesses on 127.0.0.1 (EmulatorConfig keywords); stop them after."""
    procs: list[subprocess.Popen[str]] = []

    def start(**config: Any) -> _Served:
        config.setdefault("engine", "composite")
        proc = subprocess.Popen([sys.executable, "-c", _EMULATOR, json.dumps(config)],
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        return _Served(url)

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def _pairs(count: int) -> list[tuple[bytes, bytes]]:
    """Distinct (face, image) pairs: each row is its own job to the emulator."""
    pairs = [(make_image(seed=i), make_image(color=(40, 160, 90), seed=i + 100)) for i in range(count)]
    assert len({job_key(f, i) for f, i in pairs}) == count
    return pairs


def test_every_row_is_processed_exactly_once(ray_cluster: None, serve: Callable[..., _Served]) -> None:
    """40 rows of bytes through 2 actors: 40 ok rows, and the emulator merged each pair once."""
    served = serve()
    pairs = _pairs(40)
    ds = ray.data.from_items([{"face_image": f, "image": i, "n": n} for n, (f, i) in enumerate(pairs)])
    rows = na_ray.merge_faces(ds, api_key=DEFAULT_API_KEY, base_url=served.url, concurrency=2,
                              max_concurrency=4, batch_size=8).take_all()
    assert sorted(row["n"] for row in rows) == list(range(40))
    assert {row["status"] for row in rows} == {"ok"}
    assert all(row["error"] is None and row["merged_image"].startswith(b"\x89PNG") for row in rows)
    stats = served.stats()
    assert stats["successes"] == {job_key(f, i): 1 for f, i in pairs}
    assert stats["requests"] == 40


def test_rpm_is_held_across_actors(
    ray_cluster: None, serve: Callable[..., _Served], tmp_path: Path
) -> None:
    """At 240/min over 2 actors x 4 slots, the emulator sees 4 starts a second in all, not 8."""
    served = serve()
    inputs = tmp_path / "in"
    inputs.mkdir()
    items = []
    for n, (face, image) in enumerate(_pairs(24)):
        (inputs / f"f{n}.png").write_bytes(face)
        (inputs / f"i{n}.png").write_bytes(image)
        items.append({"face_image": str(inputs / f"f{n}.png"), "image": str(inputs / f"i{n}.png")})
    rpm = 240.0
    out = na_ray.merge_faces(ray.data.from_items(items), api_key=DEFAULT_API_KEY, base_url=served.url,
                             requests_per_minute=rpm, concurrency=2, max_concurrency=4, batch_size=6,
                             output_dir=tmp_path / "out")
    rows = out.take_all()
    assert {row["status"] for row in rows} == {"ok"}
    assert all(Path(row["output_path"]).is_file() for row in rows)
    starts = served.started_at()
    assert len(starts) == 24
    rate = (len(starts) - 1) / (starts[-1] - starts[0])  # starts per second, over the run
    interval = 60.0 / rpm
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # Held: never faster than the account's pace (a little slack for the
    # jitter of two processes' clocks and loops), and not far below it.
    assert rate <= rpm / 60 * 1.05, (rate, gaps)
    assert rate >= rpm / 60 * 0.8, (rate, gaps)
    assert min(gaps) >= interval * 0.5, gaps


def test_a_429_slows_every_actor(ray_cluster: None, serve: Callable[..., _Served]) -> None:
    """No fixed pace, a 240/min server: every actor's 429s reach the one shared pacer, which slows."""
    served = serve(rate_limit_rpm=240, rate_limit_burst=2)
    pacer = na_ray.shared_pacer(api_key=DEFAULT_API_KEY, base_url=served.url)
    pairs = _pairs(20)
    ds = ray.data.from_items([{"face_image": f, "image": i} for f, i in pairs])
    rows = na_ray.merge_faces(ds, api_key=DEFAULT_API_KEY, base_url=served.url, concurrency=2,
                              max_concurrency=4, batch_size=6, pacer=pacer,
                              retry=na.RetryPolicy(max_attempts=8, initial_wait=0.2,
                                                   max_wait=1.0)).take_all()
    assert {row["status"] for row in rows} == {"ok"}
    stats = served.stats()
    limited = stats["statuses"].get("429", 0)
    shared = ray.get(pacer.stats.remote())
    # Every 429 any actor saw reached the shared pacer, which cut the one pace.
    assert shared["rate_limited"] == limited >= 1
    assert shared["requests_per_minute"] is not None
    assert shared["requests_per_minute"] <= 240 * 1.2
    assert limited <= 0.6 * stats["requests"], stats


def test_bad_rows_are_error_rows(ray_cluster: None, serve: Callable[..., _Served], tmp_path: Path) -> None:
    """A missing file and a faceless image are rows with an error; the other rows succeed."""
    served = serve()
    good = tmp_path / "good.png"
    good.write_bytes(make_image(seed=3))
    flat = tmp_path / "flat.png"
    flat.write_bytes(flat_image())
    items = [
        {"face_image": str(good), "image": str(good), "name": "good"},
        {"face_image": str(tmp_path / "missing.png"), "image": str(good), "name": "missing"},
        {"face_image": str(flat), "image": str(good), "name": "flat"},
        {"face_image": str(good), "image": str(tmp_path / "g2.png"), "name": "good2"},
    ]
    (tmp_path / "g2.png").write_bytes(make_image(seed=4))
    out = na_ray.merge_faces(ray.data.from_items(items), api_key=DEFAULT_API_KEY, base_url=served.url,
                             concurrency=1, batch_size=4)
    rows = {row["name"]: row for row in out.take_all()}
    assert rows["good"]["status"] == rows["good2"]["status"] == "ok"
    assert rows["missing"]["status"] == "failed"
    assert "missing.png" in rows["missing"]["error"]
    assert rows["missing"]["error_reason"].startswith("InvalidImageError")
    assert rows["flat"]["status"] == "failed"
    assert rows["flat"]["error_reason"] == "IMAGE_NO_FACE_DETECTED"
    assert rows["flat"]["merged_image"] is None


def test_options_are_checked_on_the_driver(ray_cluster: None) -> None:
    """A missing key or a reserved client option fails at the call, not inside the workers."""
    ds = ray.data.from_items([{"face_image": b"x", "image": b"y"}])
    with pytest.raises(na.ConfigurationError, match="API key"):
        na_ray.merge_faces(ds, base_url="http://127.0.0.1:9")
    with pytest.raises(na.ConfigurationError, match="session"):
        na_ray.merge_faces(ds, api_key="sk_x", base_url="http://127.0.0.1:9", session=None)


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Ray, the error says which extra to install."""
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"novita_async\[ray\]"):
        na_ray.shared_pacer(requests_per_minute=10)


def test_pace_keeper_spaces_and_shares_a_cool_down() -> None:
    """The shared pacer's state, without Ray: slots are spaced, and a 429 pushes every later one."""
    keeper = _PaceKeeper(requests_per_minute=600)  # one start every 0.1 s
    delays = [keeper.reserve()[0] for _ in range(3)]
    assert delays[0] == pytest.approx(0.0, abs=0.01)
    assert delays[2] == pytest.approx(0.2, abs=0.01)
    keeper.on_rate_limited(2.0)
    assert keeper.reserve()[0] >= 1.9
    assert keeper.stats()["rate_limited"] == 1


def test_pace_keeper_rebooks_slots_from_before_a_429() -> None:
    """A slot booked before a 429 is booked again after the cool-down; one booked since is kept."""
    keeper = _PaceKeeper(requests_per_minute=600)
    before = keeper.reserve().epoch
    assert keeper.rebook(before).delay == 0.0  # no 429 since: go
    keeper.on_rate_limited(2.0)
    again = keeper.rebook(before)
    assert again.delay >= 1.9 and again.epoch != before
    assert keeper.rebook(again.epoch).delay == 0.0


def test_pace_keeper_hands_out_slots_given_back() -> None:
    """Slots given back by cancelled callers go to the next bookings, earliest first, instead of new
    slots at the end of the schedule; not once a 429 has started the schedule again."""
    keeper = _PaceKeeper(requests_per_minute=60)  # one start a second
    bookings = [keeper.reserve() for _ in range(6)]  # starts 0 s, 1 s, ... 5 s from now
    for booking in reversed(bookings[1:]):
        keeper.give_back(booking)
    assert keeper.stats()["returned"] == 5
    taken = keeper.reserve()
    assert taken.start == bookings[1].start
    assert taken.delay == pytest.approx(1.0, abs=0.05)
    assert keeper.reserve().start == bookings[2].start
    keeper.on_rate_limited(None)
    assert keeper.stats()["returned"] == 0
    keeper.give_back(bookings[4])  # booked before the 429: its place in the schedule is gone
    assert keeper.stats()["returned"] == 0


def test_id_claims_keep_an_id_to_the_inputs_that_took_it_first() -> None:
    """The same id (or output) with other inputs is refused; with the same inputs it is the same job again."""
    claims = na_ray._IdClaims()
    assert claims.claim([("a", "inputs-1"), ("b", "inputs-2"), ("a", "inputs-3")]) == [True, True, False]
    assert claims.claim([("a", "inputs-1"), ("b", "inputs-9")]) == [True, False]


def test_cancelled_waiters_give_their_slots_back(ray_cluster: None, serve: Callable[..., _Served]) -> None:
    """Eight calls queued at 30/min on a shared pacer, broken off after the first: the next call starts
    in the first slot given back (2 s on), not behind the seven slots nobody uses (16 s on)."""
    served = serve()
    actor = na_ray.shared_pacer(requests_per_minute=30, name="test-give-back")
    face, image = _pairs(1)[0]

    async def run() -> float:
        async with na.NovitaClient(api_key=DEFAULT_API_KEY, base_url=served.url,
                                   pacer=na_ray.ActorPacer(actor, fixed=True), max_concurrency=8) as client:
            async with anyio.create_task_group() as group:
                for _ in range(8):
                    group.start_soon(client.merge_face, face, image)
                await anyio.sleep(0.5)  # the first has started, seven wait for their slots
                group.cancel_scope.cancel()
            started = time.monotonic()
            await client.merge_face(face, image)
            return time.monotonic() - started

    took = asyncio.run(run())
    assert took < 4.0, f"the next call waited {took:.1f} s behind slots given up"
    assert served.stats()["requests"] == 2
    ray.kill(actor)


def test_a_repeated_id_across_blocks_is_one_job(
    ray_cluster: None, serve: Callable[..., _Served], tmp_path: Path
) -> None:
    """Rows in separate blocks: an id (or output name) that a row with other inputs holds fails as a
    DuplicateJobError, unsent, so no file is written twice; rows alike in id and inputs are one job."""
    served = serve()
    (face, image), (_, other), (_, third) = _pairs(3)
    rows = [
        {"face_image": face, "image": image, "id": "same", "n": 0},
        {"face_image": face, "image": other, "id": "same", "n": 1},  # same id, other inputs
        {"face_image": face, "image": other, "id": "a/b", "n": 2},
        {"face_image": face, "image": third, "id": "a_b", "n": 3},  # another id, the same file name
        {"face_image": face, "image": third, "id": "twin", "n": 4},
        {"face_image": face, "image": third, "id": "twin", "n": 5},  # alike: the same job again
    ]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    out = na_ray.merge_faces(ds, api_key=DEFAULT_API_KEY, base_url=served.url, id_column="id",
                             output_dir=tmp_path / "out", batch_size=1, concurrency=2)
    results = {row["n"]: row for row in out.take_all()}
    for pair in ((0, 1), (2, 3)):
        statuses = sorted(results[n]["status"] for n in pair)
        assert statuses == ["failed", "ok"], [results[n] for n in pair]
        refused = next(results[n] for n in pair if results[n]["status"] == "failed")
        assert refused["error_reason"] == "DuplicateJobError"
        assert "give each row its own id" in refused["error"]
        assert refused["output_path"] is None
    assert results[4]["status"] == results[5]["status"] == "ok"
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["a_b.png", "same.png", "twin.png"]
    assert served.stats()["requests"] == 4  # one for each of the two clashes, two for the twins
