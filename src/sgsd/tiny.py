"""Tiny offline models: a byte-level BPE tokenizer trained in-process and a Qwen3 model from a config.

Nothing is downloaded. Used by the tiny recipes, the tests, the benchmarks and the demo, so that the
laptop path runs the same code as the GPU path with a real Qwen3 checkpoint.

The tokenizer has the special tokens and chat template shape of Qwen3 (`<|im_start|>`,
`<|im_end|>`, `<think>`, `</think>`, `enable_thinking`), one token per digit, and a few hundred
merges learned from a fixed corpus, so it is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen3-style template: `enable_thinking=False` closes an empty think block after the generation
# prompt, as Qwen3's own template does.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\n\n</think>\n\n' }}"
    "{%- endif -%}"
    "{%- endif -%}"
)

_BASE_CORPUS = [
    "Problem: What is 12 + 35?\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
    "We add the ones: 2 + 5 = 7. Then the tens: 1 + 3 = 4. So the answer is \\boxed{47}.",
    "Below are retrieved skills that may help with this problem. Use them as soft guidance only.",
    "## General Principles **Carry the one**: when a column sum exceeds 9, carry. Apply when: adding.",
    "## Mistakes to Avoid Don't: forget the carry. Instead: write the carry above the next column.",
    "Reference solution: The answer is \\boxed{12}. Derive the answer independently.",
    "the a of to and is in that it for as with be on not this are or by from at an which",
    "multiply divide subtract sum product remainder number digit column carry borrow total answer",
    "\\frac{1}{2} \\sqrt{3} \\pi x^2 + y^2 = z^2 ( ) [ ] { } = + - * / < > , . : ; ! ? $ % ^ _ | ~ ' \"",
]


def build_tokenizer(extra_corpus: Iterable[str] = (), vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE `PreTrainedTokenizerFast` with Qwen3-like special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_BASE_CORPUS) + list(extra_corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a Qwen3 decoder built from a config (`tiny_qwen3_config`); one description for the tiny
    recipes (the defaults: model `tiny`), the demo's warm start and the benchmark model.

    vocab_size: the model's vocabulary V; with a tokenizer (`build_tiny_model`) the tokenizer's length
    decides it and this is the size its BPE is trained to (`build_tokenizer`). head_dim = hidden / heads.
    Qwen3-1.7B: hidden 2048, 28 layers, 16 / 8 heads, intermediate 6144, vocabulary 151,936.
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 512

    def __post_init__(self) -> None:
        sizes = {f.name: getattr(self, f.name) for f in fields(self)}
        if min(sizes.values()) < 1:
            raise ValueError(f"model sizes must be positive: {sizes}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}) "
                             f"and num_heads by num_kv_heads ({self.num_kv_heads})")

    def parameter_counts(self) -> tuple[int, int]:
        """(decoder-layer parameters, LM-head parameters): the matmul weights each token passes through."""
        head_dim = self.hidden_size // self.num_heads
        attention = self.hidden_size * head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        return self.num_layers * (attention + mlp), self.hidden_size * self.vocab_size


def tiny_qwen3_config(shape: ModelShape = ModelShape(), *, max_positions: int = 2048, pad_token_id: int = 0,
                      eos_token_id: int | None = None) -> Qwen3Config:
    """A `Qwen3Config` of `shape` (untied LM head, no BOS token)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.hidden_size // shape.num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )


def build_tiny_model(tokenizer: PreTrainedTokenizerBase, *, seed: int = 0, shape: ModelShape = ModelShape(),
                     max_positions: int = 2048) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3ForCausalLM of `shape` (vocabulary: the tokenizer's), deterministic given `seed`."""
    import torch
    from transformers import Qwen3ForCausalLM

    config = tiny_qwen3_config(replace(shape, vocab_size=len(tokenizer)), max_positions=max_positions,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
