"""Every pointer to the project's spec leads somewhere: "docs/spec.md section N" (also "sections 4 and 9",
"sections 2-4", "section 9.3") names a heading of docs/spec.md (`## N. Title`, `### N.M Title`), the
numbered sections keep the meaning the code's pointers rely on, and nothing points to the spec file that
lived outside the repository (a clone of the project does not have it).

The scan covers src/, tests/, docs/, README.md, configs/ and scripts/ (this file excepted: its examples
are not pointers).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "spec.md"
SCANNED = ("src", "tests", "docs", "README.md", "configs", "scripts")

_REF = r"\d+(?:\.\d+)?"
POINTER = re.compile(rf"docs/spec\.md,?\s+sections?\s+(?P<refs>{_REF}(?:\s*(?:,|-|–|and|to)\s*{_REF})*)")
# Spellings of a pointer to the old spec: "SPEC section 4", "SPEC sections 4, 9", "SPEC 9.1", "SPEC: 1-3",
# "SPEC's m_t", "SPEC § 4", or its path. Case-sensitive, so `spec` variables and SPECIAL_TOKENS pass.
OLD_POINTER = re.compile(r"\bSPEC(?:\s+sections?\b|\s*§|:|'s\b|\s+\d)|shared/SPEC|\bSPEC\.md\b")
HEADING = re.compile(r"^(?:## (?P<section>\d+)\. |### (?P<subsection>\d+\.\d+) )\S", re.MULTILINE)

# What code and docs mean by each section number (the titles must keep these words).
SECTION_MEANINGS = {
    1: ("idea",), 2: ("data", "prompts"), 3: ("skill bank",), 4: ("objective",), 5: ("baselines",),
    6: ("paper", "configuration"), 7: ("verifier", "evaluation"), 8: ("results",), 9: ("public code",),
}


def cited_sections(refs: str) -> list[str]:
    """The section numbers of a pointer's reference list; "2-4" is 2, 3, 4."""
    out: list[str] = []
    for match in re.finditer(rf"({_REF})(?:\s*[-–]\s*({_REF}))?", refs):
        start, end = match.groups()
        if end and "." not in start + end:
            out.extend(str(n) for n in range(int(start), int(end) + 1))
        else:
            out.extend(x for x in (start, end) if x)
    return out


def _text_files():
    me = Path(__file__).resolve()
    for name in SCANNED:
        path = ROOT / name
        for file in ([path] if path.is_file() else sorted(path.rglob("*"))):
            if not file.is_file() or "__pycache__" in file.parts or file.resolve() == me:
                continue
            try:
                yield file, file.read_text(encoding="utf-8")
            except UnicodeDecodeError:  # images and other binary files
                continue


def _scan():
    pointers, old = [], []
    for file, text in _text_files():
        for number, line in enumerate(text.splitlines(), 1):
            where = f"{file.relative_to(ROOT)}:{number}"
            pointers += [(where, sections) for m in POINTER.finditer(line) for sections in cited_sections(m["refs"])]
            old += [f"{where}: {line.strip()}" for _ in OLD_POINTER.finditer(line)]
    return pointers, old


def _headings() -> dict[str, str]:
    text = SPEC.read_text(encoding="utf-8")
    found = {}
    for match in HEADING.finditer(text):
        number = match["section"] or match["subsection"]
        found[number] = text[match.start():text.index("\n", match.start())]
    return found


def test_pointer_parsing_reads_every_spelling_in_use():
    def refs(text: str) -> list[str]:
        return [s for m in POINTER.finditer(text) for s in cited_sections(m["refs"])]

    assert refs("(docs/spec.md section 4).") == ["4"]
    assert refs("SGSD trainer (docs/spec.md sections 2-4): one student") == ["2", "3", "4"]
    assert refs("docs/spec.md sections 4 and 9 (defects 1-3, 8)") == ["4", "9"]
    assert refs("(docs/spec.md sections 5, 6, 9); they") == ["5", "6", "9"]
    assert refs("runs K times (docs/spec.md section 9.1); the") == ["9.1"]
    assert refs("(docs/spec.md section 9, defect 6): it saw") == ["9"]
    assert refs("docs/spec.md section 3 (1)-(3): memories") == ["3"]
    assert refs("docs/spec.md section 9 items 1-3 and 8") == ["9"]
    for old in ("SPEC section 4", "SPEC sections 4, 9", "(SPEC 9.1)", "(SPEC: 1-3)", "it is SPEC's m_t",
                "SPEC § 4", "see ../shared/SPEC.md"):
        assert OLD_POINTER.search(old), old
    for fine in ("SPECIAL_TOKENS = [", 'error("WHAT: no such file or directory: SPEC")', "docs/spec.md section 4",
                 "spec = method_spec(name)"):
        assert not OLD_POINTER.search(fine), fine


def test_spec_has_the_numbered_sections_with_their_meanings():
    assert SPEC.is_file(), "docs/spec.md is missing"
    headings = _headings()
    for number, words in SECTION_MEANINGS.items():
        assert str(number) in headings, f"docs/spec.md has no heading '## {number}. ...'"
        title = headings[str(number)].lower()
        assert all(w in title for w in words), f"section {number} should be about {' and '.join(words)}: {title!r}"


def test_every_pointer_names_a_heading_of_the_spec():
    assert SPEC.is_file(), "docs/spec.md is missing"
    pointers, _ = _scan()
    # the code cites the spec throughout: an empty scan means the pattern or the scan broke
    assert any(where.startswith("src/sgsd/objectives.py:") for where, _ in pointers), "no pointer found"
    headings = _headings()
    missing = [f"{where}: section {section}" for where, section in pointers if section not in headings]
    if missing:
        pytest.fail("pointers to sections docs/spec.md does not have:\n" + "\n".join(missing))


def test_nothing_points_to_the_old_spec():
    _, old = _scan()
    if old:
        pytest.fail(f"{len(old)} pointers to the old spec (write 'docs/spec.md section N'):\n" + "\n".join(old[:20]))
