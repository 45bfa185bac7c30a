"""One training process of a vLLM test launch: `torchrun --nproc_per_node N tests/vllm_worker.py RECIPE OUT
[key=value ...]`.

Trains `RECIPE` with `sgsd.trainers.run.prepare_run` (vLLM colocate generation, sampled), recording each
generation batch this rank scored (step, problems, completion token ids) in OUT/../rollouts-rank{R}.jsonl
through the rollout seam (`rollout_extras`), so the test can check which rank generated what. With
`sgsd.teacher_engine=vllm`, also the largest difference between the teacher and control log-probs this rank's
engine gave and the trainer engine's of the same rows (`engine_gap`, over counted tokens).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
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
        extras = original(inputs, output, rewards)
        record = {"step": trainer.state.global_step, "problems": [x["problem"] for x in inputs],
                  "completions": completions}
        settings = getattr(trainer, "settings", None)
        if getattr(settings, "teacher_engine", "trainer") == "vllm":
            trainer.settings = replace(settings, teacher_engine="trainer")
            try:
                reference = original(inputs, output, rewards)
            finally:
                trainer.settings = settings
            counted = extras["sgsd_mask"].bool()
            gaps = [(extras[key] - reference[key]).abs()[counted[:, None, :].expand_as(extras[key])
                                                        if extras[key].dim() == 3 else counted]
                    for key in ("teacher_logps", "control_logps") if key in extras]
            record["engine_gap"] = max(float(gap.max()) for gap in gaps)
            record["engine_tokens_compared"] = int(sum(gap.numel() for gap in gaps))
        with log.open("a") as file:
            file.write(json.dumps(record) + "\n")
        return extras

    trainer.rollout_extras = rollout_extras
    run.train()
    close()  # as `sgsd train` does
    leave_worker()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
