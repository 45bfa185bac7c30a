"""The run directory's README.md: SGSD's own model card, in place of TRL's generic one.

TRL's `GRPOTrainer._save_checkpoint` writes a generic card ("fine-tuned version of [None] ...
trained with GRPO") into the output directory at every checkpoint. `ModelCardWriter` replaces it
right after each save (an `on_save` callback runs after `_save_checkpoint`), and `train()` writes the
final card, with the final metrics, into the run directory and `final/` when training ends. The
card is built from what the run recorded (`resolved_config.yaml`, `metrics.jsonl`), so it states
the settings that were used, not the ones a reader assumes. Written atomically, by the main process.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from transformers import TrainerCallback

from sgsd.config import RunConfig, config_from_dict
from sgsd.errors import DataError, UserError
from sgsd.methods import MethodSpec, method_spec
from sgsd.paths import looks_local
from sgsd.run_dir import RUN_FILES, RunDir, RunRecord, read_run_record
from sgsd.storage import atomic_write_text, read_jsonl


SHARED_SETTINGS = ("training.max_steps", "training.learning_rate", "training.lr_scheduler",
                   "training.prompts_per_device", "training.gradient_accumulation_steps", "training.seed",
                   "generation.max_new_tokens", "generation.temperature", "generation.top_p",
                   "prompt.enable_thinking", "model.lora.enabled")
# metrics.jsonl keys in the final-metrics table, in order (absent ones are left out)
FINAL_METRICS = ("train/reward_mean", "train/loss", "sgsd/helpful_fraction", "sgsd/harmful_fraction",
                 "sgsd/neutral_fraction", "sgsd/support_mean", "sgsd/success_rate", "train/completion_length_mean",
                 "time/step_s")


def render_model_card(run_dir: Path, step: int, *, in_progress: bool = False) -> str:
    """Markdown model card of the run in `run_dir` at `step` (from its resolved config and metrics)."""
    record = read_run_record(run_dir) or RunRecord({})
    method = str(record.setting("method", "sgsd"))
    spec, cfg = _registered(record, method)
    name = spec.display_name(cfg) if spec and cfg else method.upper()
    base = str(record.setting("model.name_or_path", "?"))
    max_steps = record.setting("training.max_steps")
    title = f"{run_dir.resolve().name}: {name} on {base}"
    status = f"in progress, step {step} of {max_steps}" if in_progress else f"complete at step {step}"
    lines = ["---", "library_name: transformers", *(["base_model: " + base] if _is_hub_id(base) else []),
             "tags:", *sorted({"- sgsd", f"- {method}"}), "- math-reasoning", "---", "", f"# {title}", "",
             f"Trained with `sgsd` {record.provenance.get('versions', {}).get('sgsd', '')} ({status}).", "",
             (spec.description if spec and spec.description else method), "", "| | |", "| --- | --- |",
             f"| method | {name} |", f"| base model | `{base}` |",
             f"| data | {_data_line(record)} |", f"| skill bank | {_bank_line(record, run_dir)} |",
             f"| git revision | `{record.provenance.get('git_revision') or 'unknown'}` |", "",
             "## Key settings", "", "| setting | value |", "| --- | --- |"]
    teachers = record.provenance.get("teachers") if isinstance(record.provenance.get("teachers"), dict) else {}
    for key in (*(spec.card_settings if spec else ()), *SHARED_SETTINGS):
        if key == "sgsd.num_teachers" and "used" in teachers:  # capped at the bank's pairs (trainers.preflight)
            lines.append(f"| `{key}` | {teachers['used']!r} (requested {teachers.get('requested')!r}; the bank "
                         "forms no more pairs) |")
        else:
            lines.append(f"| `{key}` | {record.setting(key)!r} |")
    lines += ["", "Every setting: `resolved_config.yaml`.", "", *_metrics_section(RunDir(run_dir).metrics, step, in_progress),
              "", "## Use", "", "```bash", f"sgsd eval --model {shlex.quote(str(run_dir))} --benchmarks aime24,aime25,hmmt25 "
              "--output-dir EVAL_DIR", "```", "", "or `AutoModelForCausalLM.from_pretrained(\"RUN_DIR/final\")` "
              "(a LoRA run's final/ is a PEFT adapter).", "", "## Files", ""]
    lines += [f"- `{name}`: {text}" for name, text in RUN_FILES.items()]
    return "\n".join(lines) + "\n"


def write_model_card(run_dir: Path, step: int, *also: Path, in_progress: bool = False) -> None:
    """README.md in `run_dir` (and each folder of `also`, e.g. final/'s staging folder), atomically."""
    text = render_model_card(Path(run_dir), step, in_progress=in_progress)
    for folder in (Path(run_dir), *also):
        atomic_write_text(folder / "README.md", text)


class ModelCardWriter(TrainerCallback):
    """After each checkpoint save, replace TRL's generic README.md with the run's card (main process)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_model_card(self.run_dir, state.global_step, in_progress=True)


def _registered(record: RunRecord, method: str) -> "tuple[MethodSpec | None, RunConfig | None]":
    """The run's registered method and its config rebuilt from the record (None, None for a method this
    process does not know or a record it cannot read: the card then names the method as written)."""
    try:
        return method_spec(method), config_from_dict(record.config)
    except (KeyError, UserError):
        return None, None


def _is_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not looks_local(spec) and not Path(spec).exists()


def _data_line(record: RunRecord) -> str:
    path = record.setting("data.path", "?")
    report = record.provenance.get("data") or {}
    if not report:
        return f"`{path}`"
    return (f"`{path}`: {report.get('kept')} problems used of {report.get('rows')} rows "
            f"({report.get('skipped_missing', 0)} without a problem or answer skipped, "
            f"{report.get('duplicates', 0)} duplicates)")


def _bank_line(record: RunRecord, run_dir: Path) -> str:
    """The skill bank the run used, as recorded when it started (a bank file changed later does not
    change the card); "none" for a run that used none."""
    bank = (record.provenance.get("inputs") or {}).get("skill bank")
    if not isinstance(bank, dict):
        return "none"
    online = "; updated online: skills/latest.json" if (run_dir / "skills" / "latest.json").exists() else ""
    return (f"`{bank.get('source')}` ({bank.get('skills')} skills, {bank.get('mistakes')} mistakes, version "
            f"{bank.get('version')}, sha256 {str(bank.get('sha256'))[:12]}){online}")


def _metrics_section(path: Path, step: int, in_progress: bool) -> list[str]:
    try:
        records = list(read_jsonl(path))
    except DataError:  # a damaged metrics file must not fail training; the card says so
        records = []
    record = next((r for r in reversed(records) if int(r.get("step", 0)) <= step), None)
    heading = "## Metrics so far" if in_progress else "## Final metrics"
    if record is None:
        return [heading, "", "none logged (metrics.jsonl is empty or unreadable)."]
    lines = [heading, "", f"Step {record.get('step')}, from `metrics.jsonl` (every step and key is there).", "",
             "| metric | value |", "| --- | --- |"]
    for key in FINAL_METRICS:
        if isinstance(record.get(key), (int, float)):
            lines.append(f"| `{key}` | {record[key]:.4g} |")
    return lines
