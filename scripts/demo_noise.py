"""How far machine noise moves the demo: the same demo from warm starts one ulp apart, on one machine.

Two machines that train "the same" warm start get weights that differ in their last bits (other
kernels, other reduction orders, another thread count), and what follows can amplify that. This runs
the demo twice, as usual and with one ulp of noise on every weight (`sgsd.demo.warmup.perturb_ulp`),
everything else equal, and reports how far each run's avg@k, each method's mean and each paired
difference moved. `--at warm-up` (the default) moves the initial weights before the 650-step warm-up,
which then amplifies it as it would a machine's differences; `--at warm-start` moves the trained warm
start's weights, which tests whether the 30 training steps amplify last bits on their own::

    python scripts/demo_noise.py --exact runs/demo --perturbed runs/demo-ulp [--at warm-up|warm-start]
        [--preset full|quick|smoke] [--methods a,b,...] [--seeds N] [--cache-dir D]

`--exact` may be a directory an ordinary `sgsd demo` with the same settings has filled: its runs are
reused. Written to the perturbed directory: noise.json and noise.md (also printed).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence


def accuracy_moves(exact: dict[str, Any], perturbed: dict[str, Any]) -> dict[str, Any]:
    """perturbed - exact for two demos' results.json (same plan, same seeds): per run (method, seed,
    learning rate), per warm start (Base), per method mean and per paired comparison, and the largest
    absolute move of a single run."""
    def by_run(results: dict[str, Any]) -> dict[tuple[str, int, Any], float]:
        return {(r["method"], r["seed"], r["learning_rate"]): r["avg_at_k"] for r in results["runs"]}

    runs_a, runs_b = by_run(exact), by_run(perturbed)
    if runs_a.keys() != runs_b.keys():
        raise ValueError("accuracy_moves: the two demos trained different runs; use the same settings for both")
    runs = [{"method": m, "seed": s, "learning_rate": lr, "exact": runs_a[(m, s, lr)], "perturbed": runs_b[(m, s, lr)],
             "move": runs_b[(m, s, lr)] - runs_a[(m, s, lr)]} for (m, s, lr) in sorted(runs_a, key=str)]
    base_a = {w["seed"]: w["base"]["mean"] for w in exact["warm_starts"]}
    base_b = {w["seed"]: w["base"]["mean"] for w in perturbed["warm_starts"]}
    bases = [{"seed": s, "exact": base_a[s], "perturbed": base_b[s], "move": base_b[s] - base_a[s]}
             for s in sorted(base_a) if s in base_b]
    methods = {name: {"exact": m["mean"], "perturbed": perturbed["methods"][name]["mean"],
                      "move": perturbed["methods"][name]["mean"] - m["mean"]}
               for name, m in exact["methods"].items() if name in perturbed["methods"]}
    compared = {key: {"exact": c["difference"], "perturbed": perturbed["comparisons"][key]["difference"],
                      "move": perturbed["comparisons"][key]["difference"] - c["difference"],
                      "verdicts": [c["verdict"], perturbed["comparisons"][key]["verdict"]]}
                for key, c in exact["comparisons"].items() if key in perturbed["comparisons"]}
    trained = [r["move"] for r in runs]
    return {"runs": runs, "base": bases, "methods": methods, "comparisons": compared,
            "max_abs_run_move": max((abs(x) for x in trained), default=0.0),
            "mean_abs_run_move": sum(abs(x) for x in trained) / len(trained) if trained else 0.0}


def format_moves(moves: dict[str, Any], k: int) -> str:
    """noise.md: the moves as markdown tables."""
    from sgsd.demo.plan import label

    lines = [f"# One ulp of noise on the warm starts: how far avg@{k} moved", "",
             "| run | seed | exact | perturbed | move |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| Base | {b['seed']} | {b['exact']:.3f} | {b['perturbed']:.3f} | {b['move']:+.3f} |" for b in moves["base"]]
    lines += [f"| {label(r['method'])} (lr {r['learning_rate']:g}) | {r['seed']} | {r['exact']:.3f} | "
              f"{r['perturbed']:.3f} | {r['move']:+.3f} |" for r in moves["runs"]]
    lines += ["", f"Largest move of one training run: {moves['max_abs_run_move']:.3f}; mean absolute move "
              f"{moves['mean_abs_run_move']:.3f}.", "", "| method mean / paired difference | exact | perturbed | move "
              "| verdicts (exact, perturbed) |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {label(name)} | {m['exact']:.3f} | {m['perturbed']:.3f} | {m['move']:+.3f} | |"
              for name, m in moves["methods"].items()]
    lines += [f"| {key} | {c['exact']:+.3f} | {c['perturbed']:+.3f} | {c['move']:+.3f} | {', '.join(c['verdicts'])} |"
              for key, c in moves["comparisons"].items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from sgsd.demo.plan import PRESETS, parse_methods
    from sgsd.demo.run import make_plan, run_demo
    from sgsd.errors import UserError
    from sgsd.storage import atomic_write_json, atomic_write_text

    parser = argparse.ArgumentParser(prog="python scripts/demo_noise.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--exact", required=True, help="demo directory from the warm starts as cached")
    parser.add_argument("--perturbed", required=True, help="demo directory from the perturbed warm starts")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="full")
    parser.add_argument("--methods", default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--at", choices=("warm-up", "warm-start"), default="warm-up",
                        help="where the ulp goes: the initial weights, before the warm-up (default), or the "
                             "trained warm start")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if Path(args.exact).resolve() == Path(args.perturbed).resolve():
        print("demo_noise.py: error: --exact and --perturbed must be different directories", file=sys.stderr)
        return 2
    try:
        methods = parse_methods(args.methods) if args.methods else None
        plan = make_plan(preset=args.preset, seeds=args.seeds, methods=methods)
        exact = run_demo(args.exact, plan=plan, cache_root=args.cache_dir, progress=not args.quiet)
        perturbed = run_demo(args.perturbed, plan=replace(plan, ulp_noise=args.at), cache_root=args.cache_dir,
                             progress=not args.quiet)
    except UserError as err:
        print(f"demo_noise.py: error: {err}", file=sys.stderr)
        return 2
    moves = accuracy_moves(exact, perturbed)
    text = format_moves(moves, exact["k"])
    atomic_write_json(Path(args.perturbed) / "noise.json", moves)
    atomic_write_text(Path(args.perturbed) / "noise.md", text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
