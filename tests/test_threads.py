"""The thread policy (`sgsd.threads`): precedence of flag and environment, the model-size rule, the
split among the processes of one machine, and that commands really run with the chosen thread count."""

import json

import pytest
import torch

import sgsd.threads as threads
from sgsd.cli import main
from sgsd.errors import UserError
from sgsd.threads import THREADS_PAY_PARAMETERS, choose_threads

SMALL, LARGE = 700_000, THREADS_PAY_PARAMETERS  # the demo's model; the first size that gets the cores
POLICY_VARIABLES = ("SGSD_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID",
                    "TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS", "SGSD_POLICY_TOKENIZERS_PARALLELISM",
                    "SGSD_POLICY_RAYON_NUM_THREADS")


@pytest.fixture()
def clean_env(monkeypatch):
    """No thread setting from the user (restored after the test, whatever the code under test writes)."""
    for name in POLICY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    saved = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(saved)


def test_model_size_decides_when_the_user_set_nothing():
    assert choose_threads(parameters=None, env={}, cores=8).threads == 1  # no model yet
    assert choose_threads(parameters=SMALL, env={}, cores=8).threads == 1
    assert choose_threads(parameters=LARGE - 1, env={}, cores=8).threads == 1
    large = choose_threads(parameters=LARGE, env={}, cores=8)
    assert (large.threads, large.explicit) == (8, False)


@pytest.mark.parametrize("local, cores, share", [("2", 8, 4), ("3", 8, 2), ("16", 2, 1), ("1", 2, 2)])
def test_processes_of_one_machine_split_the_cores(local, cores, share):
    assert choose_threads(parameters=LARGE, env={"LOCAL_WORLD_SIZE": local}, cores=cores).threads == share
    # a small model stays at one thread whatever the split
    assert choose_threads(parameters=SMALL, env={"LOCAL_WORLD_SIZE": local}, cores=cores).threads == 1


def test_precedence_flag_then_sgsd_threads_then_users_openmp_then_size():
    env = {"SGSD_THREADS": "3", "OMP_NUM_THREADS": "5", "MKL_NUM_THREADS": "7", "LOCAL_WORLD_SIZE": "2"}
    assert choose_threads(parameters=SMALL, env=env, cores=8) == threads.ThreadChoice(3, "SGSD_THREADS", True)
    del env["SGSD_THREADS"]
    assert choose_threads(parameters=SMALL, env=env, cores=8).threads == 5  # the user's OpenMP count, not split
    del env["OMP_NUM_THREADS"]
    assert choose_threads(parameters=LARGE, env=env, cores=8).threads == 7
    del env["MKL_NUM_THREADS"]
    assert choose_threads(parameters=LARGE, env=env, cores=8).threads == 4
    # OpenMP's per-level list: the outer level's count
    assert choose_threads(parameters=SMALL, env={"OMP_NUM_THREADS": "4,2"}, cores=8).threads == 4


