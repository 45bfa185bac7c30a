"""One vocabulary and one help style for every `sgsd` command.

- `SgsdArgumentParser`: every parser and sub-parser (nested ones inherit the class) formats help with
  `DefaultsHelpFormatter`, which appends "(default: X)" to an option whose help does not already say
  what happens by default, and reports usage errors in one line.
- `--threads N` on every parser (`add_threads`): the thread policy's override (`sgsd.threads`).
- The shared spellings: `--output-dir` for every output directory, `--bank` for a skill bank,
  `--teachers` for the number of teachers, `--quiet` for progress output (`add_quiet`).
- `required_group`: options a command needs, shown under "required arguments" even where argparse
  cannot require them (a sub-command such as `sgsd eval compare` does without them).
"""

from __future__ import annotations

import argparse
import difflib
from typing import Any, NoReturn

from sgsd.bounds import Bound, above, at_least, between
from sgsd.errors import UserError, shorten
from sgsd.threads import THREADS_PAY_PARAMETERS

class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" where the help text does not already describe the default.

    Left alone: switches (`store_true`), options without a default (None: their help says what
    omitting them means) and help texts that mention "default" themselves.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or default is None or default is argparse.SUPPRESS or default is False
                or isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction, argparse._VersionAction))):
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


class SgsdArgumentParser(argparse.ArgumentParser):
    """ArgumentParser whose help shows defaults and whose usage errors are one line (`sgsd: error: ...`,
    exit 2, as every other error); sub-parsers created from it are of the same class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        # no prefix matching: a removed or mistyped option (`--skills`) would silently become another
        # one that starts with it (`--skills-top-k`)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        add_threads(self)

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # reported by the sub-command they were given to, which knows its own options
            _innermost(self, parsed).error("unrecognized arguments: " + " ".join(extras))
        return parsed

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"sgsd: error: {self.prog}: {message}{self._did_you_mean(message)} (see `{self.prog} --help`)\n")

    def _did_you_mean(self, message: str) -> str:
        """For "unrecognized arguments: --bnak x": the closest options this parser knows."""
        prefix = "unrecognized arguments: "
        if not message.startswith(prefix):
            return ""
        known = sorted(o for action in self._actions for o in action.option_strings if o.startswith("--"))
        hints = [close for word in message[len(prefix):].split() if word.startswith("--")
                 for close in difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.75)]
        return f" (did you mean {' or '.join(dict.fromkeys(hints))}?)" if hints else ""


def _innermost(parser: argparse.ArgumentParser, parsed: argparse.Namespace) -> argparse.ArgumentParser:
    """The deepest sub-command parser that `parsed` went through (`sgsd skills retrieve` for
    `sgsd skills retrieve ...`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            child = action.choices.get(getattr(parsed, action.dest, None) or "")
            if child is not None:
                return _innermost(child, parsed)
    return parser


def add_threads(parser: argparse.ArgumentParser) -> None:
    """`--threads N` (dest `threads`), accepted by every parser and sub-parser (`SgsdArgumentParser` adds
    it), so it may stand before or after the command; absent from the namespace unless given, so a
    sub-parser never overwrites the value given to its parent. `sgsd.cli` applies it (`sgsd.threads`)."""
    parser.add_argument("--threads", type=COUNT, metavar="N", default=argparse.SUPPRESS,
                        help="torch CPU threads of each process (also SGSD_THREADS; overrides OMP_NUM_THREADS). "
                             f"By default: 1 for models under {THREADS_PAY_PARAMETERS / 1e6:g} M parameters, else "
                             "this process's share of the cores (docs/performance.md, Threads)")


def add_quiet(parser: argparse.ArgumentParser, what: str = "no progress bars") -> None:
    """`--quiet` (dest `quiet`)."""
    parser.add_argument("--quiet", action="store_true", help=what)


def required_group(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "required arguments" section of a command's help."""
    return parser.add_argument_group("required arguments")


def require(args: argparse.Namespace, command: str, *names: str) -> None:
    """Refuse a missing option that argparse could not require (see `required_group`)."""
    missing = ["--" + name.replace("_", "-") for name in names if getattr(args, name, None) in (None, "")]
    if missing:
        raise UserError(f"{command}: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required "
                        f"(see `{command} --help`)")


class Bounded:
    """An argparse `type=` that reads an int or a float and refuses, in the parser's one usage line, a value
    outside `bound` (NaN and infinity included): a number flag passes the same kind of check as a config
    setting (`sgsd.bounds`), before the command does anything. Every number flag of every command uses one
    (tests/test_cli_numbers.py)."""

    def __init__(self, kind: type, bound: Bound) -> None:
        self.kind, self.bound = kind, bound
        self.__name__ = "whole number" if kind is int else "number"  # argparse names the type in its error

    def __call__(self, text: str) -> Any:
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected a {self.__name__}, got {shorten(repr(text), 40)}") from None
        if not self.bound.holds(value):
            raise argparse.ArgumentTypeError(f"{shorten(text, 40)}: {self.bound.describe().replace('finite number', self.__name__)}")
        return value

    def __repr__(self) -> str:
        return f"Bounded({self.kind.__name__}, {self.bound.describe()})"


COUNT = Bounded(int, at_least(1))  # how many of something: at least one
NON_NEGATIVE = Bounded(int, at_least(0))  # where 0 means something (a seed, "none", "off")
SEED = NON_NEGATIVE
NON_NEGATIVE_NUMBER = Bounded(float, at_least(0))  # e.g. a temperature (0: greedy)
POSITIVE_NUMBER = Bounded(float, above(0))  # e.g. seconds of a timeout
PROBABILITY_MASS = Bounded(float, between(0, 1, low_open=True))  # e.g. top-p
