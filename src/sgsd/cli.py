"""The `sgsd` command line: one entry point, one sub-command per module.

Sub-command modules are imported only when their command runs, so `sgsd --help` stays fast.
Each module exposes `configure(parser)` (adds its arguments) and `run(args) -> int`; a parser whose
command continues an interrupted run when rerun sets the default `_resumable=True` (said on Ctrl-C).
Every command runs under the thread policy (`sgsd.threads`; `--threads N` before or after the command).
A `UserError` from any command is printed as one line (`sgsd: error: ...`) with exit status 2.
Help pages show every default (`sgsd.commands.options`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from sgsd import __version__
from sgsd.commands import COMMANDS
from sgsd.commands.options import SgsdArgumentParser
from sgsd.distributed import is_peer_loss
from sgsd.errors import UserError
from sgsd.peers import PEER_FAILURE_GRACE_S


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = SgsdArgumentParser(
        prog="sgsd",
        description="Skill-Conditioned Gated Self-Distillation: training, skill banks and math evaluation.",
    )

    parser.add_argument("--version", action="version", version=f"sgsd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    chosen = _command_name(argv)
    for name, module_name, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen command's module is imported (lazy, keeps --help fast).
        if name == chosen:
            module = importlib.import_module(module_name)
            module.configure(p)
            p.set_defaults(_run=module.run)
    return parser


def _command_name(argv: list[str]) -> str | None:
    """The first word of `argv` that is neither an option nor the value of `--threads N`."""
    words = iter(argv)
    for word in words:
        if word == "--threads":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version (0) or a usage error (2, already printed in one line)
        return int(done.code or 0)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0 if not argv else 2
    try:
        from sgsd.threads import configure_process

        configure_process(getattr(args, "threads", None))  # before torch does work (docs/performance.md)
        from sgsd.vllm_adapter import hide_false_triton_warning

        hide_false_triton_warning()  # before anything imports vLLM's model code
        return int(args._run(args) or 0)
    except UserError as err:
        if not getattr(err, "same_on_every_rank", False):
            print(f"sgsd: error{_rank_tag()}: {err}", file=sys.stderr)
        elif os.environ.get("RANK", "0") == "0":  # an input error every rank raised alike: printed once
            print(f"sgsd: error: {err}", file=sys.stderr)
        elif _main_process_did_not_stop():  # ... unless only this rank raised it (e.g. a file missing on its machine)
            print(f"sgsd: error{_rank_tag()}: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `sgsd skills show F | head`: the reader left; not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at interpreter exit
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        again = "; run the same command again to resume" if getattr(args, "_resumable", False) else ""
        print(f"sgsd: interrupted{again}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - last resort: one line unless SGSD_DEBUG is set
        if os.environ.get("SGSD_DEBUG"):
            raise
        if _rank_tag() and _secondary_failure(err):
            from sgsd.peers import report_loss

            report_loss()
            return 1
        print(f"sgsd: internal error{_rank_tag()}: {type(err).__name__}: {err} (set SGSD_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


def _secondary_failure(err: Exception) -> bool:
    """A lost peer is the consequence of another rank's failure, which that rank reports: wait for the
    launcher to stop this process quietly; only if it does not (the peer vanished without an error
    of its own, e.g. killed) report the loss in one line."""
    if not is_peer_loss(err):
        return False
    time.sleep(PEER_FAILURE_GRACE_S)
    return True


def _main_process_did_not_stop() -> bool:
    """A non-main rank raised an input error that every rank should find alike: if the main process found
    it too, it printed it and exited, and the launcher stops this process within its monitor interval.
    Still running after the grace time means the main process did not: this rank says it, tagged."""
    time.sleep(PEER_FAILURE_GRACE_S)
    return True


def _rank_tag() -> str:
    """" (rank R)" in a launch of several processes (torchrun / accelerate set WORLD_SIZE), else ""."""
    return f" (rank {os.environ.get('RANK', '0')})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
