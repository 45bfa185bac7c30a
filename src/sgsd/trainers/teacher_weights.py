"""Which parameters score as teacher (docs/spec.md section 4): live policy, base model, or EMA.

Each option is a context manager factory: inside it, the shared model computes with the teacher's
weights; outside, it is the student again. No second copy of the model is made for `live`; `base`
disables the LoRA adapter (or, for full fine-tuning, uses a frozen copy of the initial weights);
`ema` swaps an exponential moving average of the trainable parameters in and out.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterator

import torch

from sgsd.trl_adapter import adapter_disabled


class EMAWeights:
    """EMA of the trainable parameters: ema <- decay * ema + (1 - decay) * theta after each optimizer step.

    The shadow is kept in fp32 whatever the parameters' dtype: it is built when the trainer is, before
    DeepSpeed may cast the module to bf16 (while PEFT keeps LoRA weights in fp32), so parameter dtypes
    can change under it; and a bf16 shadow would round away most steps of (1 - decay) * (theta - ema)
    (bf16 resolves 1 part in 256 near 1.0: with decay 0.99 a step below ~0.8 is lost entirely).
    Swapped in, the shadow is cast to each parameter's current dtype.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().to(torch.float32, copy=True) for n, p in model.named_parameters()
                       if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, param in model.named_parameters():
            if name in self.shadow:
                shadow = self.shadow[name]
                if shadow.device != param.device:  # the module moved after the EMA was built
                    shadow = self.shadow[name] = shadow.to(param.device)
                shadow.lerp_(param.detach().to(torch.float32), 1.0 - self.decay)

    @contextmanager
    def swapped_in(self, model: torch.nn.Module) -> Iterator[None]:
        params = {n: p for n, p in model.named_parameters() if n in self.shadow}
        saved = {n: p.detach().clone() for n, p in params.items()}
        try:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(self.shadow[name])  # copy_ casts fp32 -> the parameter's dtype and device
            yield
        finally:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(saved[name])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the model's trainable parameters: {sorted(missing)[:3]}")
        self.decay = float(state["decay"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value.to(torch.float32))


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class FrozenCopy:
    """Initial weights for a `base` teacher under full fine-tuning (a second copy of the model).

    The copy is made when the trainer is built; DeepSpeed or accelerate may move and cast the policy
    later. `placed_like(policy)` returns the copy on the policy's device and in its dtype (moved once,
    when they differ), which is where and how the teacher must score.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        # TRL/accelerate may have replaced `model.forward` by an instance attribute whose closure points
        # at the live model; a deep copy would carry it over and run the student. Use the class forward.
        self.model.__dict__.pop("forward", None)

    def placed_like(self, policy: torch.nn.Module) -> torch.nn.Module:
        target = next(p for p in policy.parameters() if p.is_floating_point())
        current = next(p for p in self.model.parameters() if p.is_floating_point())
        if (current.device, current.dtype) != (target.device, target.dtype):
            self.model.to(device=target.device, dtype=target.dtype)
        return self.model


def teacher_context_factory(kind: str, model_getter: Callable[[], torch.nn.Module], *, ema: EMAWeights | None = None
                            ) -> Callable[[], ContextManager[None]]:
    """A zero-argument factory of context managers that put the teacher weights in place.

    For `base` under full fine-tuning the caller scores with `FrozenCopy.model` instead (see
    `teacher_model_for`), so here it is a no-op.
    """
    if kind == "live":
        return nullcontext
    if kind == "base":
        def base_context() -> ContextManager[None]:
            model = model_getter()
            if is_peft(model):
                return adapter_disabled(model)
            return nullcontext()

        return base_context
    if kind == "ema":
        if ema is None:
            raise ValueError("teacher 'ema' needs EMA weights")
        return lambda: ema.swapped_in(model_getter())
    raise ValueError(f"unknown teacher weights {kind!r} (live, base or ema)")


class SelfTeacher:
    """The teacher-weights setup shared by every method whose teacher is the model itself (SGSD, OPSD).

    A trainer mixin: `setup_teacher(kind, ema_decay)` after the trainer is built gives `self.ema`
    (EMAWeights or None), `self.frozen` (FrozenCopy or None: a `base` teacher under full fine-tuning),
    `self.teacher_context` (a factory of contexts that put the teacher's weights in place) and
    `teacher_scoring_model()` (the module to call for teacher scores: the policy, or the frozen copy
    placed like it); `ema_step()` runs after every optimizer step (`callbacks.EMAStep`).
    """

    ema: EMAWeights | None = None
    frozen: FrozenCopy | None = None
    # the trainer's (transformers.Trainer), which this mixin is combined with: declared for the reader
    model: torch.nn.Module
    unwrapped_model: torch.nn.Module

    def setup_teacher(self, kind: str, ema_decay: float) -> None:
        model = self.unwrapped_model
        self.ema = EMAWeights(model, ema_decay) if kind == "ema" else None
        self.frozen = FrozenCopy(model) if kind == "base" and not is_peft(model) else None
        self.teacher_context = teacher_context_factory(kind, lambda: self.unwrapped_model, ema=self.ema)

    def teacher_scoring_model(self) -> torch.nn.Module:
        # DeepSpeed moves and casts the policy after the frozen copy was made: the copy follows it
        if self.frozen is None:
            return self.model
        return self.frozen.placed_like(self.unwrapped_model)

    def ema_step(self) -> None:
        if self.ema is not None:
            self.ema.update(self.unwrapped_model)
