"""One route, one rule: every numeric setting of every config section, fed 0, a negative value, NaN and infinity
through YAML and through `key=value` overrides, is accepted or refused alike by both routes when the config is
built (`sgsd.bounds`), before anything loads a model. The fields are found by introspection, so a new setting is
covered without editing this file; what 0 may legitimately mean is in ALLOWED, with the reason."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from sgsd.config import RunConfig, load_config
from sgsd.errors import ConfigError

# (dotted key, value) pairs that are valid settings on their own (on the defaults), with why
ALLOWED: dict[tuple[str, str], str] = {
    ("model.lora.dropout", "0"): "no dropout",
    ("data.shuffle_seed", "0"): "a seed",
    ("generation.top_k", "0"): "no top-k cut",
    ("skills.online.max_new", "0"): "an update adds no item",
    ("skills.online.temperature", "0"): "greedy updater replies",
    ("grpo.beta", "0"): "no KL term, the paper's",
    ("opsd.beta", "0"): "forward KL",
    ("opsd.ema_decay", "0"): "the EMA teacher follows the live weights",
    ("opsd.logprob_chunk_tokens", "0"): "chunk from logprob_chunk_mb",
    ("sgsd.confidence_threshold", "0"): "every nonzero support counts",
    ("sgsd.local_support_top_k", "0"): "the full vocabulary, the paper's",
    ("sgsd.ema_decay", "0"): "the EMA teacher follows the live weights",
    ("sgsd.logprob_chunk_tokens", "0"): "chunk from logprob_chunk_mb",
    ("sgsd_pg.lambda_sgsd", "0"): "GRPO alone, with SGSD's metrics",
    ("training.warmup_steps", "0"): "no warm-up",
    ("training.max_grad_norm", "0"): "no clipping (Hugging Face's meaning)",
    ("training.seed", "0"): "a seed",
    ("training.weight_decay", "0"): "no weight decay",
    ("distributed.peer_timeout_s", "0"): "no heartbeat watch (the collective timeout alone)",
}
# each value as written in YAML and in an override (both spellings of NaN and infinity YAML users write)
VALUES = {"0": ("0",), "-1": ("-1",), "nan": (".nan", "nan"), "inf": (".inf", "inf", "1e999")}


def numeric_settings(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Dotted keys of every int or float field (optional ones included) under `cls`."""
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        if typing.get_origin(tp) is typing.ClassVar:
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if dataclasses.is_dataclass(tp):
            keys += numeric_settings(tp, f"{prefix}{name}.")
        elif any(a in (int, float) for a in args) and bool not in args:
            keys.append(prefix + name)
    return keys


KEYS = numeric_settings()


def test_the_introspection_finds_every_section():
    sections = {key.rsplit(".", 1)[0] for key in KEYS}
    assert {"model.lora", "data", "prompt", "generation", "skills", "skills.online", "grpo", "opsd", "sgsd",
            "sgsd_pg", "training"} <= sections
    assert len(KEYS) >= 50 and all(key in KEYS for key, _ in ALLOWED)


def _routes(key: str, spelling: str, tmp_path) -> list:
    section, _, leaf = key.rpartition(".")
    yaml_text = "".join(f"{'  ' * i}{part}:\n" for i, part in enumerate(section.split("."))) + \
        f"{'  ' * len(section.split('.'))}{leaf}: {spelling}\n"
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    return [lambda: load_config(config), lambda: load_config(None, [f"{key}={spelling}"])]


@pytest.mark.parametrize("key", KEYS)
def test_every_numeric_setting_has_one_rule_on_every_route(key, tmp_path):
    for value, spellings in VALUES.items():
        for spelling in spellings:
            for route in _routes(key, spelling, tmp_path):
                if (key, value) in ALLOWED:
                    route()
                    continue
                with pytest.raises(ConfigError) as refused:
                    route()
                message = str(refused.value)
                assert "\n" not in message and key.rsplit(".", 1)[-1] in message, (key, spelling, message)


def _section_and_leaf(key: str) -> tuple[type, str]:
    """The settings class that declares `key`'s last part, and that part."""
    cls: type = RunConfig
    *sections, leaf = key.split(".")
    for part in sections:
        cls = typing.get_type_hints(cls)[part]
    return cls, leaf


PYTHON_VALUES = {"0": 0, "-1": -1, "nan": float("nan"), "inf": float("inf")}


@pytest.mark.parametrize("key", KEYS)
def test_a_section_built_in_python_checks_every_numeric_field_as_the_config_does(key):
    """The third route: a settings section built directly (`SGSDSettings(teacher_batch_size=0)`, what a caller of
    `train(cfg)` writes) is refused or accepted at construction exactly as the YAML and override routes decide,
    so nothing passes here and fails once the model has loaded."""
    cls, leaf = _section_and_leaf(key)
    for value, given in PYTHON_VALUES.items():
        if (key, value) in ALLOWED:
            cls(**{leaf: given})
            continue
        with pytest.raises(ValueError, match=leaf):  # SettingsError: a ConfigError and a ValueError
            cls(**{leaf: given})


def test_the_teacher_weight_settings_are_declared_once_for_sgsd_and_opsd():
    from sgsd.config import OPSDSettings
    from sgsd.loss_settings import SGSDSettings, TeacherWeights, TeacherWeightSettings

    shared = {f.name for f in dataclasses.fields(TeacherWeightSettings)}
    assert shared == {"teacher", "ema_decay", "logprob_chunk_tokens", "logprob_chunk_mb"}
    for section in (SGSDSettings, OPSDSettings):
        assert issubclass(section, TeacherWeightSettings)
        assert typing.get_type_hints(section)["teacher"] == TeacherWeights  # one Literal
        assert {k: section.BOUNDS[k] for k in TeacherWeightSettings.BOUNDS} == TeacherWeightSettings.BOUNDS
    # each section keeps its own defaults: SGSD scores with the live policy and chunks by memory, OPSD with the base
    # model and 1024 rows; the chunk size is resolved by the one method both trainers call
    assert (SGSDSettings().teacher, OPSDSettings().teacher) == ("live", "base")
    assert SGSDSettings().chunk_tokens(151_936) == 1_073_741_824 // (151_936 * 6)  # 1 GiB of fp32 + bf16 rows: 1,177
    assert OPSDSettings().chunk_tokens(151_936) == 1024
    with pytest.raises(ValueError, match="opsd.teacher"):
        OPSDSettings(teacher="ema2")


def _choice_fields(cls: type = RunConfig, prefix: str = "") -> list[tuple[type, str, str]]:
    """(section class, field, dotted key) of every field typed as a Literal under `cls`."""
    found = []
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            found += _choice_fields(tp, f"{prefix}{name}.")
        elif typing.get_origin(tp) is typing.Literal:
            found.append((cls, name, prefix + name))
    return found


CHOICES = _choice_fields()


@pytest.mark.parametrize("section,name,key", CHOICES, ids=[key for *_, key in CHOICES])
def test_a_section_built_in_python_refuses_a_value_outside_its_choices(section, name, key):
    assert len(CHOICES) >= 13  # every section's choices: the scan finds them
    with pytest.raises(ValueError, match=f"{key}: expected"):
        section(**{name: "not-a-choice"})
