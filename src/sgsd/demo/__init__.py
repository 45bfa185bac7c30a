"""The offline demo's parts: a synthetic addition world, a warm-started tiny model, a labelled seed
skill bank, fast evaluation and hint / polarity measurements.

Light to import (torch and transformers are imported inside the functions that need them).

Typical use (what `sgsd demo` does before training)::

    from sgsd.demo import DEMO_WARMUP, warm_start, write_seed_bank, accuracy
    config = DEMO_WARMUP
    start = warm_start(config)                        # cached under ~/.cache/sgsd/demo/<hash>
    write_seed_bank(out / "seed_bank.json")           # loads with sgsd.skills.load_bank
    base = accuracy(start.model, start.tokenizer, start.world.test, k=4)
"""

from sgsd.demo.bank import LABELS, hint_effect, item_labels, seed_bank, write_seed_bank
from sgsd.demo.evaluate import AccuracyEstimate, Rollouts, accuracy, bootstrap_interval, sample, student_text, subset
from sgsd.demo.presets import DEMO_WARMUP
from sgsd.demo.warmup import (
    ModelShape,
    WarmStart,
    WarmupConfig,
    WarmupReport,
    default_cache_root,
    hint_prompt,
    load_seed_bank,
    reference_prompt,
    warm_start,
)
from sgsd.demo.world import (
    MistakeRates,
    Problem,
    World,
    WorldConfig,
    boxed_integer,
    is_correct,
    make_world,
    to_training_problems,
    write_problems,
)

__all__ = [
    "DEMO_WARMUP", "LABELS", "AccuracyEstimate", "MistakeRates", "ModelShape", "Problem", "Rollouts", "WarmStart",
    "WarmupConfig", "WarmupReport", "World", "WorldConfig", "accuracy", "bootstrap_interval", "boxed_integer",
    "default_cache_root", "hint_effect", "hint_prompt", "is_correct", "item_labels", "load_seed_bank", "make_world",
    "reference_prompt", "sample", "seed_bank", "student_text", "subset", "to_training_problems", "warm_start",
    "write_problems", "write_seed_bank",
]
