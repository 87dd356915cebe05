"""The chart: throughput and peak RSS growth by concurrency, one panel per image size."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks._clients import CLIENTS

if TYPE_CHECKING:
    from benchmarks._report import Report

__all__ = ["draw"]

MB = 1e6
RSS_LIMIT_MB = 100.0
RSS_SIZE = "large"  # the size class the memory target is about


def draw(report: Report, path: Path) -> None:
    """Throughput (top) and peak RSS growth (bottom) by concurrency, one panel per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")

    sizes = [s for s in ("small", "medium", "large") if any(r.size == s for r in report.grid)]
    if not sizes:
        return
    colors = {"official": "#d62728", "naive": "#ff7f0e", "novita_async": "#1f77b4"}
    labels = {"official": "novita-client 0.7.1 (official SDK, threads)",
              "naive": "naive aiohttp + gather", "novita_async": "novita_async (defaults)"}
    figure, axes = plt.subplots(2, len(sizes), figsize=(5.2 * len(sizes), 8.4),
                                squeeze=False)
    for column, size in enumerate(sizes):
        cells = [c for s, c in report.cells() if s == size]
        top, bottom = axes[0][column], axes[1][column]
        top.plot(cells, [report.ideal(size, c) for c in cells], "k--", lw=1,
                 label="ideal: C / (latency + emulator time)")
        for c in cells:
            if report.bound(size, c) == "CPU":
                top.annotate("CPU-bound", (c, report.ideal(size, c)), fontsize=7,
                             color="grey", textcoords="offset points", xytext=(3, 5))
        for client in CLIENTS:
            rows = [report.rows(size, c).get(client) for c in cells]
            points = [(c, r) for c, r in zip(cells, rows, strict=True) if r is not None and r.valid]
            if not points:
                continue
            xs = [c for c, _ in points]
            top.plot(xs, [r.throughput for _, r in points], "o-", color=colors[client],
                     label=labels[client])
            bottom.plot(xs, [max(r.growth / MB, 0.5) for _, r in points], "o-",
                        color=colors[client], label=labels[client])
        size_mb = {"small": "~100 KB", "medium": "~2 MB", "large": "~20 MB"}[size]
        top.set_title(f"{size} images ({size_mb} each)")
        top.set_ylabel("throughput, jobs/s")
        top.set_ylim(bottom=0, top=max(report.ideal(size, c) for c in cells) * 1.12)
        bottom.set_ylabel("peak RSS growth over idle, MB (log)")
        bottom.set_yscale("log")
        if size == RSS_SIZE:
            bottom.axhline(RSS_LIMIT_MB, color="grey", lw=0.8, ls=":")
            bottom.text(cells[0], RSS_LIMIT_MB * 1.15, "100 MB target", color="grey",
                        fontsize=8)
        bottom.yaxis.set_major_formatter(plain)
        bottom.yaxis.set_minor_formatter(NullFormatter())
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(cells)
            ax.set_xticklabels([str(c) for c in cells])
            ax.set_xlabel("concurrency (requests in flight)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="upper left")
    figure.suptitle(
        f"Merge Face clients vs the local emulator (latency {report.latency:g} s), "
        f"{report.machine['cores']} cores, {report.machine['cpu']}, {report.date}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
