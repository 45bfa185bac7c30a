"""Measure a demo warm start: warm-up cost, accuracy per hint kind, SGSD polarity per teacher label.

Run as a script (this is how the numbers in the demo's design notes were produced)::

    python scripts/demo_measure.py [--seed S] [--cache-dir D] [--problems 100] [--k 4] [--json out.json]
    python scripts/demo_measure.py --polarity-only --controls neutral,shuffled [--rollouts 128] [--json out.json]

It warms up (or loads the cached warm start of replication S, default 0: `sgsd.demo.presets.warmup_config`),
then prints greedy and sampled accuracy on held-out
problems, sampled accuracy with no hint / helpful / irrelevant / misleading hints and with the OPSD
reference prompt, and the polarity table of `sgsd.demo.hints.polarity_table` on student rollouts of
training problems.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from sgsd.demo.evaluate import AccuracyEstimate, accuracy, subset
from sgsd.demo.hints import PolarityReport, format_polarity, hint_accuracy, polarity_table
from sgsd.demo.warmup import WarmStart, load_seed_bank


@dataclass(frozen=True)
class WarmStartMeasurement:
    """Everything `measure` found; `hint` maps "none"/"helpful"/"irrelevant"/"misleading"/"reference"."""

    warmup_seconds: float
    from_cache: bool
    num_parameters: int
    final_loss: float
    greedy: AccuracyEstimate | None  # None with --polarity-only (not measured), as `sampled`
    sampled: AccuracyEstimate | None
    hint: dict[str, AccuracyEstimate]
    polarity: PolarityReport
    measure_seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "warmup_seconds": self.warmup_seconds, "from_cache": self.from_cache,
            "num_parameters": self.num_parameters, "final_loss": self.final_loss,
            "greedy": self.greedy.to_json() if self.greedy else None,
            "sampled": self.sampled.to_json() if self.sampled else None,
            "hint": {k: v.to_json() for k, v in self.hint.items()},
            "polarity": {
                "success_rate": self.polarity.success_rate,
                "mean_counted_tokens": self.polarity.mean_counted_tokens,
                "top3_share": self.polarity.top3_share,
                "rows": [_finite(asdict(r)) for r in self.polarity.rows],
            },
            "measure_seconds": self.measure_seconds,
        }


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """NaN is not JSON: write null for empty groups."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def measure(start: WarmStart, *, num_problems: int = 100, k: int = 4, num_rollouts: int = 128,
            thetas: Sequence[float] = (0.05, 0.02, 0.01), seed: int = 0, controls: Sequence[str] = (),
            polarity_only: bool = False) -> WarmStartMeasurement:
    """Accuracy (held-out test problems) and polarity (rollouts on training problems) of a warm start;
    `polarity_only`: the polarity table alone (the accuracies are then empty estimates)."""
    began = time.perf_counter()
    model, tokenizer, bank = start.model, start.tokenizer, load_seed_bank()
    test = subset(start.world.test, num_problems, seed)
    greedy = None if polarity_only else accuracy(model, tokenizer, test, greedy=True, seed=seed)
    sampled = None if polarity_only else accuracy(model, tokenizer, test, k=k, seed=seed)
    hint = {} if polarity_only else hint_accuracy(model, tokenizer, test, bank, k=k, seed=seed)
    polarity = polarity_table(model, tokenizer, subset(start.world.train, num_rollouts, seed), bank,
                              thetas=thetas, seed=seed, controls=controls)
    return WarmStartMeasurement(
        warmup_seconds=start.report.seconds, from_cache=start.from_cache,
        num_parameters=start.report.num_parameters, final_loss=start.report.losses[-1],
        greedy=greedy, sampled=sampled, hint=hint, polarity=polarity,
        measure_seconds=time.perf_counter() - began,
    )


def format_measurement(m: WarmStartMeasurement) -> str:
    def acc(e: AccuracyEstimate | None) -> str:
        return "not measured" if e is None else f"{e.mean:.3f} [{e.ci_low:.3f}, {e.ci_high:.3f}]"

    lines = [
        f"warm-up: {m.warmup_seconds:.0f} s{' (cached)' if m.from_cache else ''}, "
        f"{m.num_parameters / 1e6:.2f} M parameters, final loss {m.final_loss:.3f}",
        f"held-out greedy accuracy {acc(m.greedy)}; sampled {acc(m.sampled)}",
        "sampled accuracy by prompt: " + "; ".join(f"{k} {acc(v)}" for k, v in m.hint.items()),
        format_polarity(m.polarity),
        f"measurement took {m.measure_seconds:.0f} s",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from sgsd.demo.presets import warmup_config
    from sgsd.demo.warmup import warm_start

    parser = argparse.ArgumentParser(prog="python scripts/demo_measure.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="which replication's warm start (default 0)")
    parser.add_argument("--cache-dir", default=None, help="cache root (default: ~/.cache/sgsd/demo)")
    parser.add_argument("--problems", type=int, default=100)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--rollouts", type=int, default=128)
    parser.add_argument("--json", default=None, help="also write the measurement as JSON here")
    parser.add_argument("--controls", default="", help="polarity controls to add: neutral, shuffled (comma-separated)")
    parser.add_argument("--polarity-only", action="store_true", help="only the polarity table (no accuracies)")
    args = parser.parse_args(argv)

    def progress(step: int, loss: float) -> None:
        if step % 50 == 0:
            print(f"warm-up step {step}: loss {loss:.3f}", file=sys.stderr, flush=True)

    start = warm_start(warmup_config(args.seed), cache_root=args.cache_dir, progress=progress)
    result = measure(start, num_problems=args.problems, k=args.k, num_rollouts=args.rollouts,
                     controls=[c for c in args.controls.split(",") if c.strip()], polarity_only=args.polarity_only)
    print(format_measurement(result))
    if args.json:
        from sgsd.storage import atomic_write_json

        atomic_write_json(args.json, {"path": str(start.path), **result.to_json()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