def test_torchruns_placeholder_is_not_a_users_choice():
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    assert choose_threads(parameters=LARGE, env=torchrun, cores=8).threads == 4
    # the same value outside torchrun, or another value under it, is the user's
    assert choose_threads(parameters=LARGE, env={"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, cores=8).threads == 1
    assert choose_threads(parameters=LARGE, env={**torchrun, "OMP_NUM_THREADS": "3"}, cores=8).threads == 3
    assert choose_threads(parameters=LARGE, env={**torchrun, "SGSD_THREADS": "1"}, cores=8).threads == 1


@pytest.mark.parametrize("env, where", [({"SGSD_THREADS": "0"}, "SGSD_THREADS"), ({"SGSD_THREADS": "two"}, "SGSD_THREADS"),
                                        ({"OMP_NUM_THREADS": "-1"}, "OMP_NUM_THREADS"),
                                        ({"LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE")])
def test_bad_settings_are_one_line_errors_naming_the_variable(env, where):
    with pytest.raises(UserError, match=where):
        choose_threads(parameters=LARGE, env=env, cores=8)


def test_configure_process_sizes_torch_and_tokenizers(clean_env):
    choice = threads.configure_process(2)
    assert choice.threads == 2 and torch.get_num_threads() == 2
    import os

    assert os.environ["SGSD_THREADS"] == "2"  # sub-processes inherit the flag
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true" and os.environ["RAYON_NUM_THREADS"] == "2"
    clean_env.delenv("SGSD_THREADS")
    threads.configure_process()
    assert torch.get_num_threads() == 1 and os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_inter_op_pool_follows_the_start_up_decision(clean_env):
    """In a fresh process (the pool is sized once, before its first use), as `sgsd` starts."""
    import subprocess
    import sys

    code = ("from sgsd.threads import configure_process; import torch; configure_process({flag}); "
            "print(torch.get_num_threads(), torch.get_num_interop_threads())")
    many = min(3, threads.available_cores())  # an explicit count is capped at the cores (tested below)
    for flag, expected in ((str(many), f"{many} {many}"), ("", "1 1")):
        out = subprocess.run([sys.executable, "-c", code.format(flag=flag)], capture_output=True, text=True, check=True)
        assert out.stdout.split() == expected.split()


def test_users_tokenizers_setting_is_kept(clean_env):
    import os

    clean_env.setenv("TOKENIZERS_PARALLELISM", "true")
    threads.configure_process()
    assert torch.get_num_threads() == 1 and os.environ["TOKENIZERS_PARALLELISM"] == "true"


def test_load_model_applies_the_size_rule(clean_env, tiny_tokenizer):
    from sgsd.models import load_model

    torch.set_num_threads(3)
    load_model("tiny", tokenizer=tiny_tokenizer)
    assert torch.get_num_threads() == 1  # a tiny model: one thread
    clean_env.setattr(threads, "THREADS_PAY_PARAMETERS", 1)  # as if it were large
    load_model("tiny", tokenizer=tiny_tokenizer)
    assert torch.get_num_threads() == threads.available_cores()


STEP = ["bench", "step", "--teachers", "2", "--vocab", "64", "--completion-tokens", "8", "--hidden", "32", "--layers",
        "1", "--heads", "4", "--repeats", "1", "--warmup", "0", "--json"]


@pytest.mark.parametrize("argv, env, expected", [
    (STEP, {}, 1),  # the policy: a small model
    (["--threads", "2", *STEP], {}, 2),  # the global option before the command
    ([*STEP, "--threads", "2"], {}, 2),  # ... or after it
    (STEP, {"SGSD_THREADS": "2"}, 2),
    (STEP, {"OMP_NUM_THREADS": "2"}, 2),  # the user's OpenMP setting is respected
    ([*STEP, "--threads", "1"], {"OMP_NUM_THREADS": "2"}, 1),  # the flag wins
])
def test_a_command_runs_with_the_chosen_thread_count(clean_env, capsys, argv, env, expected):
    for name, value in env.items():
        clean_env.setenv(name, value)
    torch.set_num_threads(3)  # neither answer: the command must set it
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["threads"] == expected  # torch.get_num_threads() while timed


def test_bad_thread_settings_stop_the_cli_in_one_line(clean_env, capsys):
    assert main(["--threads", "0", "bench", "estimate"]) == 2
    assert capsys.readouterr().err.strip() == "sgsd: error: sgsd: argument --threads: 0: must be a whole number >= 1 (see `sgsd --help`)"
    clean_env.setenv("SGSD_THREADS", "many")
    assert main(["bench", "estimate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sgsd: error: --threads / SGSD_THREADS:") and "'many'" in err and "\n" not in err


def test_an_explicit_thread_count_is_capped_at_the_cores_with_a_note(monkeypatch, capsys):
    for variable in ("SGSD_THREADS", "OMP_NUM_THREADS"):
        capped = choose_threads(parameters=None, env={variable: "100000"}, cores=2)
        assert capped == threads.ThreadChoice(2, f"{variable}=100000 capped at the 2 cores this process may use", True)
    assert choose_threads(parameters=None, env={"SGSD_THREADS": "2"}, cores=2).threads == 2
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setenv("SGSD_THREADS", "2000")
    assert threads.configure_process().threads == 2
    assert "sgsd: note: SGSD_THREADS=2000 capped at the 2 cores this process may use; using 2" in capsys.readouterr().err
