"""Issue 15: a CLI a researcher can trust - finished runs, dropped data rows, comparable evaluations,
checks before work, local paths, config suggestions, one vocabulary and truthful help."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from sgsd.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/tiny/sgsd.yaml"
TINY_BANK = ROOT / "configs/tiny/skill_bank.json"


def _train(out: Path, *extra: str) -> int:
    return main(["train", "--config", str(RECIPE), "--output-dir", str(out), "--quiet", "training.save_steps=1", *extra])


def _snapshot(run: Path) -> dict[str, str]:
    """Relative path -> content hash of every file under `run` (what a no-op must leave untouched)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ defect 1: a finished run is complete


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step tiny SGSD run with a checkpoint at every step, and what the command printed."""
    out = tmp_path_factory.mktemp("trust") / "run"
    capture = pytest.MonkeyPatch()
    import io
    import sys

    stdout = io.StringIO()
    capture.setattr(sys, "stdout", stdout)
    try:  # not --quiet: the console shows a progress bar and one line per logging step
        code = main(["train", "--config", str(RECIPE), "--output-dir", str(out), "training.save_steps=1",
                     "--max-steps", "2"])
    finally:
        capture.undo()
    assert code == 0
    return out, stdout.getvalue()


@pytest.mark.slow
def test_finished_run_rerun_does_nothing_larger_max_steps_continues_smaller_is_refused(finished_run, capsys):
    out, _ = finished_run
    capsys.readouterr()
    before = _snapshot(out)
    assert _steps(out) == [1, 2]

    assert _train(out, "--max-steps", "2") == 0
    assert "complete at step 2; nothing to do" in capsys.readouterr().out
    assert _snapshot(out) == before  # no metrics line, attribution rollout, checkpoint or card added

    assert _train(out, "--max-steps", "1") == 2
    err = capsys.readouterr().err.strip()
    assert "complete at step 2; max_steps 1 is smaller" in err and "\n" not in err
    assert _snapshot(out) == before

    assert _train(out, "--max-steps", "3") == 0  # continues to exactly step 3
    assert _steps(out) == [1, 2, 3]
    assert json.loads((out / "final" / "sgsd_complete.json").read_text())["step"] == 3
    attribution = json.loads((out / "attribution.json").read_text())
    assert attribution["rollouts"] == 3 * 4  # 4 prompts per step (tiny recipe), counted once each

    # interrupted after the step-3 checkpoint but before final/: only final/ is written, no 4th step
    shutil.rmtree(out / "final")
    assert _train(out, "--max-steps", "3") == 0
    assert _steps(out) == [1, 2, 3]
    assert json.loads((out / "attribution.json").read_text()) == attribution
    from safetensors.torch import load_file

    final, checkpoint = load_file(out / "final" / "model.safetensors"), load_file(out / "checkpoint-3" / "model.safetensors")
    assert final.keys() == checkpoint.keys() and all((final[k] == checkpoint[k]).all() for k in final)


def test_plan_rerun_refuses_a_checkpoint_beyond_max_steps(tmp_path):
    from sgsd.errors import UserError
    from sgsd.run_dir import plan_rerun, write_complete_marker

    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "rng_state.pth").write_bytes(b"rng")
    write_complete_marker(checkpoint, 4, world_size=1)
    assert plan_rerun(tmp_path, 6, 1).action == "resume"
    assert plan_rerun(tmp_path, 4, 1).action == "finish"
    with pytest.raises(UserError, match="holds checkpoint-4, beyond max_steps 2"):
        plan_rerun(tmp_path, 2, 1)


@pytest.mark.slow
def test_run_directory_readme_is_the_sgsd_model_card(finished_run):
    out, _ = finished_run
    card = (out / "README.md").read_text()
    assert "fine-tuned version of" not in card and "TRL" not in card  # not TRL's generic card
    assert "SGSD on tiny" in card and "base model | `tiny`" in card
    assert "`builtin:tiny-math`: 64 problems used of 64 rows" in card
    assert "skill_bank.json` (4 skills, 4 mistakes" in card
    assert "| `sgsd.num_teachers` | 3 |" in card
    assert "## Final metrics" in card and "`sgsd/helpful_fraction`" in card
    from sgsd.run_dir import RUN_FILES

    listed = [name for name in RUN_FILES if f"- `{name}`" in card]
    assert listed == list(RUN_FILES)
    assert (out / "final" / "README.md").read_text() == card
    readme = (ROOT / "README.md").read_text()
    assert [name for name in RUN_FILES if f"`{name}`" not in readme] == []  # the README lists every file


@pytest.mark.slow
def test_console_prints_one_line_per_logging_step(finished_run):
    _, printed = finished_run
    lines = [line for line in printed.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    assert all("reward " in line and "helpful " in line and "support " in line and "generate " in line
               for line in lines)
    assert "{'loss'" not in printed and "'sgsd/" not in printed  # no Hugging Face log dicts


def test_step_line_format_and_main_process_only(capsys):
    from types import SimpleNamespace

    from sgsd.trainers.console import StepLinePrinter, format_step_line

    logs = {"loss": 0.5, "reward": 0.25, "sgsd/helpful_fraction": 0.5, "sgsd/harmful_fraction": 0.25,
            "sgsd/neutral_fraction": 0.25, "sgsd/support_mean": -0.0123, "time/generate_s": 1.25,
            "time/teacher_s": 0.5, "time/update_s": 0.25, "epoch": 0.1}
    assert format_step_line(3, 10, logs) == ("step 3/10  reward 0.250  loss 0.5  helpful 0.50 harmful 0.25 "
                                             "neutral 0.25  support -0.0123  generate 1.2s teacher 0.5s update 0.2s")
    assert format_step_line(1, 2, {"loss": 0.1, "reward": 1.0}) == "step 1/2  reward 1.000  loss 0.1"  # GRPO
    printer = StepLinePrinter(progress=False)
    for zero in (False, True):
        printer.on_log(None, SimpleNamespace(is_world_process_zero=zero, global_step=3, max_steps=10), None, logs=logs)
    assert capsys.readouterr().out.splitlines() == [format_step_line(3, 10, logs)]


# ------------------------------------------------- defect 2: rows without an answer, runs without a step


def _rows_file(path: Path, good: int, bad_at: int) -> Path:
    rows = [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(good)]
    rows.insert(bad_at, {"problem": "What is nothing?"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_too_few_problems_for_one_step_is_an_error_and_skipped_rows_are_named(tmp_path, capsys):
    data = _rows_file(tmp_path / "three.jsonl", good=2, bad_at=1)
    out = tmp_path / "run"
    assert main(["train", "--config", str(RECIPE), "--output-dir", str(out), "--max-steps", "1", "--quiet",
                 f"data.path={data}"]) == 2
    err = capsys.readouterr().err
    assert f"{data}: skipped 1 of 3 rows without a problem or answer (row 2;" in err
    assert "2 usable problems, but one training step needs 4" in err
    assert not out.exists()


def test_skipped_rows_are_named_before_anything_else_happens(tmp_path, capsys):
    data = _rows_file(tmp_path / "nine.jsonl", good=8, bad_at=4)
    out = tmp_path / "run"
    # the prompt limit stops the run after data loading: the note must already have been printed
    assert main(["train", "--config", str(RECIPE), "--output-dir", str(out), "--quiet", f"data.path={data}",
                 "prompt.max_prompt_tokens=8"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"sgsd: {data}: skipped 1 of 9 rows without a problem or answer (row 5; data.bad_rows=error "
                      "refuses them instead)")
    assert "longer than prompt.max_prompt_tokens=8" in err[1]


def test_a_run_that_takes_no_step_is_an_error_not_trained_0_steps(tmp_path, capsys, monkeypatch):
    from sgsd.trainers import run as run_module

    monkeypatch.setattr(run_module, "check_problems_per_step", lambda cfg, n: None)  # only the safety net left
    data = _rows_file(tmp_path / "three.jsonl", good=2, bad_at=1)
    out = tmp_path / "run"
    assert main(["train", "--config", str(RECIPE), "--output-dir", str(out), "--max-steps", "1", "--quiet",
                 f"data.path={data}"]) == 2
    captured = capsys.readouterr()
    assert "without taking a step" in captured.err and "trained 0 steps" not in captured.out
    assert not (out / "final").exists()


# ------------------------------------------------------ defect 3: eval compare refuses different settings


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

    assert main(["eval", "compare", str(base), str(reseeded), "--output-dir", str(plots)]) == 0
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


# ------------------------------------------------------- defect 4: eval checks before it generates


def test_eval_checks_output_dir_and_model_before_loading_anything(tmp_path, capsys, monkeypatch):
    from sgsd.commands import evaluate

    def no_generation(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(evaluate, "_generator", no_generation)
    bench = tmp_path / "toy.jsonl"
    bench.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    occupied = tmp_path / "occupied"
    occupied.write_text("a file where the output directory should go")
    common = ["--benchmarks", str(bench), "--k", "1", "--max-new-tokens", "4"]
    assert main(["eval", "--model", "tiny", "--output-dir", str(occupied), *common]) == 2
    assert f"output directory {occupied}: exists and is not a directory" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny", "--output-dir", str(occupied / "sub"), *common]) == 2
    assert f"{occupied} is a file, not a directory" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "runs" / "gone"), "--output-dir", str(tmp_path / "e"), *common]) == 2
    assert "model: no such file or directory" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny", "--output-dir", str(tmp_path / "e"), *common, "--bank",
                 str(tmp_path / "nobank.json")]) == 2
    assert "skill bank: no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


# -------------------------------------------- defect 5: local-looking paths are never looked up on the hub


def test_local_looking_paths_versus_hub_ids(tmp_path, monkeypatch):
    from sgsd.models import resolve_model_path
    from sgsd.paths import looks_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for spec in ("data/nope.jsonl", "./model", "/abs/model", "~/model", "runs/foo", "bank.JSON"):
        assert looks_local(spec), spec
    for spec in ("Qwen/Qwen3-1.7B", "open-r1/DAPO-Math-17k-Processed", "gsm8k", "HuggingFaceH4/MATH-500"):
        assert not looks_local(spec), spec
    assert resolve_model_path("Qwen/Qwen3-1.7B") == "Qwen/Qwen3-1.7B"  # a hub id with a dot is not a file


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", str(RECIPE), "--output-dir", "out", "data.path=data/nope.jsonl"],
     "dataset: no such file or directory: data/nope.jsonl"),
    (["train", "--config", str(RECIPE), "--output-dir", "out", "model.name_or_path=runs/foo"],
     "model: no such file or directory: runs/foo"),
    (["eval", "--model", "runs/foo", "--output-dir", "out", "--benchmarks", "bench.jsonl"],
     "model: no such file or directory: runs/foo"),
    (["eval", "--model", "tiny", "--output-dir", "out", "--benchmarks", "data/nope.jsonl"],
     "benchmark: no such file or directory: data/nope.jsonl"),
    (["skills", "build", "--problems", "data/nope.jsonl", "--output-dir", "out", "--policy", "tiny"],
     "dataset: no such file or directory: data/nope.jsonl"),
    (["skills", "retrieve", "--bank", str(TINY_BANK), "--problem", "1+1", "--embedder", "runs/minilm"],
     "embedding model: no such file or directory: runs/minilm"),
])
def test_missing_local_paths_are_one_line_errors(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "bench.jsonl").write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sgsd: error: {message}" or (err.endswith(message) and "\n" not in err), err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------ defect 6: did you mean, on leaf names


@pytest.mark.parametrize("override, hint", [
    ("save_steps=2", "did you mean 'training.save_steps'?"),
    ("generation.learning_rate=1e-5", "did you mean 'training.learning_rate'?"),
    ("beta=0.1", "did you mean 'grpo.beta' or 'opsd.beta'?"),
    ("training.save_step=2", "did you mean 'training.save_steps'?"),
    ("learning_rat=1e-5", "did you mean 'training.learning_rate'?"),
])
def test_unknown_keys_suggest_leaf_names(override, hint):
    from sgsd.config import load_config
    from sgsd.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown config key") as info:
        load_config(RECIPE, [override])
    assert hint in str(info.value)


# ------------------------------------------------------------------------------ skills report, interrupt


def test_skills_report_finds_the_run_bank_from_its_resolved_config(tmp_path, capsys):
    from sgsd.config import dump_config, load_config
    from sgsd.skills.attribution import AttributionTracker

    run = tmp_path / "run"
    run.mkdir()
    (run / "resolved_config.yaml").write_text(dump_config(load_config(RECIPE)) + "# provenance: {}\n")
    tracker = AttributionTracker()
    tracker.update([["gen_001"]], [["mis_001"]], [[1]], [[0.5]], [[1.0]])
    tracker.save(run)
    assert main(["skills", "report", str(run)]) == 0
    printed = capsys.readouterr().out
    bank = json.loads(TINY_BANK.read_text())
    title = next(s["title"] for s in bank["general_skills"] if s["skill_id"] == "gen_001")
    assert title[:40] in printed and f"bank: {TINY_BANK}" in printed
    assert (run / "attribution.png").read_bytes()[:4] == b"\x89PNG"


def test_interrupt_says_whether_the_same_command_resumes(monkeypatch, capsys):
    import sgsd.commands.evaluate as evaluate
    import sgsd.commands.train as train

    def interrupted(args):
        raise KeyboardInterrupt

    for module, resumes in ((train, True), (evaluate, False)):
        fake = lambda args: interrupted(args)  # noqa: E731
        fake.__module__ = module.__name__
        monkeypatch.setattr(module, "run", fake)
        argv = ["train", "--config", str(RECIPE)] if module is train else ["eval", "--model", "tiny", "--output-dir", "o"]
        assert main(argv) == 130
        err = capsys.readouterr().err.strip()
        assert err.startswith("sgsd: interrupted") and ("run the same command again to resume" in err) == resumes


# ------------------------------------------------------------- one vocabulary, truthful help on every page


def _parsers(argv: list[str], parser: argparse.ArgumentParser):
    yield argv, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers([*argv, name], child)


def _every_parser():
    for name, _, _ in COMMANDS:
        top = build_parser([name])
        command = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        yield from _parsers([name], command)


def test_every_help_page_explains_every_option_and_shows_defaults(capsys):
    pages = list(_every_parser())
    paths = {" ".join(argv) for argv, _ in pages}
    assert {"train", "eval", "eval compare", "skills build", "skills report", "bench step", "demo"} <= paths
    for argv, parser in pages:
        assert main([*argv, "--help"]) == 0
        page = capsys.readouterr().out
        assert page.startswith(f"usage: sgsd {' '.join(argv)}"), argv
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = "/".join(action.option_strings) or action.dest
            text = formatter._expand_help(action)
            assert action.help and len(action.help) > 8, f"sgsd {' '.join(argv)} {name}: no explanation"
            is_switch = isinstance(action, argparse._StoreTrueAction)
            takes_default = not is_switch and (action.option_strings or action.nargs in ("?", "*"))
            if takes_default and not action.required:
                assert "default" in text.lower() or "required" in text.lower() or _in_required_group(parser, action), \
                    f"sgsd {' '.join(argv)} {name}: the help does not say its default"
            if action.default not in (None, False, argparse.SUPPRESS) and not isinstance(action.default, list):
                assert str(action.default) in text or "default" in action.help, f"{argv} {name}: default not shown"


def _in_required_group(parser: argparse.ArgumentParser, action: argparse.Action) -> bool:
    return any(group.title == "required arguments" and action in group._group_actions
               for group in parser._action_groups)


def test_required_options_are_shown_as_required(capsys):
    for argv, expected in ((["train"], "--config CONFIG"), (["eval"], "--model MODEL --output-dir DIR"),
                           (["skills", "build"], "--problems PROBLEMS"), (["skills", "validate"], "--bank BANK")):
        assert main([*argv, "--help"]) == 0
        usage = capsys.readouterr().out.split("\n\n")[0]
        assert expected in usage and f"[{expected.split()[0]}" not in usage, usage


@pytest.mark.parametrize("old, new, attribute, value", [
    (["skills", "validate", "BANK.json"], "--bank", "bank", "BANK.json"),
    (["skills", "retrieve", "--bank", "b", "--problem", "p", "--top-k", "3"], "--teachers", "teachers", 3),
    (["skills", "build", "--problems", "p", "--out", "D"], "--output-dir", "output_dir", "D"),
    (["skills", "report", "R", "--png", "x.png"], "--output-dir", "png", "x.png"),
    (["eval", "--model", "m", "--output-dir", "o", "--skills", "b.json"], "--bank", "skills", "b.json"),
    (["eval", "--model", "m", "--output-dir", "o", "--no-progress"], "--quiet", "quiet", True),
    (["eval", "compare", "a", "--plot", "p.png"], "--output-dir", "plot", "p.png"),
    (["demo", "--no-progress"], "--quiet", "quiet", True),
])
def test_old_spellings_still_work_with_a_deprecation_line(capsys, old, new, attribute, value):
    args = build_parser(old).parse_args(old)
    assert getattr(args, attribute) == value
    err = capsys.readouterr().err.strip()
    assert err.startswith("sgsd: warning: ") and "deprecated" in err and f"use {new}" in err and "\n" not in err


def test_usage_errors_are_one_line(capsys):
    assert main(["eval", "compare"]) == 2
    assert main(["skills", "retrieve", "--bank"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("sgsd: error: sgsd ") for line in errors)


@pytest.mark.parametrize("content, message", [
    (None, "training.deepspeed: ds.json: no such file"),
    ('{"zero_optimization": {"stage": 2},', "training.deepspeed: ds.json: invalid JSON at line 1"),
    ("[1, 2]", "training.deepspeed: ds.json: expected a JSON object (a DeepSpeed config), got list"),
])
def test_a_bad_deepspeed_config_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys, content, message):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / "ds.json").write_text(content)
    assert main(["train", "--config", str(RECIPE), "--output-dir", "out", "--quiet", "training.deepspeed=ds.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_valid_deepspeed_config_passes_the_check(tmp_path):
    from sgsd.trainers.preflight import check_deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    check_deepspeed_config(str(path))  # no error
    check_deepspeed_config(None)
    check_deepspeed_config(str(Path(__file__).resolve().parents[1] / "configs/paper/deepspeed-zero2.json"))
