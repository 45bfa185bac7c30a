"""What the project writes gets the mode a plain `open()` gives under the user's umask (docs/distributed.md,
"Shared filesystems"): a teammate on a shared cluster can read a run's weights, metrics and reports when
the umask lets them. safetensors writes weights 0600 and `tempfile.mkstemp` / `mkdtemp` make private files
and folders; the writers of `sgsd.storage` give them the umask's mode. Lock files are the one exception.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fake_llm_server import base_url, fake_llm_server

from sgsd import storage
from sgsd.storage import apply_plain_modes, atomic_write_bytes, atomic_write_json, current_umask, plain_file_mode

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    """The process's umask set to the parameter for the test, restored after it."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _plain_open_mode(folder: Path) -> int:
    reference = folder / "reference-by-open"
    with open(reference, "w") as handle:
        handle.write("x")
    mode = _mode(reference)
    reference.unlink()
    return mode


def test_current_umask_reads_without_changing_it(umask):
    assert current_umask() == umask
    assert os.umask(umask) == umask  # still set as it was


def test_current_umask_without_proc_reads_it_once(umask, monkeypatch):
    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(storage, "open", no_proc, raising=False)
    monkeypatch.setattr(storage, "_umask_fallback", None)
    assert current_umask() == umask
    assert os.umask(umask) == umask


def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path, umask):
    expected = _plain_open_mode(tmp_path)
    assert expected == 0o666 & ~umask and plain_file_mode() == expected
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_bytes(tmp_path / "deep" / "b.bin", b"\0")
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "deep" / "b.bin") == expected
    assert _mode(tmp_path / "deep") == 0o777 & ~umask


def test_apply_plain_modes_opens_private_files_and_folders_only_as_far_as_the_umask(tmp_path, umask):
    folder = tmp_path / "written"
    (folder / "sub").mkdir(parents=True)
    weights, outside = folder / "sub" / "model.safetensors", tmp_path / "not-ours.txt"
    weights.write_bytes(b"w")
    outside.write_text("x")
    os.chmod(weights, 0o600)
    os.chmod(folder / "sub", 0o700)
    os.chmod(outside, 0o600)
    (folder / "link").symlink_to(outside)
    apply_plain_modes(folder)
    assert _mode(weights) == 0o666 & ~umask
    assert _mode(folder / "sub") == _mode(folder) == 0o777 & ~umask
    assert _mode(outside) == 0o600  # a link's target is not what the folder holds


def test_the_eval_comparison_figure_gets_the_umask_mode(tmp_path, umask):
    pytest.importorskip("matplotlib")
    from types import SimpleNamespace

    from sgsd.evaluation.report import plot_comparison

    result = SimpleNamespace(avg_at_k=0.5, avg_ci=(0.4, 0.6), k=2)  # what the plot reads of a result
    png = plot_comparison([SimpleNamespace(label="run", benchmarks={"toy": result})], tmp_path / "cmp" / "compare.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and _mode(png) == 0o666 & ~umask


# -- a whole run directory, an evaluation and a skill bank build, under two umasks ------------------------

_SCRIPT = r"""
import json, os, sys
from pathlib import Path
from sgsd.cli import main

root, url, tiny = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
for mask in (0o022, 0o077):
    os.umask(mask)
    out = root / f"{mask:03o}"
    out.mkdir()
    with open(out / "reference-by-open", "w") as handle:
        handle.write("x")
    (out / "reference-by-mkdir").mkdir()
    problems = out / "problems.jsonl"
    problems.write_text("".join(json.dumps({"problem": f"What is {a} + {a + 3}?", "answer": str(2 * a + 3)}) + "\n"
                                for a in range(10, 14)))
    steps = [
        ["train", "--config", f"{tiny}/sgsd.yaml", "--output-dir", str(out / "run"), "--max-steps", "2", "--quiet",
         "training.save_steps=1", "skills.online.enabled=true", "skills.online.every_steps=1",
         "skills.online.success_threshold=1.0", f"skills.online.llm={url}", "skills.online.llm_model=fake"],
        ["eval", "--model", str(out / "run" / "final"), "--benchmarks", str(problems), "--k", "2",
         "--max-new-tokens", "4", "--output-dir", str(out / "eval-trained"), "--quiet"],
        ["eval", "--model", "tiny", "--benchmarks", str(problems), "--k", "2", "--max-new-tokens", "4",
         "--output-dir", str(out / "eval-tiny"), "--quiet"],
        ["eval", "compare", str(out / "eval-trained"), str(out / "eval-tiny"), "--output-dir", str(out / "compare")],
        ["skills", "build", "--problems", str(problems), "--output-dir", str(out / "bank"), "--policy-url", url + "/v1",
         "--policy-model", "fake", "--group-size", "4"],
    ]
    for argv in steps:
        code = main(argv)
        assert code == 0, (argv, code)
"""


def _reply(prompt: str) -> str:
    if prompt.startswith("Problem: "):
        return "Adding gives \\boxed{23}."  # right for 10 + 13, wrong otherwise: both kinds of memories
    if "Merge them" in prompt:
        return "{}"
    if "SUCCESSFUL" in prompt:
        return '{"general_skills": [{"title": "Columns", "principle": "Add column by column.", "when_to_apply": "Sums."}]}'
    return '{"common_mistakes": [{"description": "Slip", "why_it_happens": "haste", "how_to_avoid": "Check carries."}]}'


@pytest.mark.slow  # one subprocess: two tiny trainings, four evaluations, two bank builds (~40 s on 2 cores)
def test_every_file_of_a_run_an_evaluation_and_a_bank_build_has_the_plain_open_mode(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    with fake_llm_server(_reply) as server:
        done = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path), base_url(server), str(ROOT / "configs/tiny")],
                              env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for mask in (0o022, 0o077):
        out = tmp_path / f"{mask:03o}"
        file_mode, dir_mode = _mode(out / "reference-by-open"), _mode(out / "reference-by-mkdir")
        assert (file_mode, dir_mode) == (0o666 & ~mask, 0o777 & ~mask)
        seen, wrong = set(), []
        for path in sorted(out.rglob("*")):
            if path.name == ".sgsd.lock":  # lock files are excepted
                continue
            seen.add(path.relative_to(out).as_posix())
            expected = dir_mode if path.is_dir() else file_mode
            if _mode(path) != expected:
                wrong.append(f"{path.relative_to(out)}: {_mode(path):o} (expected {expected:o})")
        assert not wrong, wrong
        # the files the issue found private, and each kind of output, were all looked at
        for name in ("run/final/model.safetensors", "run/final/README.md", "run/final/sgsd_complete.json",
                     "run/metrics.jsonl", "run/resolved_config.yaml", "run/attribution.json",
                     "run/checkpoint-1/model.safetensors", "run/checkpoint-2/sgsd_state.pt",
                     "run/skills/bank_step_000001.json", "eval-trained/results.json", "compare/compare.png",
                     "bank/skill_bank.json"):
            assert name in seen, name
