"""`torchrun --nproc_per_node 2 tests/one_rank_input_error.py ARGS...`: `sgsd ARGS...` in which rank 1 alone
finds its data file missing, as the second machine of a multi-node run without the file would."""

from __future__ import annotations

import os
import sys


def main() -> int:
    if os.environ.get("RANK") == "1":
        import sgsd.data
        from sgsd.errors import DataError

        def missing(path, **_kwargs):
            raise DataError(f"{path}: no such file")

        sgsd.data.load_problems = missing  # read by `sgsd.trainers.run.prepare_run` when it runs
    from sgsd.cli import main as sgsd_main

    return sgsd_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
