"""Every number flag of every command reads its value through a bounded type (`sgsd.commands.options.Bounded`):
0, a negative value, NaN and infinity are accepted or refused by the parser, in one usage line, before the command
does anything. The flags are found by walking the parsers, so a new flag is covered without editing this file."""

from __future__ import annotations

import argparse

import pytest

from sgsd.cli import main
from sgsd.commands.options import Bounded

# flags whose 0 is a valid value ("COMMAND --flag", for every sub-command of COMMAND), with what it means
ZERO_ALLOWED = {
    "bench --warmup": "no warm-up repeat", "bench --seed": "a seed", "bench --chunk-tokens":
    "chunk from the memory budget", "bench --load-processes": "no competing load",
    "bench --confidence-threshold": "every nonzero support counts", "eval --top-k": "no top-k cut",
    "eval --seed": "a seed", "eval --temperature": "greedy decoding", "skills --seed": "a seed",
    "skills --temperature": "greedy attempts", "skills --min-uses": "prune on any evidence",
    "bench --temperature": "greedy decoding (sgsd bench vllm)",
}


def zero_key(flag: str) -> str:
    return f"{flag.split()[0]} {flag.split()[-1]}"


def number_flags() -> dict[str, argparse.Action]:
    """'command sub --flag' -> its action, for every option that takes a number (or is typed int/float)."""
    from sgsd.cli import COMMANDS, build_parser

    found: dict[str, argparse.Action] = {}

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}".strip())
            elif action.option_strings and (isinstance(action.type, Bounded) or action.type in (int, float)):
                found[f"{path} {action.option_strings[0]}".strip()] = action

    for name, _, _ in COMMANDS:  # the CLI configures only the chosen command (lazy imports): each in turn
        parser = build_parser([name])
        command = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        walk(command, name)
    walk(build_parser([]), "")  # the top level's own (--threads)
    return found


FLAGS = number_flags()


def test_every_number_flag_is_bounded():
    assert len(FLAGS) >= 40 and "eval --grade-timeout" in FLAGS and "skills build --attempts" in FLAGS
    assert [flag for flag, action in FLAGS.items() if not isinstance(action.type, Bounded)] == []
    assert set(ZERO_ALLOWED) <= {zero_key(flag) for flag in FLAGS}


@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_zero_negative_nan_and_infinity(flag):
    bounded = FLAGS[flag].type
    for text in ("0", "-1", "nan", "inf", "-inf", "1e999"):
        accepted = text == "0" and zero_key(flag) in ZERO_ALLOWED
        if accepted:
            assert bounded(text) == 0
        else:
            with pytest.raises(argparse.ArgumentTypeError):
                bounded(text)


@pytest.mark.parametrize("argv", [
    ["eval", "--model", "tiny", "--output-dir", "x", "--grade-timeout", "nan"],
    ["eval", "--model", "tiny", "--output-dir", "x", "--grade-timeout", "inf"],
    ["eval", "--model", "tiny", "--output-dir", "x", "--top-p", "nan"],
    ["train", "--config", "c.yaml", "--max-steps", "0"],
    ["skills", "build", "--problems", "p.jsonl", "--output-dir", "x", "--temperature", "-1"],
])
def test_a_bad_number_is_one_usage_line_before_anything_runs(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and argv[-2] in err and not list(tmp_path.iterdir())
