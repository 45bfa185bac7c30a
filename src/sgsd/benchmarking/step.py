"""`sgsd bench step` and `sgsd bench compare`: time and peak memory of the SGSD loss phase.

The loss phase = K teacher forwards (no gradient), the student forward and backward, the SGSD loss,
on the seeded synthetic batch of `sgsd.benchmarking.synthetic`; `real` is the trainer's code, `naive`
the public code's pattern (`sgsd.benchmarking.phases`). Timings are medians of `repeats` runs after
`warmup` runs; gradients are reset to None before every run, as the trainer's optimizer step does.
`compare` runs real K=1, real K=K and naive K=K on one model in one process, interleaved over several
rounds, and reports the issue-7 ratios of every round (their spread shows the machine's noise).
"""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sgsd.benchmarking.cost import phase_flops
from sgsd.benchmarking.phases import LossSettings, naive_loss_phase, real_loss_phase
from sgsd.benchmarking.synthetic import BatchShape, ModelShape, build_model, make_batch, max_sequence_length

# issue 7 targets (ratios measured in one run)
TARGET_SCALING = 3.2  # time(K) / time(K=1), floor about 2.75 at K = 8
TARGET_TIME_VS_NAIVE = 0.45
TARGET_MEMORY_VS_NAIVE = 0.4


@dataclass(frozen=True)
class StepBenchConfig:
    model: ModelShape = field(default_factory=ModelShape)
    batch: BatchShape = field(default_factory=BatchShape)
    settings: LossSettings = field(default_factory=LossSettings)
    naive: bool = False
    repeats: int = 3
    warmup: int = 1
    device: str = "cpu"


@dataclass(frozen=True)
class StepBenchResult:
    """One measured configuration; JSON keys of `sgsd bench step --json`."""

    path: str  # "real" (trainer code) or "naive" (public code's pattern)
    teachers: int
    rollouts: int
    completion_tokens: int
    vocab: int
    hidden: int
    layers: int
    loss_phase_s: float  # median of the repeats
    loss_phase_min_s: float
    loss_phase_max_s: float
    repeats_s: list[float]
    peak_mem_mb: float  # tensor memory at the phase's peak above its start (includes parameter gradients)
    mem_method: str
    peak_rss_mb: float | None  # resident-set growth during a timed repeat (median), Linux CPU only
    gradients_mb: float  # size of the parameter gradients, part of peak_mem_mb in both paths
    estimated_gflop: float  # matmul FLOPs of the phase (`sgsd.benchmarking.cost`)
    achieved_gflops: float
    loss: float
    active_rollouts: int
    chunk_tokens: int
    lean_head: bool
    skip_neutral_rows: bool
    device: str
    threads: int


def _phase_fn(naive: bool):
    return naive_loss_phase if naive else real_loss_phase


