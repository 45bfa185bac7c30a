"""One training process of a vLLM test launch: `torchrun --nproc_per_node N tests/vllm_worker.py RECIPE OUT
[key=value ...]`.

Trains `RECIPE` with `sgsd.trainers.run.prepare_run` (vLLM colocate generation, sampled), recording each
generation batch this rank scored (step, problems, completion token ids) in OUT/../rollouts-rank{R}.jsonl
through the rollout seam (`rollout_extras`), so the test can check which rank generated what.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(recipe: str, out: str, *overrides: str) -> int:
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from sgsd.config import load_config
    from sgsd.distributed import close, leave_worker
    from sgsd.trainers.run import prepare_run

    cfg = load_config(recipe, list(overrides))
    run = prepare_run(cfg, Path(out), progress=False)
    trainer = run.trainer
    rank = trainer.accelerator.process_index
    log = Path(out).parent / f"rollouts-rank{rank}.jsonl"
    original = trainer.rollout_extras

    def rollout_extras(inputs, output, rewards):
        completions = [ids[mask.bool()].tolist() for ids, mask in zip(output["completion_ids"], output["completion_mask"])]
        with log.open("a") as file:
            file.write(json.dumps({"step": trainer.state.global_step, "problems": [x["problem"] for x in inputs],
                                   "completions": completions}) + "\n")
        return original(inputs, output, rewards)

    trainer.rollout_extras = rollout_extras
    run.train()
    close()  # as `sgsd train` does
    leave_worker()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
