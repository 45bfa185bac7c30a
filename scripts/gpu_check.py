"""The CUDA path in one short run: every tiny recipe trains on one GPU in bf16, and the paper's engine
(DeepSpeed ZeRO-2 and ZeRO-3, bf16) trains through `torchrun`, with the dtype invariants checked.

    python scripts/gpu_check.py OUT_DIR            # about 3-6 minutes on one GPU, most of it start-up

What it checks, per run: exit 0, every logged loss and reward finite, `final/` written; for the EMA teacher
the shadow weights in `sgsd_state.pt` are fp32 (bf16 would lose updates below its resolution); for LoRA the
adapter weights are fp32. It prints one line per run and writes OUT_DIR/gpu_check.json. Nothing here
replaces the CPU suite (CI runs that); it covers what only a GPU has: CUDA kernels, bf16 autocast on
CUDA, DeepSpeed's CUDA path. Run it before a long run on a new cluster, after `pip install -e
".[deepspeed]"` (vLLM and NCCL across several GPUs need a machine with several GPUs: docs/distributed.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
CUDA = ("training.device=cuda", "training.deterministic=false")
RUN_TIMEOUT_S = 240


def runs() -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """name -> (launcher prefix, train arguments)."""
    plain = [sys.executable, "-m", "sgsd.cli"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29561",
                "-m", "sgsd.cli"]
    zero2 = str(ROOT / "configs" / "paper" / "deepspeed-zero2.json")
    zero3 = os.environ.get("SGSD_ZERO3_CONFIG", str(ROOT / "configs" / "paper" / "deepspeed-zero3.json"))
    table: dict[str, tuple[list[str], tuple[str, ...]]] = {
        name: (plain, (f"{name}.yaml", *CUDA)) for name in ("sgsd", "grpo", "opsd", "sgsd-pg", "sgsd-z")
    }
    table["sgsd-bf16-lora-ema"] = (plain, ("sgsd.yaml", *CUDA, "training.precision=bf16", "model.lora.enabled=true",
                                           "model.lora.r=4", "model.lora.alpha=8", "sgsd.teacher=ema"))
    table["sgsd-bf16-ema"] = (plain, ("sgsd.yaml", *CUDA, "training.precision=bf16", "sgsd.teacher=ema"))
    table["sgsd-zero2-bf16-lora-ema"] = (torchrun, ("sgsd.yaml", *CUDA, "training.precision=bf16",
                                                     f"training.deepspeed={zero2}", "model.lora.enabled=true",
                                                     "model.lora.r=4", "model.lora.alpha=8", "sgsd.teacher=ema"))
    if Path(zero3).is_file():
        for method in ("sgsd", "opsd"):  # sgsd-pg under ZeRO-3 is refused before the model loads
            table[f"{method}-zero3-bf16"] = (torchrun, (f"{method}.yaml", *CUDA, "training.precision=bf16",
                                                        f"training.deepspeed={zero3}"))
    return table


def check(run: Path, args: tuple[str, ...]) -> list[str]:
    """What is wrong with a finished run (empty: nothing)."""
    import torch

    problems = []
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not records:
        problems.append("no metrics")
    for record in records:
        for key in ("train/loss", "train/reward_mean"):
            value = record.get(key)
            if value is not None and not math.isfinite(value):
                problems.append(f"step {record['step']}: {key} = {value}")
    if not (run / "final").is_dir():
        problems.append("no final/")
    if "sgsd.teacher=ema" in args:
        states = sorted(run.glob("checkpoint-*/sgsd_state.pt"))
        if not states:
            problems.append("no sgsd_state.pt")
        else:
            shadow = torch.load(states[-1], map_location="cpu", weights_only=True)["ema"]["shadow"]
            dtypes = {str(v.dtype) for v in shadow.values()}
            if dtypes != {"torch.float32"}:
                problems.append(f"EMA shadow dtypes {sorted(dtypes)}, expected float32")
    if "model.lora.enabled=true" in args and not any(a.startswith("training.deepspeed=") for a in args):
        # (under DeepSpeed's bf16 mode the module, adapters included, is bf16 and its fp32 master weights
        # live in the optimizer shards: tests/test_deepspeed.py checks those on CPU)
        from safetensors.torch import load_file

        adapter = load_file(run / "final" / "adapter_model.safetensors")
        dtypes = {str(v.dtype) for v in adapter.values()}
        if dtypes != {"torch.float32"}:
            problems.append(f"LoRA adapter dtypes {sorted(dtypes)}, expected float32")
    return problems


def main(out: Path) -> int:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    summary = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               "runs": {}}
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    failed = 0
    for name, (launcher, (recipe, *overrides)) in runs().items():
        run = out / "runs" / name
        command = [*launcher, "train", "--config", str(TINY / recipe), "--output-dir", str(run), "--quiet",
                   "--no-resume", *overrides]
        started = time.monotonic()
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S)
            problems = [f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ''}"] \
                if result.returncode else check(run, tuple(overrides))
            stderr = result.stderr
        except subprocess.TimeoutExpired as err:
            problems, stderr = [f"no exit within {RUN_TIMEOUT_S} s"], str(err.stderr or "")
        seconds = round(time.monotonic() - started, 1)
        summary["runs"][name] = {"ok": not problems, "seconds": seconds, "problems": problems,
                                 "stderr_tail": stderr[-1500:] if problems else ""}
        failed += bool(problems)
        print(f"{name}: {'ok' if not problems else 'FAILED: ' + '; '.join(problems)} ({seconds} s)", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")  # after each run: a cut-off keeps it
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
