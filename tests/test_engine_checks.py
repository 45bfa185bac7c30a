"""What the training engine cannot run is refused before the model loads, in one line (issue 20), and
bf16 is accepted on CPU. One process, no launch: the checks read the config, the DeepSpeed JSON and
what `accelerate launch` exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sgsd.config import load_config
from sgsd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
ZERO2 = ROOT / "configs" / "paper" / "deepspeed-zero2.json"
ZERO3 = ROOT / "configs" / "paper" / "deepspeed-zero3.json"
ACCELERATE_ENV = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_CONFIG_FILE",
                  "ACCELERATE_USE_FSDP", "FSDP_VERSION")


@pytest.fixture(autouse=True)
def no_launcher_env(monkeypatch):
    for name in ACCELERATE_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def no_model_load(monkeypatch):
    """Loading the model is what the refusal must come before."""
    import sgsd.models  # sgsd.run_setup loads through the module

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(sgsd.models, "load_model", refuse)


REFUSED = [
    ("sgsd-pg.yaml", [], "method sgsd-pg under DeepSpeed ZeRO-3"),
    ("sgsd.yaml", ["sgsd.teacher=ema"], "sgsd.teacher=ema under DeepSpeed ZeRO-3"),
    ("opsd.yaml", ["opsd.teacher=ema"], "opsd.teacher=ema under DeepSpeed ZeRO-3"),
    ("sgsd.yaml", ["skills.online.enabled=true"], "skills.online.llm=policy under DeepSpeed ZeRO-3"),
]


@pytest.mark.parametrize("recipe, overrides, start", REFUSED)
def test_zero3_combinations_that_cannot_work_are_refused_before_the_model_loads(tmp_path, no_model_load, recipe,
                                                                                overrides, start):
    from sgsd.trainers.run import prepare_run

    cfg = load_config(TINY / recipe, [*overrides, f"training.deepspeed={ZERO3}"])
    with pytest.raises(ConfigError) as err:
        prepare_run(cfg, tmp_path / "run", progress=False)
    message = str(err.value)
    assert message.startswith(start) and "\n" not in message
    assert "ZeRO-2" in message  # says what to use instead
    assert not (tmp_path / "run").exists()


def test_the_same_combination_under_zero2_is_not_refused():
    from sgsd.trainers.preflight import check_engine

    check_engine(load_config(TINY / "sgsd-pg.yaml", ["sgsd.teacher=ema", f"training.deepspeed={ZERO2}"]))


def test_zero3_from_accelerate_launch_is_seen_too(monkeypatch):
    """`accelerate launch` with a DeepSpeed config passes the stage in the environment, not in the run config."""
    from sgsd.trainers.preflight import check_engine, zero_stage

    cfg = load_config(TINY / "sgsd-pg.yaml")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert zero_stage(cfg) == 3
    with pytest.raises(ConfigError, match="^method sgsd-pg under DeepSpeed ZeRO-3"):
        check_engine(cfg)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ZERO3))
    assert zero_stage(cfg) == 3


def test_fsdp1_is_refused_before_the_model_loads_for_a_method_with_its_own_loss(tmp_path, monkeypatch, no_model_load):
    from sgsd.trainers.run import prepare_run

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="^FSDP version 1 is not supported by the SGSD/OPSD loss"):
        prepare_run(load_config(TINY / "opsd.yaml"), tmp_path / "run", progress=False)
    monkeypatch.setenv("FSDP_VERSION", "2")  # FSDP2 is supported (tests/test_deepspeed.py trains with it)
    from sgsd.trainers.preflight import check_engine

    check_engine(load_config(TINY / "opsd.yaml"))


def test_zero_stage_reads_the_deepspeed_json(tmp_path):
    from sgsd.trainers.preflight import zero_stage

    assert zero_stage(load_config(TINY / "sgsd.yaml")) is None
    assert zero_stage(load_config(TINY / "sgsd.yaml", [f"training.deepspeed={ZERO2}"])) == 2
    custom = tmp_path / "ds.json"
    custom.write_text(json.dumps({"train_batch_size": "auto"}))  # no zero_optimization: stage 0
    assert zero_stage(load_config(TINY / "sgsd.yaml", [f"training.deepspeed={custom}"])) == 0


def test_bf16_is_accepted_on_cpu():
    from sgsd.trainers.run import resolve_device

    assert resolve_device(load_config(TINY / "sgsd.yaml", ["training.precision=bf16"])) == (True, True)
    assert resolve_device(load_config(TINY / "sgsd.yaml", ["training.precision=auto"])) == (True, False)
    assert resolve_device(load_config(TINY / "sgsd.yaml", ["training.precision=fp32"])) == (True, False)


def test_provenance_counts_the_processes():
    from sgsd.provenance import provenance

    assert provenance()["processes"] == 1  # no process group; tests/test_distributed.py checks 2
