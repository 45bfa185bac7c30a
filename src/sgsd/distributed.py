"""What several processes need to agree on, in one place: rank queries, gather and broadcast of objects.

Every training process runs the same code; state that one rank sees (its rollouts, its polarity
counts, a skill bank its extraction produced) is gathered to all ranks, decided once, and broadcast,
so all ranks hold identical state and the checkpoint written by the main process is the global one.
Files are written by the main process only.

The functions work with or without an initialized `torch.distributed` process group (one process:
gather returns `[obj]`, broadcast returns `obj`), so single-process code paths stay the same. They
use `torch.distributed`'s object collectives, which pickle: meant for small state (strings, counts,
a skill bank), not tensors of a batch. Every rank must call each of them, in the same order.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator, TypeVar

from sgsd.errors import UserError

T = TypeVar("T")


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    if _initialized():
        import torch.distributed as dist

        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's global rank: from the process group when it exists, else from the launcher's
    `RANK` (set by torchrun / accelerate before the group is created), else 0."""
    if _initialized():
        import torch.distributed as dist

        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def launched_world_size() -> int:
    """The number of processes of the launch (the process group's size once it exists, before that the
    launcher's `WORLD_SIZE`, set by torchrun / accelerate), 1 without a launcher."""
    if _initialized():
        return world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def announce(message: str) -> None:
    """One `sgsd: ...` line on stderr, from the main process only."""
    if is_main_process():
        print(f"sgsd: {message}", file=sys.stderr, flush=True)


def close() -> None:
    """Destroy the process group at the end of a run (every rank, after its last collective). Left to
    the interpreter's exit, the group's communication threads can be destroyed while still joinable
    (seen under DeepSpeed ZeRO-3 on gloo: "terminate called without an active exception", SIGABRT,
    after a complete run)."""
    if _initialized():
        import torch.distributed as dist

        dist.destroy_process_group()


def leave_worker() -> None:
    """End a non-main rank of a finished multi-process run without the interpreter's teardown (after
    `close()`, and only after every file the run writes is written: the main process writes them, and
    the run's last collective has passed). Under DeepSpeed ZeRO-3 on gloo a rank has been seen to abort
    in teardown ("terminate called without an active exception", SIGABRT) after a complete run, even
    with the process group destroyed, which makes the launcher report a failed job; a worker has nothing
    left to do there (no files, no reporting), so it flushes its streams and exits 0. The main process
    exits normally (its exit hooks, a logger's final sync among them, must run). No-op in one process."""
    if launched_world_size() <= 1 or is_main_process():
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def gather_objects(obj: T) -> list[T]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (`[obj]` in one process)."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` on every rank (`obj` itself in one process)."""
    if world_size() == 1:
        return obj
    import torch.distributed as dist

    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# How another process's death shows up in this one: gloo closes the connection, NCCL aborts or times out.
_PEER_LOSS_MARKERS = ("closed by peer", "reset by peer", "Connection refused", "Broken pipe", "NCCL communicator",
                      "collective operation timeout", "ProcessGroupNCCL", "ProcessGroupGloo")


def is_peer_loss(err: BaseException) -> bool:
    """Whether `err` says that ANOTHER process of the run stopped (a consequence, not the cause)."""
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())) and not isinstance(err, getattr(dist, "DistStoreError", ())):
        return True
    text = str(err)
    return any(marker in text for marker in _PEER_LOSS_MARKERS)


@contextmanager
def same_on_every_rank() -> Iterator[None]:
    """UserErrors raised inside are deterministic input errors, identical on every rank, unless
    `rank_local()` marked them (training has begun): mark them so the CLI prints them once."""
    try:
        yield
    except UserError as err:
        if not getattr(err, "rank_local", False):
            setattr(err, "same_on_every_rank", True)  # read by the CLI with getattr: an attribute of any UserError
        raise


@contextmanager
def rank_local() -> Iterator[None]:
    """Errors raised inside may happen on one rank only (training, saving): every rank reports its own."""
    try:
        yield
    except UserError as err:
        setattr(err, "rank_local", True)
        raise
