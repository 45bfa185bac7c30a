"""`sgsd bench teacher-engine`: the live teacher scored by the colocated vLLM engine against the trainer's model
(`sgsd.teacher_engine: vllm | trainer`, docs/performance.md "Scoring teachers in vLLM").

Per model and dtype, in one process: the model loaded for the trainer and a vLLM engine on the same weights
(the same dtype); `--rollouts` fixed rollouts sampled by the engine (temperature 1, seed 0, `--tokens` new
tokens) for GSM8K problems (`--data-dir`, else the built-in tiny-math problems), K = `--teachers` teachers of
the paper's bank (embedding retrieval) and the neutral control, rewards alternating 1, 0 (both outcomes).
Then:
- the noise: per counted token of each present row, |log q_vllm - log q_trainer| (teachers and the control),
  against |d_t| = |log q_trainer - log p| (the student's own log-prob on its plain prompt): the values the
  polarity test averages (docs/spec.md section 4); quantiles, and the share of tokens where the noise exceeds
  |d_t|;
- the decisions: polarity of every (rollout, teacher) with the paper's threshold test and with the z test,
  without control and against the neutral control, from either engine's log-probs (the student's the same):
  the share that changes, and the largest support difference;
- the loss and its gradient (the student's, full fine-tuning) from either engine's log-probs: relative
  differences |L_v - L_t| / |L_t| and ||g_v - g_t|| / ||g_t||, for each test;
- the teacher phase's seconds (`score_under_teachers`: trainer with prefix reuse, without, and the engine),
  wall and this process's CPU time (the engine runs in this process), interleaved over `--rounds` rounds,
  with the ratios engine / trainer of each round.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sgsd.benchmarking.real_model import PAPER_BANK
from sgsd.data import tiny_math_problems
from sgsd.evaluation.benchmarks import load_benchmark
from sgsd.generation import SamplingConfig, VLLMGenerator
from sgsd.loss_phase import sgsd_loss_phase
from sgsd.loss_settings import SGSDSettings
from sgsd.models import engine_directory, load_model, load_tokenizer
from sgsd.prompts import ChatStyle, render_chat, student_prompt
from sgsd.scoring import left_pad
from sgsd.skills.bank import load_bank
from sgsd.skills.retrieval import make_retriever
from sgsd.skills.teachers import TeacherSource
from sgsd.storage import JSONObject
from sgsd.teacher_scoring import ScoredRollouts, decide, score_rollouts, score_under_teachers

# the paper's threshold test, the z test, and theta = 0 (every nonzero support counts: the sign alone decides, the
# test most exposed to noise; on a random tiny model every teacher is neutral at the paper's theta)
TESTS = {"threshold": SGSDSettings(), "z": SGSDSettings(polarity_test="z"),
         "threshold0": SGSDSettings(confidence_threshold=0.0)}
QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)
ENGINE_DTYPES = {"float32": "fp32", "bfloat16": "bf16"}


def _quantiles(values: Any) -> dict[str, float]:
    values = values.double()
    return {f"q{int(q * 100):02d}": float(torch.quantile(values, q)) for q in QUANTILES} | {
        "max": float(values.max()), "mean": float(values.mean())}


def _problems(data_dir: str | None, count: int) -> tuple[str, list[str]]:
    """(where the problems come from, the first `count` of them)."""
    if data_dir and (Path(data_dir) / "gsm8k_test.jsonl").is_file():
        return "gsm8k", [p.problem for p in load_benchmark("gsm8k", data_dir=data_dir, limit=count).problems]
    return "tiny-math", [p.problem for p in tiny_math_problems(count)]


def _loss_and_grad(model: torch.nn.Module, student: tuple[torch.Tensor, torch.Tensor],
                   completion: tuple[torch.Tensor, torch.Tensor], scored: ScoredRollouts, settings: SGSDSettings,
                   control: str) -> tuple[float, torch.Tensor]:
    scores = scored.scores
    model.zero_grad(set_to_none=True)
    phase = sgsd_loss_phase(model, prompt_ids=student[0], prompt_mask=student[1], completion_ids=completion[0],
                            completion_mask=completion[1], counted_mask=scores.counted, rewards=scored.rewards,
                            teacher_weights=scores.teacher_weights, teacher_logps=scores.teacher_logps,
                            chunk_tokens=4096, settings=replace(settings, polarity_control=control),
                            control_logps=scores.control_logps.get(control))
    phase.loss.backward()
    grad = torch.cat([p.grad.reshape(-1).double() for p in model.parameters() if p.grad is not None])
    return float(phase.loss.detach()), grad


def measure(name: str, spec: str, dtype: str, *, rollouts: int, tokens: int, teachers: int, rounds: int,
            data_dir: str | None, progress: Callable[[str], None] = lambda line: None) -> JSONObject:
    """One model in one dtype (a key of ENGINE_DTYPES): the module docstring's measurements."""
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, dtype=ENGINE_DTYPES[dtype], tokenizer=tokenizer).eval()
    folder = engine_directory(spec, model, tokenizer)
    start = time.perf_counter()
    engine = VLLMGenerator(folder, dtype=dtype)
    engine_start = time.perf_counter() - start
    try:
        source, problems = _problems(data_dir, rollouts)
        style = ChatStyle(enable_thinking=False)
        texts = [render_chat(tokenizer, student_prompt(p), style) for p in problems]
        sampled = engine.generate(texts, 1, SamplingConfig(max_new_tokens=tokens, temperature=1.0, top_p=1.0, seed=0))
        rows = [c[0].token_ids[:tokens] or [tokenizer.eos_token_id] for c in sampled]
        ids, mask = left_pad([r[::-1] for r in rows], tokenizer.pad_token_id)  # right padding: flip, pad left, flip
        ids, mask = ids.flip(1), mask.flip(1)
        rewards = torch.tensor([float(i % 2 == 0) for i in range(len(problems))])
        bank = load_bank(PAPER_BANK)
        source = TeacherSource(bank, make_retriever("embedding", bank), teachers)
        chosen = source.teachers_for(problems)
        controls = {"neutral": source.controls_for(problems, "neutral", tokenizer)}
        settings = replace(SGSDSettings(), num_teachers=teachers)
        trainer = score_rollouts(model, tokenizer, problems, ids, mask, rewards, chosen, settings, controls=controls,
                                 student_style=style)
        kwargs = {"settings": settings, "style": style, "chunk_tokens": 4096, "controls": controls}
        in_engine = ScoredRollouts(score_under_teachers(model, tokenizer, problems, chosen, ids, mask,
                                                        engine=engine.llm, **kwargs),
                                   trainer.student_logps, trainer.rewards)

        # the noise against the signal, over the counted tokens of present rows (teachers and the control)
        counted, present = trainer.scores.counted, trainer.scores.teacher_weights > 0
        cells = counted[:, None, :] & present[:, :, None]
        noise = [(in_engine.scores.teacher_logps - trainer.scores.teacher_logps)[cells]]
        signal = [(trainer.scores.teacher_logps - trainer.student_logps[:, None, :])[cells]]
        for kind, logps in trainer.scores.control_logps.items():
            noise.append((in_engine.scores.control_logps[kind] - logps)[counted])
            signal.append((logps - trainer.student_logps)[counted])
        noise_t, signal_t = torch.cat(noise).abs(), torch.cat(signal).abs()
        report: JSONObject = {
            "model": name, "spec": spec, "dtype": dtype, "problems": source, "rollouts": len(problems),
            "teachers": teachers,
            "completion_tokens": int(mask.sum()), "counted_tokens": int(noise_t.numel()),
            "threads": torch.get_num_threads(), "engine_start_s": engine_start,
            "noise": _quantiles(noise_t), "abs_d": _quantiles(signal_t),
            "share_noise_above_abs_d": float((noise_t > signal_t).double().mean()),
        }

        # the decisions, the loss and the gradient from either engine's log-probs
        report["decisions"] = {}
        student = left_pad([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts],
                           tokenizer.pad_token_id)
        trainable = load_model(spec, dtype=ENGINE_DTYPES[dtype], tokenizer=tokenizer).train()
        trainable.load_state_dict(model.state_dict())
        for test, test_settings in TESTS.items():
            test_settings = replace(test_settings, num_teachers=teachers)
            found = {engine_name: decide(scored, test_settings)
                     for engine_name, scored in (("trainer", trainer), ("vllm", in_engine))}
            for control in found["trainer"]:
                a, b = found["trainer"][control], found["vllm"][control]
                loss_t, grad_t = _loss_and_grad(trainable, student, (ids, mask), trainer, test_settings, control)
                loss_v, grad_v = _loss_and_grad(trainable, student, (ids, mask), in_engine, test_settings, control)
                report["decisions"][f"{test}/{control}"] = {
                    "decisions": int(a.present.sum()),
                    "changed": int((a.polarity != b.polarity)[a.present].sum()),
                    "share_changed": float((a.polarity != b.polarity)[a.present].double().mean()),
                    "polarity_counts": {str(v): int((a.polarity[a.present] == v).sum()) for v in (-1, 0, 1)},
                    "max_abs_support_diff": float((a.support - b.support)[a.present].abs().max()),
                    # NaN where every teacher is neutral (loss and gradient 0: nothing to compare)
                    "loss_trainer": loss_t,
                    "loss_rel_diff": abs(loss_v - loss_t) / abs(loss_t) if loss_t else float("nan"),
                    "grad_rel_diff": float((grad_v - grad_t).norm() / grad_t.norm()) if grad_t.norm() > 0
                    else float("nan"),
                }
        del trainable

        # the teacher phase's time: trainer (prefix reuse on, off) and the engine, interleaved
        variants = {"trainer": lambda: score_under_teachers(model, tokenizer, problems, chosen, ids, mask, **kwargs),
                    "trainer_no_reuse": lambda: score_under_teachers(
                        model, tokenizer, problems, chosen, ids, mask,
                        **{**kwargs, "settings": replace(settings, prefix_reuse=False)}),
                    "vllm": lambda: score_under_teachers(model, tokenizer, problems, chosen, ids, mask,
                                                         engine=engine.llm, **kwargs)}
        # wall seconds, and this process's CPU seconds (the engine runs in this process; on a shared machine the
        # wall time also measures the other jobs' load, the CPU time does not)
        seconds: dict[str, list[float]] = {v: [] for v in variants}
        cpu: dict[str, list[float]] = {v: [] for v in variants}
        for index in range(rounds):
            order = list(variants) if index % 2 == 0 else list(variants)[::-1]
            for variant in order:
                start, cpu_start = time.perf_counter(), time.process_time()
                variants[variant]()
                seconds[variant].append(time.perf_counter() - start)
                cpu[variant].append(time.process_time() - cpu_start)
            progress(f"{name} {dtype} round {index + 1}: " + ", ".join(
                f"{v} {seconds[v][-1]:.2f} s ({cpu[v][-1]:.2f} CPU s)" for v in order))
        report["teacher_phase_s"], report["teacher_phase_cpu_s"] = seconds, cpu
        for measured, key in ((seconds, ""), (cpu, "cpu_")):
            for base in ("trainer", "trainer_no_reuse"):
                report[f"{key}ratio_vllm_over_{base}"] = [v / t for v, t in zip(measured["vllm"], measured[base])]
        report["load_average"] = list(os.getloadavg())
        progress(json.dumps(report))  # each model's result as soon as it is measured
        return report
    finally:
        engine.close()


