"""The layout of a training run directory, and reading back what a run recorded about itself.

`RUN_FILES` describes every file and folder `sgsd train` writes (the model card and the README
list them from here). `read_run_record` returns a run's resolved config and provenance from its
`resolved_config.yaml`, for commands that work on a finished run (`sgsd skills report RUN_DIR`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sgsd.errors import DataError

RESOLVED_CONFIG = "resolved_config.yaml"
PROVENANCE_PREFIX = "# provenance: "

# name -> what it holds; in the order a reader needs them
RUN_FILES: dict[str, str] = {
    "README.md": "this model card: method, base model, data, skill bank, key settings, final metrics",
    "resolved_config.yaml": "every setting of the run, with the git revision, package versions and data counts",
    "metrics.jsonl": "one JSON object per logged step (train/reward_mean, sgsd/helpful_fraction, time/generate_s, ...)",
    "attribution.json": "SGSD: per skill-bank item, uses and helpful / harmful / neutral counts (sgsd skills report)",
    "skills/": "SGSD with online updates: bank_step_<N>.json snapshots and latest.json (the bank in use)",
    "checkpoint-<step>/": "resumable state every training.save_steps (model, optimizer, scheduler, RNG, "
                          "sgsd_state.pt, sgsd_complete.json written last)",
    "final/": "the trained model or LoRA adapter and tokenizer in Hugging Face format, with this card and "
              "sgsd_complete.json (the step it was saved at)",
}


@dataclass(frozen=True)
class RunRecord:
    """A run's resolved config (nested dict, as in the YAML) and provenance (git revision, versions, data)."""

    config: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)

    def setting(self, dotted: str, default: Any = None) -> Any:
        value: Any = self.config
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                return default
            value = value[part]
        return value


def read_run_record(run_dir: str | Path) -> RunRecord | None:
    """The run's record, or None when it has no resolved_config.yaml."""
    import yaml

    path = Path(run_dir) / RESOLVED_CONFIG
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise DataError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    provenance: dict[str, Any] = {}
    for line in text.splitlines():
        if line.startswith(PROVENANCE_PREFIX):
            try:
                provenance = json.loads(line[len(PROVENANCE_PREFIX):])
            except json.JSONDecodeError:
                provenance = {}
    return RunRecord(config if isinstance(config, dict) else {}, provenance)
