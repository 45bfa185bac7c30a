"""`sgsd.teacher_engine` (trainer | vllm): what it refuses, in one line each, before a model loads, and the
requests the vLLM path sends (token ids, one per present teacher or control row), checked against the trainer's
own scoring through a stand-in engine that computes prompt log-probs with the same model. The engine itself is
exercised by tests/test_vllm_training.py (one process) and tests/test_vllm_distributed.py (two)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from sgsd.bounds import SettingsError
from sgsd.errors import ConfigError
from sgsd.loss_settings import SGSDSettings

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(("overrides", "named"), [
    ({"teacher": "ema"}, "sgsd.teacher=ema needs other weights: use sgsd.teacher_engine=trainer"),
    ({"teacher": "base"}, "sgsd.teacher=base needs other weights: use sgsd.teacher_engine=trainer"),
    ({"local_support_top_k": 4}, "the local-support variant needs each position's top-k"),
])
def test_vllm_engine_refuses_what_it_cannot_score_in_one_line(overrides, named):
    with pytest.raises(SettingsError) as err:
        SGSDSettings(teacher_engine="vllm", **overrides)
    assert named in str(err.value) and "\n" not in str(err.value)
    SGSDSettings(teacher_engine="trainer", **overrides)  # the trainer engine scores any of them
    assert SGSDSettings(teacher_engine="vllm").teacher == "live"


def test_unknown_engine_is_named():
    with pytest.raises(SettingsError, match=r"sgsd.teacher_engine: expected 'trainer' or 'vllm', got 'gpu'"):
        SGSDSettings(teacher_engine="gpu")  # type: ignore[arg-type]


@pytest.mark.parametrize("recipe", ["sgsd.yaml", "sgsd-pg.yaml"])
def test_run_config_needs_the_colocated_engine(recipe):
    from sgsd.methods import load_run_config

    path = ROOT / "configs/tiny" / recipe
    with pytest.raises(ConfigError, match=r"sgsd.teacher_engine=vllm .*set generation.use_vllm=true"):
        load_run_config(path, ["sgsd.teacher_engine=vllm"])
    with pytest.raises(ConfigError, match=r"set generation.vllm_mode=colocate"):
        load_run_config(path, ["sgsd.teacher_engine=vllm", "generation.use_vllm=true", "generation.vllm_mode=server"])
    cfg = load_run_config(path, ["sgsd.teacher_engine=vllm", "generation.use_vllm=true"])
    assert cfg.sgsd.teacher_engine == "vllm"
    assert load_run_config(path).sgsd.teacher_engine == "trainer"  # the default


def test_cli_refuses_an_ema_teacher_in_the_engine_before_loading(tmp_path, capsys):
    from sgsd.cli import main

    code = main(["train", "--config", str(ROOT / "configs/tiny/sgsd.yaml"), "--output-dir", str(tmp_path / "run"),
                 "generation.use_vllm=true", "sgsd.teacher_engine=vllm", "sgsd.teacher=ema"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "sgsd.teacher_engine=trainer" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # nothing written


def test_requests_are_token_ids_and_bad_rows_are_named():
    from sgsd.vllm_adapter import prompt_logprob_requests

    requests = prompt_logprob_requests([list(torch.tensor([5, 6, 7])), [9, 1]], [1, 2], max_length=4)  # 0-d tensors
    assert requests == [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [9, 1]}]
    assert all(type(t) is int for r in requests for t in r["prompt_token_ids"])
    too_long = r"sequence 1: 5 tokens, longer than the vLLM engine's context \(max_model_len 4\)"
    with pytest.raises(ValueError, match=too_long):
        prompt_logprob_requests([[1, 2], [1, 2, 3, 4, 5]], [1, 1], max_length=4)
    with pytest.raises(ValueError, match=r"sequence 0: scoring from token 0 of 2"):
        prompt_logprob_requests([[1, 2]], [0])


class StandInEngine:
    """What `sgsd.vllm_adapter.score_sequences` reads of a `vllm.LLM`, computing each request's prompt log-probs
    with a Hugging Face model on exactly the token ids sent (one unpadded sequence at a time), and keeping the
    requests and sampling parameters it was given."""

    def __init__(self, model, max_model_len=2048):
        self.model, self.requests, self.params = model, [], []
        self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=max_model_len))

    @torch.no_grad()
    def generate(self, requests, params, use_tqdm=True):
        self.requests += requests
        self.params.append(params)
        outputs = []
        for request in requests:
            ids = torch.tensor([request["prompt_token_ids"]])
            logps = self.model(input_ids=ids).logits[0].float().log_softmax(-1)
            rows = [None] + [{int(t): types.SimpleNamespace(logprob=float(logps[i, t]))}
                             for i, t in enumerate(ids[0, 1:])]
            outputs.append(types.SimpleNamespace(prompt_logprobs=rows))
        return outputs


def test_engine_rows_match_the_trainers_scoring(tiny_model, tiny_tokenizer, monkeypatch):
    """The vLLM path scores the same rows as the trainer's (teachers, absent teachers, controls, masked tokens),
    from [teacher prompt; completion] token ids, with greedy one-token requests asking for prompt log-probs."""
    from sgsd.prompts import ChatStyle
    from sgsd.skills.bank import CommonMistake, GeneralSkill
    from sgsd.skills.teachers import Teacher
    from sgsd.teacher_scoring import prompt_ids, score_under_teachers

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=lambda **kw: kw))
    tiny_model.eval()

    def teacher(i):
        return Teacher(GeneralSkill(f"s{i}", f"skill {i}", "add the tens first", "sums"),
                       CommonMistake(f"m{i}", f"mistake {i}", "haste", "check the carry"), None, 0.5,
                       f"Skill {i}: add the tens first. Mistake {i}: dropping a carry.")

    problems = ["What is 12 + 35?", "What is 7 * 6?", "What is 90 - 45?"]
    teachers = [[teacher(0), teacher(1)], [teacher(2)], [teacher(1), teacher(3)]]  # rollout 1: one teacher absent
    controls = {"neutral": ["A note. " * 6, "A note. " * 5, "A note. " * 7]}
    completion_ids = torch.randint(5, 40, (3, 9))
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 6:] = 0
    completion_mask[2, 3:] = 0
    settings, style = SGSDSettings(num_teachers=2), ChatStyle()
    engine = StandInEngine(tiny_model)
    kwargs = dict(settings=settings, style=style, chunk_tokens=64, controls=controls)
    trainer = score_under_teachers(tiny_model, tiny_tokenizer, problems, teachers, completion_ids, completion_mask,
                                   **kwargs)
    in_engine = score_under_teachers(tiny_model, tiny_tokenizer, problems, teachers, completion_ids, completion_mask,
                                     engine=engine, **kwargs)

    # one request per present row (5 teachers + 3 controls), each its prompt's ids then the completion's
    assert engine.params == [{"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}]
    lengths = completion_mask.sum(-1).tolist()
    expected = []
    for b, problem in enumerate(problems):
        blocks = [t.guidance for t in teachers[b]] + [controls["neutral"][b]]
        for ids in prompt_ids(tiny_tokenizer, problem, blocks, style, len(blocks)):
            expected.append(ids + completion_ids[b, : lengths[b]].tolist())
    assert sorted(r["prompt_token_ids"] for r in engine.requests) == sorted(expected)

    # the same log-probs (fp32: the trainer runs padded batches with a shared-prefix cache, the stand-in one
    # unpadded sequence; summation orders differ by a few ulp of values near -4, ulp 4.8e-7: 1e-5 is 20 ulp),
    # exact zeros where the trainer writes them (the absent teacher, masked tokens)
    assert torch.allclose(in_engine.teacher_logps, trainer.teacher_logps, atol=1e-5, rtol=0)
    assert torch.allclose(in_engine.control_logps["neutral"], trainer.control_logps["neutral"], atol=1e-5, rtol=0)
    assert torch.equal(in_engine.teacher_logps == 0, trainer.teacher_logps == 0)
    assert (trainer.teacher_logps[1, 1] == 0).all() and (trainer.teacher_logps[2, :, 3:] == 0).all()
    assert (trainer.teacher_logps[0] != 0).all()  # the comparison above is not of zeros
    assert in_engine.teacher_entropy is None and trainer.teacher_entropy is not None
    assert torch.equal(in_engine.counted, trainer.counted)


@pytest.mark.parametrize(("args", "named"), [
    (["--models", "gpt2"], "--models 'gpt2': expected names from tiny, smollm2"),
    (["--dtypes", "float16"], "--dtypes 'float16': expected names from float32, bfloat16"),
])
def test_bench_teacher_engine_names_a_bad_argument(args, named, capsys):
    from sgsd.cli import main

    assert main(["bench", "teacher-engine", *args]) != 0
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1, err
