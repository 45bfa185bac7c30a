"""Config: defaults, YAML with inherit, overrides, unknown keys and inconsistent settings refused."""

from pathlib import Path

import pytest

from sgsd.methods import load_run_config

from sgsd.config import RunConfig, dump_config, load_config
from sgsd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_paper_objective():
    cfg = RunConfig()
    assert (cfg.sgsd.gate_tau, cfg.sgsd.clip_delta, cfg.sgsd.confidence_threshold) == (1.0, 3.0, 0.05)
    assert cfg.sgsd.num_teachers == 8 and cfg.sgsd.teacher == "live"
    assert cfg.prompt.teacher_enable_thinking is None  # teacher follows the student's thinking mode


def test_tiny_recipe_inherits_and_resolves_paths():
    cfg = load_config(ROOT / "configs/tiny/sgsd.yaml")
    assert cfg.method == "sgsd" and cfg.model.name_or_path == "tiny"
    assert Path(cfg.skills.bank) == ROOT / "configs/tiny/skill_bank.json"
    assert cfg.training.learning_rate == pytest.approx(1e-3)


def test_overrides_are_typed(tmp_path):
    cfg = load_config(None, ["skills.bank=b.json", "training.learning_rate=2e-5", "sgsd.teacher=ema",
                             "model.lora.enabled=true", "model.lora.target_modules=[q_proj, v_proj]"])
    assert cfg.training.learning_rate == pytest.approx(2e-5)
    assert cfg.sgsd.teacher == "ema" and cfg.model.lora.enabled is True
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("override, message", [
    (["training.lerning_rate=1"], "unknown config key 'training.lerning_rate' (did you mean 'training.learning_rate'?)"),
    (["nonsense=1"], "unknown config key 'nonsense'"),
    (["skills.bank=b", "training.max_steps=many"], "training.max_steps: expected an integer"),
    (["skills.bank=b", "sgsd.teacher=oracle"], "sgsd.teacher: expected one of"),
    (["method=sgsd"], "skills.bank: method sgsd with skills needs a skill bank"),
    (["method=grpo", "grpo.num_generations=1"], "GRPO needs at least 2"),
    (["method=grpo", "skills.online.enabled=true"], "online skill updates are part of SGSD"),
    (["skills.bank=b", "model.lora.enabled=true", "model.lora.target_modules=[lm_head]"], "lm_head"),
])
def test_bad_settings_are_refused_with_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_run_config(None, override)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: sgsd\nsgsd:\n  gate_tau: 1.0\n  gate_tua: 2.0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'sgsd.gate_tua'"):
        load_config(path)


def test_invalid_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("method: [sgsd\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file: no such file or directory: .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_dump_roundtrips(tmp_path):
    cfg = load_config(ROOT / "configs/tiny/sgsd.yaml", ["sgsd.gate_tau=2.0"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
