"""Cost per optimizer step of the tiny recipes of several methods (docs/methods.md).

    python scripts/method_cost.py DIR [--steps 4] [--recipes sgsd,sgsd-z,grpo,sgsd-pg]

Trains each `configs/tiny/<recipe>.yaml` for `--steps` steps into DIR/<recipe> (no checkpoints, so their
writing is not timed), one after the other in fresh processes, then prints the median over steps 2..N
(step 1 pays one-off warm-up) of the per-step times the trainers log (`time/step_s` = generate +
teachers + update), the rollouts per step, and each recipe's step time relative to the first recipe.
Tiny random models on CPU: the ratios show what a method adds (extra forwards), not paper-scale times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMES = ("time/step_s", "time/generate_s", "time/teacher_s", "time/update_s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--recipes", default="sgsd,sgsd-z,grpo,sgsd-pg")
    args = parser.parse_args()
    rows = []
    for recipe in args.recipes.split(","):
        out = args.output_dir / recipe
        config = ROOT / "configs/tiny" / f"{recipe}.yaml"
        command = [sys.executable, "-m", "sgsd.cli", "train", "--config", str(config),
                   "--output-dir", str(out), "--no-resume", "--quiet", "--max-steps", str(args.steps),
                   f"training.save_steps={args.steps + 1}"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"{recipe}: failed: {result.stderr.strip()[-300:]}", file=sys.stderr)
            return 1
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
        generations = _rollouts_per_prompt(config)
        rows.append((recipe, generations, [statistics.median(r[key] for r in records) for key in TIMES]))
    base = rows[0][2][0]
    print(f"{'recipe':<10} {'rollouts/prompt':>15} " + " ".join(f"{k.split('/')[1]:>11}" for k in TIMES)
          + f" {'step/' + rows[0][0]:>12}")
    for recipe, generations, times in rows:
        print(f"{recipe:<10} {generations:>15} " + " ".join(f"{t:>11.3f}" for t in times) + f" {times[0] / base:>12.2f}")
    return 0


def _rollouts_per_prompt(config: Path) -> int:
    from sgsd.config import load_config
    from sgsd.methods import method_spec

    cfg = load_config(config)
    return method_spec(cfg.method).grpo_settings(cfg)["num_generations"]


if __name__ == "__main__":
    sys.exit(main())
