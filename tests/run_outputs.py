"""Helpers for tests that train the tiny SGSD recipe in-process and read what the run wrote."""

from __future__ import annotations

import json
from pathlib import Path

import torch

RECIPE = Path(__file__).resolve().parents[1] / "configs/tiny/sgsd.yaml"


def metrics(run: Path) -> list[dict]:
    """The run's metrics.jsonl records without time/* (wall-clock measurements: the only keys allowed to
    differ between two identical runs)."""
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "final" / "model.safetensors")


def train_tiny(out: Path, *overrides: str, steps: int = 2, **kwargs):
    """`sgsd.trainers.run.train` on the tiny SGSD recipe with `overrides`, for `steps` steps, no progress bar."""
    from sgsd.config import load_config
    from sgsd.trainers.run import train

    return train(load_config(RECIPE, list(overrides)), out, max_steps=steps, progress=False, **kwargs)
