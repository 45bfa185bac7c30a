"""`sgsd skills report RUN`: the run's bank is found from its resolved config."""

from __future__ import annotations

import json
from pathlib import Path

from sgsd.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/tiny/sgsd.yaml"
TINY_BANK = ROOT / "configs/tiny/skill_bank.json"


def test_skills_report_finds_the_run_bank_from_its_resolved_config(tmp_path, capsys):
    from sgsd.config import dump_config, load_config
    from sgsd.skills.attribution import AttributionTracker

    run = tmp_path / "run"
    run.mkdir()
    (run / "resolved_config.yaml").write_text(dump_config(load_config(RECIPE)) + "# provenance: {}\n")
    tracker = AttributionTracker()
    tracker.update([["gen_001"]], [["mis_001"]], [[1]], [[0.5]], [[1.0]])
    tracker.save(run)
    assert main(["skills", "report", str(run)]) == 0
    printed = capsys.readouterr().out
    bank = json.loads(TINY_BANK.read_text())
    title = next(s["title"] for s in bank["general_skills"] if s["skill_id"] == "gen_001")
    assert title[:40] in printed and f"bank: {TINY_BANK}" in printed
    assert (run / "attribution.png").read_bytes()[:4] == b"\x89PNG"
