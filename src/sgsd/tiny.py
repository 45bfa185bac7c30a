"""Tiny offline models: a byte-level BPE tokenizer trained in-process and a Qwen3 model from a config.

Nothing is downloaded. Used by the tiny recipes, the tests, the benchmarks and the demo, so that the
laptop path runs the same code as the GPU path with a real Qwen3 checkpoint.

The tokenizer has the special tokens and chat template shape of Qwen3 (`<|im_start|>`,
`<|im_end|>`, `<think>`, `</think>`, `enable_thinking`), one token per digit, and a few hundred
merges learned from a fixed corpus, so it is deterministic.
"""

from __future__ import annotations

from typing import Any, Iterable

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


def build_tokenizer(extra_corpus: Iterable[str] = (), vocab_size: int = 512) -> Any:
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


def tiny_qwen3_config(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                      num_kv_heads: int = 2, intermediate_size: int = 128, max_positions: int = 2048,
                      pad_token_id: int = 0, eos_token_id: int | None = None) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )


def build_tiny_model(tokenizer: Any, *, seed: int = 0, **config_kwargs: Any) -> Any:
    """A randomly initialised Qwen3ForCausalLM sized for CPU tests, deterministic given `seed`."""
    import torch
    from transformers import Qwen3ForCausalLM

    config = tiny_qwen3_config(
        len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **config_kwargs
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model

