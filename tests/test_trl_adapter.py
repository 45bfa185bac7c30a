"""Contract tests: TRL's private surface the adapter relies on. These fail loudly when TRL changes."""

import inspect

import pytest
import torch

from sgsd.trl_adapter import (
    ATTRIBUTES,
    OUTPUT_KEYS,
    PRIVATE_HOOKS,
    TRL_VERSION,
    check_trl_contract,
    local_rewards,
    make_grpo_config,
)


def test_installed_trl_matches_the_adapter():
    import trl

    assert trl.__version__ == TRL_VERSION
    assert check_trl_contract() == []


def test_private_hooks_exist_with_expected_parameters():
    from trl import GRPOTrainer

    for name, expected in PRIVATE_HOOKS.items():
        params = tuple(inspect.signature(getattr(GRPOTrainer, name)).parameters)
        assert params[: len(expected)] == expected, name


def test_generate_and_score_output_keys_and_trainer_attributes_are_still_used():
    from trl import GRPOTrainer

    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    for key in OUTPUT_KEYS:
        assert f'"{key}"' in source, key
    init_source = inspect.getsource(GRPOTrainer)
    for attribute in ATTRIBUTES:
        assert f"self.{attribute}" in init_source, attribute
    # TRL's own loss scales for gradient accumulation this way; method_loss mirrors it.
    assert "current_gradient_accumulation_steps" in inspect.getsource(GRPOTrainer._compute_loss)


def test_grpo_config_refuses_single_rollout_but_adapter_allows_it():
    common = dict(output_dir="/tmp/sgsd-test", use_cpu=True, bf16=False, report_to="none",
                  per_device_train_batch_size=1, gradient_accumulation_steps=4)
    from trl import GRPOConfig

    with pytest.raises(ValueError):
        GRPOConfig(num_generations=1, **common)
    args = make_grpo_config(num_generations=1, **common)
    assert args.num_generations == 1
    assert args.steps_per_generation == 4 and args.generation_batch_size == 4  # TRL's default batching kept


def test_local_rewards_slice_this_rank():
    class FakeAccelerator:
        process_index = 1

    class FakeTrainer:
        reward_weights = torch.tensor([1.0, 0.5])
        accelerator = FakeAccelerator()

    per_func = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # 2 ranks x 2 rollouts
    assert local_rewards(FakeTrainer(), per_func, 2).tolist() == [1.5, 0.5]


def test_colocated_engine_seams_are_still_used():
    """TRL 1.16 builds its colocated engine by calling the `LLM` its vllm_generation module imported (which
    `colocated_engine` replaces for the duration), from `model.name_or_path` (a folder the run
    writes for the in-process tiny model), and keeps it where `check_engine_sync` and `close_engine` read it."""
    from trl import GRPOTrainer
    from trl.generation.vllm_generation import VLLMGeneration

    from sgsd.trl_adapter import VLLM_COLOCATE_ATTRIBUTES

    init = inspect.getsource(VLLMGeneration._init_vllm)
    assert "self.llm = LLM(" in init and "model=model.name_or_path" in init
    assert "dtype" not in init and "enforce_eager" not in init  # TRL sets neither: engine_options does
    assert "self.vllm_generation = VLLMGeneration(" in inspect.getsource(GRPOTrainer.__init__)
    source = inspect.getsource(GRPOTrainer)
    for attribute in VLLM_COLOCATE_ATTRIBUTES:
        assert f"self.{attribute}" in source, attribute
    # the sync happens right before generation, so the check after it sees the weights that generated
    single_turn = inspect.getsource(GRPOTrainer._generate_single_turn)
    assert single_turn.index("sync_weights()") < single_turn.index("self.vllm_generation.generate(")


def test_engine_options_follow_the_trainer():
    from sgsd.trl_adapter import engine_options

    fp32 = make_grpo_config(num_generations=2, output_dir="/tmp/sgsd-test", use_cpu=True, bf16=False,
                            report_to="none", per_device_train_batch_size=2)
    assert engine_options(fp32, on_cpu=True) == {"dtype": "float32", "enforce_eager": True}
    fp32.bf16 = True
    assert engine_options(fp32, on_cpu=False) == {"dtype": "bfloat16"}  # GPUs keep vLLM's CUDA graphs
