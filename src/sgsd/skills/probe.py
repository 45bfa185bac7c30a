"""`sgsd skills probe`: before a training run, do the K teachers of one rollout give SGSD a signal?

With a training config (model, bank, retrieval, prompts, generation, `sgsd` settings as training uses them)
it samples N rollouts of the training problems (one per problem, the config's sampling; or reads them from a
JSONL file, e.g. a run's samples), grades them with the config's reward, scores them under the K teachers and
under each asked control (`sgsd.teacher_probe.probe_teachers`: the trainer's own scoring and polarity code)
and writes into the output folder:
- probe.json: per control (`none` = the paper, `neutral`, `shuffled`), the quadrant shares, support
  quantiles, per-rollout sign disagreement, per-item polarity and the permutation test between items; the
  first control's also at the top level;
- teachers.jsonl: one row per control, rollout and teacher (its items, support, rho, quadrant, shifts);
- report.md, with a verdict in plain words, and the plots support.png, items.png.
What is simplified: the teacher is the model as loaded (the live teacher at step 0, or the base model: they
are the same weights before training); EMA weights do not exist yet.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from sgsd.errors import UserError
from sgsd.storage import read_input_jsonl
from sgsd.loss_settings import POLARITY_CONTROLS

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from sgsd.config import RunConfig
    from sgsd.teacher_probe import TeacherProbe

PERMUTATIONS = 2000  # the between-item test's resamples: a p-value of 0.05 is then known to about +-0.005
MIN_ITEM_USES = 3  # items used fewer times are listed but left out of the between-item test


class ProbeError(UserError):
    """Bad input of `sgsd skills probe` (config, rollouts file, options)."""


@dataclass(frozen=True)
class ProbeRollout:
    """One graded completion of a training problem."""

    problem_id: str
    problem: str
    completion: str
    reward: float
    token_ids: tuple[int, ...] = ()  # as sampled (with the end-of-sequence token); empty: tokenize `completion`
    truncated: bool = False


def read_rollouts_file(path: str | Path, problems: Sequence[Any], extract: str) -> list[ProbeRollout]:
    """JSONL rows with `completion` and the problem: its text (`problem`) or the `problem_id` of a problem of the
    config's training data (so that `sgsd eval`'s samples files can be read as they are). The reward is the row's
    `reward`, else the completion graded with the config's `reward.extract` against the row's `gold` or the
    data's answer. One-line errors name the row."""
    from sgsd.verify import grade_batch

    by_text = {p.problem: p for p in problems}
    by_id = {p.problem_id: p for p in problems}
    source = Path(path)
    if not source.is_file():
        raise ProbeError(f"--rollouts-file {path}: no such file")
    rows: list[dict[str, Any]] = []
    # bounded, regular file, UTF-8, one JSON object per line: the rule every input file from a user follows
    for number, row in read_input_jsonl(source, "--rollouts-file"):
        if not isinstance(row.get("completion"), str) or not (
                isinstance(row.get("problem"), str) or "problem_id" in row):
            raise ProbeError(f"{path}:{number}: needs a string 'completion' and a 'problem' text or a 'problem_id'")
        known = by_text.get(row["problem"]) if isinstance(row.get("problem"), str) else by_id.get(str(row["problem_id"]))
        text = row["problem"] if isinstance(row.get("problem"), str) else (known.problem if known else None)
        if text is None:
            raise ProbeError(f"{path}:{number}: problem_id {row['problem_id']!r} is not in the config's training data")
        gold = row.get("gold", known.answer if known else None)
        if "reward" not in row and gold is None:
            raise ProbeError(f"{path}:{number}: no 'reward', no 'gold' and the problem is not in the training data")
        rows.append({**row, "_text": text, "_gold": gold, "_line": number})
    if not rows:
        raise ProbeError(f"{path}: no rollouts")
    to_grade = [r for r in rows if "reward" not in r]
    grades = grade_batch([r["completion"] for r in to_grade], [r["_gold"] for r in to_grade],
                         extract=extract)  # type: ignore[arg-type]
    graded = {id(r): float(g.correct) for r, g in zip(to_grade, grades)}
    return [ProbeRollout(str(r.get("problem_id", r["_line"])), r["_text"], r["completion"],
                         float(r["reward"]) if "reward" in r else graded[id(r)],
                         truncated=bool(r.get("truncated", False))) for r in rows]


