"""Bounded before expanded: what an input costs is bounded before anything walks it (docs/safety.md, "Bounds").

YAML aliases are refused, nesting is bounded with the file named, quoted values are cut, an oversized JSONL line
is refused while it is read, and a file that starts with a byte-order mark is read."""

from __future__ import annotations

import json
import time

import pytest

from sgsd.cli import main
from sgsd.config import load_config
from sgsd.errors import QUOTE_LIMIT, ConfigError, DataError, UserError, shorten
from sgsd.storage import read_input_jsonl

# A few hundred bytes that expand to 9^3 = 729 strings (9^9 with six more lines): refused unexpanded.
BOMB = """a: &a ["x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
"""


def test_yaml_aliases_are_refused_in_configs_and_overrides(tmp_path):
    config = tmp_path / "bomb.yaml"
    config.write_text(BOMB)
    with pytest.raises(ConfigError, match=rf"config file {config}: line 2: YAML alias \*a refused"):
        load_config(config)
    with pytest.raises(ConfigError, match=r"override training.max_steps: line 1: YAML alias \*a refused"):
        load_config(None, ["training.max_steps=[&a [1, 1], *a, *a]"])


def test_deep_nesting_names_the_file_and_never_recurses(tmp_path, capsys):
    config = tmp_path / "deep.yaml"
    config.write_text("training: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=rf"config file {config}: line 1: nested more than 100 levels deep"):
        load_config(config)
    bank = tmp_path / "bank.json"
    bank.write_text('{"general_skills": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert main(["skills", "validate", "--bank", str(bank)]) == 2
    err = capsys.readouterr().err
    assert f"{bank}: JSON nested too deeply" in err and "RecursionError" not in err
    data = tmp_path / "data.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n' + "[" * 100_000 + "\n")
    with pytest.raises(DataError, match=rf"{data}: line 2: JSON nested too deeply"):
        list(read_input_jsonl(data, "dataset"))


def test_messages_quote_a_bounded_part_of_a_value(capsys):
    huge = "9" * 100_000
    for override in (f"training.max_steps=x{huge}", f"training.{huge}=1", f"training.lr_scheduler={huge}"):
        with pytest.raises(UserError) as err:
            load_config(None, [override])
        assert len(str(err.value)) < 2 * QUOTE_LIMIT + 300, str(err.value)[:400]
    assert shorten("abc", 2) == "ab... (1 more characters)" and shorten("abc") == "abc"


def test_an_oversized_jsonl_line_is_refused_while_read(tmp_path, monkeypatch):
    monkeypatch.setenv("SGSD_MAX_LINE_MB", "0.01")  # 10 kB
    data = tmp_path / "data.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n' + json.dumps({"problem": "x" * 50_000, "answer": "1"}) + "\n")
    started = time.perf_counter()
    with pytest.raises(DataError, match=rf"dataset {data}: line 2: longer than the line bound of 0.01 MB "
                                        r"\(set SGSD_MAX_LINE_MB to raise it\)"):
        list(read_input_jsonl(data, "dataset"))
    assert time.perf_counter() - started < 1.0  # bound: reading 10 kB and one line, generously


def test_a_file_that_starts_with_a_byte_order_mark_is_read(tmp_path):
    from sgsd.data import load_problems
    from sgsd.skills.bank import load_bank

    data = tmp_path / "data.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + b'{"problem": "1+1", "answer": "2"}\n{"problem": "2+2", "answer": "4"}\n')
    problems, _ = load_problems(str(data))
    assert [p.answer for p in problems] == ["2", "4"]
    listed = tmp_path / "data.json"
    listed.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"problem": "1+1", "answer": "2"}]).encode())
    assert [p.answer for p in load_problems(str(listed))[0]] == ["2"]
    bank = tmp_path / "bank.json"
    bank.write_bytes(b"\xef\xbb\xbf" + (pytest.importorskip("pathlib").Path(__file__).parents[1] / "configs" / "tiny" /
                                        "skill_bank.json").read_bytes())
    assert len(load_bank(bank).general_skills) == 4
    config = tmp_path / "c.yaml"
    config.write_bytes(b"\xef\xbb\xbftraining: {max_steps: 3}\n")
    assert load_config(config).training.max_steps == 3


def test_a_config_that_is_a_directory_says_so(tmp_path):
    with pytest.raises(ConfigError, match=f"config file {tmp_path}: is a directory; give the YAML file"):
        load_config(tmp_path)


def test_num_teachers_beyond_the_banks_pairs_is_capped_with_a_note(capsys, tmp_path):
    from pathlib import Path

    from sgsd.run_dir import RunRecord
    from sgsd.skills.bank import load_bank
    from sgsd.trainers.model_card import render_model_card
    from sgsd.run_setup import teachers_within_bank
    from sgsd.trainers.preflight import teachers_record

    path = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "skill_bank.json"  # 4 skills, 4 mistakes
    bank = load_bank(path)
    cfg = load_config(None, [f"skills.bank={path}", "sgsd.num_teachers=100000000"])
    used = teachers_within_bank(cfg, bank)
    assert used.sgsd.num_teachers == 4 and cfg.sgsd.num_teachers == 100000000  # the request is kept, for resumes
    assert f"sgsd.num_teachers=100000000: the skill bank {path} forms at most 4 (skill, mistake) pairs per problem; " \
           "K = 4 is used" in capsys.readouterr().err
    assert teachers_record(cfg, used) == {"teachers": {"requested": 100000000, "used": 4}}
    online = load_config(None, [f"skills.bank={path}", "sgsd.num_teachers=100", "skills.online.enabled=true"])
    assert teachers_within_bank(online, bank).sgsd.num_teachers == 4 + 30  # online updates may add 30 per list
    capsys.readouterr()
    within = load_config(None, [f"skills.bank={path}", "sgsd.num_teachers=3"])
    assert teachers_within_bank(within, bank) is within and capsys.readouterr().err == ""
    assert teachers_record(within, within) == {}
    # the model card states the K used
    from sgsd.config import dump_config
    from sgsd.run_dir import resolved_config_text

    (tmp_path / "resolved_config.yaml").write_text(resolved_config_text(dump_config(cfg), teachers_record(cfg, used)))
    assert "| `sgsd.num_teachers` | 4 (requested 100000000; the bank forms no more pairs) |" in \
        render_model_card(tmp_path, 1)
    assert RunRecord  # the record type the card reads


def test_skills_validate_refuses_exactly_the_items_training_refuses(tmp_path, capsys):
    from pathlib import Path

    from sgsd.skills.bank import MAX_ITEM_CHARS, load_bank

    obj = json.loads((Path(__file__).resolve().parents[1] / "configs" / "tiny" / "skill_bank.json").read_text())
    bank = tmp_path / "bank.json"
    for size, refused in ((MAX_ITEM_CHARS, False), (MAX_ITEM_CHARS + 1, True), (210_000, True)):
        item = obj["general_skills"][0]
        item["principle"] = "x" * (size - len(item["title"]) - len(item["when_to_apply"]))
        bank.write_text(json.dumps(obj))
        assert main(["skills", "validate", "--bank", str(bank)]) == (2 if refused else 0)
        err = capsys.readouterr().err
        if refused:
            with pytest.raises(DataError) as loaded:  # what training, eval and the probe read it with
                load_bank(bank)
            assert err.strip() == f"sgsd: error: {loaded.value}"
            assert f"{size:,} characters of text, over the bound of {MAX_ITEM_CHARS:,}" in err
        else:
            assert load_bank(bank).general_skills[0].principle == item["principle"]
