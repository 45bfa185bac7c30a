"""`sgsd train --config FILE [--output-dir DIR] [--max-steps N] [--no-resume] [key=value ...]`."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe (e.g. configs/tiny/sgsd.yaml)")
    parser.add_argument("--output-dir", help="run directory (default: training.output_dir of the config)")
    parser.add_argument("--max-steps", type=int, help="override training.max_steps")
    parser.add_argument("--no-resume", action="store_true",
                        help="start fresh (only into an empty directory); by default the latest complete checkpoint "
                             "in the output directory is resumed")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys, e.g. training.learning_rate=1e-5 sgsd.teacher=ema")


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    from sgsd.config import load_config

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sgsd.distributed import same_on_every_rank
    from sgsd.trainers.run import train

    with same_on_every_rank():  # a bad config is found alike by every rank: printed once
        cfg = load_config(args.config, args.overrides)

    result = train(cfg, args.output_dir, resume=not args.no_resume, max_steps=args.max_steps,
                   progress=not args.quiet)
    from sgsd.distributed import is_main_process

    if not is_main_process():  # what a user reads comes once, from the main process
        return 0
    if result.ignored_checkpoints:
        print(f"sgsd: ignored incomplete checkpoints: {', '.join(result.ignored_checkpoints)}", file=sys.stderr)
    if result.resumed_from:
        print(f"sgsd: resumed from {result.resumed_from}")
    print(f"sgsd: trained {result.global_step} steps; final model in {result.final_dir}")
    return 0
