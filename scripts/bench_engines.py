"""Step time and peak memory per process of DDP, DeepSpeed ZeRO-2 and ZeRO-3 (and FSDP2) on one recipe.

    DS_ACCELERATOR=cpu python scripts/bench_engines.py [--recipe configs/tiny/sgsd.yaml] [--steps 5]
        [--processes 2] [--out runs/bench-engines] [key=value ...]

Each engine trains the same recipe (same seed, same overrides) with `sgsd train` on `--processes`
processes (torchrun; FSDP2 through `accelerate launch` with configs/cpu/accelerate-fsdp2.yaml), one
after the other, and the script prints a Markdown table: the median `time/step_s` of the steps after
the first (the first pays for one-time set-up), and each rank's peak resident memory (ru_maxrss: the
whole process, Python, torch and DeepSpeed included, so small models show mostly the runtime). Ratios
are against DDP in the same invocation; rerun on an otherwise idle machine for numbers to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {
    "DDP": [],
    "ZeRO-2": [f"training.deepspeed={ROOT / 'configs/paper/deepspeed-zero2.json'}"],
    "ZeRO-3": [f"training.deepspeed={ROOT / 'configs/paper/deepspeed-zero3.json'}"],
    "FSDP2": [],
}


def rank_main(out: str, argv: list[str]) -> int:
    """One rank: `sgsd train ...`, then this process's peak memory into OUT/peak_rss_rank<R>.json."""
    from sgsd.cli import main

    code = main(argv)
    rank = os.environ.get("RANK", "0")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    Path(out, f"peak_rss_rank{rank}.json").write_text(json.dumps({"peak_rss_mib": peak_mib}))
    return code


def launch(engine: str, processes: int, run: Path, train_args: list[str]) -> list[str]:
    inner = [str(Path(__file__).resolve()), "--rank-of", str(run), "--", *train_args]
    if engine == "FSDP2":
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs/cpu/accelerate-fsdp2.yaml"), "--num_processes", str(processes), *inner]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *inner]


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--rank-of":
        return rank_main(sys.argv[2], sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "configs/tiny/sgsd.yaml"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-engines")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, of " + ", ".join(ENGINES))
    parser.add_argument("overrides", nargs="*", help="key=value settings for every engine")
    args = parser.parse_args()
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "TRL_EXPERIMENTAL_SILENCE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    rows = []
    for engine in args.engines.split(","):
        run = Path(args.out) / engine
        if run.exists():
            raise SystemExit(f"{run} exists: choose another --out")
        run.mkdir(parents=True)
        train_args = ["train", "--config", args.recipe, "--output-dir", str(run / "run"), "--quiet",
                      "--max-steps", str(args.steps), f"training.save_steps={args.steps}", *args.overrides,
                      *ENGINES[engine]]
        done = subprocess.run(launch(engine, args.processes, run, train_args), env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{engine}: failed\n{done.stderr[-3000:]}")
        records = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
        step_s = statistics.median(r["time/step_s"] for r in records[1:])
        peaks = [json.loads(p.read_text())["peak_rss_mib"] for p in sorted(run.glob("peak_rss_rank*.json"))]
        rows.append((engine, step_s, peaks))
    base_step, base_peak = rows[0][1], max(rows[0][2])
    print(f"recipe {args.recipe}, {args.processes} processes, {args.steps} steps, overrides: "
          f"{' '.join(args.overrides) or '-'}\n")
    print(f"| engine | step time (median, s) | vs {rows[0][0]} | peak memory per process (MiB) | vs {rows[0][0]} |")
    print("| --- | --- | --- | --- | --- |")
    for engine, step_s, peaks in rows:
        print(f"| {engine} | {step_s:.2f} | {step_s / base_step:.2f}x | {' / '.join(f'{p:.0f}' for p in peaks)} | "
              f"{max(peaks) / base_peak:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
