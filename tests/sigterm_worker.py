"""One rank of `tests/test_peers.py`'s SIGTERM test: joins the test's store (as a torchrun worker joins its
launcher's), starts the peer watch and the SIGTERM report as `sgsd train` does, writes OUT/ready-rank{R},
then waits in a collective that never completes (a receive from the other rank, which never sends). A lost
peer is reported as the CLI reports it, after a shorter grace (2 heartbeat intervals, in which the heartbeat
thread reads the peer's end state; the CLI waits PEER_FAILURE_GRACE_S, for a failing peer's own line)."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(out: str) -> int:
    import torch
    import torch.distributed as dist

    from sgsd.distributed import is_peer_loss
    from sgsd.peers import HEARTBEAT_MAX_S, report_loss, reporting_termination, watching_peers

    with reporting_termination(), watching_peers(60.0):
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        Path(out, f"ready-rank{rank}").write_text("")
        try:
            dist.recv(torch.zeros(1), src=1 - rank)
        except Exception as err:  # noqa: BLE001 - as sgsd.cli.main handles it
            if not is_peer_loss(err):
                raise
            time.sleep(2 * HEARTBEAT_MAX_S)
            report_loss()
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
