"""`sgsd compare`: train several methods from one start with one shared config block, evaluate every
model with the same `sgsd eval` settings, and write one table (docs/spec.md section 5).

    sgsd compare --configs configs/paper/qwen3-1.7b-{sgsd,grpo,opsd}.yaml --base --base-skill \\
        --launcher "accelerate launch --config_file configs/paper/accelerate-zero2.yaml -m sgsd.cli" \\
        --eval-args "--benchmarks aime24,aime25,hmmt25 --k 12 --thinking" --output-dir comparisons/1.7b

Each stage is an ordinary `sgsd train` or `sgsd eval` command, run in a subprocess (training through
`--launcher`, e.g. accelerate on several GPUs) or, with `--in-process`, in this process (tiny CPU runs).
A stage whose output is complete (`final/`, `results.json`) is skipped, so re-running the same command
resumes an interrupted comparison; `--dry-run` prints the commands instead. The configs must agree on
every setting outside their method section (model, data, prompt, generation, training), so that the
comparison differs only in the method; `--allow-differences` accepts the paper's own baseline settings
(the "-paper-settings" recipes) and lists the differences in the table.

Output: OUT/runs/<label>/ (training runs), OUT/eval/<label>/ (evaluations; `base`, `base+skill`),
OUT/plan.json (the commands), OUT/comparison.txt (avg@k table, training cost, differences, what was
not replicated) and OUT/comparison.png.

What a comparison does not replicate: every method trains once, from one start model, with one
training seed, and the avg@k intervals resample problems only. Run-to-run variation (the training
seed's data order and sampling, and the start model when it is one you trained: a warm start trained
on two machines differs in its last bits, which training amplifies; docs/demo.md measures it) is not
in them. Replicate a finding before relying on it: rerun the same command with other
`training.seed=S` overrides into other output directories (and, for a start model of your own, from
starts trained independently), and count in how many replications the sign of a difference held.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

from sgsd.commands import run_in_process
from sgsd.commands.options import COUNT
from sgsd.config import RunConfig, config_settings, flatten, setting_differences
from sgsd.errors import ConfigError, UserError
from sgsd.methods import load_run_config, method_names, method_spec
from sgsd.run_dir import RunDir, claimed_output_dir
from sgsd.storage import JSONObject, atomic_write_json, atomic_write_text


UNCONTROLLED_KEYS = {"training.output_dir"}
BANK_KEYS = {"skills.bank", "skills.retrieval", "skills.embedder"}  # the same bank for every method that uses one
RESERVED_LABELS = ("base", "base+skill")
FORBIDDEN_EVAL_ARGS = ("--model", "--output-dir", "--bank", "--skills")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", nargs="+", required=True, metavar="YAML", help="one training recipe per method")
    parser.add_argument("--output-dir", required=True, help="comparison directory (runs/, eval/, comparison.txt)")
    parser.add_argument("--labels", help="comma-separated run labels (default: the config file names)")
    parser.add_argument("--base", action="store_true", help="also evaluate the start model (Base)")
    parser.add_argument("--base-skill", action="store_true",
                        help="also evaluate the start model with skills in the prompt (Base+Skill; the configs' bank)")
    parser.add_argument("--max-steps", type=COUNT,
                        help="override training.max_steps of every config (default: each config's own)")
    parser.add_argument("--eval-args", default="",
                        help="arguments given to every `sgsd eval`, as one quoted string (default: none, eval's defaults)")
    parser.add_argument("--launcher", default=None,
                        help="command that runs `sgsd` for training (default: this Python's `-m sgsd.cli`)")
    parser.add_argument("--eval-launcher", default=None,
                        help="command that runs `sgsd` for evaluation (default: this Python's `-m sgsd.cli`)")
    parser.add_argument("--allow-differences", action="store_true",
                        help="accept configs that differ outside their method section (not a controlled comparison)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every stage in this process (tiny CPU runs; not for vLLM or several GPUs)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bars in the stages")
    parser.set_defaults(_resumable=True)  # finished stages are skipped when the same command runs again
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides applied to every config (default: none)")


@dataclass(frozen=True)
class Stage:
    """One `sgsd` command of the comparison; `output` is complete when `done`."""

    kind: Literal["train", "eval"]
    label: str
    argv: tuple[str, ...]
    output: Path

    @property
    def done(self) -> bool:
        if self.kind == "train":
            return RunDir(self.output).is_finished
        return (self.output / "results.json").is_file()


def config_differences(configs: dict[str, RunConfig]) -> list[str]:
    """Settings outside the method sections on which the configs disagree, one line per key.

    Controlled: every section of the config that no registered method names among its `sections`
    (model, data, prompt, generation, reward, training, and a plugin's new sections), and the skill bank
    with its retrieval among the configs whose method uses a bank (`MethodSpec.needs_bank`).
    """
    method_sections = {s for name in method_names() for s in method_spec(name).sections}
    sections = [name for name, value in next(iter(configs.values())).to_dict().items()
                if isinstance(value, dict) and name not in method_sections and name != "skills"]
    flat = {label: {k: v for section in sections for k, v in flatten(cfg.to_dict()[section], section).items()
                    if k not in UNCONTROLLED_KEYS} for label, cfg in configs.items()}
    banked = {label: {k: v for k, v in flatten(cfg.to_dict()["skills"], "skills").items() if k in BANK_KEYS}
              for label, cfg in configs.items() if method_spec(cfg.method).needs_bank(cfg)}
    return setting_differences(flat) + (setting_differences(banked) if len(banked) > 1 else [])


def _labels(args: argparse.Namespace) -> list[str]:
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else [Path(p).stem for p in args.configs]
    if len(labels) != len(args.configs):
        raise UserError(f"compare: --labels has {len(labels)} names for {len(args.configs)} configs")
    bad = [label for label in labels if not label or "/" in label or label in RESERVED_LABELS]
    if bad or len(set(labels)) != len(labels):
        raise UserError(f"compare: labels must be distinct, non-empty, without '/', and not {RESERVED_LABELS}: "
                        f"{labels} (use --labels a,b,...)")
    return labels


def _shared(configs: dict[str, RunConfig], getter: Callable[[RunConfig], str | None], what: str) -> str:
    values = {getter(cfg) for cfg in configs.values()} - {None}
    if len(values) != 1:
        raise UserError(f"compare: the configs must share one {what} for Base/Base+Skill, found {sorted(values) or 'none'}")
    return values.pop()


def plan(args: argparse.Namespace) -> tuple[list[Stage], dict[str, RunConfig], list[str]]:
    """(stages in order, configs by label, differences outside the method sections)."""
    labels = _labels(args)
    configs = {label: load_run_config(path, args.overrides) for label, path in zip(labels, args.configs)}
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise ConfigError(f"compare: --max-steps {args.max_steps}: must be >= 1")
        for cfg in configs.values():
            cfg.training.max_steps = args.max_steps
    differences = config_differences(configs)
    if differences and not args.allow_differences:
        raise UserError("compare: the configs differ outside their method sections, so the comparison would not be "
                        "controlled: " + "; ".join(differences) + " (align them, or pass --allow-differences)")
    eval_args = shlex.split(args.eval_args)
    clash = [a for a in eval_args if a.split("=")[0] in FORBIDDEN_EVAL_ARGS]
    if clash:
        raise UserError(f"compare: --eval-args must not set {', '.join(clash)} (compare sets the model, output and skills)")
    out = Path(args.output_dir)
    quiet_train, quiet_eval = (["--quiet"], ["--quiet"]) if args.quiet else ([], [])
    stages: list[Stage] = []
    for label, path in zip(labels, args.configs):
        steps = ["--max-steps", str(args.max_steps)] if args.max_steps is not None else []
        run_dir = out / "runs" / label
        stages.append(Stage("train", label, ("train", "--config", str(path), "--output-dir", str(run_dir), *steps,
                                             *quiet_train, *args.overrides), run_dir))
    evals: list[tuple[str, list[str]]] = []
    if args.base or args.base_skill:
        start = _shared(configs, lambda c: c.model.name_or_path, "start model (model.name_or_path)")
    if args.base:
        evals.append(("base", ["--model", start]))
    if args.base_skill:
        bank = _shared(configs, lambda c: c.skills.bank, "skill bank (skills.bank)")
        retrieval = _shared(configs, lambda c: c.skills.retrieval, "retrieval mode (skills.retrieval)")
        embedder = next(iter(configs.values())).skills.embedder if retrieval == "embedding" else None
        evals.append(("base+skill", ["--model", start, "--bank", bank, "--retrieval", retrieval,
                                     *(["--embedder", embedder] if embedder else [])]))
    evals.extend((label, ["--model", str(out / "runs" / label)]) for label in labels)
    for label, model_args in evals:
        eval_dir = out / "eval" / label
        stages.append(Stage("eval", label, ("eval", *model_args, "--output-dir", str(eval_dir), *eval_args, *quiet_eval),
                            eval_dir))
    return stages, configs, differences


def _launcher(text: str | None) -> list[str]:
    return shlex.split(text) if text else [sys.executable, "-m", "sgsd.cli"]


def run_stage(stage: Stage, launcher: Sequence[str], in_process: bool) -> None:
    rerun = "fix it and rerun the same `sgsd compare` command: finished stages are skipped"
    if in_process:
        try:
            code = run_in_process(stage.argv)
        except UserError as err:
            raise UserError(f"compare: {stage.kind} of {stage.label} failed: {err}; {rerun}") from None
    else:
        code = subprocess.run([*launcher, *stage.argv], check=False).returncode
    if code != 0:
        raise UserError(f"compare: {stage.kind} of {stage.label} failed (exit {code}); {rerun}")


def training_cost(run_dir: Path) -> tuple[int, float, float] | None:
    """(steps, mean seconds per step, total seconds) from a run's metrics.jsonl, or None without one."""
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    times = [r["time/step_s"] for r in records if isinstance(r.get("time/step_s"), (int, float))]
    steps = max((int(r.get("step", 0)) for r in records), default=0)
    return steps, (sum(times) / len(times) if times else float("nan")), sum(times)


def replication_note(configs: JSONObject) -> list[str]:
    """comparison.txt's lines on what this comparison did not replicate: its start model(s) and training
    seed(s), and how to replicate it (the module docstring says why)."""
    starts = sorted({str(cfg.model.name_or_path) for cfg in configs.values()})
    seeds = sorted({cfg.training.seed for cfg in configs.values()})
    rerun = f"training.seed={max(seeds) + 1}, then training.seed={max(seeds) + 2}"
    return ["not replicated: each method trained once, from " + ", ".join(starts) + ", with training seed "
            + ", ".join(str(s) for s in seeds) + "; the avg@k intervals resample problems only",
            f"  replicate before relying on a difference: rerun this command with {rerun} (other --output-dir each)",
            "  and, for a start model you trained yourself, from independently trained starts; count in how many",
            "  replications the sign of the difference held"]


def write_report(out: Path, stages: Sequence[Stage], differences: Sequence[str],
                 configs: JSONObject | None = None) -> str:
    """comparison.txt (avg@k table, training cost, differences, and with `configs` what was not
    replicated) and comparison.png; returns the text."""
    from sgsd.evaluation.report import format_comparison, load_run, plot_comparison

    runs = [load_run(stage.output, stage.label) for stage in stages if stage.kind == "eval"]
    lines = [format_comparison(runs), "", "training cost (from metrics.jsonl)"]
    for stage in stages:
        cost = training_cost(stage.output) if stage.kind == "train" else None
        if cost is not None:
            lines.append(f"  {stage.label}: {cost[0]} steps, {cost[1]:.2f} s/step, {cost[2]:.0f} s in total")
    lines += ["", "settings that differ outside the method sections: " + ("none (controlled)" if not differences else "")]
    lines += [f"  {line}" for line in differences]
    if configs:
        lines += ["", *replication_note(configs)]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "comparison.txt", text)
    plot_comparison(runs, out / "comparison.png")
    return text


