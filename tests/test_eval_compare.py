"""`sgsd eval compare`: evaluations with different settings are refused unless allowed; the plot's axis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sgsd.cli import main


def _evaluation(path: Path, *, model: str, k: int = 4, temperature: float = 1.0, seed: int = 0) -> Path:
    from sgsd.evaluation.runner import BenchmarkResult, EvalSettings
    from sgsd.generation import SamplingConfig

    settings = EvalSettings(model=model, benchmarks=("toy",), k=k, sampling=SamplingConfig(temperature=temperature,
                                                                                            seed=seed))
    result = BenchmarkResult("toy", "toy.jsonl", 3, k, 0.0, 0.0, 0.0, (0.0, 0.0), 0.0)
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({"settings": settings.to_json(),
                                                   "benchmarks": {"toy": result.to_json()}}))
    return path


def test_eval_compare_refuses_different_settings_unless_allowed(tmp_path, capsys):
    base = _evaluation(tmp_path / "base", model="tiny")
    other = _evaluation(tmp_path / "other", model="runs/x", k=2, temperature=0.6)
    reseeded = _evaluation(tmp_path / "reseeded", model="runs/y", seed=7)  # model and seed may differ
    plots = tmp_path / "plots"
    assert main(["eval", "compare", str(base), str(other), "--output-dir", str(plots)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "different settings: k: base=4, other=2; sampling.temperature: base=1.0, other=0.6" in err
    assert "model" not in err.split("settings:")[1] and "--allow-differences" in err
    assert not plots.exists()

    assert main(["eval", "compare", str(base), str(other), "--output-dir", str(plots), "--allow-differences"]) == 0
    printed = capsys.readouterr().out
    assert "settings that differ" in printed and "k: base=4, other=2" in printed
    assert (plots / "compare.png").read_bytes()[:4] == b"\x89PNG"

    plot = (plots / "compare.png").read_bytes()
    # other evaluations into that directory: refused, the earlier plot kept (sgsd.run_dir.check_output_dir)
    assert main(["eval", "compare", str(base), str(reseeded), "--output-dir", str(plots)]) == 2
    assert "holds an earlier `sgsd eval compare` made with other settings" in capsys.readouterr().err
    assert (plots / "compare.png").read_bytes() == plot
    assert main(["eval", "compare", str(base), str(reseeded), "--output-dir", str(tmp_path / "plots2")]) == 0
    assert "settings that differ" not in capsys.readouterr().out


def test_all_zero_comparison_plot_has_a_sane_axis(tmp_path, monkeypatch):
    import matplotlib.axes

    from sgsd.evaluation.report import load_run, percent_axis, plot_comparison

    limits = []
    original = matplotlib.axes.Axes.set_ylim
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylim",
                        lambda self, *a, **kw: (limits.append(a), original(self, *a, **kw))[1])
    runs = [load_run(_evaluation(tmp_path / name, model=name)) for name in ("a", "b")]  # avg@k 0 everywhere
    plot_comparison(runs, tmp_path / "zero.png")
    assert limits[-1] == (0.0, 10.0)  # the final range; not matplotlib's -0.04..0.04 around the zero bars
    assert percent_axis([40.0]) == (0.0, pytest.approx(46.0)) and percent_axis([95.0]) == (0.0, 100.0)
