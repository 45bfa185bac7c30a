"""`sgsd bench vllm` without an engine: bad input as one-line errors before anything loads, and the report's
ratios, summary, table and JSON from known calls. The measurement itself is run by hand (docs/vllm.md)."""

import json

import pytest

from sgsd.benchmarking.vllm_generation import Call, ModelReport, table
from sgsd.cli import main


def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sgsd: error:") and "\n" not in err
    return err


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fails the test if the command gets as far as loading a model."""
    import sgsd.benchmarking.vllm_generation as bench
    import sgsd.commands.bench as command

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(bench, "measure_model", refuse)
    monkeypatch.setattr(command, "measure_model", refuse)  # imported there by name


@pytest.mark.parametrize("argv,needle", [
    (["--models", "tiny,llama"], "--models 'tiny,llama': expected names from tiny, smollm2"),
    (["--models", ","], "expected names from tiny, smollm2"),
    (["--top-p", "1.5"], "--top-p: 1.5: must be a number in (0, 1]"),
    (["--prompts", "0"], "--prompts"),
    (["--temperature", "-1"], "--temperature"),
])
def test_bad_input_is_one_line_before_any_model_loads(capsys, no_model_loads, argv, needle):
    assert needle in _error(capsys, ["bench", "vllm", *argv])


def test_a_missing_vllm_is_refused_naming_the_extra(capsys, monkeypatch, no_model_loads):
    import sgsd.commands.bench as command

    monkeypatch.setattr(command, "unusable_reason", lambda on_cpu: "vLLM is not installed: pip install x")
    assert "sgsd bench vllm: vLLM is not installed: pip install x" in _error(capsys, ["bench", "vllm"])


def _report():
    # round 1: hf 100 tok/s, vLLM 150 tok/s (1.5); round 2: hf 50 tok/s, vLLM 100 tok/s (2.0);
    # round 3: hf 100 tok/s, vLLM 300 tok/s (3.0)
    rounds = [{"hf": Call("hf", 1.0, 8, 100), "vllm": Call("vllm", 1.0, 8, 150)},
              {"hf": Call("hf", 2.0, 8, 100), "vllm": Call("vllm", 1.0, 8, 100)},
              {"hf": Call("hf", 0.5, 8, 50), "vllm": Call("vllm", 0.25, 8, 75)}]
    return ModelReport("tiny", "tiny:x", 1_500_000, 8, 1, 64, 1, {"hf": 0.5, "vllm": 12.25},
                       {"hf": 0.2, "vllm": 0.3}, rounds)


def test_ratios_are_per_round_and_the_summary_takes_their_median():
    report = _report()
    assert report.ratios() == pytest.approx([1.5, 2.0, 3.0])  # exact up to float division
    summary = report.summary()
    assert summary["ratio_vllm_over_hf"]["median"] == pytest.approx(2.0)
    assert (summary["ratio_vllm_over_hf"]["min"], summary["ratio_vllm_over_hf"]["max"]) == pytest.approx((1.5, 3.0))
    # the medians of each backend's own throughput: hf (100, 50, 100), vLLM (150, 100, 300)
    assert summary["tokens_per_s"] == pytest.approx({"hf": 100.0, "vllm": 150.0})
    assert summary["tokens_per_call"] == {"hf": 100, "vllm": 100}


def test_table_and_json_carry_start_times_apart_from_throughput():
    report = _report()
    lines = table([report]).splitlines()
    assert len(lines) == 2 and "start s (hf/vllm)" in lines[0]
    row = lines[1].split()
    assert row[:5] == ["tiny", "1.5M", "8x1x64", "1", "0.5/12.2"]
    assert row[5:] == ["0.2/0.3", "100.0", "150.0", "2.00", "1.50", "2.00", "3.00"]
    data = json.loads(json.dumps(report.to_json()))
    assert data["start_s"] == {"hf": 0.5, "vllm": 12.25} and data["first_call_s"] == {"hf": 0.2, "vllm": 0.3}
    assert [r["vllm"]["tokens_per_s"] for r in data["rounds"]] == [150.0, 100.0, 300.0]
    assert data["summary"]["ratio_vllm_over_hf"]["per_round"] == pytest.approx([1.5, 2.0, 3.0])
