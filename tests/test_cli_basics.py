import subprocess
import sys

from sgsd.cli import main


def test_help_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "skills", "bench", "demo"):
        assert command in out


def test_help_is_fast_and_imports_nothing_heavy():
    code = "import sys, sgsd.cli; sgsd.cli.build_parser(['--help']); print(sorted(m for m in ('torch','transformers','trl') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
