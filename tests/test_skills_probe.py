"""`sgsd skills probe` on the tiny recipe: what it writes, that its numbers are the core path's, one-line errors
before the model loads; and the controlled polarity in a 2-process training run with attribution and online
updates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sgsd.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "probe"
    code = main(["skills", "probe", "--config", str(TINY / "sgsd.yaml"), "--output-dir", str(out), "--rollouts", "6",
                 "--control", "none,neutral,shuffled", "--batch-size", "4"])
    assert code == 0
    return out


def test_probe_writes_what_it_promises(probe_dir):
    result = json.loads((probe_dir / "probe.json").read_text())
    assert result["rollouts"] == 6 and set(result["controls"]) == {"none", "neutral", "shuffled"}
    assert result["control"] == "none" and result["quadrants"] == result["controls"]["none"]["quadrants"]
    for section in result["controls"].values():
        shares = section["quadrants"]
        assert set(shares) == {"helpful", "over_suppressive", "misleading", "warning", "neutral"}
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)  # shares of the 18 present teachers
        assert list(section["support"]["all"]) == ["0.05", "0.25", "0.5", "0.75", "0.95"]
        uses = sum(item["uses"] for item in section["items"].values())
        assert uses == 2 * 6 * 3  # each of the K = 3 teachers of 6 rollouts names one skill and one mistake
        for item in section["items"].values():
            assert item["helpful"] + item["harmful"] <= item["uses"]
            low, high = item["interval"]
            assert low <= item["net_polarity"] <= high
    assert 0 <= result["success_rate"] <= 1 and result["seconds_per_rollout"] > 0
    # the controls change the support the test reads (a random model still shifts with the block's text)
    assert result["controls"]["none"]["support"] != result["controls"]["neutral"]["support"]
    report = (probe_dir / "report.md").read_text()
    assert "Do the teachers of one rollout differ in sign?" in report and "## Control: shuffled" in report
    assert (probe_dir / "support.png").stat().st_size > 0 and (probe_dir / "items.png").stat().st_size > 0
    # teachers.jsonl holds what probe.json summarises: its rows re-count the quadrant shares and item uses
    rows = [json.loads(line) for line in (probe_dir / "teachers.jsonl").read_text().splitlines()]
    for control, section in result["controls"].items():
        mine = [r for r in rows if r["control"] == control]
        assert len(mine) == 18 and {r["rollout"] for r in mine} == set(range(6))
        for name, share in section["quadrants"].items():
            assert sum(r["quadrant"] == name for r in mine) / 18 == pytest.approx(share, abs=1e-12)
        for item_id, item in section["items"].items():
            used = [r for r in mine if item_id in (r["skill_id"], r["mistake_id"])]
            assert (len(used), sum(r["rho"] > 0 for r in used)) == (item["uses"], item["helpful"])
        assert all((r["control_shift"] is None) == (control == "none") for r in mine)


def test_probe_caps_k_at_the_banks_pairs_as_training_does(tmp_path, capsys):
    out = tmp_path / "probe"
    assert main(["skills", "probe", "--config", str(TINY / "sgsd.yaml"), "--output-dir", str(out), "--rollouts", "2",
                 "sgsd.num_teachers=50"]) == 0
    assert "forms at most 4 (skill, mistake) pairs per problem; K = 4 is used" in capsys.readouterr().err
    result = json.loads((out / "probe.json").read_text())
    assert result["num_teachers"] == 4  # the tiny bank: 4 skills x 4 mistakes, one pair per teacher
    rows = [json.loads(line) for line in (out / "teachers.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4  # 4 teachers per rollout, none padded in


def test_probe_counts_the_core_paths_polarity(probe_dir):
    """The summary counts the quadrants `sgsd.teacher_scoring.quadrants` gives for the probe's polarity."""
    import torch

    from sgsd.probe.statistics import summarize
    from sgsd.teacher_scoring import QUADRANTS, TeacherProbe, quadrants

    polarity = torch.tensor([[1, -1, 0], [1, 1, -1]])
    rewards = torch.tensor([1.0, 0.0])
    present = torch.tensor([[True, True, True], [True, True, False]])
    codes = quadrants(polarity, rewards, present)
    # success: +1 -> q > p (helpful), -1 -> q < p (over-suppressive); failure: rho +1 -> q < p (warning)
    assert [[QUADRANTS[c] if c >= 0 else None for c in row] for row in codes.tolist()] == [
        ["helpful", "over_suppressive", "neutral"], ["warning", "warning", None]]

    class Bank:
        general_skills, common_mistakes = [], []

    probe = TeacherProbe(support=polarity.float(), polarity=polarity, quadrant=codes, present=present,
                         counted_tokens=torch.tensor([3, 4]), rewards=rewards, block_shift=torch.zeros(2, 3),
                         control_shift=torch.full((2,), float("nan")))
    ids = [[("s1", "m1"), ("s2", "m1"), ("s3", "m2")], [("s1", "m2"), ("s2", "m2"), ("s3", "m3")]]
    section = summarize(probe, ids, Bank())
    assert section["quadrants"] == {"helpful": 0.2, "over_suppressive": 0.2, "misleading": 0.0, "warning": 0.4,
                                    "neutral": 0.2}
    # rollout 0 has signs +1 and -1; rollout 1 only -1, -1
    assert section["sign_disagreement"] == {"rollouts_with_two_signed_teachers": 2, "share_with_both_signs": 0.5}
    assert section["items"]["s1"] == {"kind": "?", "uses": 2, "helpful": 2, "harmful": 0, "net_polarity": 1.0,
                                      "interval": [1.0, 1.0]}
    assert "s3" in section["items"] and section["items"]["m2"]["uses"] == 3


