"""The demo's seed skill bank: helpful, irrelevant and misleading items for the running-sum world.

Written in the paper's JSON format (docs/spec.md section 3) so that `sgsd.skills.load_bank` reads it like any
bank. `metadata["labels"]` maps every item id to "helpful", "irrelevant" or "misleading": the labels
are for the report (does SGSD's polarity separate them?), never for training.

In the toy world the labels are also the items' *effect* in the warm-up data (`hint_effect`): the
forgotten-carry rate of a worked solution depends on the net number of helpful minus misleading
items in its prompt. Irrelevant items include some that sound relevant ("add carefully", "sums that
are off by one") but change nothing, as retrieved skills often do: no hint fixes arithmetic slips
(see `sgsd.demo.world`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from sgsd.storage import JSONObject, atomic_write_json

HELPFUL, IRRELEVANT, MISLEADING = "helpful", "irrelevant", "misleading"
LABELS = (HELPFUL, IRRELEVANT, MISLEADING)

# Short texts on purpose: every hint prompt of the warm-up and every SGSD teacher row carries one
# skill and one mistake, so their length is most of the demo's compute.
# (skill_id, label, title, principle, when_to_apply)
_SKILLS = (
    ("gen_001", HELPFUL, "Carry into the tens",
     "If the ones digits reach 10, the tens digit goes up by one.", "adding to a total"),
    ("gen_002", HELPFUL, "Check every step for a carry",
     "A new total must be larger than the old one by the number added.", "adding many numbers"),
    ("gen_003", IRRELEVANT, "Simplify fractions",
     "Divide top and bottom by their greatest common divisor.", "the answer is a fraction"),
    ("gen_004", IRRELEVANT, "Add carefully",
     "Make sure every sum is right.", "adding numbers"),
    ("gen_005", IRRELEVANT, "Draw a diagram",
     "Sketch the figure and label what you know.", "geometry problems"),
    ("gen_006", MISLEADING, "Only the ones digit changes",
     "Adding one digit never changes the tens digit.", "adding to a total"),
    ("gen_007", MISLEADING, "Keep the tens digit",
     "If the ones digits reach 10, keep only the last digit.", "adding many numbers"),
)

# (mistake_id, label, description, why_it_happens, how_to_avoid)
_MISTAKES = (
    ("err_001", HELPFUL, "Forgetting to carry",
     "When the ones digits pass 9 it is easy to write only the last digit.",
     "If the ones digits reach 10, add one to the tens digit."),
    ("err_002", HELPFUL, "A total that is 10 too small",
     "The ten from the ones digits is dropped.",
     "Check that each total grew by the number added."),
    ("err_003", IRRELEVANT, "Sign errors",
     "Terms change sign when moved across an equation.",
     "Flip the sign of every term you move."),
    ("err_004", IRRELEVANT, "Misreading the question",
     "Reading too fast can swap what is asked for.",
     "Read the question again."),
    ("err_005", IRRELEVANT, "Sums off by one",
     "Quick sums are sometimes one too large or too small.",
     "Double-check every sum."),
    ("err_006", MISLEADING, "Changing the tens digit",
     "A large ones digit tempts you to change the tens digit.",
     "Never change the tens digit."),
    ("err_007", MISLEADING, "Carrying too often",
     "Carries look necessary more often than they are.",
     "Keep the tens digit as it was."),
)


def seed_bank() -> JSONObject:
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
            "source": "sgsd.demo.bank: hand-written seed bank for the demo's running-sum world",
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
    return atomic_write_json(path, seed_bank())
