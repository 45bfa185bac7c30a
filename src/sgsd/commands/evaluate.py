"""`sgsd eval`: avg@k / pass@k / maj@k of a model on math benchmarks, and `sgsd eval compare`.

    sgsd eval --model Qwen/Qwen3-1.7B --benchmarks aime24,aime25,hmmt25 --k 12 --output-dir out/base
    sgsd eval --model runs/sgsd --data-dir ../shared/benchmarks --output-dir out/sgsd      # a run's final/
    sgsd eval --model Qwen/Qwen3-1.7B --skills bank.json --output-dir out/base_skill       # Base+Skill
    sgsd eval compare out/base out/sgsd --plot compare.png

Defaults are the paper's (SPEC section 7): k = 12, temperature 1.0, top-p 0.95, 38,912 new tokens.
Generation uses vLLM when installed with a CUDA device, Hugging Face generate otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sgsd.errors import ConfigError, UserError

DEFAULT_BENCHMARKS = "aime24,aime25,hmmt25"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("compare", nargs="*", metavar="compare OUT1 OUT2",
                        help="`compare OUT1 OUT2 ...`: print and plot evaluations side by side")
    parser.add_argument("--model", help="hub id, local model, run directory (its final/), adapter dir, or tiny")
    parser.add_argument("--benchmarks", default=DEFAULT_BENCHMARKS,
                        help="comma-separated names (aime24, aime25, hmmt25, math500, gsm8k) or JSONL/parquet paths")
    parser.add_argument("--k", type=int, default=12, help="samples per problem (default 12)")
    parser.add_argument("--data-dir", help="read registered benchmarks from this folder's JSONL files (offline)")
    parser.add_argument("--limit", type=int, help="only the first N problems of each benchmark")
    parser.add_argument("--skills", help="skill bank JSON: Base+Skill (top skills and mistakes in the prompt)")
    parser.add_argument("--skills-top-k", type=int, default=8, help="skills and mistakes in the prompt (default 8)")
    parser.add_argument("--retrieval", default="embedding", help="retrieval mode for --skills (embedding, bm25, random)")
    parser.add_argument("--embedder", help="embedding model for --retrieval embedding")
    parser.add_argument("--max-new-tokens", type=int, default=38_912)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=0, help="0 disables top-k (default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                        help="chat template thinking mode (default: the template's own default)")
    parser.add_argument("--after-think", action="store_true",
                        help="grade only the box after the last </think> (default: the last box anywhere)")
    parser.add_argument("--backend", default="auto", help="auto (vLLM when usable), hf or vllm")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per Hugging Face generate call")
    parser.add_argument("--dtype", default="auto", help="model dtype: auto, bf16, fp16, fp32")
    parser.add_argument("--grade-workers", type=int, default=4, help="grader processes")
    parser.add_argument("--grade-timeout", type=float, default=5.0, help="seconds per answer check")
    parser.add_argument("--output-dir", help="where results.json and samples/ are written")
    parser.add_argument("--plot", default=None, help="compare: PNG path (default: compare.png)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.compare:
        if args.compare[0] != "compare":
            raise UserError(f"eval: unexpected argument {args.compare[0]!r} (did you mean `sgsd eval compare OUT...`?)")
        return run_compare(args.compare[1:], args.plot or "compare.png")
    return run_eval(args)


def run_compare(paths: list[str], plot: str) -> int:
    from sgsd.evaluation.report import format_comparison, load_run, plot_comparison

    if not paths:
        raise UserError("eval compare: give at least one evaluation output directory")
    labels = [Path(p).resolve().name for p in paths]
    if len(set(labels)) < len(labels):
        labels = [str(Path(p)) for p in paths]
    runs = [load_run(p, label) for p, label in zip(paths, labels)]
    print(format_comparison(runs))
    print(f"plot: {plot_comparison(runs, plot)}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from sgsd.evaluation.generation import SamplingConfig, choose_backend
    from sgsd.evaluation.report import format_results
    from sgsd.evaluation.runner import EvalSettings, load_benchmarks, run_evaluation

    if not args.model or not args.output_dir:
        raise UserError("eval: --model and --output-dir are required (or `sgsd eval compare OUT...`)")
    benchmarks = tuple(b.strip() for b in args.benchmarks.split(",") if b.strip())
    if not benchmarks:
        raise UserError("eval: --benchmarks is empty")
    for name, value, low in (("--k", args.k, 1), ("--skills-top-k", args.skills_top_k, 1),
                             ("--grade-workers", args.grade_workers, 1), ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise ConfigError(f"eval: {name} {value}: must be at least {low}")
    if args.grade_timeout <= 0:
        raise ConfigError(f"eval: --grade-timeout {args.grade_timeout}: must be positive")
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed)
    settings = EvalSettings(
        model=args.model, benchmarks=benchmarks, k=args.k, sampling=sampling, thinking=args.thinking,
        after_think=args.after_think, data_dir=args.data_dir, limit=args.limit, skills=args.skills,
        skills_top_k=args.skills_top_k, retrieval=args.retrieval, backend=choose_backend(args.backend, args.model),
        grade_timeout_s=args.grade_timeout, grade_workers=args.grade_workers,
    )
    loaded = load_benchmarks(settings)  # fail on a bad benchmark before loading the model
    retriever = _retriever(args) if args.skills else None
    generator, tokenizer = _generator(settings, args)
    results = run_evaluation(settings, generator, tokenizer, args.output_dir, benchmarks=loaded,
                             retriever=retriever, progress=not args.no_progress)
    print(format_results(results))
    print(f"results: {Path(args.output_dir) / 'results.json'}")
    return 0


def _retriever(args: argparse.Namespace) -> Any:
    try:
        from sgsd.skills.bank import load_bank
        from sgsd.skills.retrieval import make_retriever
    except ImportError as err:  # the skills package is optional for evaluation
        raise UserError(f"eval --skills: the skill-bank package is unavailable ({err})") from err
    options = {"embedder": args.embedder} if args.embedder else {}
    return make_retriever(args.retrieval, load_bank(args.skills), **options)


def _generator(settings: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    from sgsd.evaluation.generation import HFGenerator, VLLMGenerator
    from sgsd.models import load_model, load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(settings.model)
    if settings.backend == "vllm":
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(args.dtype, args.dtype)
        path = Path(resolve_model_path(settings.model))
        adapter_config = path / "adapter_config.json"
        if adapter_config.exists():
            config = json.loads(adapter_config.read_text())
            return VLLMGenerator(config["base_model_name_or_path"], adapter_path=str(path),
                                 max_lora_rank=int(config.get("r", 64)), dtype=dtype), tokenizer
        return VLLMGenerator(str(path), dtype=dtype), tokenizer
    import torch

    model = load_model(settings.model, dtype=args.dtype, tokenizer=tokenizer)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return HFGenerator(model, tokenizer, batch_size=args.batch_size), tokenizer
