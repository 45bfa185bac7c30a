"""Warm-up presets of the demo, sized for a 2-core CPU.

quick: for `sgsd demo --quick` (whole demo under 5 minutes, warm-up included when the cache is
    cold): 3-digit operands only (shorter solutions, learned in fewer steps) and fewer steps.
full: for the full demo (under 20 minutes): 3-4 digit operands.
Both first learn the arithmetic on plain prompts (cheap), then hints and references.
"""

from __future__ import annotations

from sgsd.demo.warmup import WarmupConfig
from sgsd.demo.world import WorldConfig

DEMO_PRESETS: dict[str, WarmupConfig] = {
    "quick": WarmupConfig(
        world=WorldConfig(seed=0, num_train=3000, num_test=100, min_digits=3, max_digits=3),
        steps=450, plain_steps=200,
    ),
    "full": WarmupConfig(
        world=WorldConfig(seed=0, num_train=6000, num_test=200, min_digits=3, max_digits=4),
        steps=650, plain_steps=300,
    ),
}
