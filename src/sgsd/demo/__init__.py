"""The offline demo's parts: a synthetic addition world, a warm-started tiny model, a labelled seed
skill bank, fast evaluation and hint / polarity measurements.

Light to import (torch and transformers are imported inside the functions that need them).

Typical use (what `sgsd demo` does before training)::

    from sgsd.demo import DEMO_WARMUP, warm_start, write_seed_bank, accuracy
    start = warm_start(DEMO_WARMUP)                   # cached under ~/.cache/sgsd/demo/<hash>
    write_seed_bank(out / "seed_bank.json")           # loads with sgsd.skills.load_bank
    base = accuracy(start.model, start.tokenizer, start.world.test, k=4)
"""

from sgsd.demo.bank import LABELS, hint_effect, item_labels, seed_bank, write_seed_bank
from sgsd.demo.evaluate import AccuracyEstimate, Rollouts, accuracy, is_correct, sample, student_text, subset
from sgsd.demo.presets import DEMO_WARMUP
from sgsd.demo.warmup import (
    DEMO_MODEL,
    WarmStart,
    WarmupConfig,
    WarmupReport,
    default_cache_root,
    hint_prompt,
    load_seed_bank,
    reference_prompt,
    warm_start,
)
from sgsd.demo.world import MistakeRates, World, WorldConfig, make_world, problem_terms, write_problems

__all__ = [
    "DEMO_MODEL", "DEMO_WARMUP", "LABELS", "AccuracyEstimate", "MistakeRates", "Rollouts", "WarmStart",
    "WarmupConfig", "WarmupReport", "World", "WorldConfig", "accuracy", "default_cache_root", "hint_effect",
    "hint_prompt", "is_correct", "item_labels", "load_seed_bank", "make_world", "problem_terms", "reference_prompt",
    "sample", "seed_bank", "student_text", "subset", "warm_start", "write_problems", "write_seed_bank",
]
