"""One training process of a test launch: `torchrun --nproc_per_node N tests/distributed_worker.py RECIPE OUT
[key=value ...]`.

Trains `RECIPE` with `sgsd.trainers.run.train` on FIXED completions instead of sampled ones (TRL's
rollout hook), so that runs with different numbers of processes see the same rollouts whatever the
ranks' random streams are: the completion of a problem is a function of the problem alone, right for
about half of the problems (a box around the answer), wrong for a quarter (a box around answer + 1)
and without an answer for the rest (no box, counted in `reward/no_answer`).
"""

from __future__ import annotations

import sys
from pathlib import Path


def fixed_rollouts(tokenizer, answers: dict[str, str]):
    from sgsd.prompts import ChatStyle, render_chat
    from sgsd.storage import stable_hash

    def completion(problem: str) -> str:
        answer, kind = answers[problem], int(stable_hash(problem), 16) % 4
        if kind < 2:
            return f"Add the numbers: the total is {answer}. \\boxed{{{answer}}}"
        if kind == 2:
            wrong = int(answer) + 1
            return f"Adding gives {wrong}, so \\boxed{{{wrong}}}"
        return f"The total is about {answer} or so."  # no box: counted in reward/no_answer

    def rollout(prompts, trainer):
        prompt_ids, completion_ids = [], []
        for messages in prompts:
            text = messages[-1]["content"]
            problem = next(p for p in answers if f"Problem: {p}\n" in text)
            prompt_ids.append(tokenizer(render_chat(tokenizer, text, ChatStyle(False)),
                                        add_special_tokens=False)["input_ids"])
            ids = tokenizer(completion(problem), add_special_tokens=False)["input_ids"]
            completion_ids.append(ids + [tokenizer.eos_token_id])
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    return rollout


def main(recipe: str, out: str, *overrides: str) -> int:
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from sgsd.config import load_config
    from sgsd.data import load_problems
    from sgsd.distributed import close, leave_worker
    from sgsd.models import load_tokenizer
    from sgsd.trainers.run import train

    cfg = load_config(recipe, list(overrides))
    problems, _ = load_problems(cfg.data.path)
    rollout = fixed_rollouts(load_tokenizer(cfg.model.name_or_path), {p.problem: p.answer for p in problems})
    train(cfg, Path(out), progress=False, rollout_func=rollout)
    close()  # as `sgsd train` does
    leave_worker()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