def table(reports: Sequence[JSONObject]) -> str:
    """The reports as text: the noise against |d_t|, the decisions changed, the loss and gradient differences,
    the teacher phase's ratio."""
    lines = [f"{'model':<8} {'dtype':<8} {'tokens':>6} {'noise q50/q99/max':>26} {'|d| q01/q10/q50':>24} "
             f"{'noise>|d|':>9}  {'vllm/trainer, CPU s (per round)':<28}"]
    for r in reports:
        if "error" in r:
            lines.append(f"{r['model']:<8} {r['dtype']:<8} error: {r['error']}")
            continue
        n, d = r["noise"], r["abs_d"]
        ratios = " ".join(f"{x:.2f}" for x in r.get("cpu_ratio_vllm_over_trainer", r["ratio_vllm_over_trainer"]))
        lines.append(f"{r['model']:<8} {r['dtype']:<8} {r['counted_tokens']:>6} "
                     f"{n['q50']:8.1e}/{n['q99']:8.1e}/{n['max']:8.1e} {d['q01']:7.1e}/{d['q10']:7.1e}/{d['q50']:7.1e} "
                     f"{r['share_noise_above_abs_d']:9.4f}  {ratios}")
    lines.append("")
    lines.append(f"{'model':<8} {'dtype':<8} {'test/control':<20} {'changed':>9} {'support diff':>12} "
                 f"{'loss rel':>9} {'grad rel':>9}")
    for r in reports:
        for key, v in r.get("decisions", {}).items():
            lines.append(f"{r['model']:<8} {r['dtype']:<8} {key:<20} {v['changed']:>4}/{v['decisions']:<4} "
                         f"{v['max_abs_support_diff']:12.1e} {v['loss_rel_diff']:9.1e} {v['grad_rel_diff']:9.1e}")
    return "\n".join(lines)
