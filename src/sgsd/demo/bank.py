"""The demo's seed skill bank: helpful, irrelevant and misleading items for the addition world.

Written in the paper's JSON format (SPEC section 3) so that `sgsd.skills.load_bank` reads it like any
bank. `metadata["labels"]` maps every item id to "helpful", "irrelevant" or "misleading": the labels
are for the report (does SGSD's polarity separate them?), never for training.

In the toy world the labels are also the items' *effect* in the warm-up data (`hint_effect`): the
forgotten-carry rate of a worked solution depends on the net number of helpful minus misleading
items in its prompt. Irrelevant items include some that sound relevant ("check each column sum")
but change nothing, as retrieved skills often do. No item addresses arithmetic slips in a way that
works: no hint fixes them (see `sgsd.demo.world`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

HELPFUL, IRRELEVANT, MISLEADING = "helpful", "irrelevant", "misleading"
LABELS = (HELPFUL, IRRELEVANT, MISLEADING)

# (skill_id, label, title, principle, when_to_apply)
_SKILLS = (
    ("gen_001", HELPFUL, "Carry the one",
     "When a column sums to 10 or more, write its last digit and add 1 to the next column.",
     "adding numbers column by column"),
    ("gen_002", HELPFUL, "Track every carry",
     "Before adding a column, check whether the previous column sum was 10 or more; if so, add 1 to this column.",
     "multi-digit addition"),
    ("gen_003", IRRELEVANT, "Simplify fractions",
     "Divide the numerator and the denominator by their greatest common divisor.",
     "an answer is a fraction"),
    ("gen_004", IRRELEVANT, "Check each column sum",
     "Add the two digits of a column carefully and make sure the sum is right.",
     "adding digits"),
    ("gen_005", IRRELEVANT, "Draw a diagram",
     "Sketch the figure and label every length and angle you know.",
     "geometry problems"),
    ("gen_006", MISLEADING, "Columns are independent",
     "Add each column on its own: the sum of one column never changes the next column.",
     "adding numbers column by column"),
    ("gen_007", MISLEADING, "Keep only the last digit",
     "When a column sums to 10 or more, keep its last digit and drop the rest.",
     "multi-digit addition"),
)

# (mistake_id, label, description, why_it_happens, how_to_avoid)
_MISTAKES = (
    ("err_001", HELPFUL, "Forgetting to add the carry to the next column",
     "The 1 from a column sum of 10 or more is easy to lose when moving left.",
     "Whenever a column sums to 10 or more, add 1 to the next column."),
    ("err_002", HELPFUL, "Adding the next column without its carry",
     "The carry is not written down, so the next column is added as if it were alone.",
     "Write +1 in the next column as soon as a column sum reaches 10."),
    ("err_003", IRRELEVANT, "Sign errors when moving terms",
     "Terms change sign when moved across an equation and this is easy to miss.",
     "Flip the sign of every term you move to the other side."),
    ("err_004", IRRELEVANT, "Misreading the question",
     "Reading too fast can swap the quantity that is asked for.",
     "Read the question again before writing the final answer."),
    ("err_005", IRRELEVANT, "Wrong digit sums",
     "Adding small numbers quickly sometimes gives a sum that is off by one.",
     "Double-check every digit sum."),
    ("err_006", MISLEADING, "Adding a carry to the next column",
     "A column sum of 10 or more tempts you to change the next column.",
     "Never add anything to a column except its own two digits."),
    ("err_007", MISLEADING, "Writing two digits for one column",
     "A column sum of 10 or more seems to need two places.",
     "Write only the last digit of every column sum and move on."),
)


def seed_bank() -> dict[str, Any]:
    """The seed bank as a JSON-ready object in the paper's format, with labels in metadata."""
    labels = {item[0]: item[1] for item in _SKILLS + _MISTAKES}
    return {
        "general_skills": [
            {"skill_id": sid, "title": title, "principle": principle, "when_to_apply": when}
            for sid, _, title, principle, when in _SKILLS
        ],
        "task_specific_skills": [],
        "common_mistakes": [
            {"mistake_id": mid, "description": desc, "why_it_happens": why, "how_to_avoid": how}
            for mid, _, desc, why, how in _MISTAKES
        ],
        "metadata": {
            "source": "sgsd.demo.bank: hand-written seed bank for the demo's addition world",
            "labels": labels,
            "label_note": "labels are for the demo report only; training never reads them",
        },
    }


def item_labels() -> dict[str, str]:
    """Item id -> "helpful" / "irrelevant" / "misleading"."""
    return dict(seed_bank()["metadata"]["labels"])


def hint_effect(item_ids: Iterable[str]) -> int:
    """Net effect of the items in a prompt: (#helpful - #misleading); unknown ids count as irrelevant."""
    labels = item_labels()
    return sum({HELPFUL: 1, MISLEADING: -1}.get(labels.get(item_id, IRRELEVANT), 0) for item_id in item_ids)


def write_seed_bank(path: str | Path) -> Path:
    """Write the seed bank as JSON, atomically (a reader never sees half a file)."""
    from sgsd.skills.storage import atomic_write_json

    return atomic_write_json(path, seed_bank())
