"""The benchmark report: how it judges issue 5's targets and explains a miss.

These check the harness's arithmetic on rows of known values (no run is
timed here: the measurements themselves live in ``python -m benchmarks``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks._measure import FloorModel
from benchmarks._notes import findings
from benchmarks._report import Report
from benchmarks._rows import GridRow

#: Per-byte costs of the order this project's VM measured (seconds per byte).
FLOOR = FloorModel(codec="pybase64", encode=36e-12, decode=42e-12, send=201e-12, recv=78e-12,
                   read=27e-12, write=364e-12)
MEDIUM_IN, MEDIUM_OUT = 4_000_000, 2_000_000
RESULTS_JSON = Path(__file__).parent.parent / "benchmarks" / "results.json"


def machine(cores: int = 2) -> dict[str, str]:
    return {"cpu": "test CPU", "cores": str(cores), "ram": "1 GiB", "os": "test", "python": "3",
            "packages": "none", "codec": "pybase64"}


def make_report(*rows: GridRow, cores: int = 2) -> Report:
    report = Report(mode="quick", command="python -m benchmarks", latency=0.2, floor=FLOOR,
                    machine_info=machine(cores))
    report.grid.extend(rows)
    return report


def row(size: str, concurrency: int, client: str, *, rate: float, cpu: float,
        handling: float = 0.005, emulator_cpu: float = 0.001,
        sizes: tuple[int, int] = (MEDIUM_IN, MEDIUM_OUT)) -> GridRow:
    """A finished run of 100 jobs at ``rate`` jobs/s spending ``cpu`` seconds per job."""
    jobs = 100
    return GridRow(size, concurrency, client, jobs, sizes[0], ok=jobs, elapsed=jobs / rate,
                   settled_rate=rate, cpu_seconds=cpu * jobs, baseline_rss=40_000_000,
                   peak_rss=50_000_000, handling=handling, emulator_cpu=emulator_cpu,
                   output_bytes=sizes[1], output_sha1="same")


def small_c64(*, ours: float) -> Report:
    """Small images at C=64: novita_async at ``ours`` jobs/s with the emulator at 13 ms a
    request; the official SDK's run, the cell's least loaded, at 4 ms."""
    return make_report(
        row("small", 64, "novita_async", rate=ours, cpu=0.001, handling=0.013),
        row("small", 64, "official", rate=284.7, cpu=0.003, handling=0.004),
    )


def target(report: Report, name: str, where: str) -> tuple[str, bool | None]:
    found = [(t.value, t.passed) for t in report.targets() if t.name == name and where in t.where]
    assert len(found) == 1, report.targets()
    return found[0]


@pytest.mark.parametrize(("rate", "own", "passed"), [(37.2, "97.2%", True), (36.0, "94.1%", False)])
def test_efficiency_is_judged_against_the_emulator_time_of_the_runs_own(
    rate: float, own: str, passed: bool
) -> None:
    """Issue 5: ideal = C / (latency + the handling time the emulator measured in the run)."""
    report = make_report(
        row("small", 8, "novita_async", rate=rate, cpu=0.001, handling=0.009),
        row("small", 8, "naive", rate=38.0, cpu=0.001, handling=0.004),
    )
    assert report.ideal("small", 8, handling=0.009) == pytest.approx(8 / 0.209)
    shared = rate / (8 / 0.204)  # the cell's least loaded emulator: the naive run's 4 ms
    assert target(report, "efficiency vs ideal", "small, C=8") == (
        f"{own} ({shared:.1%} vs the cell's least loaded emulator)", passed)


def test_a_cell_left_out_of_the_run_is_reported_not_run() -> None:
    """A partial run (``--sizes medium``) names the latency-bound cells it skipped, plainly."""
    report = make_report(row("medium", 8, "novita_async", rate=34.0, cpu=0.004))
    small = [t for t in report.targets() if t.where.startswith("small, C=")]
    assert [(t.where, t.value, t.passed) for t in small] == [
        ("small, C=8", "not run", None), ("small, C=64", "not run", None)]
    assert target(report, "efficiency vs ideal", "medium, C=8")[1] is not None


def test_the_grid_table_compares_the_peers_against_one_ideal_per_cell() -> None:
    """The table's ideal and eff. columns use the least handling any peer's run saw."""
    report = small_c64(ours=297.5)
    assert report.ideal("small", 64) == pytest.approx(64 / 0.204)
    lines = report.grid_table().splitlines()
    ours = next(line for line in lines if "| novita_async |" in line)
    official = next(line for line in lines if "| official |" in line)
    assert "| 313.7 (latency) | 95% |" in ours
    assert "| 313.7 (latency) | 91% |" in official


def test_a_missed_efficiency_names_the_emulator_time_it_was_judged_on() -> None:
    report = small_c64(ours=280.0)
    value, passed = target(report, "efficiency vs ideal", "small, C=64")
    assert passed is False and value.startswith(f"{280.0 / (64 / 0.213):.1%} (")
    assert ("(the emulator measured 13 ms per request in novita_async's run)"
            in findings(report))


def test_the_cpu_target_counts_base64_and_loopback_bytes_only() -> None:
    """Floor = encode the inputs + decode the result + send + receive, per byte."""
    report = make_report(row("medium", 32, "novita_async", rate=60, cpu=0.005, emulator_cpu=0.05))
    request, response = 4 * ((MEDIUM_IN + 2) // 3), 4 * ((MEDIUM_OUT + 2) // 3)
    floor = 36e-12 * MEDIUM_IN + 42e-12 * response + 201e-12 * request + 78e-12 * response
    assert report.floor("medium", 32) == pytest.approx(floor)
    assert report.floor_with_files("medium", 32) == pytest.approx(
        floor + 27e-12 * MEDIUM_IN + 364e-12 * MEDIUM_OUT)
    assert report.bound("medium", 32) == "CPU"
    assert target(report, "CPU per job vs floor", "medium, C=32") == (
        f"{0.005 / floor:.2f}x", False)


def test_a_missed_cpu_target_is_explained_with_the_file_work_bound() -> None:
    """The notes say how far floor plus file work alone already is from the goal."""
    report = make_report(
        row("medium", 32, "novita_async", rate=60, cpu=0.005, emulator_cpu=0.05),
        row("medium", 32, "naive", rate=50, cpu=0.02, emulator_cpu=0.05),
    )
    floor, with_files = report.floor("medium", 32), report.floor_with_files("medium", 32)
    assert floor is not None and with_files is not None
    text = findings(report)
    assert "**Missed: CPU per job vs floor** (medium, C=32)" in text
    assert f"{with_files / floor:.2f}x the floor for medium images" in text
    over = with_files - 1.5 * floor
    assert over > 0  # these sizes: file work alone exceeds the 1.5x budget
    assert f"({over * 1e3:.2f} ms per job over)" in text
    assert f"novita_async is at {0.005 / with_files:.1f}-{0.005 / with_files:.1f}x" in text


def test_the_cpu_target_passes_within_one_and_a_half_floors() -> None:
    report = make_report(row("medium", 32, "novita_async", rate=60, cpu=0.0, emulator_cpu=0.05))
    floor = report.floor("medium", 32)
    assert floor is not None
    report.grid[0].cpu_seconds = 1.4 * floor * report.grid[0].jobs
    assert target(report, "CPU per job vs floor", "medium, C=32") == ("1.40x", True)
    assert "Missed" not in findings(report)


def test_the_bound_uses_the_cores_of_the_machine_that_measured() -> None:
    """A re-render on a bigger machine must not turn a CPU-bound cell latency-bound."""
    rows = (row("medium", 32, "novita_async", rate=60, cpu=0.005, emulator_cpu=0.01),)
    # At the ideal (156 jobs/s) the cell needs 156 x 15 ms = 2.3 cores.
    assert make_report(*rows, cores=2).bound("medium", 32) == "CPU"
    assert make_report(*rows, cores=8).bound("medium", 32) == "latency"


def test_the_worst_cell_against_the_naive_client_is_reported() -> None:
    report = make_report(
        row("small", 8, "novita_async", rate=38.0, cpu=0.0017),
        row("small", 8, "naive", rate=38.5, cpu=0.0012),
        row("small", 32, "novita_async", rate=150.0, cpu=0.0016),
        row("small", 32, "naive", rate=100.0, cpu=0.0012),
    )
    value, passed = target(report, "throughput vs naive, everywhere", "small, C=8")
    assert (value, passed) == (f"{38.0 / 38.5:.2f}x", True)
    report.grid[0].settled_rate = 30.0
    value, passed = target(report, "throughput vs naive, everywhere", "small, C=8")
    assert passed is False
    assert "novita_async 1.70 against the naive client's 1.20 ms of CPU per job" in findings(report)


def test_the_committed_results_re_render_to_the_targets_they_recorded() -> None:
    """RESULTS.md can be rebuilt from results.json on any machine, with the same verdicts."""
    data = json.loads(RESULTS_JSON.read_text())
    report = Report.from_json(data)
    recorded = [(t["name"], t["where"], t["value"], t["passed"]) for t in data["targets"]]
    assert [(t.name, t.where, t.value, t.passed) for t in report.targets()] == recorded
    markdown = report.markdown()
    for name, where, value, passed in recorded:
        verdict = {True: "PASS", False: "MISS", None: "not run"}[passed]
        row = next(line for line in markdown.splitlines()
                   if line.startswith(f"| {name} | {where} | {value} |"))
        assert row.endswith(f"| {verdict} |")


def with_exchange(report: Report, *, cpu: float, size: str = "medium", concurrency: int = 32) -> GridRow:
    """Add the cell's exchange-alone run, at ``cpu`` seconds per job."""
    reference = row(size, concurrency, "exchange", rate=60, cpu=cpu, emulator_cpu=0.05)
    reference.output_bytes = reference.output_sha1 = None  # it writes nothing
    report.references.append(reference)
    return reference


