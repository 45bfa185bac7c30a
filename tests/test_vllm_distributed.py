"""vLLM colocate generation on 2 CPU processes (torchrun, gloo; TRL runs one engine per rank through vLLM's
`external_launcher` executor): each rank generates its own share with its own random stream, and the run's
accounting matches one process's. The teachers and the neutral control are scored in each rank's own engine
(`sgsd.teacher_engine=vllm`): each rank's scores equal its trainer's of the same rows. The 2-process launch
runs under DeepSpeed ZeRO-3 (where installed), so TRL's gather of the sharded parameters before each sync is
checked by the same sync metric. Two launches of one to three minutes each; skipped without vLLM's CPU
build. (ZeRO-2 with vLLM: tests/test_multinode.py.)"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sgsd.trl_adapter import PROBE_LOGP_METRIC, SYNC_DIFF_METRIC
from test_vllm_adapter import LOGP_TOLERANCE, VLLM_TINY, require_vllm_cpu

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "vllm_worker.py"
ZERO3 = ROOT / "configs" / "paper" / "deepspeed-zero3.json"
STEPS, PROMPTS_PER_STEP = 2, 4

pytestmark = pytest.mark.slow


def _launch(nproc: int, out: Path, data: Path, *extra: str, **more_env: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "TRL_EXPERIMENTAL_SILENCE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]), **more_env}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
               str(ROOT / "configs/tiny/sgsd.yaml"), str(out / "run"), "generation.use_vllm=true",
               f"model.name_or_path={VLLM_TINY}", f"training.max_steps={STEPS}", f"data.path={data}",
               "data.deduplicate=false", f"training.prompts_per_device={PROMPTS_PER_STEP // nproc}",
               "skills.attribution=false", "sgsd.teacher_engine=vllm", "sgsd.polarity_control=neutral", *extra]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]


def _rollouts(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / f"rollouts-rank{rank}.jsonl").read_text().splitlines()]


def test_two_processes_generate_their_own_shares_and_account_as_one(tmp_path):
    require_vllm_cpu()
    # every problem is the same text: both ranks get the same prompts, so ranks sharing a random stream (or an
    # engine seed) would return the same completions
    data = tmp_path / "same.jsonl"
    data.write_text("".join(json.dumps({"problem": "What is 12 + 35?", "answer": "47"}) + "\n" for _ in range(16)))
    one = _launch(1, tmp_path / "one", data)
    zero3 = () if importlib.util.find_spec("deepspeed") is None else (f"training.deepspeed={ZERO3}",)
    two = _launch(2, tmp_path / "two", data, *zero3, DS_ACCELERATOR="cpu")
    if zero3:  # the parameters were sharded: each rank's checkpoint holds its own model-state shard
        assert len(list((tmp_path / "two" / "run").glob(f"checkpoint-{STEPS}/global_step*/zero_pp_rank_*_model_states.pt"))) == 2

    shares = [_rollouts(tmp_path / "two", rank) for rank in (0, 1)]
    for step in range(STEPS):
        batches = [share[step] for share in shares]
        assert [b["step"] for b in batches] == [step, step]
        assert [len(b["completions"]) for b in batches] == [PROMPTS_PER_STEP // 2] * 2  # each rank its share
        completions = [tuple(c) for b in batches for c in b["completions"]]
        assert len(set(completions)) == PROMPTS_PER_STEP, "ranks generated the same rollouts"
        # each rank's engine scored its own rows (teachers and control) as its trainer does (LOGP_TOLERANCE's note)
        assert all(b["engine_tokens_compared"] > 0 and b["engine_gap"] <= LOGP_TOLERANCE for b in batches), batches
    assert [len(b["completions"]) for b in _rollouts(tmp_path / "one", 0)] == [PROMPTS_PER_STEP] * STEPS

    # the same accounting: steps, metric keys, and every rank's engine in step with its trainer
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    assert set(one[0]) == set(two[0])
    for records in (one, two):
        assert all(r[SYNC_DIFF_METRIC] <= LOGP_TOLERANCE for r in records)  # max over ranks
        assert abs(records[1][PROBE_LOGP_METRIC] - records[0][PROBE_LOGP_METRIC]) > LOGP_TOLERANCE
    # completion lengths are summed over ranks by TRL: 4 rollouts of at most 24 tokens either way
    assert one[0]["num_tokens"] > 0 and two[0]["num_tokens"] > 0