def _null_rollouts(rng, *, clustered):
    """60 rollouts x 4 teachers whose rho depends on the rollout only (its outcome: a failed rollout's teachers
    are warnings, +1, a solved one's over-suppressive, -1, each teacher neutral with probability 0.3), never on
    its items. `clustered`: failed rollouts retrieve items a0-a3 and solved ones b0-b3 (retrieval gives related
    problems the same items); else each teacher carries two of eight items at random."""
    rows = []
    for _ in range(60):
        failed = rng.random() < 0.5
        sign = 1.0 if failed else -1.0
        pool = ([f"a{j}" for j in range(4)] if failed else [f"b{j}" for j in range(4)]) if clustered else None
        row = []
        for k in range(4):
            items = (pool[k],) if clustered else tuple(rng.sample([f"i{j}" for j in range(8)], 2))
            row.append((items, sign if rng.random() < 0.7 else 0.0))
        rows.append(row)
    return rows


def test_between_item_test_separates_items_only_beyond_chance():
    from sgsd.probe.statistics import between_item_test

    import random

    rng = random.Random(0)
    # under the null (rho depends on the rollout, not on the items) it rejects at its level: 200 data sets,
    # binomial sd of the rate sqrt(0.05 * 0.95 / 200) = 0.015; [0.01, 0.10] is about 3 sd either side
    rejected = sum(between_item_test(_null_rollouts(rng, clustered=False), permutations=200, seed=seed)["p_value"]
                   < 0.05 for seed in range(200))
    assert 0.01 <= rejected / 200 <= 0.10, rejected
    # items that only ever meet the same rollouts' outcomes: their net polarities differ (a's +0.7, b's -0.7),
    # but within a rollout nothing separates them, so the test sees no item effect (a test permuting rho
    # across rollouts rejects every one of these data sets)
    clustered = [between_item_test(_null_rollouts(rng, clustered=True), permutations=200, seed=s)["p_value"]
                 for s in range(20)]
    assert sum(p < 0.05 for p in clustered) <= 3, clustered
    # a good and a bad item in the same rollouts: +1 / -1 with probability 0.8, two filler teachers at random
    rows = []
    for _ in range(30):
        rows.append([(("good",), 1.0 if rng.random() < 0.8 else 0.0), (("bad",), -1.0 if rng.random() < 0.8 else 0.0),
                     (("x",), rng.choice([-1.0, 0.0, 1.0])), (("y",), rng.choice([-1.0, 0.0, 1.0]))])
    found = between_item_test(rows)
    assert found["p_value"] < 0.01 and found["items_tested"] == 4
    assert between_item_test([[(("a",), 1.0)], [(("a",), 1.0)]])["p_value"] is None  # one item: not tested
    assert between_item_test([[(("a",), 1.0), (("b",), 1.0)]] * 2)["items_tested"] == 0  # 2 uses each: too few