class StepBench:
    """A benchmark model (built once) and its synthetic batches; `measure(config)` runs one configuration."""

    def __init__(self, model_shape: ModelShape, *, device: str = "cpu", max_positions: int = 8192,
                 seed: int = 0) -> None:
        import torch

        self.model_shape = model_shape
        self.device = torch.device(device)
        self.model = build_model(model_shape, max_positions=max_positions, seed=seed, device=self.device)

    def measure(self, config: StepBenchConfig, *, memory: bool = True) -> StepBenchResult:
        """Time `config` (and its peak memory unless `memory` is False: then peak_mem_mb is NaN)."""
        import torch

        from sgsd.benchmarking.measure import peak_memory, time_phase

        if config.model != self.model_shape:
            raise ValueError("StepBench.measure: config.model differs from the model this bench was built with")
        batch = make_batch(config.batch, config.model.vocab).to(self.device)
        if max_sequence_length(batch) > self.model.config.max_position_embeddings:
            raise ValueError(f"sequences of {max_sequence_length(batch)} tokens exceed the model's "
                             f"{self.model.config.max_position_embeddings} positions")
        phase = _phase_fn(config.naive)
        outputs: list[Any] = []

        def run() -> None:
            outputs.append(phase(self.model, batch, config.settings))

        def reset() -> None:
            self.model.zero_grad(set_to_none=True)
            outputs.clear()

        timing = time_phase(run, repeats=config.repeats, warmup=config.warmup, device=self.device, before=reset)
        out = outputs[-1]
        peak = peak_memory(run, device=self.device, before=reset) if memory else None
        self.model.zero_grad(set_to_none=True)
        grads = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        flops = phase_flops(config.model, batch, naive=config.naive,
                            teacher_batch_rows=config.settings.teacher_batch_rows, active_rollouts=out.active_rollouts,
                            skip_neutral_rows=config.settings.skip_neutral_rows and not config.naive)
        return StepBenchResult(
            path="naive" if config.naive else "real", teachers=config.batch.teachers,
            rollouts=config.batch.rollouts, completion_tokens=config.batch.completion_tokens,
            vocab=config.model.vocab, hidden=config.model.hidden, layers=config.model.layers,
            loss_phase_s=timing.median_s, loss_phase_min_s=timing.min_s, loss_phase_max_s=timing.max_s,
            repeats_s=timing.repeats, peak_mem_mb=peak.peak_mb if peak else float("nan"),
            mem_method=peak.method if peak else "not measured",
            peak_rss_mb=timing.rss_peak_mb, gradients_mb=grads / 2**20, estimated_gflop=flops / 1e9,
            achieved_gflops=flops / 1e9 / timing.median_s, loss=float(out.loss), active_rollouts=out.active_rollouts,
            chunk_tokens=config.settings.chunk_tokens, lean_head=config.settings.lean_head and not config.naive,
            skip_neutral_rows=config.settings.skip_neutral_rows and not config.naive,
            device=str(self.device), threads=torch.get_num_threads(),
        )


@dataclass(frozen=True)
class CompareRound:
    real_k1: StepBenchResult
    real_k: StepBenchResult
    naive_k: StepBenchResult

    @property
    def scaling(self) -> float:
        return self.real_k.loss_phase_s / self.real_k1.loss_phase_s

    @property
    def time_vs_naive(self) -> float:
        return self.real_k.loss_phase_s / self.naive_k.loss_phase_s

    @property
    def memory_vs_naive(self) -> float:
        return self.real_k.peak_mem_mb / self.naive_k.peak_mem_mb


def compare(config: StepBenchConfig, *, rounds: int = 5, progress: Any = None) -> list[CompareRound]:
    """Real K=1, real K, naive K (K = config.batch.teachers) on one model, `rounds` times interleaved.

    Warm-up runs and the peak-memory run (deterministic) happen in the first round only; every round
    times `config.repeats` runs of each path, so a burst of load on a shared machine hits one round.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    bench = StepBench(config.model, device=config.device, seed=config.batch.seed)
    one = replace(config, batch=replace(config.batch, teachers=1), naive=False)
    configs = (one, replace(config, naive=False), replace(config, naive=True))
    out: list[CompareRound] = []
    for index in range(rounds):
        results = []
        for position, cfg in enumerate(configs):
            if index == 0:
                result = bench.measure(cfg)
            else:
                result = bench.measure(replace(cfg, warmup=0), memory=False)
                reference = (out[0].real_k1, out[0].real_k, out[0].naive_k)[position]
                result = replace(result, peak_mem_mb=reference.peak_mem_mb, mem_method=reference.mem_method)
            results.append(result)
            if progress is not None:
                progress(index, result)
        out.append(CompareRound(*results))
    return out


def summarize(rounds: list[CompareRound]) -> dict[str, Any]:
    """Per-ratio median / min / max over rounds and whether the issue-7 targets hold in every round."""
    summary: dict[str, Any] = {}
    for name, target in (("scaling", TARGET_SCALING), ("time_vs_naive", TARGET_TIME_VS_NAIVE),
                         ("memory_vs_naive", TARGET_MEMORY_VS_NAIVE)):
        values = [getattr(r, name) for r in rounds]
        summary[name] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                         "values": values, "target": target, "holds_every_round": all(v <= target for v in values)}
    return summary


def environment() -> dict[str, Any]:
    import torch

    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def result_dict(result: StepBenchResult) -> dict[str, Any]:
    return asdict(result)
