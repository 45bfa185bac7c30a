"""Loading policies and tokenizers: hub ids, local directories, training runs (LoRA adapters), tiny.

`model_spec` may be
- a Hugging Face hub id (`Qwen/Qwen3-1.7B`) - downloaded by transformers unless offline;
- a local directory with a full model (`config.json`) or a PEFT adapter (`adapter_config.json`,
  whose base model is loaded first and the adapter applied);
- a training run directory: its `final/` sub-directory is used;
- `tiny` or `tiny:seed=N,hidden_size=H,...`: an in-process tiny Qwen3 model (`sgsd.tiny`).
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from sgsd.errors import UserError
from sgsd.paths import check_local_path
from sgsd.run_dir import RunDir
from sgsd.threads import fit_to_model
from sgsd.tiny import ModelShape, build_tiny_model, build_tokenizer

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


TINY_PREFIX = "tiny"


def is_tiny(model_spec: str) -> bool:
    return model_spec == TINY_PREFIX or model_spec.startswith(TINY_PREFIX + ":")


def _parse_tiny(spec: str) -> dict[str, int]:
    options: dict[str, int] = {}
    _, _, rest = spec.partition(":")
    for part in filter(None, rest.split(",")):
        key, sep, value = part.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise UserError(f"model spec {spec!r}: expected tiny:key=INT,..., got {part!r}")
        options[key.strip()] = int(value)
    return options


def _tiny_shape(spec: str, options: dict[str, int]) -> ModelShape:
    known = [f.name for f in fields(ModelShape) if f.name != "vocab_size"]  # the tokenizer decides V
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UserError(f"model spec {spec!r}: unknown key {unknown[0]!r}; expected seed, max_positions or "
                        f"{', '.join(known)}")
    try:
        return ModelShape(**options)
    except ValueError as err:
        raise UserError(f"model spec {spec!r}: {err}") from None


def tiny_head_dim(model_spec: str) -> int | None:
    """head_dim of a `tiny[:...]` spec (hidden size / heads), None for any other model spec."""
    if not is_tiny(model_spec):
        return None
    options = _parse_tiny(model_spec)
    options.pop("seed", None), options.pop("max_positions", None)
    shape = _tiny_shape(model_spec, options)
    return shape.hidden_size // shape.num_heads


def resolve_model_path(model_spec: str) -> str:
    """Map a run directory to its `final/`; check local paths exist; leave hub ids alone."""
    if is_tiny(model_spec):
        return model_spec
    path = Path(model_spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            if RunDir(path).is_finished:
                return str(RunDir(path).final)
            raise UserError(f"model {model_spec}: directory has no config.json, adapter_config.json or final/")
        return str(path)
    if path.exists():
        raise UserError(f"model {model_spec}: not a directory (expected a model folder, a run directory or a hub id)")

    check_local_path(model_spec, "model")
    if model_spec.count("/") > 1:
        raise UserError(f"model {model_spec}: neither a local directory nor a hub id (owner/name)")
    return model_spec


def engine_directory(model_spec: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str:
    """Where an engine that loads models from disk (vLLM) finds this one: its folder or hub id, or for the
    in-process tiny model a temporary folder of this process holding it and its tokenizer (removed at exit)."""
    if not is_tiny(model_spec):
        return resolve_model_path(model_spec)

    folder = tempfile.mkdtemp(prefix="sgsd-engine-model-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_tokenizer(model_spec: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    path = resolve_model_path(model_spec)
    if path.split(":")[0] == TINY_PREFIX:
        return build_tokenizer()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"model {model_spec}: cannot load tokenizer ({str(err).splitlines()[0]})") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_spec: str, *, dtype: str = "auto", tokenizer: PreTrainedTokenizerBase | None = None,
               trainable_adapter: bool = False) -> PreTrainedModel | PeftModel:
    """Load a causal LM. A PEFT adapter directory gives a `PeftModel` (trainable when asked). Torch's
    thread count is set for its size (`sgsd.threads.fit_to_model`)."""
    model = _load_model(model_spec, dtype=dtype, tokenizer=tokenizer, trainable_adapter=trainable_adapter)
    fit_to_model(model)
    return model


def _load_model(model_spec: str, *, dtype: str, tokenizer: PreTrainedTokenizerBase | None,
                trainable_adapter: bool) -> PreTrainedModel | PeftModel:
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model_spec)
    if path.split(":")[0] == TINY_PREFIX:
        options = _parse_tiny(path)
        seed, max_positions = options.pop("seed", 0), options.pop("max_positions", 2048)
        return build_tiny_model(tokenizer if tokenizer is not None else load_tokenizer(path), seed=seed,
                                shape=_tiny_shape(model_spec, options), max_positions=max_positions)
    torch_dtype = {"auto": "auto", "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                   "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise UserError(f"model dtype {dtype!r}: expected auto, bf16, fp16 or fp32")
    adapter_config = Path(path) / "adapter_config.json"
    try:
        if adapter_config.exists():
            from peft import PeftModel

            base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
            base_model = _load_model(base, dtype=dtype, tokenizer=tokenizer, trainable_adapter=False)
            return PeftModel.from_pretrained(base_model, path, is_trainable=trainable_adapter)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"model {model_spec}: cannot load ({str(err).splitlines()[0]})") from err
