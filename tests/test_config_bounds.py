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
