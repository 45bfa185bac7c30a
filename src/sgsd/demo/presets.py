"""The demo's warm-up settings, sized for a 2-core CPU; `sgsd demo` and `sgsd demo --quick` share them.

Each replication (seed) has its own warm start (`warmup_config`); the quick demo's one seed is the full
demo's seed 0, so a quick run warms part of the cache for the full one (and the other way round).
Warm-up: 650 steps of a 0.72 M-parameter model per seed, trained once and then loaded from the cache;
how long it takes depends on the machine (`sgsd demo` shows an estimate from its own measured speed;
docs/demo.md has measured times). Measured with `python scripts/demo_measure.py`:

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

# The sweep's harder world (docs/sweep.md): 6-8 addends with at least 3 carries (53 completion tokens on
# average, 62 at most, against 32 and 38 in the demo's world), and a student that forgets a carry without a
# hint half the time (0.25 in the demo's world). Hints act as before: one helpful item makes carries
# reliable (0.03), a misleading one makes them rare. Chosen before any training on it, for a Base avg@4
# of at most 0.10: the synthetic data's own accuracy without a hint is about 0.5^3.4 x 0.97^6 = 0.08, and
# the demo's warm starts sample below their data (0.22-0.45 against about 0.54).
HARD_WARMUP = replace(DEMO_WARMUP, world=replace(DEMO_WARMUP.world, min_terms=6, max_terms=8, min_carries=3),
                      forget_by_effect=(0.9, 0.75, 0.5, 0.03, 0.01))


def warmup_config(seed: int, steps: int | None = None, base: WarmupConfig = DEMO_WARMUP) -> WarmupConfig:
    """The warm start of replication `seed`: `base` (DEMO_WARMUP unless a sweep's harder world) with its own warm-up seed (initial weights and
    data order), in the same world (the same problems for every replication, so they pair). Seed 0 is
    DEMO_WARMUP itself. `steps` (the smoke preset's short warm-up) replaces the step count, and the early
    phase shrinks with it. The seed and steps are in the config, hence in the cache key."""
    config = replace(base, seed=seed)
    if steps is not None and steps != config.steps:
        config = replace(config, steps=steps, early_steps=min(config.early_steps, steps // 5))
    return config