def test_the_exchange_reference_is_kept_apart_from_the_peers() -> None:
    """The reference neither joins a cell's peers nor moves its bound; it is judged beside novita_async."""
    report = make_report(row("medium", 32, "novita_async", rate=60, cpu=0.005, emulator_cpu=0.05))
    bound_before = report.bound("medium", 32)
    with_exchange(report, cpu=0.0001)  # far cheaper than any peer: it would change the bound if counted
    assert set(report.rows("medium", 32)) == {"novita_async"}
    assert report.bound("medium", 32) == bound_before
    parts = FLOOR.floor(MEDIUM_IN, MEDIUM_OUT)
    assert report.exchange_bound("medium", 32) == pytest.approx(
        0.0001 + parts.encode + parts.decode + parts.files)
    table = report.exchange_table()
    assert f"| medium | 32 | 0.10 | {parts.total * 1e3:.2f} | {0.0001 / parts.total:.2f}x |" in table
    assert table.rstrip().endswith(f"| 5.00 | {0.005 / (0.0001 + parts.encode + parts.decode + parts.files):.2f}x |")
    again = Report.from_json(json.loads(json.dumps(report.as_json())))
    assert again.exchange_table() == table
    assert "## CPU reference: the exchange alone" in again.markdown()


def test_a_missed_cpu_target_cites_the_exchange_alone() -> None:
    """The notes say where the exchange alone is past the goal, and where it did not bound novita_async."""
    report = make_report(row("medium", 32, "novita_async", rate=60, cpu=0.005, emulator_cpu=0.05))
    floor = report.floor("medium", 32)
    assert floor is not None
    with_exchange(report, cpu=2.0 * floor)
    text = findings(report)
    assert "cost 2.00-2.00x the floor in these cells, past the goal by itself in 1 of 1 (medium, C=32)." in text
    assert "not a strict bound" not in text
    report.references[0].cpu_seconds = 0.006 * report.references[0].jobs  # more than novita_async's whole job
    assert "in medium, C=32 novita_async's whole job cost less than the exchange" in findings(report)


def test_no_reference_no_section() -> None:
    report = make_report(row("medium", 32, "novita_async", rate=60, cpu=0.005, emulator_cpu=0.05))
    assert "## CPU reference" not in report.markdown()
    assert "exchange alone" not in findings(report)


@pytest.mark.anyio
async def test_the_exchange_reference_moves_every_job_through_the_emulator(tmp_path: Path) -> None:
    """The reference run sends whole bodies the emulator accepts and takes every answer."""
    from benchmarks._clients import GridSpec, run_exchange
    from benchmarks._images import make_pair
    from novita_async.emulator import Emulator, EmulatorConfig

    pair = make_pair("small", tmp_path)
    async with Emulator(EmulatorConfig(engine="composite")) as emulator:
        spec = GridSpec(url=emulator.url, api_key=emulator.api_key, face=str(pair.face),
                        image=str(pair.image), concurrency=3, jobs=7, out_dir=str(tmp_path / "out"))
        outcome = await run_exchange(spec)
        assert (outcome.ok, outcome.failed, outcome.errors) == (7, 0, [])
        assert emulator.stats.requests == 7
        assert sum(emulator.stats.successes.values()) == 7
        assert emulator.stats.chunked_requests == 0
