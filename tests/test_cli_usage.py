"""What the command line says back: every help page explains every option and its default, required options
show as required, removed spellings are refused with a did-you-mean, usage errors and unknown config keys are one
line (with a did-you-mean on leaf names), an interrupt says whether the same command resumes."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from sgsd.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/tiny/sgsd.yaml"


def _parsers(argv: list[str], parser: argparse.ArgumentParser):
    yield argv, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers([*argv, name], child)


def _every_parser():
    for name, _, _ in COMMANDS:
        top = build_parser([name])
        command = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        yield from _parsers([name], command)


def test_every_help_page_explains_every_option_and_shows_defaults(capsys):
    pages = list(_every_parser())
    paths = {" ".join(argv) for argv, _ in pages}
    assert {"train", "eval", "eval compare", "skills build", "skills report", "bench step", "demo"} <= paths
    for argv, parser in pages:
        assert main([*argv, "--help"]) == 0
        page = capsys.readouterr().out
        assert page.startswith(f"usage: sgsd {' '.join(argv)}"), argv
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = "/".join(action.option_strings) or action.dest
            text = formatter._expand_help(action)
            assert action.help and len(action.help) > 8, f"sgsd {' '.join(argv)} {name}: no explanation"
            is_switch = isinstance(action, argparse._StoreTrueAction)
            takes_default = not is_switch and (action.option_strings or action.nargs in ("?", "*"))
            if takes_default and not action.required:
                assert "default" in text.lower() or "required" in text.lower() or _in_required_group(parser, action), \
                    f"sgsd {' '.join(argv)} {name}: the help does not say its default"
            if action.default not in (None, False, argparse.SUPPRESS) and not isinstance(action.default, list):
                assert str(action.default) in text or "default" in action.help, f"{argv} {name}: default not shown"


def _in_required_group(parser: argparse.ArgumentParser, action: argparse.Action) -> bool:
    return any(group.title == "required arguments" and action in group._group_actions
               for group in parser._action_groups)


def test_required_options_are_shown_as_required(capsys):
    for argv, expected in ((["train"], "--config CONFIG"), (["eval"], "--model MODEL --output-dir DIR"),
                           (["skills", "build"], "--problems PROBLEMS"), (["skills", "validate"], "--bank BANK")):
        assert main([*argv, "--help"]) == 0
        usage = capsys.readouterr().out.split("\n\n")[0]
        assert expected in usage and f"[{expected.split()[0]}" not in usage, usage


@pytest.mark.parametrize("argv, hint", [
    (["skills", "retrieve", "--bank", "b", "--problem", "p", "--top-k", "3"], None),
    (["skills", "report", "R", "--png", "x.png"], None),
    (["eval", "--model", "m", "--output-dir", "o", "--skills=b.json"], None),
    (["eval", "--model", "m", "--output-dir", "o", "--no-progress"], None),
    (["eval", "--model", "m", "--output-dir", "o", "--bnak=b.json"], "--bank"),
    (["skills", "retrieve", "--bank", "b", "--problem", "p", "--teachrs", "3"], "--teachers"),
    (["eval", "--model", "m", "--output-dir", "o", "--skills-top=3"], "--skills-top-k"),
])
def test_unknown_and_removed_options_are_one_line_with_a_did_you_mean(capsys, argv, hint):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sgsd: error: ") and "unrecognized arguments" in err and "\n" not in err, err
    assert (f"did you mean {hint}?" in err) if hint else ("did you mean" not in err), err


def test_usage_errors_are_one_line(capsys):
    assert main(["eval", "compare"]) == 2
    assert main(["skills", "retrieve", "--bank"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("sgsd: error: sgsd ") for line in errors)


@pytest.mark.parametrize("override, hint", [
    ("save_steps=2", "did you mean 'training.save_steps'?"),
    ("generation.learning_rate=1e-5", "did you mean 'training.learning_rate'?"),
    ("beta=0.1", "did you mean 'grpo.beta' or 'opsd.beta'?"),
    ("training.save_step=2", "did you mean 'training.save_steps'?"),
    ("learning_rat=1e-5", "did you mean 'training.learning_rate'?"),
])
def test_unknown_keys_suggest_leaf_names(override, hint):
    from sgsd.config import load_config
    from sgsd.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown config key") as info:
        load_config(RECIPE, [override])
    assert hint in str(info.value)


def test_interrupt_says_whether_the_same_command_resumes(monkeypatch, capsys):
    import sgsd.commands.evaluate as evaluate
    import sgsd.commands.train as train

    def interrupted(args):
        raise KeyboardInterrupt

    for module, resumes in ((train, True), (evaluate, False)):
        fake = lambda args: interrupted(args)  # noqa: E731
        fake.__module__ = module.__name__
        monkeypatch.setattr(module, "run", fake)
        argv = ["train", "--config", str(RECIPE)] if module is train else ["eval", "--model", "tiny", "--output-dir", "o"]
        assert main(argv) == 130
        err = capsys.readouterr().err.strip()
        assert err.startswith("sgsd: interrupted") and ("run the same command again to resume" in err) == resumes