def check_inputs(cfg: RunConfig, output_dir: str | Path, rollouts: int, controls: Sequence[str]) -> Path:
    """Everything checkable before the model loads."""
    if not cfg.skills.bank:
        raise ProbeError("skills.bank: the probe scores teachers of a skill bank; set skills.bank=PATH")
    if rollouts < 1:
        raise ProbeError(f"--rollouts must be >= 1, got {rollouts}")
    unknown = [c for c in controls if c not in POLARITY_CONTROLS]
    if unknown or not controls:
        raise ProbeError(f"--control: expected a comma-separated list of {', '.join(POLARITY_CONTROLS)}, "
                         f"got {','.join(controls)!r}")
    if cfg.sgsd.local_support_top_k > 0:
        raise ProbeError("sgsd.local_support_top_k > 0: the probe scores the full-vocabulary polarity; set it to 0")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ProbeError(f"--output-dir {out}: exists and is not a folder")
    return out


def run_probe(cfg: RunConfig, output_dir: str | Path, *, rollouts: int = 32, controls: Sequence[str] = ("none",),
              rollouts_file: str | None = None, batch_size: int = 8,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Sample (or read), grade, score and summarise; writes probe.json, report.md and the plots."""
    import torch

    from sgsd.data import check_untrusted_text, load_problems
    from sgsd.lm_head import resolve_chunk_tokens
    from sgsd.models import load_model, load_tokenizer
    from sgsd.prompts import ChatStyle, refuse_special_tokens
    from sgsd.scoring import lm_parts
    from sgsd.skills.bank import load_bank
    from sgsd.skills.retrieval import make_retriever
    from sgsd.skills.teachers import TeacherSource
    from sgsd.teacher_probe import probe_teachers

    out = check_inputs(cfg, output_dir, rollouts, controls)
    problems, _ = load_problems(cfg.data.path, split=cfg.data.split, problem_field=cfg.data.problem_field,
                                answer_field=cfg.data.answer_field, deduplicate=cfg.data.deduplicate,
                                max_problems=cfg.data.max_problems, bad_rows=cfg.data.bad_rows)
    given = read_rollouts_file(rollouts_file, problems, cfg.reward.extract)[:rollouts] if rollouts_file else None
    bank = load_bank(cfg.skills.bank)
    retriever = make_retriever(cfg.skills.retrieval, bank, embedder=cfg.skills.embedder, seed=cfg.training.seed)
    started = time.perf_counter()
    log(f"probe: loading {cfg.model.name_or_path}")
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    # text that would act as a chat-template control token inside a prompt: refused before the model loads
    check_untrusted_text(tokenizer, problems, cfg.data.path, bank, cfg.skills.bank)
    if given is not None:
        refuse_special_tokens(tokenizer, ((f"--rollouts-file {rollouts_file}: rollout {i + 1} ({field})", text)
                                          for i, r in enumerate(given)
                                          for field, text in (("problem", r.problem), ("completion", r.completion))))
    model = load_model(cfg.model.name_or_path, dtype=cfg.model.dtype, tokenizer=tokenizer).eval()
    student_style = ChatStyle(cfg.prompt.enable_thinking)
    thinking = cfg.prompt.teacher_enable_thinking
    teacher_style = ChatStyle(cfg.prompt.enable_thinking if thinking is None else thinking)
    sampling_s = 0.0
    if given is None:
        sample_start = time.perf_counter()
        given = sample_rollouts(model, tokenizer, cfg, problems[:rollouts], student_style, batch_size, log)
        sampling_s = time.perf_counter() - sample_start
    source = TeacherSource(bank, retriever, cfg.sgsd.num_teachers)
    chunk = resolve_chunk_tokens(cfg.sgsd.logprob_chunk_tokens, cfg.sgsd.logprob_chunk_mb,
                                 lm_parts(model)[1].weight.size(0))
    settings = replace(cfg.sgsd, polarity_control="none")
    probes: dict[str, list[TeacherProbe]] = {c: [] for c in controls}
    teacher_ids: list[list[tuple[str, str]]] = []
    score_start = time.perf_counter()
    for start in range(0, len(given), batch_size):
        batch = given[start:start + batch_size]
        texts = [r.problem for r in batch]
        teachers = source.teachers_for(texts)
        teacher_ids += [[(t.skill.skill_id, t.mistake.mistake_id) for t in row[:settings.num_teachers]]
                        for row in teachers]
        ids, mask = _completion_tensors(tokenizer, batch)
        rewards = torch.tensor([r.reward for r in batch])
        extra = {c: source.controls_for(texts, c, tokenizer) for c in controls if c != "none"}
        found = probe_teachers(model, tokenizer, texts, ids, mask, rewards, teachers, settings, controls=extra,
                               student_style=student_style, teacher_style=teacher_style, chunk_tokens=chunk)
        for control in controls:
            probes[control].append(found[control])
        log(f"probe: scored {min(start + batch_size, len(given))}/{len(given)} rollouts "
            f"({time.perf_counter() - score_start:.0f} s)")
    scoring_s = time.perf_counter() - score_start
    summaries = {c: summarize(_cat(probes[c]), teacher_ids, bank) for c in controls}
    first = summaries[controls[0]]
    result = {**{k: v for k, v in first.items()}, "control": controls[0], "controls": summaries,
              "rollouts": len(given), "success_rate": sum(r.reward > 0 for r in given) / len(given),
              "seconds_per_rollout": (sampling_s + scoring_s) / len(given),
              "scoring_seconds_per_rollout": scoring_s / len(given),
              "sampling_seconds_per_rollout": sampling_s / len(given),
              "wall_seconds": time.perf_counter() - started, "model": cfg.model.name_or_path,
              "bank": cfg.skills.bank, "retrieval": cfg.skills.retrieval, "num_teachers": settings.num_teachers,
              "polarity_test": settings.polarity_test, "confidence_threshold": settings.confidence_threshold,
              "polarity_z": settings.polarity_z, "rollouts_file": rollouts_file}
    joined = {c: _cat(probes[c]) for c in controls}
    write_outputs(out, result, joined, teacher_rows(joined, given, teacher_ids))
    log(f"probe: wrote {out / 'probe.json'} and {out / 'report.md'}")
    return result


def sample_rollouts(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: RunConfig, problems: Sequence[Any], style: Any,
                    batch_size: int, log: Callable[[str], None]) -> list[ProbeRollout]:
    """One completion per problem with the config's sampling, graded with the config's reward."""
    from sgsd.generation import HFGenerator, SamplingConfig
    from sgsd.prompts import render_chat, student_prompt
    from sgsd.verify import grade_batch

    g = cfg.generation
    sampling = SamplingConfig(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                              top_k=g.top_k, seed=cfg.training.seed)
    prompts = [render_chat(tokenizer, student_prompt(p.problem), style) for p in problems]
    done = [0]

    def progress(count: int) -> None:
        done[0] += count
        log(f"probe: sampled {done[0]}/{len(prompts)} rollouts")

    completions = [c[0] for c in HFGenerator(model, tokenizer, batch_size=batch_size).generate(
        prompts, 1, sampling, on_progress=progress)]
    grades = grade_batch([c.text for c in completions], [p.answer for p in problems], extract=cfg.reward.extract)
    return [ProbeRollout(p.problem_id, p.problem, c.text, float(gr.correct), c.token_ids, c.truncated)
            for p, c, gr in zip(problems, completions, grades)]


def _completion_tensors(tokenizer: PreTrainedTokenizerBase, rollouts: Sequence[ProbeRollout]) -> tuple[Any, Any]:
    """Right-padded completion ids [B, T] and mask: the sampled ids, or the text re-tokenized with the end of
    sequence it stopped on (unless truncated)."""
    import torch

    rows = []
    for r in rollouts:
        ids = list(r.token_ids) or tokenizer(r.completion, add_special_tokens=False)["input_ids"]
        if not r.token_ids and not r.truncated:
            ids.append(tokenizer.eos_token_id)
        rows.append(ids or [tokenizer.eos_token_id])
    width = max(len(ids) for ids in rows)
    out = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        out[row, :len(ids)] = torch.tensor(ids)
        mask[row, :len(ids)] = 1
    return out, mask


def _cat(parts: Sequence[TeacherProbe]) -> TeacherProbe:
    import torch

    from sgsd.teacher_probe import TeacherProbe

    fields = TeacherProbe.__dataclass_fields__
    return TeacherProbe(**{name: torch.cat([getattr(p, name) for p in parts]) for name in fields})


# -- summaries (pure: numbers in, numbers out) ------------------------------------------------------------


def _quantiles(values: Sequence[float]) -> dict[str, float | None]:
    import numpy as np

    if not len(values):
        return {str(q): None for q in (0.05, 0.25, 0.5, 0.75, 0.95)}
    return {str(q): float(np.quantile(np.asarray(values), q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)}


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and its 95% Student-t interval (the mean itself twice for fewer than two values)."""
    from scipy import stats

    n = len(values)
    mean = float(sum(values) / n) if n else float("nan")
    if n < 2:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def between_item_test(rollouts: Sequence[Sequence[tuple[Sequence[str], float]]], *,
                      permutations: int = PERMUTATIONS, seed: int = 0) -> dict[str, Any]:
    """Does net polarity differ between items beyond what their rollouts explain?

    `rollouts`: per rollout, its teachers as (the items the teacher carries, its rho). Statistic: the
    use-weighted variance of the items' mean rho, over items with at least MIN_ITEM_USES uses. Null: within a
    rollout, which teacher got which rho does not depend on its items, so the rho values are permuted among
    the teachers of each rollout (a stratified permutation test). Permuting across rollouts instead would
    count as an item effect what is a rollout's: the teachers of one rollout share its completion and outcome
    (on a model where every block lowers the completion, all of a failed rollout's teachers are warnings), and
    retrieval gives related problems the same items, so items retrieved for hard problems would "differ" from
    items retrieved for easy ones whatever they say."""
    import numpy as np

    uses: dict[str, int] = {}
    for row in rollouts:
        for items, _ in row:
            for item in items:
                uses[item] = uses.get(item, 0) + 1
    kept = {item: index for index, item in enumerate(sorted(i for i, n in uses.items() if n >= MIN_ITEM_USES))}
    if len(kept) < 2:
        return {"items_tested": len(kept), "statistic": None, "p_value": None}
    width = max((len(row) for row in rollouts), default=0)
    values = np.zeros((len(rollouts), width))
    present = np.zeros((len(rollouts), width), dtype=bool)
    slots, labels = [], []  # one entry per (teacher slot, kept item it carries)
    for r, row in enumerate(rollouts):
        for j, (items, value) in enumerate(row):
            values[r, j], present[r, j] = value, True
            for item in items:
                if item in kept:
                    slots.append(r * width + j)
                    labels.append(kept[item])
    slot_index, item_index = np.asarray(slots), np.asarray(labels)
    counts = np.bincount(item_index, minlength=len(kept))

    def statistic(table: Any) -> float:
        x = table.reshape(-1)[slot_index]
        means = np.bincount(item_index, weights=x, minlength=len(kept)) / counts
        return float((counts * (means - x.mean()) ** 2).sum() / counts.sum())

    observed = statistic(values)
    rng = np.random.default_rng(seed)
    rows = np.arange(len(rollouts))[:, None]
    exceed = 0
    for _ in range(permutations):
        # each rollout's teachers fill its first slots: a random order of them, the empty slots sorted last
        order = np.argsort(np.where(present, rng.random(present.shape), np.inf), axis=1)
        exceed += statistic(values[rows, order]) >= observed - 1e-12
    return {"items_tested": len(kept), "statistic": observed, "p_value": (exceed + 1) / (permutations + 1),
            "permutations": permutations, "null": "rho permuted among the teachers of each rollout"}


def summarize(probe: TeacherProbe, teacher_ids: Sequence[Sequence[tuple[str, str]]], bank: Any) -> dict[str, Any]:
    """probe.json's section of one control."""
    from sgsd.teacher_probe import QUADRANTS

    present = probe.present.tolist()
    quadrant = probe.quadrant.tolist()
    polarity = probe.polarity.tolist()
    support = probe.support.tolist()
    success = (probe.rewards > 0).tolist()
    codes = [q for row, keep in zip(quadrant, present) for q, k in zip(row, keep) if k]
    shares = {name: (sum(c == i for c in codes) / len(codes) if codes else None) for i, name in enumerate(QUADRANTS)}
    signs = []  # per rollout: the signs of its signed teachers' support
    for row_p, row_keep, ok in zip(polarity, present, success):
        signs.append([(p if ok else -p) for p, k in zip(row_p, row_keep) if k and p != 0])
    two_or_more = [s for s in signs if len(s) >= 2]
    disagree = [len(set(s)) > 1 for s in two_or_more]
    items: dict[str, dict[str, Any]] = {}
    values: dict[str, list[float]] = {}
    teachers: list[list[tuple[tuple[str, str], float]]] = []  # per rollout: (its items, rho) of each teacher
    for row_ids, row_p, row_keep in zip(teacher_ids, polarity, present):
        teachers.append([(pair, float(p)) for pair, p, k in zip(row_ids, row_p, row_keep) if k])
        for pair, p in teachers[-1]:
            for item in pair:
                values.setdefault(item, []).append(p)
    kinds = {s.skill_id: "skill" for s in bank.general_skills} | {m.mistake_id: "mistake" for m in bank.common_mistakes}
    for item, vals in sorted(values.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        mean, low, high = mean_interval(vals)
        items[item] = {"kind": kinds.get(item, "?"), "uses": len(vals), "helpful": sum(v > 0 for v in vals),
                       "harmful": sum(v < 0 for v in vals), "net_polarity": mean, "interval": [low, high]}
    block = [b for row, keep in zip(probe.block_shift.tolist(), present) for b, k in zip(row, keep) if k]
    control_shift = [c for c in probe.control_shift.tolist() if not math.isnan(c)]
    return {
        "quadrants": shares,
        "support": {"all": _quantiles([s for row, keep in zip(support, present) for s, k in zip(row, keep) if k]),
                    "success": _quantiles([s for row, keep, ok in zip(support, present, success)
                                           for s, k in zip(row, keep) if k and ok]),
                    "failure": _quantiles([s for row, keep, ok in zip(support, present, success)
                                           for s, k in zip(row, keep) if k and not ok])},
        "sign_disagreement": {"rollouts_with_two_signed_teachers": len(two_or_more),
                              "share_with_both_signs": (sum(disagree) / len(disagree)) if disagree else None},
        "block_shift_mean": sum(block) / len(block) if block else None,
        "block_shift": _quantiles(block),
        "control_shift_mean": sum(control_shift) / len(control_shift) if control_shift else None,
        "counted_tokens_mean": float(probe.counted_tokens.float().mean()),
        "items": items,
        "between_items": between_item_test(teachers),
    }


# -- outputs ----------------------------------------------------------------------------------------------


def format_p(p: float) -> str:
    """"= 0.042", or "< 0.001" where the test's resolution (1 / (permutations + 1)) ends."""
    return f"= {p:.3f}" if p >= 0.001 else "< 0.001"


def verdict(section: dict[str, Any], control: str) -> list[str]:
    """Plain-word answers to the two questions that decide whether SGSD has a signal."""
    lines = []
    dis = section["sign_disagreement"]
    share = dis["share_with_both_signs"]
    if share is None:
        lines.append(f"- **Do the teachers of one rollout differ in sign?** Not measurable: no rollout has two "
                     f"teachers whose sign counts (control {control}).")
    else:
        word = "Yes, often" if share >= 0.5 else ("Sometimes" if share > 0 else "No")
        lines.append(f"- **Do the teachers of one rollout differ in sign?** {word}: {share:.0%} of the "
                     f"{dis['rollouts_with_two_signed_teachers']} rollouts with at least two signed teachers have "
                     f"both signs (control {control}).")
    test = section["between_items"]
    if test["p_value"] is None:
        lines.append(f"- **Does net polarity differ between items beyond chance?** Not testable: "
                     f"{test['items_tested']} item(s) with at least {MIN_ITEM_USES} uses.")
    else:
        word = "Yes" if test["p_value"] < 0.05 else "No evidence"
        lines.append(f"- **Does net polarity differ between items beyond chance?** {word}: permutation test over "
                     f"{test['items_tested']} items with >= {MIN_ITEM_USES} uses, p {format_p(test['p_value'])} "
                     f"({test['permutations']} permutations); per-item 95% intervals in items.png and probe.json.")
    q = section["quadrants"]
    lines.append("- Quadrants of the teachers: " + ", ".join(f"{k} {v:.1%}" for k, v in q.items() if v is not None)
                 + ".")
    if section["block_shift_mean"] is not None:
        lines.append(f"- A skill block changes the student's log-prob of its own tokens by "
                     f"{section['block_shift_mean']:+.3f} nats a token on average"
                     + (f"; the control block by {section['control_shift_mean']:+.3f}."
                        if section["control_shift_mean"] is not None else "."))
    unmatched = control_mismatch(section)
    if unmatched:
        lines.append(unmatched)
    return lines


def control_mismatch(section: dict[str, Any]) -> str | None:
    """A warning when the control block moves the student's log-probs outside the 5-95% range of what the skill
    blocks do: then it is no like-for-like block for this model (a filler the model never saw, say), and
    support against it measures the difference between the two kinds of block as much as what a skill says."""
    shift, spread = section.get("control_shift_mean"), section.get("block_shift") or {}
    low, high = spread.get("0.05"), spread.get("0.95")
    if shift is None or low is None or high is None or low <= shift <= high:
        return None
    return (f"- **The control is not matched to the skill blocks on this model:** it shifts the student's "
            f"log-probs by {shift:+.3f} nats a token, outside the skill blocks' 5-95% range [{low:+.3f}, "
            f"{high:+.3f}]; the polarity read against it mixes the two kinds of block with what a skill says.")


def teacher_rows(probes: dict[str, TeacherProbe], rollouts: Sequence[ProbeRollout],
                 teacher_ids: Sequence[Sequence[tuple[str, str]]]) -> list[dict[str, Any]]:
    """teachers.jsonl: one row per (control, rollout, present teacher), what probe.json summarises."""
    from sgsd.teacher_probe import QUADRANTS

    rows = []
    for control, probe in probes.items():
        columns = {name: getattr(probe, name).tolist() for name in ("support", "polarity", "quadrant", "present",
                                                                      "block_shift", "control_shift", "counted_tokens")}
        for b, (rollout, ids) in enumerate(zip(rollouts, teacher_ids)):
            shift = columns["control_shift"][b]
            for k, (skill, mistake) in enumerate(ids):
                if not columns["present"][b][k]:
                    continue
                rows.append({"control": control, "rollout": b, "problem_id": rollout.problem_id,
                             "reward": rollout.reward, "teacher": k, "skill_id": skill, "mistake_id": mistake,
                             "support": columns["support"][b][k], "rho": columns["polarity"][b][k],
                             "quadrant": QUADRANTS[columns["quadrant"][b][k]],
                             "block_shift": columns["block_shift"][b][k],
                             "control_shift": None if math.isnan(shift) else shift,
                             "counted_tokens": columns["counted_tokens"][b]})
    return rows


def write_outputs(out: Path, result: dict[str, Any], probes: dict[str, TeacherProbe],
                  teachers: Sequence[dict[str, Any]] = ()) -> None:
    from sgsd.storage import atomic_write_json, atomic_write_jsonl, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    plot_support(probes, out / "support.png")
    plot_items(result["controls"], out / "items.png")
    atomic_write_jsonl(out / "teachers.jsonl", teachers)
    atomic_write_json(out / "probe.json", result)
    lines = [f"# Teacher probe: {result['model']}", "",
             f"{result['rollouts']} rollouts (success rate {result['success_rate']:.1%}), K = {result['num_teachers']} "
             f"teachers of {result['bank']} ({result['retrieval']} retrieval), polarity test "
             f"{result['polarity_test']} (theta {result['confidence_threshold']}, z {result['polarity_z']}); "
             f"{result['seconds_per_rollout']:.2f} s a rollout "
             f"({result['scoring_seconds_per_rollout']:.2f} s scoring).", ""]
    for control, section in result["controls"].items():
        lines += [f"## Control: {control}", "", *verdict(section, control), ""]
    lines += ["![support per outcome](support.png)", "", "![net polarity per item](items.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))


def plot_support(probes: dict[str, TeacherProbe], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(probes), figsize=(5 * len(probes), 3.4), squeeze=False)
    for ax, (control, probe) in zip(axes[0], probes.items()):
        success = (probe.rewards > 0)[:, None].expand_as(probe.present)
        for ok, label, color in ((False, "failed", "tab:red"), (True, "successful", "tab:green")):
            values = probe.support[probe.present & (success == ok)].tolist()
            if values:
                ax.hist(values, bins=30, alpha=0.6, color=color, label=f"{label} rollouts ({len(values)} teachers)")
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(f"support, control {control}")
        ax.set_xlabel("clipped mean support (nats/token)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_items(sections: dict[str, dict[str, Any]], path: Path, top: int = 20) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sections), figsize=(5 * len(sections), 0.25 * top + 1.5), squeeze=False)
    for ax, (control, section) in zip(axes[0], sections.items()):
        items = list(section["items"].items())[:top]
        names = [f"{k} ({v['uses']})" for k, v in items]
        means = [v["net_polarity"] for _, v in items]
        errors = [[m - v["interval"][0] for m, (_, v) in zip(means, items)],
                  [v["interval"][1] - m for m, (_, v) in zip(means, items)]]
        ax.errorbar(means, range(len(items)), xerr=errors, fmt="o", markersize=3)
        ax.set_yticks(range(len(items)), names, fontsize=6)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlim(-1.05, 1.05)
        ax.set_title(f"net polarity per item (95% t), control {control}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
