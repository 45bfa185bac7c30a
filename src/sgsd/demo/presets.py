"""Warm-up presets of the demo, sized for a 2-core CPU.

Measured on an idle 2-core machine (AMD EPYC, torch 2.13 CPU): ~0.25 s per warm-up step with the
default batch sizes, so quick ~3.5 minutes and full ~4.5 minutes when the cache is cold; a cached
warm start loads in about a second.

quick: for `sgsd demo --quick`: the smallest warm-up that reliably reads hints and the reference
    prompt (600 steps at a higher learning rate did not: helpful hints no longer helped).
full: for the full demo: a larger world and more steps (lower loss, so sampled accuracy is closer to
    the data's and hints are read more sharply).
"""

from __future__ import annotations

from sgsd.demo.warmup import WarmupConfig
from sgsd.demo.world import WorldConfig

DEMO_PRESETS: dict[str, WarmupConfig] = {
    "quick": WarmupConfig(world=WorldConfig(seed=0, num_train=3000, num_test=100), steps=800),
    "full": WarmupConfig(world=WorldConfig(seed=0, num_train=6000, num_test=200), steps=1000),
}
