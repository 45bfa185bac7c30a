"""Benchmarks of SGSD's cost (docs/performance.md; docs/spec.md section 9 items 1-3 and 8).

- `synthetic`: a seeded synthetic rollout batch and a Qwen3-architecture model built from a config.
- `phases`: the loss phase as the trainer runs it (`real_loss_phase`) and as the paper's public code
  runs it (`naive_loss_phase`), on the same batch, with the same loss value and gradient.
- `measure`: wall-clock medians and the peak memory of one phase.
- `step`: `sgsd bench step` / `sgsd bench compare` (time and memory against K, T, V).
- `train_step`: `sgsd bench train-step`, the per-stage profile of whole training steps.
- `vllm_generation`: `sgsd bench vllm`, generation throughput of vLLM against Hugging Face `generate`.

Nothing here is imported by `sgsd.cli`; torch and transformers are imported inside functions or by
modules that only the bench command loads.
"""
