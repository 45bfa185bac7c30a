"""Evaluation harness (docs/spec.md section 7): benchmarks, metrics, runner, reports.

Modules: `benchmarks` (registry and loading), `metrics` (avg@k, pass@k, maj@k, bootstrap intervals),
`runner` (prompts -> samples -> grades -> results.json), `report` (tables, comparison plots). The
generation backends are `sgsd.generation`, the grader is `sgsd.verify`. Nothing heavy is imported here.
"""
