"""Skill bank schema: the real reference banks load unchanged, broken banks are refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from conftest import REFERENCE_BANKS, require_shared
from sgsd.cli import main
from sgsd.errors import DataError
from sgsd.skills.bank import SCHEMA_VERSION, GeneralSkill, load_bank, parse_bank, save_bank

# (file, general skills, common mistakes): the counts docs/spec.md section 3 gives for the merged banks.
MERGED = [("qwen3_1b_skill_bank.json", 28, 98), ("qwen3_4b_skill_bank.json", 24, 15), ("qwen3_8b_skill_bank.json", 46, 8)]
RAW = ["qwen3_1b_raw_candidates.json", "qwen3_4b_raw_candidates.json", "qwen3_8b_raw_candidates.json"]


def _skill(i, **kw):
    return {"skill_id": f"gen_{i:03d}", "title": f"t{i}", "principle": f"p{i}", "when_to_apply": f"w{i}", **kw}


def _mistake(i, **kw):
    return {"mistake_id": f"err_{i:03d}", "description": f"d{i}", "why_it_happens": f"y{i}", "how_to_avoid": f"h{i}", **kw}


def _good():
    return {"general_skills": [_skill(1), _skill(2)], "task_specific_skills": {},
            "common_mistakes": [_mistake(1)], "metadata": {"source": "test"}}


@pytest.mark.parametrize("name,n_skills,n_mistakes", MERGED)
def test_reference_banks_load_with_spec_counts(name, n_skills, n_mistakes):
    bank = load_bank(require_shared(REFERENCE_BANKS) / name)
    assert (len(bank.general_skills), len(bank.common_mistakes)) == (n_skills, n_mistakes)
    assert bank.general_skills[0].skill_id == "gen_001" and bank.common_mistakes[0].mistake_id == "err_001"
    assert bank.metadata["merge_group_size"] == 32


@pytest.mark.parametrize("name", [m[0] for m in MERGED] + RAW)
def test_reference_banks_round_trip_unchanged(name, tmp_path):
    path = require_shared(REFERENCE_BANKS) / name
    original = json.loads(path.read_text())
    bank = load_bank(path)
    save_bank(bank, tmp_path / "copy.json")
    written = json.loads((tmp_path / "copy.json").read_text())
    assert written["metadata"].pop("schema_version") == SCHEMA_VERSION
    assert written == original
    again = load_bank(tmp_path / "copy.json")
    assert again.version == bank.version and again.general_skills == bank.general_skills


def test_extra_fields_survive_a_round_trip(tmp_path):
    obj = _good()
    obj["general_skills"][0]["source_memory"] = 17
    obj["producer"] = {"tool": "x"}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(obj))
    save_bank(load_bank(path), tmp_path / "c.json")
    written = json.loads((tmp_path / "c.json").read_text())
    assert written["general_skills"][0]["source_memory"] == 17 and written["producer"] == {"tool": "x"}


def _mutate(fn):
    obj = _good()
    fn(obj)
    return json.dumps(obj)


BROKEN = {
    "invalid_json": ('{"general_skills": [,]}', "invalid JSON at line 1 column 21"),
    "truncated": (json.dumps(_good(), indent=2)[:150], "truncated JSON"),
    "empty_file": ("  \n", "empty file"),
    "not_an_object": ("[1, 2]", "top level: expected a JSON object, got list"),
    "missing_list": (_mutate(lambda o: o.pop("common_mistakes")), "missing required top-level field 'common_mistakes'"),
    "list_is_object": (_mutate(lambda o: o.update(general_skills={})), "general_skills: expected a list, got object"),
    "item_not_object": (_mutate(lambda o: o["general_skills"].append("x")), "general_skills[2]: expected an object, got string"),
    "wrong_type": (_mutate(lambda o: o["general_skills"][1].update(title=3)), "general_skills[1] (gen_002).title: expected a string, got integer"),
    "missing_field": (_mutate(lambda o: o["common_mistakes"][0].pop("how_to_avoid")), "common_mistakes[0] (err_001): missing required field 'how_to_avoid'"),
    "missing_id": (_mutate(lambda o: o["general_skills"][0].pop("skill_id")), "general_skills[0]: missing required field 'skill_id'"),
    "empty_text": (_mutate(lambda o: o["common_mistakes"][0].update(description="  ")), "common_mistakes[0] (err_001).description: empty string"),
    "duplicate_id": (_mutate(lambda o: o["general_skills"].append(_skill(1))), "general_skills[2] (gen_001).skill_id: duplicate id 'gen_001' (first at general_skills[0])"),
    "null_field": (_mutate(lambda o: o["general_skills"][0].update(principle=None)), "general_skills[0] (gen_001).principle: expected a string, got null"),
    "metadata_list": (_mutate(lambda o: o.update(metadata=[])), "metadata: expected an object, got list"),
    "newer_schema": (_mutate(lambda o: o["metadata"].update(schema_version=SCHEMA_VERSION + 1)), "upgrade sgsd"),
    "nan": ('{"general_skills": [], "common_mistakes": [], "metadata": {"x": NaN}}', "non-standard constant NaN"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_banks_are_refused_with_one_line_naming_file_item_and_field(case, tmp_path):
    text, expected = BROKEN[case]
    path = tmp_path / f"{case}.json"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        load_bank(path)
    message = str(info.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_validate_command_exit_codes(tmp_path, capsys):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_good()))
    bad.write_text(BROKEN["duplicate_id"][0])
    assert main(["skills", "validate", "--bank", str(good)]) == 0
    assert "valid skill bank (2 general skills, 1 common mistakes" in capsys.readouterr().out
    assert main(["skills", "validate", "--bank", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "duplicate id 'gen_001'" in err and "Traceback" not in err
    assert main(["skills", "validate", "--bank", str(tmp_path / "absent.json")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_validate_command_accepts_every_reference_bank(capsys):
    for name in [m[0] for m in MERGED] + RAW:
        assert main(["skills", "validate", "--bank", str(require_shared(REFERENCE_BANKS) / name)]) == 0


def test_show_prints_counts_provenance_and_items(capsys):
    path = require_shared(REFERENCE_BANKS) / "qwen3_4b_skill_bank.json"
    assert main(["skills", "show", "--bank", str(path)]) == 0
    out = capsys.readouterr().out
    assert "general skills:    24" in out and "common mistakes:   15" in out
    assert "using vllm:Qwen/Qwen3-4B" in out and "root_group_reached" in out
    assert "gen_024" in out and "err_015" in out


def test_version_depends_on_items_only_and_is_stable_across_processes(tmp_path):
    bank = parse_bank(_good())
    assert replace(bank, metadata={"other": 1}).version == bank.version
    changed = replace(bank, general_skills=(replace(bank.general_skills[0], title="t1!"),) + bank.general_skills[1:])
    assert changed.version != bank.version
    save_bank(bank, tmp_path / "b.json")
    code = f"from sgsd.skills.bank import load_bank; print(load_bank({str(tmp_path / 'b.json')!r}).version)"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == bank.version


def test_save_is_atomic_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "bank.json"
    save_bank(parse_bank(_good()), path)
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        save_bank(parse_bank({**_good(), "general_skills": [_skill(9)]}), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.json"]  # no temporary file left


def test_dynamic_items_are_split_from_static_ones():
    obj = _good()
    obj["general_skills"].append(_skill(1) | {"skill_id": "dyn_001"})
    bank = parse_bank(obj)
    assert [s.skill_id for s in bank.static_skills] == ["gen_001", "gen_002"]
    assert [s.skill_id for s in bank.dynamic_skills] == ["dyn_001"]
    new = bank.with_dynamic([GeneralSkill("dyn_002", "a", "b", "c")], [])
    assert [s.skill_id for s in new.general_skills] == ["gen_001", "gen_002", "dyn_002"]
    assert new.common_mistakes == bank.common_mistakes
