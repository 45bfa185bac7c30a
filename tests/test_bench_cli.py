"""`sgsd bench`: JSON with positive timings and memory, the compare table, the paper-scale estimate, bad
input as one-line errors; FLOP counts against a hand count; the train-step profile from metrics records."""

import json

import pytest
import torch

from sgsd.benchmarking.cost import paper_scale_estimate, phase_flops, teacher_padding_fraction
from sgsd.benchmarking.synthetic import SyntheticBatch
from sgsd.tiny import ModelShape
from sgsd.benchmarking.train_step import profile_from_records, timed_reward
from sgsd.cli import main

TINY = ["--vocab", "64", "--completion-tokens", "8", "--hidden", "32", "--layers", "1", "--heads", "4",
        "--rollouts", "2", "--repeats", "2", "--warmup", "1"]


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()  # the bench sets 1 thread by default (--threads)
    yield
    torch.set_num_threads(threads)


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_step_prints_json_with_positive_time_and_memory(capsys):
    real = _json(capsys, ["bench", "step", "--teachers", "3", *TINY, "--json"])
    naive = _json(capsys, ["bench", "step", "--teachers", "3", "--naive", *TINY, "--json"])
    for out, path in ((real, "real"), (naive, "naive")):
        assert out["path"] == path and out["teachers"] == 3 and len(out["repeats_s"]) == 2
        assert out["loss_phase_s"] > 0 and out["peak_mem_mb"] > 0 and out["estimated_gflop"] > 0
        assert out["loss_phase_min_s"] <= out["loss_phase_s"] <= out["loss_phase_max_s"]
        assert out["threads"] == 1
    # same seeded model and batch: the same loss (fp32 model, different padding: ~1e-8 apart)
    assert real["loss"] != 0 and abs(real["loss"] - naive["loss"]) < 1e-5
    assert naive["peak_mem_mb"] > real["peak_mem_mb"]  # K student passes and full logits
    assert naive["estimated_gflop"] > real["estimated_gflop"]


def test_compare_reports_the_three_ratios(capsys):
    out = _json(capsys, ["bench", "compare", "--teachers", "2", *TINY, "--rounds", "2", "--json"])
    assert set(out["summary"]) == {"scaling", "time_vs_naive", "memory_vs_naive"}
    assert len(out["rounds"]) == 2
    for key, ratio in out["summary"].items():
        assert len(ratio["values"]) == 2 and all(v > 0 for v in ratio["values"]), key
        assert ratio["min"] <= ratio["median"] <= ratio["max"]
        if "memory" not in key:
            assert ratio["pooled_min"] > 0
    first, second = out["rounds"]
    assert first["real_k1"]["teachers"] == 1 and first["naive_k"]["path"] == "naive"
    assert second["naive_k"]["peak_mem_mb"] == first["naive_k"]["peak_mem_mb"]  # measured once
    assert main(["bench", "compare", "--teachers", "2", *TINY, "--rounds", "1"]) == 0
    text = capsys.readouterr().out
    assert "time(K=2) / time(K=1)" in text and "peak memory real / naive" in text


def test_sweep_covers_every_point(capsys):
    out = _json(capsys, ["bench", "sweep", "--teachers", "1,2", *TINY[:2], "--completion-tokens", "6,8",
                         *TINY[4:], "--json"])
    points = [(r["teachers"], r["completion_tokens"], r["path"]) for r in out["results"]]
    assert sorted(points) == [(k, t, "real") for k in (1, 2) for t in (6, 8)]


def test_paper_scale_estimate_matches_the_spec(capsys):
    out = _json(capsys, ["bench", "estimate", "--json"])
    # docs/spec.md section 9: K student passes cost ~2.7-2.9x the necessary FLOPs at K = 8; the naive path's
    # full-vocabulary logits and log-softmax take ~13-17 GB per micro-step at K = 8 and 1024 tokens
    assert 2.7 <= out["naive_over_real"] <= 2.9
    assert 13 <= out["naive_logits_gb"] <= 17.5
    assert out["teachers_tflop"] > out["student_tflop"]  # K = 8 teacher forwards dominate the real path
    # one fp32 [chunk, V] buffer; the teachers' 8 x 1024 rows cap the chunk at 8192, the student's at 1024
    est = paper_scale_estimate(chunk_tokens=16384)
    assert est.teacher_chunk_buffer_gb == pytest.approx(8192 * 151936 * 4 / 1e9)  # 4.98 GB = B K T V x 4 B
    assert est.student_chunk_buffer_gb == pytest.approx(1024 * 151936 * 4 / 1e9)
    assert est.head_peak_gb == est.teacher_chunk_buffer_gb


