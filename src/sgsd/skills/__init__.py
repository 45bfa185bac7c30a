"""Skill banks (docs/spec.md section 3): schema and storage, retrieval, teacher construction, cold-start
building, online update and attribution.

Light modules only are imported here (no torch, no sentence-transformers): `sgsd.skills.bank`,
`sgsd.skills.teachers` and `sgsd.skills.retrieval` import their heavy dependencies where used.
"""

from sgsd.skills.bank import CommonMistake, GeneralSkill, SkillBank, load_bank, parse_bank, save_bank

__all__ = ["CommonMistake", "GeneralSkill", "SkillBank", "load_bank", "parse_bank", "save_bank"]
