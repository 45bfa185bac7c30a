"""sgsd: Skill-Conditioned Gated Self-Distillation (arXiv 2605.28791) for reasoning language models.

Importing the package is cheap: heavy dependencies (torch, transformers, TRL, vLLM,
sentence-transformers, math-verify) are imported by the modules that use them.
"""

__version__ = "0.1.0"
