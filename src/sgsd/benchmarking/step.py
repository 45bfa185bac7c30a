"""`sgsd bench step` and `sgsd bench compare`: time and peak memory of the SGSD loss phase.

The loss phase = K teacher forwards (no gradient), the student forward and backward, the SGSD loss,
on the seeded synthetic batch of `sgsd.benchmarking.synthetic`; `real` is the trainer's code, `naive`
the public code's pattern (`sgsd.benchmarking.phases`). Timings are medians of `repeats` runs after
`warmup` runs; gradients are reset to None before every run, as the trainer's optimizer step does.
`compare` runs real K=1, real K=K and naive K=K on one model in one process, interleaved over several
rounds, and reports the target ratios of every round (their spread shows the machine's noise).
"""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from sgsd.benchmarking.cost import phase_flops, teacher_padding_fraction
from sgsd.benchmarking.measure import peak_memory, time_phase
from sgsd.benchmarking.phases import naive_loss_phase, real_loss_phase
from sgsd.benchmarking.synthetic import BENCH_MODEL, BatchShape, build_model, make_batch, max_sequence_length
from sgsd.loss_settings import SGSDSettings
from sgsd.storage import JSONObject
from sgsd.tiny import ModelShape

# targets of the loss phase (ratios measured in one run; docs/performance.md)
TARGET_SCALING = 3.2  # time(K) / time(K=1), floor about 2.75 at K = 8
TARGET_TIME_VS_NAIVE = 0.45
TARGET_MEMORY_VS_NAIVE = 0.4


@dataclass(frozen=True)
class StepBenchConfig:
    model: ModelShape = BENCH_MODEL
    batch: BatchShape = field(default_factory=BatchShape)
    settings: SGSDSettings = field(default_factory=SGSDSettings)
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
    teacher_padding_fraction: float  # real path: share of teacher token slots that are padding
    achieved_gflops: float
    loss: float
    active_rollouts: int
    chunk_tokens: int
    skip_neutral_rows: bool
    device: str
    threads: int


def _phase_fn(naive: bool) -> Callable[..., Any]:
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

        if config.model != self.model_shape:
            raise ValueError("StepBench.measure: config.model differs from the model this bench was built with")
        batch = make_batch(config.batch, config.model.vocab_size).to(self.device)
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
                            teacher_batch_rows=config.settings.teacher_batch_size, active_rollouts=out.active_rollouts,
                            skip_neutral_rows=config.settings.skip_neutral_rows and not config.naive)
        return StepBenchResult(
            path="naive" if config.naive else "real", teachers=config.batch.teachers,
            rollouts=config.batch.rollouts, completion_tokens=config.batch.completion_tokens,
            vocab=config.model.vocab_size, hidden=config.model.hidden_size, layers=config.model.num_layers,
            loss_phase_s=timing.median_s, loss_phase_min_s=timing.min_s, loss_phase_max_s=timing.max_s,
            repeats_s=timing.repeats, peak_mem_mb=peak.peak_mb if peak else float("nan"),
            mem_method=peak.method if peak else "not measured",
            peak_rss_mb=timing.rss_peak_mb, gradients_mb=grads / 2**20, estimated_gflop=flops / 1e9,
            teacher_padding_fraction=teacher_padding_fraction(
                batch, teacher_batch_rows=config.settings.teacher_batch_size),
            achieved_gflops=flops / 1e9 / timing.median_s, loss=float(out.loss), active_rollouts=out.active_rollouts,
            chunk_tokens=config.settings.chunk_tokens(config.model.vocab_size),
            skip_neutral_rows=config.settings.skip_neutral_rows and not config.naive,
            device=str(self.device), threads=torch.get_num_threads(),
        )


# ratio name -> (numerator run, denominator run, measured quantity, target or None)
RATIOS: dict[str, tuple[str, str, str, float | None]] = {
    "scaling": ("real_k", "real_k1", "loss_phase_s", TARGET_SCALING),
    "time_vs_naive": ("real_k", "naive_k", "loss_phase_s", TARGET_TIME_VS_NAIVE),
    "memory_vs_naive": ("real_k", "naive_k", "peak_mem_mb", TARGET_MEMORY_VS_NAIVE),
}


@dataclass(frozen=True)
class CompareRound:
    """The runs of one round: real_k1, real_k, naive_k."""

    runs: dict[str, StepBenchResult]

    def ratio(self, name: str) -> float | None:
        top, bottom, key, _ = RATIOS[name]
        if top not in self.runs or bottom not in self.runs:
            return None
        return getattr(self.runs[top], key) / getattr(self.runs[bottom], key)


def compare(config: StepBenchConfig, *, rounds: int = 5,
            progress: Callable[[int, str, StepBenchResult], None] | None = None) -> list[CompareRound]:
    """Real K=1, real K, naive K (K = config.batch.teachers) on one model, `rounds` times interleaved.

    Warm-up runs and the peak-memory run (deterministic) happen in the first round only; every round
    times `config.repeats` runs of each path, so a burst of load on a shared machine hits one round.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    bench = StepBench(config.model, device=config.device, seed=config.batch.seed)
    real = replace(config, naive=False)
    configs = {"real_k1": replace(real, batch=replace(config.batch, teachers=1)), "real_k": real,
               "naive_k": replace(config, naive=True)}
    out: list[CompareRound] = []
    for index in range(rounds):
        runs = {}
        for name, cfg in configs.items():
            if index == 0:
                result = bench.measure(cfg)
            else:
                result = bench.measure(replace(cfg, warmup=0), memory=False)
                first = out[0].runs[name]
                result = replace(result, peak_mem_mb=first.peak_mem_mb, mem_method=first.mem_method)
            runs[name] = result
            if progress is not None:
                progress(index, name, result)
        out.append(CompareRound(runs))
    return out


def summarize(rounds: list[CompareRound]) -> JSONObject:
    """Each ratio: per round (`values`: one ratio of medians per round; median / min / max over rounds;
    whether the target holds in every round) and, for times, `pooled_min`: the ratio of the fastest
    runs of all rounds (the least disturbed by load). The per-round ratios are the headline: the paths of
    one round run back to back, so a change of load between rounds cancels; a ratio of medians pooled
    over rounds would mix differently loaded moments."""
    summary: JSONObject = {}
    for name, (top, bottom, key, target) in RATIOS.items():
        values = [r.ratio(name) for r in rounds]
        if any(v is None for v in values):
            continue
        entry = {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values,
                 "target": target, "holds_every_round": None if target is None else all(v <= target for v in values)}
        if key == "loss_phase_s":
            pooled = {run: [t for r in rounds for t in r.runs[run].repeats_s] for run in (top, bottom)}
            entry["pooled_min"] = min(pooled[top]) / min(pooled[bottom])
        summary[name] = entry
    return summary


def environment() -> JSONObject:
    import torch

    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def result_dict(result: StepBenchResult) -> JSONObject:
    return asdict(result)