@pytest.mark.parametrize("args,message", [
    (["--rollouts", "0"], "argument --rollouts: 0: must be a whole number >= 1"),
    (["--control", "none,blank"], "--control: expected a comma-separated list"),
    (["skills.bank=null"], "skills.bank"),
    (["--rollouts-file", "missing.jsonl"], "no such file"),
])
def test_bad_input_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys, args, message):
    import sgsd.models  # sgsd.run_setup loads through the module

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sgsd.models, "load_model", no_model)
    monkeypatch.chdir(tmp_path)
    code = main(["skills", "probe", "--config", str(TINY / "sgsd.yaml"), "--output-dir", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err[-1].startswith("sgsd: error: ") and message in err[-1], err
    assert not (tmp_path / "o").exists()


def test_rollouts_file_rows_are_checked(tmp_path, monkeypatch, capsys):
    import sgsd.models

    monkeypatch.setattr(sgsd.models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    bad = tmp_path / "r.jsonl"
    bad.write_text(json.dumps({"problem": "What is 1 + 1?", "completion": "2", "reward": 1}) + "\n{\"problem\": 3}\n")
    code = main(["skills", "probe", "--config", str(TINY / "sgsd.yaml"), "--output-dir", str(tmp_path / "o"),
                 "--rollouts-file", str(bad)])
    assert code != 0 and f"{bad}:2: needs a string 'completion' and a 'problem' text" in capsys.readouterr().err
    bad.write_text(json.dumps({"problem_id": "nowhere", "completion": "2"}) + "\n")
    code = main(["skills", "probe", "--config", str(TINY / "sgsd.yaml"), "--output-dir", str(tmp_path / "o"),
                 "--rollouts-file", str(bad)])
    assert code != 0 and "problem_id 'nowhere' is not in the config's training data" in capsys.readouterr().err
    # a chat-template control token in a rollout's text is refused like one in the data or the bank
    bad.write_text(json.dumps({"problem": "What is 1 + 1?", "completion": "2<|im_end|><|im_start|>system", "reward": 1})
                   + "\n")
    code = main(["skills", "probe", "--config", str(TINY / "sgsd.yaml"), "--output-dir", str(tmp_path / "o"),
                 "--rollouts-file", str(bad)])
    assert code != 0 and (f"--rollouts-file {bad}: rollout 1 (completion): contains the tokenizer's special token "
                          "'<|im_end|>'") in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_rollouts_file_by_problem_id_is_graded_with_the_configs_reward(tmp_path):
    """`sgsd eval`-style rows (problem_id, completion, no reward) are read against the config's data and graded."""
    from sgsd.config import load_config
    from sgsd.data import tiny_math_problems
    from sgsd.probe.rollouts import read_rollouts_file

    problems = tiny_math_problems(3)
    path = tmp_path / "samples.jsonl"
    rows = [{"problem_id": problems[0].problem_id, "completion": f"so \\boxed{{{problems[0].answer}}}"},
            {"problem_id": problems[1].problem_id, "completion": "\\boxed{-12345}"},
            {"problem": problems[2].problem, "completion": "no answer", "reward": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(TINY / "sgsd.yaml")
    got = read_rollouts_file(path, problems, cfg.reward.extract)
    assert [r.problem for r in got] == [p.problem for p in problems]
    assert [r.reward for r in got] == [1.0, 0.0, 1.0]


def _updater_reply(prompt: str) -> str:
    """The fake skill updater: a merge declines, every extraction adds one mistake."""
    if "Merge them" in prompt:
        return "{}"
    return ('{"common_mistakes": [{"description": "Slip", "why_it_happens": "haste", '
            '"how_to_avoid": "Check each carry."}]}')


@pytest.mark.slow
def test_controlled_polarity_trains_on_two_processes(tmp_path):
    """torchrun, 2 processes over gloo: each rank scores its own rollouts' control (keyed by the problem, no
    collective needed); attribution gathers both ranks, an online bank update at step 2 changes the bank the
    controls are drawn from, the run finishes, and its polarity differs from the paper's on the same seed."""
    from fake_llm_server import base_url, fake_llm_server

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "TRL_EXPERIMENTAL_SILENCE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("SGSD_FAULT_INJECT", None)
    records = {}
    with fake_llm_server(_updater_reply) as server:
        online = ["skills.online.enabled=true", "skills.online.every_steps=2", "skills.online.success_threshold=1.0",
                  f"skills.online.llm={base_url(server)}", "skills.online.llm_model=fake"]
        for control, steps, extra in (("none", 2, []), ("shuffled", 3, online)):
            out = tmp_path / control
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                       "sgsd.cli", "train", "--config", str(TINY / "sgsd.yaml"), "--output-dir", str(out), "--quiet",
                       "--max-steps", str(steps), f"sgsd.polarity_control={control}", "skills.attribution=true",
                       *extra]
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, result.stderr[-3000:]
            records[control] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            attribution = json.loads((out / "attribution.json").read_text())
            # steps x 2 ranks x 4 prompts: every rank's polarity gathered
            assert attribution["rollouts"] == steps * 2 * 4
        assert server.requests  # the online update ran
    latest = json.loads((tmp_path / "shuffled" / "skills" / "latest.json").read_text())
    assert any(m["description"] == "Slip" for m in latest["common_mistakes"])  # the bank changed at step 2
    assert len(records["none"]) == 2 and len(records["shuffled"]) == 3
    keys = ("sgsd/support_mean", "sgsd/helpful_fraction", "sgsd/quadrant_warning")
    assert all(isinstance(r[k], float) for r in records["shuffled"] for k in keys)
    # step 1 has the same rollouts (same seed, same weights): only the control changes the support
    assert records["none"][0]["num_tokens"] == records["shuffled"][0]["num_tokens"]
    assert records["none"][0]["sgsd/support_mean"] != records["shuffled"][0]["sgsd/support_mean"]


def test_the_report_warns_when_the_control_is_not_matched_to_the_skill_blocks():
    from sgsd.probe.report import control_mismatch

    spread = {"0.05": -0.15, "0.25": -0.1, "0.5": -0.08, "0.75": -0.06, "0.95": -0.04}
    matched = {"control_shift_mean": -0.089, "block_shift": spread}
    assert control_mismatch(matched) is None
    assert control_mismatch({"control_shift_mean": None, "block_shift": spread}) is None  # no control
    weak = control_mismatch({"control_shift_mean": -0.026, "block_shift": spread})
    assert weak and "-0.026 nats a token, outside the skill blocks' 5-95% range [-0.150, -0.040]" in weak
    assert control_mismatch({"control_shift_mean": -0.205, "block_shift": spread})  # a filler the model never saw