def run(args: argparse.Namespace) -> int:
    if args.dry_run:
        stages, _, _ = plan(args)
        train_launcher, eval_launcher = _launcher(args.launcher), _launcher(args.eval_launcher or None)
        for stage in stages:
            launcher = train_launcher if stage.kind == "train" else eval_launcher
            print(("# done: " if stage.done else "") + shlex.join([*launcher, *stage.argv]))
        return 0
    _, configs, _ = plan(args)  # every input error before the directory is touched
    # a new or empty directory, or this comparison's own (same settings: done stages are skipped); locked
    with claimed_output_dir(args.output_dir, "compare", compare_settings(args, configs),
                            what="compare: output directory"):
        return _run_stages(args)


def compare_settings(args: argparse.Namespace, configs: dict[str, RunConfig]) -> JSONObject:
    """What decides a comparison's files (its output record): each config, the evaluations and their options."""
    settings: JSONObject = {f"{label}.{key}": value for label, cfg in configs.items()
                                for key, value in config_settings(cfg).items()}
    return {**settings, "eval_args": args.eval_args, "base": bool(args.base), "base_skill": bool(args.base_skill),
            "allow_differences": bool(args.allow_differences)}


def _run_stages(args: argparse.Namespace) -> int:
    stages, configs, differences = plan(args)  # again, under the lock: which stages are done now
    train_launcher, eval_launcher = _launcher(args.launcher), _launcher(args.eval_launcher or None)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "plan.json", {
        "configs": list(args.configs), "overrides": list(args.overrides), "differences": differences,
        "stages": [{"kind": s.kind, "label": s.label, "command": [*(train_launcher if s.kind == "train"
                                                                     else eval_launcher), *s.argv]} for s in stages],
    })
    for stage in stages:
        if stage.done:
            print(f"sgsd compare: {stage.kind} {stage.label}: already complete in {stage.output}, skipped")
            continue
        print(f"sgsd compare: {stage.kind} {stage.label} -> {stage.output}", flush=True)
        run_stage(stage, train_launcher if stage.kind == "train" else eval_launcher, args.in_process)
    print(write_report(out, stages, differences, configs), end="")
    print(f"sgsd compare: table in {out / 'comparison.txt'}, plot in {out / 'comparison.png'}")
    return 0
