"""The lean LM head, adopted: it now lives in `sgsd.lm_head` (kept importable here for the bench)."""

from sgsd.lm_head import chunk_tokens_for_budget, token_logprobs

__all__ = ["chunk_tokens_for_budget", "token_logprobs"]
