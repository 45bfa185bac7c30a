"""SGSD trainer options on the tiny recipe: teacher weights (live / base / EMA, LoRA), local support,
skipping all-neutral rollouts. One short run each, in one process."""

import json
from pathlib import Path

import pytest
import torch

from sgsd.config import load_config
from sgsd.trainers.teacher_weights import EMAWeights, teacher_context_factory

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/tiny/sgsd.yaml"


def _train(tmp_path, *overrides, steps=2):
    from sgsd.trainers.run import train

    cfg = load_config(RECIPE, ["skills.attribution=false", *overrides])
    result = train(cfg, tmp_path / "run", max_steps=steps, progress=False)
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    return result, records


def test_ema_tracks_parameters(tiny_model):
    ema = EMAWeights(tiny_model, decay=0.5)
    param = next(p for p in tiny_model.parameters())
    start = param.detach().clone()
    with torch.no_grad():
        param.add_(2.0)
    ema.update(tiny_model)
    name = next(n for n, _ in tiny_model.named_parameters())
    torch.testing.assert_close(ema.shadow[name], start + 1.0)  # 0.5 * old + 0.5 * new, exact in fp32
    with ema.swapped_in(tiny_model):
        torch.testing.assert_close(param.detach(), start + 1.0)
    torch.testing.assert_close(param.detach(), start + 2.0)  # restored on exit


def test_base_teacher_under_lora_scores_with_the_adapter_off(tiny_model):
    from peft import LoraConfig, get_peft_model

    from sgsd.scoring import score_teachers

    torch.manual_seed(0)
    prompts = [[[5, 6, 7, 8]]]
    comp = torch.tensor([[9, 10, 11]])
    mask = torch.ones_like(comp)
    base_scores = score_teachers(tiny_model, prompts, comp, mask, pad_id=0)
    peft_model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained adapter: the live policy now differs from the base
    live = score_teachers(peft_model, prompts, comp, mask, pad_id=0)
    base = score_teachers(peft_model, prompts, comp, mask, pad_id=0,
                          teacher_context=teacher_context_factory("base", lambda: peft_model))
    assert (live - base_scores).abs().max() > 1e-3
    torch.testing.assert_close(base, base_scores, atol=1e-6, rtol=0)  # same weights, same arithmetic


@pytest.mark.slow
def test_trainer_variants(tmp_path):
    from transformers import AutoModelForCausalLM

    from sgsd.tiny import build_tiny_model, build_tokenizer

    initial = dict(build_tiny_model(build_tokenizer(), seed=0).named_parameters())

    # EMA teacher: its state is checkpointed next to the weights and differs from both ends.
    result, records = _train(tmp_path / "ema", "sgsd.teacher=ema", "sgsd.ema_decay=0.5")
    state = torch.load(result.output_dir / "checkpoint-2" / "sgsd_state.pt", weights_only=True)
    name = "model.layers.0.self_attn.q_proj.weight"
    final = dict(AutoModelForCausalLM.from_pretrained(result.final_dir).named_parameters())
    shadow = state["ema"]["shadow"][name]
    assert not torch.equal(shadow, initial[name].detach()) and not torch.equal(shadow, final[name].detach())

    # LoRA with a base-model teacher: the adapter is what gets saved and trained.
    result, records = _train(tmp_path / "lora", "model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8",
                             "sgsd.teacher=base")
    assert (result.final_dir / "adapter_config.json").exists()
    assert all(r["train/grad_norm"] > 0 for r in records)

    # Full fine-tuning with a base teacher keeps a frozen copy of the start.
    result, records = _train(tmp_path / "base", "sgsd.teacher=base")
    assert all(r["train/grad_norm"] > 0 for r in records)

    # Local-support variant (k' = 5): trains, with finite metrics.
    result, records = _train(tmp_path / "local", "sgsd.local_support_top_k=5")
    assert all(r["train/grad_norm"] > 0 and r["sgsd/row_loss_mean"] >= 0 for r in records)

    # Every teacher neutral (threshold above any support): no rollout runs a backward, weights stay put.
    result, records = _train(tmp_path / "skip", "sgsd.skip_neutral_rows=true", "sgsd.confidence_threshold=100.0",
                             steps=1)
    assert records[0]["sgsd/active_rollout_fraction"] == 0.0 and records[0]["sgsd/neutral_fraction"] == 1.0
    final = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert all(torch.equal(p.detach(), initial[n].detach()) for n, p in final.named_parameters())
