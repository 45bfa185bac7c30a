"""Check that a change preserves training behaviour bit for bit (deterministic tiny recipes on CPU).

    python scripts/behaviour_check.py record DIR [key=value ...]  # train every variant below into DIR/<name>
    python scripts/behaviour_check.py compare A B    # metrics.jsonl (time/* aside) and final weights equal?

Record once before a refactor (e.g. on a clean checkout of main) and once after, on the same machine,
then compare: every variant must print IDENTICAL. Overrides after DIR apply to every variant (e.g.
`sgsd.prefix_reuse=false` to compare a change against a reference recorded before that setting existed). Results of different machines or thread counts may
differ in the last bits, so the references are not stored in the repository. About 1 minute on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"

# name -> (recipe, overrides): the three methods, their +Skill variants and the teacher options
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sgsd": ("sgsd.yaml", ()),
    "grpo": ("grpo.yaml", ()),
    "opsd": ("opsd.yaml", ()),
    "grpo-skill": ("grpo-skill.yaml", ()),
    "opsd-skill": ("opsd-skill.yaml", ()),
    "sgsd-ema": ("sgsd.yaml", ("sgsd.teacher=ema", "sgsd.ema_decay=0.5")),
    "sgsd-base-skip": ("sgsd.yaml", ("sgsd.teacher=base", "sgsd.skip_neutral_rows=true",
                                     "sgsd.confidence_threshold=0.01")),
    "sgsd-lora": ("sgsd.yaml", ("model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "sgsd.teacher=base")),
    "opsd-ema-sampled": ("opsd.yaml", ("opsd.teacher=ema", "opsd.sampled_token=true")),
}


def record(dest: Path, extra: tuple[str, ...] = ()) -> int:
    failed = 0
    for name, (recipe, overrides) in VARIANTS.items():
        out = dest / name
        command = [sys.executable, "-m", "sgsd.cli", "train", "--config", str(TINY / recipe), "--output-dir", str(out),
                   "--no-resume", "--quiet", *overrides, *extra]
        result = subprocess.run(command, capture_output=True, text=True)
        print(f"{name}: {'ok' if result.returncode == 0 else 'FAILED: ' + result.stderr.strip()[-300:]}")
        failed += result.returncode != 0
    return 1 if failed else 0


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    final = run / "final"
    name = "model.safetensors" if (final / "model.safetensors").exists() else "adapter_model.safetensors"
    return load_file(final / name)


def differences(a: Path, b: Path) -> list[str]:
    found = []
    ma, mb = _metrics(a), _metrics(b)
    if len(ma) != len(mb):
        found.append(f"metrics.jsonl has {len(ma)} vs {len(mb)} records")
    for x, y in zip(ma, mb):
        keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
        if keys:
            found.append(f"step {x.get('step')}: {', '.join(f'{k} {x.get(k)!r} vs {y.get(k)!r}' for k in keys[:3])}")
            break
    wa, wb = _weights(a), _weights(b)
    if set(wa) != set(wb):
        found.append("final weights have different tensors")
    else:
        changed = [k for k in wa if wa[k].shape != wb[k].shape or not bool((wa[k] == wb[k]).all())]
        if changed:
            found.append(f"final weights differ in {len(changed)} tensors, e.g. {changed[0]}")
    return found


def compare(a: Path, b: Path) -> int:
    failed = 0
    for name in VARIANTS:
        if not (a / name).exists() or not (b / name).exists():
            print(f"{name}: MISSING")
            failed += 1
            continue
        found = differences(a / name, b / name)
        print(f"{name}: {'IDENTICAL' if not found else 'DIFFERENT: ' + '; '.join(found)}")
        failed += bool(found)
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "record":
        return record(Path(argv[1]), tuple(argv[2:]))
    if len(argv) == 3 and argv[0] == "compare":
        return compare(Path(argv[1]), Path(argv[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
