"""The paper's engine on CPU processes (issue 20): DeepSpeed ZeRO-2 and ZeRO-3 (and FSDP2) over gloo,
two processes, with DeepSpeed's CPU accelerator (`DS_ACCELERATOR=cpu`).

- `accelerate launch` with configs/cpu/accelerate-zero2.yaml (the paper's launch file with only what a
  CPU needs changed) trains SGSD with LoRA, an EMA teacher, gradient checkpointing and online skill
  updates, GRPO, OPSD and sgsd-pg; SIGKILL of the launcher and both ranks after a checkpoint, then the
  same command, gives the uninterrupted run bit for bit.
- On fixed completions (tests/distributed_worker.py) ZeRO-3 and FSDP2 train the same steps as ZeRO-2
  (the chunked LM head reads the head's weight through `sgsd.lm_head.head_weights`), ZeRO-3 resumes
  exactly, and DeepSpeed's bf16 mode stays within bf16's rounding of the fp32 step.

Every run's own record (`processes` in resolved_config.yaml's provenance) must say 2: a launcher that
silently started one process would fail here. Each launch costs 15-40 s on 2 cores (DeepSpeed's import
and its CPU communication op, compiled once into ~/.cache/torch_extensions, about 60 s the first time).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fake_llm_server import fake_llm_server
from test_distributed import (TINY, WORKER, _bank, _env, _kill_tree, _metrics, _ok, _online, _processes, _run,
                              _torchrun, _updater_reply, _weights)

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_ZERO2 = ROOT / "configs" / "cpu" / "accelerate-zero2.yaml"
ZERO2 = ROOT / "configs" / "paper" / "deepspeed-zero2.json"
ZERO3 = ROOT / "configs" / "paper" / "deepspeed-zero3.json"

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")
pytestmark = pytest.mark.slow

DS = {"DS_ACCELERATOR": "cpu"}  # DeepSpeed's CPU accelerator (it looks for CUDA otherwise)


def _accelerate(recipe: str, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_ZERO2),
            "-m", "sgsd.cli", "train", "--config", str(TINY / recipe), "--output-dir", str(out), "--quiet", *args]


def _worker(recipe: str, out: Path, *args: str) -> list[str]:
    return _torchrun(2, str(WORKER), str(TINY / recipe), str(out), *args)


def _zero_shards(checkpoint: Path) -> list[str]:
    return sorted(p.name for p in checkpoint.glob("global_step*/zero_pp_rank_*_optim_states.pt"))


def _state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "sgsd_state.pt", weights_only=False)


def _kill_after_checkpoint(command: list[str], run: Path, step: int) -> None:
    """Start `command`, SIGKILL the launcher and every rank once checkpoint-`step` is complete."""
    victim = subprocess.Popen(command, env=_env(**DS), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    marker = run / f"checkpoint-{step}" / "sgsd_complete.json"
    deadline = time.monotonic() + 300
    while not marker.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), f"the run never completed its step-{step} checkpoint"
    _kill_tree(victim.pid)
    victim.wait()
    assert not (run / "final").exists()


# -- accelerate launch, ZeRO-2: SGSD with LoRA, EMA, gradient checkpointing, online updates; exact resume ----

SGSD_FULL = ("model.lora.enabled=true", "sgsd.teacher=ema", "model.gradient_checkpointing=true")


@pytest.fixture(scope="module")
def zero2_sgsd(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero2")
    whole, killed = root / "whole", root / "killed"
    with fake_llm_server(_updater_reply) as server:
        args = ("--max-steps", "4", "training.save_steps=2", *SGSD_FULL, *_online(server))
        _ok(_run(_accelerate("sgsd.yaml", whole, *args), **DS))
        _kill_after_checkpoint(_accelerate("sgsd.yaml", killed, *args), killed, 2)
        restart = _ok(_run(_accelerate("sgsd.yaml", killed, *args), **DS))
    return whole, killed, restart


def test_accelerate_launch_trains_sgsd_with_lora_ema_checkpointing_and_online_updates_on_zero2(zero2_sgsd):
    whole, _, _ = zero2_sgsd
    assert _processes(whole) == 2
    # real ZeRO-2: one optimizer shard per rank
    assert _zero_shards(whole / "checkpoint-2") == ["zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                    "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    records = _metrics(whole)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["reward/no_answer"] == 8 for r in records)  # 2 ranks x 4 prompts, summed over both ranks
    assert (whole / "final" / "adapter_model.safetensors").exists()  # LoRA: the adapter is the final model
    assert sorted(p.name for p in (whole / "skills").glob("bank_step_*.json")) == ["bank_step_000002.json",
                                                                                  "bank_step_000004.json"]
    assert _bank(whole / "skills" / "bank_step_000002.json")["metadata"]["online_update"]  # the update ran
    shadow = _state(whole / "checkpoint-4")["ema"]["shadow"]
    assert shadow and all(v.dtype == torch.float32 for v in shadow.values())
    assert all("lora_" in name for name in shadow)  # the EMA follows the trainable (adapter) parameters


def test_sigkill_under_zero2_then_the_same_command_matches_an_uninterrupted_run(zero2_sgsd):
    whole, killed, restart = zero2_sgsd
    assert restart.stdout.count("resumed from") == 1 and _processes(killed) == 2
    assert [r["step"] for r in _metrics(killed)] == [1, 2, 3, 4]
    assert _metrics(killed) == _metrics(whole)
    adapter = "adapter_model.safetensors"
    from safetensors.torch import load_file

    a, b = load_file(whole / "final" / adapter), load_file(killed / "final" / adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for step in (2, 4):
        sa, sb = _state(whole / f"checkpoint-{step}"), _state(killed / f"checkpoint-{step}")
        assert sa["ema"]["shadow"].keys() == sb["ema"]["shadow"].keys()
        assert all(torch.equal(sa["ema"]["shadow"][k], sb["ema"]["shadow"][k]) for k in sa["ema"]["shadow"])
        name = f"bank_step_{step:06d}.json"
        assert _bank(killed / "skills" / name) == _bank(whole / "skills" / name)
    assert json.loads((killed / "attribution.json").read_text()) == json.loads((whole / "attribution.json").read_text())


@pytest.mark.parametrize("recipe", ["grpo.yaml", "opsd.yaml", "sgsd-pg.yaml"])
def test_accelerate_launch_trains_the_other_methods_on_zero2(tmp_path, recipe):
    out = tmp_path / "run"
    result = _ok(_run(_accelerate(recipe, out, "--max-steps", "1", "training.save_steps=1"), **DS))
    assert result.stdout.count("sgsd: trained 1 steps") == 1
    assert _processes(out) == 2
    assert len(_zero_shards(out / "checkpoint-1")) == 2
    from sgsd.config import load_config
    from sgsd.methods import method_spec

    cfg = load_config(TINY / recipe)
    rollouts = 8 * method_spec(cfg.method).grpo_settings(cfg)["num_generations"]  # 2 ranks x 4 prompts x G
    (record,) = _metrics(out)
    assert record["reward/no_answer"] == rollouts and torch.isfinite(torch.tensor(record["train/loss"]))
    start, trained = _initial_weights(cfg), _weights(out / "final")
    if cfg.method == "grpo":
        # the random tiny model never writes a box: every group's rewards are equal, advantages 0, and
        # GRPO's gradient is exactly 0 (on every rank: the norm is over the all-reduced gradient)
        assert record["frac_reward_zero_std"] == 1.0 and record["train/grad_norm"] == 0.0
        assert all(torch.equal(trained[name], start[name]) for name in start)
    else:  # every weight tensor moved (Adam's first step moves each entry with a gradient by ~lr)
        assert all(not torch.equal(trained[name], start[name]) for name in start)


def _initial_weights(cfg) -> dict[str, torch.Tensor]:
    from transformers import set_seed

    from sgsd.models import load_model, load_tokenizer

    set_seed(cfg.training.seed)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    return {k: v.detach().clone() for k, v in load_model(cfg.model.name_or_path, tokenizer=tokenizer).state_dict().items()}


# -- fixed completions: ZeRO-3 and FSDP2 equal ZeRO-2; ZeRO-3 resumes exactly -----------------------------

FSDP2 = ROOT / "configs" / "cpu" / "accelerate-fsdp2.yaml"
STEPS = ("training.max_steps=3", "training.save_steps=1")


def _fsdp2(recipe: str, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2), str(WORKER),
            str(TINY / recipe), str(out), *args]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    runs = {}
    for recipe in ("sgsd.yaml", "opsd.yaml"):
        for name, config in (("zero2", ZERO2), ("zero3", ZERO3)):
            runs[recipe, name] = root / f"{recipe}-{name}"
            _ok(_run(_worker(recipe, runs[recipe, name], *STEPS, f"training.deepspeed={config}"), **DS))
    runs["sgsd.yaml", "fsdp2"] = root / "sgsd-fsdp2"
    _ok(_run(_fsdp2("sgsd.yaml", runs["sgsd.yaml", "fsdp2"], *STEPS)))
    return runs


# ZeRO-2, ZeRO-3 and FSDP2 compute the same fp32 arithmetic; what differs is the reduction order of the
# gradient (one all-reduce vs reduce-scatter + all-gather of shards, in other buckets) and, for the head,
# ZeRO-3's I W^T copy (exact). Measured over 3 steps: loss relative <= 3.7e-6 (first step: equal to the last
# bit), gradient norm relative <= 5.7e-7 (ZeRO-3) and 1.2e-6 (FSDP2), first-step weights within 1.4e-6
# (lr 1e-3). The tolerances of the DDP test (test_distributed.py:
# relative 1e-5, 1e-6 absolute on differences of log-probs) hold them with a margin; a head read as an
# empty or partial slice, or a gradient not reduced over the ranks, moves these by O(1).
RTOL, D_ATOL = 1e-5, 1e-6
KEYS = {"sgsd.yaml": ("train/loss", "train/grad_norm", "train/reward_mean", "sgsd/helpful_fraction",
                      "sgsd/harmful_fraction", "sgsd/support_mean", "sgsd/student_entropy_mean",
                      "sgsd/teacher_entropy_mean"),
        "opsd.yaml": ("train/loss", "train/grad_norm", "train/reward_mean", "opsd/divergence_mean",
                      "opsd/student_entropy_mean", "opsd/teacher_entropy_mean")}
D_KEYS = ("train/loss", "sgsd/support_mean")


# ZeRO-2 scores teachers with prefix reuse (`sgsd.prefix_reuse`, the default); ZeRO-3 and FSDP2 switch it off
# (`sgsd.prefix_cache.reuse_blocker`) and score every row in full: these comparisons also hold reuse to full rows.
@pytest.mark.parametrize("recipe, engine", [("sgsd.yaml", "zero3"), ("opsd.yaml", "zero3"), ("sgsd.yaml", "fsdp2")])
def test_sharded_engines_train_the_zero2_steps(engines, recipe, engine):
    reference, other = engines[recipe, "zero2"], engines[recipe, engine]
    assert _processes(reference) == _processes(other) == 2
    for ref, got in zip(_metrics(reference), _metrics(other), strict=True):
        for key in KEYS[recipe]:
            assert got[key] == pytest.approx(ref[key], rel=RTOL, abs=D_ATOL if key in D_KEYS else 0.0), (ref["step"], key)
    # the updated weights: Adam's first step moves an entry by ~lr whatever its gradient's size, so a
    # last-bit change of a near-zero gradient shows at up to ~lr (test_distributed.py); 5% of lr bounds it
    lr = 1e-3
    a, b = _weights(reference / "checkpoint-1"), _weights(other / "checkpoint-1")
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 0.05 * lr


def test_sigkill_under_zero3_then_the_same_command_matches_an_uninterrupted_run(engines, tmp_path):
    whole, killed = engines["sgsd.yaml", "zero3"], tmp_path / "killed"
    command = _worker("sgsd.yaml", killed, *STEPS, f"training.deepspeed={ZERO3}")
    _kill_after_checkpoint(command, killed, 2)
    assert len(_zero_shards(killed / "checkpoint-2")) == 2  # ZeRO-3: each rank's shard
    _ok(_run(command, **DS))
    assert [r["step"] for r in _metrics(killed)] == [1, 2, 3]
    assert _metrics(killed) == _metrics(whole)
    a, b = _weights(whole / "final"), _weights(killed / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- bf16 on CPU: DeepSpeed's bf16 mode, LoRA + EMA -------------------------------------------------------


@pytest.fixture(scope="module")
def precisions(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    runs = {}
    for precision in ("fp32", "bf16"):
        runs[precision] = root / precision
        _ok(_run(_worker("sgsd.yaml", runs[precision], "training.max_steps=1", "training.save_steps=1",
                         "model.lora.enabled=true", "sgsd.teacher=ema", f"training.precision={precision}",
                         f"training.deepspeed={ZERO2}"), **DS))
    return runs


def test_bf16_zero2_step_is_within_bf16_rounding_of_the_fp32_step(precisions):
    fp32, bf16 = _metrics(precisions["fp32"])[0], _metrics(precisions["bf16"])[0]
    assert _processes(precisions["bf16"]) == 2
    # log-probs of student and teachers are finite: no step was skipped, entropies are numbers
    assert bf16["train/nonfinite_skipped"] == 0.0
    for key in ("sgsd/student_entropy_mean", "sgsd/teacher_entropy_mean", "train/loss", "train/grad_norm"):
        assert torch.isfinite(torch.tensor(bf16[key])), key
    # bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per value); the loss and the gradient
    # norm are means over hundreds of tokens, whose roundings partly cancel (measured: relative 3.7e-3 on
    # the loss, a small mean of differences of log-probs, 1.1e-3 on the gradient norm; the same inputs
    # on CPU give the same values every run). 1e-2 is five roundings' worth; log-probs taken in bf16
    # after the head (2^-9 of |log p| ~ 6, on every token) or a loss summed in bf16 miss it by far.
    assert bf16["train/loss"] == pytest.approx(fp32["train/loss"], rel=1e-2)
    assert bf16["train/grad_norm"] == pytest.approx(fp32["train/grad_norm"], rel=1e-2)
    assert bf16["sgsd/helpful_fraction"] == fp32["sgsd/helpful_fraction"]


def test_bf16_zero2_keeps_the_ema_shadow_and_the_adapters_master_weights_in_fp32(precisions):
    checkpoint = precisions["bf16"] / "checkpoint-1"
    shadow = _state(checkpoint)["ema"]["shadow"]
    assert shadow and all(v.dtype == torch.float32 for v in shadow.values())
    # DeepSpeed's bf16 mode: the module (adapters included) computes in bf16, the optimizer keeps fp32
    # master weights of every trainable parameter: the adapter's, in each rank's shard
    numel = sum(v.numel() for v in shadow.values())
    masters = 0
    for shard in sorted(checkpoint.glob("global_step1/*optim_states.pt")):
        state = torch.load(shard, weights_only=False)["optimizer_state_dict"]
        groups = state["single_partition_of_fp32_groups"]
        assert all(g.dtype == torch.float32 for g in groups)
        masters += sum(g.numel() for g in groups)
    assert masters >= numel  # both shards together hold every adapter entry (plus alignment padding)
    model_states = torch.load(next(checkpoint.glob("global_step1/mp_rank_00_model_states.pt")), weights_only=False)
    assert {v.dtype for k, v in model_states["module"].items() if "lora_" in k} == {torch.bfloat16}
