"""`sgsd skills probe`, the run: before a training run, do the K teachers of one rollout give SGSD a signal?

With a training config (model, bank, retrieval, prompts, generation, `sgsd` settings as training uses them)
it samples N rollouts of the training problems (one per problem, the config's sampling; or reads them from a
JSONL file, e.g. a run's samples), grades them with the config's reward, scores them under the K teachers and
under each asked control (`sgsd.teacher_scoring.probe_teachers`: the trainer's own scoring and polarity code)
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

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from sgsd.config import RunConfig
from sgsd.data import LoadReport, Problem
from sgsd.generation import HFGenerator, SamplingConfig
from sgsd.lm_head import head_vocab_size
from sgsd.loss_settings import POLARITY_CONTROLS
from sgsd.probe.report import teacher_rows, write_outputs
from sgsd.probe.rollouts import ProbeError, ProbeRollout, read_rollouts_file
from sgsd.probe.statistics import summarize
from sgsd.prompts import ChatStyle, refuse_special_tokens, render_chat, student_prompt
from sgsd.run_setup import load_run_inputs, load_run_model, teachers_within_bank
from sgsd.scoring import lm_parts
from sgsd.skills.teachers import TeacherSource
from sgsd.storage import JSONObject
from sgsd.teacher_scoring import TeacherProbe, probe_teachers
from sgsd.verify import grade_batch


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
              log: Callable[[str], None] = print) -> JSONObject:
    """Sample (or read), grade, score and summarise; writes probe.json, report.md and the plots."""


    out = check_inputs(cfg, output_dir, rollouts, controls)
    given: list[ProbeRollout] | None = None

    def read_given(problems: list[Problem], _report: LoadReport) -> None:
        nonlocal given
        given = read_rollouts_file(rollouts_file, problems, cfg.reward.extract)[:rollouts] if rollouts_file else None

    def check_given(tokenizer: PreTrainedTokenizerBase) -> None:
        if given is not None:  # text that would act as a chat-template control token: refused before the model loads
            refuse_special_tokens(tokenizer, ((f"--rollouts-file {rollouts_file}: rollout {i + 1} ({field})", text)
                                              for i, r in enumerate(given)
                                              for field, text in (("problem", r.problem), ("completion", r.completion))))

    inputs = load_run_inputs(cfg, with_bank=True, on_problems=read_given)
    cfg = teachers_within_bank(cfg, inputs.bank)  # K beyond the bank's pairs would score padding, as in training
    problems, bank, retriever = inputs.problems, inputs.bank, inputs.retriever
    student_style, teacher_style = inputs.student_style, inputs.teacher_style
    started = time.perf_counter()
    log(f"probe: loading {cfg.model.name_or_path}")
    model, tokenizer = load_run_model(cfg, inputs, check_tokenizer=check_given)
    model.eval()
    sampling_s = 0.0
    if given is None:
        sample_start = time.perf_counter()
        given = sample_rollouts(model, tokenizer, cfg, problems[:rollouts], student_style, batch_size, log)
        sampling_s = time.perf_counter() - sample_start
    source = TeacherSource(bank, retriever, cfg.sgsd.num_teachers)
    chunk = cfg.sgsd.chunk_tokens(head_vocab_size(lm_parts(model)[1]))
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


def sample_rollouts(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: RunConfig, problems: Sequence[Problem],
                    style: ChatStyle,
                    batch_size: int, log: Callable[[str], None]) -> list[ProbeRollout]:
    """One completion per problem with the config's sampling, graded with the config's reward."""

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


def _completion_tensors(tokenizer: PreTrainedTokenizerBase,
                        rollouts: Sequence[ProbeRollout]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded completion ids [B, T] and mask: the sampled ids, or the text re-tokenized with the end of
    sequence it stopped on (unless truncated)."""

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


    fields = TeacherProbe.__dataclass_fields__
    return TeacherProbe(**{name: torch.cat([getattr(p, name) for p in parts]) for name in fields})
