"""Moved to `sgsd.generation` (skill building uses the backends too); this path keeps old imports working."""

from sgsd.generation import (  # noqa: F401
    BACKENDS, Completion, Generator, HFGenerator, SamplingConfig, VLLMGenerator, choose_backend, vllm_usable,
)
