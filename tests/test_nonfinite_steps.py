"""A step whose log-probs are not finite (NaN logits) is skipped, counted, and training continues."""

import pytest
import torch

from run_outputs import final_weights, metrics, train_tiny


@pytest.mark.slow
def test_nan_logits_skip_the_step_and_training_continues(tmp_path, monkeypatch):
    from sgsd import loss_phase  # the trainer's loss phase

    original = loss_phase.completion_logprobs_and_entropy
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        logps, entropy = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:  # the first loss step sees NaN logits
            return logps * float("nan"), entropy * float("nan")
        return logps, entropy

    monkeypatch.setattr(loss_phase, "completion_logprobs_and_entropy", poisoned)
    result = train_tiny(tmp_path / "run", steps=3)
    records = metrics(result.output_dir)
    assert records[0].get("train/nonfinite_skipped") == 1.0 and records[0]["train/grad_norm"] == 0.0
    assert all(r["train/nonfinite_skipped"] == 0.0 and r["train/grad_norm"] > 0 for r in records[1:])
    final = final_weights(result.output_dir)
    assert all(torch.isfinite(v).all() for v in final.values())
