"""The demo's warm-up settings, sized for a 2-core CPU; `sgsd demo` and `sgsd demo --quick` share them.

Each replication (seed) has its own warm start (`warmup_config`); the quick demo's one seed is the full
demo's seed 0, so a quick run warms part of the cache for the full one (and the other way round).
Warm-up (650 steps, 0.72 M parameters, torch 2.13 CPU): 215-239 s per seed on 2 quiet AMD EPYC cores
with one thread, the thread policy's choice (docs/demo.md); 78 s was measured on another machine with 2
threads. A cached warm start loads in ~1 s. Measured with `python scripts/demo_measure.py`:

- held-out accuracy (100 problems): greedy 0.59, sampled (T = 1) avg@4 0.26 - solves some, not all;
- sampled accuracy by prompt: no hint 0.26, helpful pair 0.48, irrelevant 0.23, misleading 0.01,
  OPSD reference prompt 0.47 - hints measurably change what it writes;
- SGSD polarity on its own rollouts at theta = 0.02: helpful teachers 67% helpful / 9% harmful,
  misleading ones 47% / 45% (harmful on every success), irrelevant ones 48% neutral.
An earlier warm start under the same cache key (other weights: greedy 0.70) gave no hint 0.30, helpful
0.44, misleading 0.03. The same settings with a 100-problem test split gave a stronger start (no hint
0.52, helpful 0.62, misleading 0.16): the outcome is sensitive to the data order. So is it to the
warm-up seed: the full demo's warm starts of seeds 0, 1 and 2 have Base avg@4 0.281, 0.453 and 0.216
(200 test problems), which is why each replication has its own.

Tried and rejected (same measurement, 100-problem test split): 800 steps (158 s) gave a stronger
start (sampled 0.61) whose helpful hints changed less (+0.03); 500 steps, or 600 steps with 3/4
batches, did not learn to read hints (helpful hints lowered accuracy).
"""

from __future__ import annotations

from dataclasses import replace

from sgsd.demo.warmup import WarmupConfig
from sgsd.demo.world import WorldConfig

DEMO_WARMUP = WarmupConfig(world=WorldConfig(seed=0, num_train=3000, num_test=200), steps=650, early_steps=120)


def warmup_config(seed: int, steps: int | None = None) -> WarmupConfig:
    """The warm start of replication `seed`: DEMO_WARMUP with its own warm-up seed (initial weights and
    data order), in the same world (the same problems for every replication, so they pair). Seed 0 is
    DEMO_WARMUP itself. `steps` (the smoke preset's short warm-up) replaces the step count, and the early
    phase shrinks with it. The seed and steps are in the config, hence in the cache key."""
    config = replace(DEMO_WARMUP, seed=seed)
    if steps is not None and steps != config.steps:
        config = replace(config, steps=steps, early_steps=min(config.early_steps, steps // 5))
    return config