@pytest.mark.parametrize("argv,needle", [
    (["bench", "step", "--teachers", "0"], "teachers"),
    (["bench", "step", "--vocab", "8"], "vocab"),
    (["bench", "step", "--hidden", "30"], "hidden"),
    (["bench", "compare", "--teachers", "1"], "--teachers"),
    (["bench", "step", "--repeats", "0"], "--repeats"),
    (["bench", "train-step", "--steps", "1"], "--steps"),
    (["bench", "step", "--completion-tokens", "6000"], "--completion-tokens"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sgsd: error:") and needle in err and "\n" not in err


def test_flops_against_a_hand_count():
    shape = ModelShape(hidden_size=4, num_layers=1, num_heads=1, num_kv_heads=1, intermediate_size=4, vocab_size=16)
    # layer weights: attention 4 x 4 x (2 + 2) = 64, MLP 3 x 4 x 4 = 48 -> 112; head 4 x 16 = 64
    assert shape.parameter_counts() == (112, 64)
    batch = SyntheticBatch(student_prompt_ids=[[1, 2]], teacher_prompt_ids=[[[3, 1, 2]]],
                           completion_ids=torch.tensor([[4, 5, 6]]), completion_mask=torch.ones(1, 3),
                           counted_mask=torch.ones(1, 3, dtype=torch.bool), rewards=torch.ones(1),
                           teacher_weights=torch.ones(1, 1))
    # forward of one row of L tokens scoring S of them: 2 x 112 x L + causal attention 2 x 4 x L^2 + 2 x 64 x S
    teacher = 2 * 112 * 6 + 2 * 4 * 36 + 2 * 64 * 3  # 2016: prompt 3 + completion 3, head on the completion
    student = 3 * (2 * 112 * 5 + 2 * 4 * 25 + 2 * 64 * 3) + 2 * 64 * 3  # 5496: fwd+bwd, checkpointed head again
    assert phase_flops(shape, batch, naive=False) == teacher + student
    naive_student = 3 * (2 * 112 * 5 + 2 * 4 * 25 + 2 * 64 * 5)  # head on every position
    naive_teacher = 2 * 112 * 6 + 2 * 4 * 36 + 2 * 64 * 6
    assert phase_flops(shape, batch, naive=True) == naive_student + naive_teacher
    assert teacher_padding_fraction(batch) == 0.0  # one row: nothing to pad


def test_teacher_padding_fraction_by_hand():
    # rollout 0: completion 3, teacher prompts of 1 and 3 tokens; rollout 1: completion 1, prompt of 2 tokens
    batch = SyntheticBatch(student_prompt_ids=[[1], [2]], teacher_prompt_ids=[[[1], [5, 6, 1]], [[7, 2]]],
                           completion_ids=torch.tensor([[4, 5, 6], [4, 0, 0]]),
                           completion_mask=torch.tensor([[1, 1, 1], [1, 0, 0]]),
                           counted_mask=torch.ones(2, 3, dtype=torch.bool), rewards=torch.ones(2),
                           teacher_weights=torch.ones(2, 2))
    # real lengths 4, 6, 3 (sorted 3, 4, 6); one batch of 3 rows: prompt width 3 + completion 3 = 6 slots each
    assert teacher_padding_fraction(batch, teacher_batch_rows=16) == pytest.approx(1 - 13 / 18)
    # batches of one row: no padding at all
    assert teacher_padding_fraction(batch, teacher_batch_rows=1) == 0.0


def test_train_step_profile_from_records():
    records = [
        {"step": 2, "time/generate_s": 1.0, "time/teacher_s": 0.5, "time/update_s": 0.25, "time/step_s": 2.0},
        {"step": 1, "time/generate_s": 5.0, "time/teacher_s": 1.0, "time/update_s": 1.0, "time/step_s": 7.0},
        {"step": 3, "time/generate_s": 3.0, "time/teacher_s": 1.5, "time/update_s": 0.75, "time/step_s": 6.0},
        {"step": 3, "train/loss": 0.1},  # records without timing are ignored
    ]
    profile = profile_from_records("cfg.yaml", records, grading=[0.5, 0.25, 1.0])
    assert [s.step for s in profile.steps] == [1, 2, 3]
    assert [s.generate_s for s in profile.steps] == [4.5, 0.75, 2.0]  # generation = generate_s - grading
    assert profile.steady_mean["teacher_s"] == 1.0 and profile.steady_mean["step_s"] == 4.0  # steps 2 and 3
    assert profile.steady_fraction["teacher_s"] == 0.25
    uneven = profile_from_records("cfg.yaml", records, grading=[0.9])
    assert uneven.notes and uneven.steps[0].grade_s == pytest.approx(0.3)
    with pytest.raises(ValueError):
        profile_from_records("cfg.yaml", [{"step": 1}], grading=[])


def test_timed_reward_keeps_name_and_records_each_call():
    def accuracy_reward(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    seconds = []
    wrapped = timed_reward(accuracy_reward, seconds)
    assert wrapped.__name__ == "accuracy_reward"  # TRL names its reward metrics after the function
    assert wrapped(["p"], ["c", "d"], answer=["1", "2"]) == [1.0, 1.0] and len(seconds) == 1


@pytest.mark.slow
def test_train_step_on_the_tiny_recipe_prints_clean_json(capsys):
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "sgsd.yaml"
    out = _json(capsys, ["bench", "train-step", "--config", str(config), "--steps", "2", "--json"])
    assert [s["step"] for s in out["steps"]] == [1, 2]
    for step in out["steps"]:
        assert step["step_s"] > 0 and step["teacher_s"] > 0 and step["generate_s"] > 0 and step["grade_s"] >= 0
        parts = step["generate_s"] + step["grade_s"] + step["teacher_s"] + step["update_s"]
        # update_s is the rest of StepTimer's window; step_s is TRL's own step_time (a slightly different
        # window, a few ms apart): the stages must account for the step, not match it to the microsecond
        assert parts == pytest.approx(step["step_s"], rel=0.25)
    assert out["steady_fraction"]["step_s"] == pytest.approx(1.0)
