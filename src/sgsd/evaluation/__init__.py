"""Evaluation harness (SPEC section 7): benchmarks, generation backends, metrics, runner, reports.

Modules: `benchmarks` (registry and loading), `generation` (Hugging Face and vLLM backends),
`metrics` (avg@k, pass@k, maj@k, bootstrap intervals), `runner` (prompts -> samples -> grades ->
results.json), `report` (tables, comparison plots). The grader is `sgsd.verify`. Nothing heavy is
imported here.
"""
