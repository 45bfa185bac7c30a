"""Tables and plots of evaluation results: one run's table, and a side-by-side comparison of runs.

The comparison is laid out as the paper's results table (docs/spec.md section 8): one row per run, one column
per benchmark with avg@k and its 95% bootstrap interval, and the mean over the benchmarks every run
has. The intervals matter: on 30 problems one problem is 3.3 points.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from sgsd.errors import DataError
from sgsd.evaluation.runner import RESULTS_FILE, BenchmarkResult
from sgsd.storage import JSONObject, atomic_write_bytes, decode_utf8, parse_json


@dataclass(frozen=True)
class EvalRun:
    label: str
    path: Path
    settings: JSONObject
    benchmarks: dict[str, BenchmarkResult]


def load_run(path: str | Path, label: str | None = None) -> EvalRun:
    """Read an evaluation output directory (or its results.json)."""
    path = Path(path)
    file = path / RESULTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"evaluation {path}: no {RESULTS_FILE} (is it an `sgsd eval` output directory?)")
    try:
        obj = parse_json(decode_utf8(file.read_bytes(), str(file)), f"evaluation {file}")
        benchmarks = {name: BenchmarkResult.from_json(name, r) for name, r in obj["benchmarks"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DataError(f"evaluation {file}: malformed results ({type(err).__name__}: {err})") from err
    run_dir = file.parent
    return EvalRun(label or run_dir.name, run_dir, obj.get("settings", {}), benchmarks)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
             for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_results(results: dict[str, BenchmarkResult]) -> str:
    """One run: a row per benchmark (percentages; CI = 95% bootstrap interval of avg@k over problems;
    strict avg@k grades the last box, flexible also takes a stated answer or the last number)."""
    rows = [[name, str(r.num_problems), str(r.k), _pct(r.avg_at_k), f"[{_pct(r.avg_ci[0])}, {_pct(r.avg_ci[1])}]",
             *_flexible_cells(r), _pct(r.pass_at_k), _pct(r.maj_at_k), _pct(r.format_failure_rate),
             f"{r.mean_length:.0f}"]
            for name, r in results.items()]
    return _table(["benchmark", "n", "k", "avg@k", "CI", "flexible avg@k", "flexible CI", "pass@k", "maj@k",
                   "format fail %", "mean tokens"], rows)


def _flexible_cells(result: BenchmarkResult) -> list[str]:
    """Flexible avg@k and its interval ("-" for results written before flexible scores existed)."""
    flexible = result.flexible
    if flexible is None:
        return ["-", "-"]
    return [_pct(flexible.avg_at_k), f"[{_pct(flexible.avg_ci[0])}, {_pct(flexible.avg_ci[1])}]"]


def common_benchmarks(runs: Sequence[EvalRun]) -> list[str]:
    """Benchmarks present in every run, in the first run's order."""
    return [name for name in runs[0].benchmarks if all(name in run.benchmarks for run in runs[1:])]


def format_comparison(runs: Sequence[EvalRun]) -> str:
    """Runs side by side: avg@k [CI] per benchmark, and the mean of avg@k over the shared benchmarks."""
    names = common_benchmarks(runs)
    rows = []
    for run in runs:
        cells = [f"{_pct(run.benchmarks[n].avg_at_k)} [{_pct(run.benchmarks[n].avg_ci[0])}, "
                 f"{_pct(run.benchmarks[n].avg_ci[1])}]" for n in names]
        mean = sum(run.benchmarks[n].avg_at_k for n in names) / len(names) if names else float("nan")
        rows.append([run.label, *cells, _pct(mean)])
    ks = sorted({r.k for run in runs for r in run.benchmarks.values()})
    note = f"avg@k (k = {', '.join(map(str, ks))}) with 95% bootstrap intervals over problems"
    return _table(["run", *names, "mean"], rows) + "\n" + note


def percent_axis(highest: Sequence[float]) -> tuple[float, float]:
    """y-range of a percentage chart: from 0 to a little above the highest bar or interval, at least 0-10 %
    (all-zero scores would otherwise get matplotlib's -0.04..0.04 range), at most 0-100 %."""
    top = max([0.0, *highest])
    return 0.0, min(100.0, max(10.0, 1.15 * top))


def plot_comparison(runs: Sequence[EvalRun], png_path: str | Path) -> Path:
    """Grouped bars of avg@k per benchmark (one bar per run) with the intervals; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = common_benchmarks(runs)
    if not names:
        raise DataError("eval compare: the runs share no benchmark")
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 * len(names) * max(1, len(runs)) ** 0.5), 4.5))
    x = np.arange(len(names))
    for index, run in enumerate(runs):
        results = [run.benchmarks[n] for n in names]
        means = np.array([100 * r.avg_at_k for r in results])
        errors = np.array([[100 * (r.avg_at_k - r.avg_ci[0]) for r in results],
                           [100 * (r.avg_ci[1] - r.avg_at_k) for r in results]])
        bars = ax.bar(x + (index - (len(runs) - 1) / 2) * width, means, width, yerr=errors, capsize=3, label=run.label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)  # the value, readable even for a zero bar
    ax.set_xticks(x, names)
    ax.set_ylabel("avg@k (%)")
    ks = sorted({run.benchmarks[n].k for run in runs for n in names})
    ax.set_title(f"avg@k (k = {', '.join(map(str, ks))}), 95% bootstrap intervals over problems", fontsize=10)
    ax.set_ylim(*percent_axis([100 * run.benchmarks[n].avg_ci[1] for run in runs for n in names]))
    ax.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=120)
    finally:
        plt.close(fig)
    return atomic_write_bytes(png_path, buffer.getvalue())
