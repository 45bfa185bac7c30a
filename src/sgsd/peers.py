"""Whether the other processes of a launch are alive, and whether they run the same thing as this one.

A collective cannot tell a busy rank from a lost one: it waits for its timeout (30 minutes) without a
word. So every rank of a launch of several processes runs a heartbeat thread (`PeerWatch`): it bumps
this rank's counter in a key-value store every `interval_s` and reads every other rank's counter. A rank
whose counter has not moved for `distributed.peer_timeout_s` was killed, is frozen (SIGSTOP, a
filesystem read that never returns, a wedged node) or never started; the surviving ranks then exit
non-zero, with one line per node naming the lost rank, its node and host. A rank that is merely busy
(the main process running the skill updater for an hour while the others wait at a barrier, a model
loading from a slow disk) keeps beating: the thread runs beside whatever the main thread waits in.

The store is the one torch elastic's launcher (torchrun, `accelerate launch`) keeps for its workers at
MASTER_ADDR:MASTER_PORT (`TORCHELASTIC_USE_AGENT_STORE=True`): it exists before any process group, so
the watch starts before the model loads, and it lives in node 0's launcher, not in a rank, so it
outlives a lost rank. The same store carries the start check (`PeerWatch.agree`): before the model
loads, the ranks compare digests of the resolved config, the output directory, the data and bank
contents, the code and the stack's versions, and a node started with something else is refused.

Without such a launcher (one process, or a launcher that sets no agent store) there is no watch;
the collective timeout then bounds a lost rank.

A rank that receives SIGTERM (a scheduler's preemption, a `kill`, its launcher passing on either) says
so in one line, tells the others through the store (`reporting_termination`), and exits; the peers'
line then names it as terminated. The main thread may be inside a collective (C++ code that does not
return to Python until the collective ends, so a Python signal handler would never run): the signal
reaches a thread of its own through `signal.set_wakeup_fd`, written by the interpreter's C-level
handler whatever the main thread does.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from sgsd.distributed import is_peer_loss, launched_world_size
from sgsd.errors import UserError

# After another rank fails, its launcher stops the rest of its node within its monitor interval (torchrun:
# 0.1 s); a rank on another node waits this long for the failing rank's own line before saying more.
PEER_FAILURE_GRACE_S = 10.0
# The longest pause between two heartbeats: a killed peer is named within the grace above, a frozen one
# within peer_timeout_s plus this.
HEARTBEAT_MAX_S = 2.0
EXIT_PEER_LOST = 1
TERMINATED = "terminated"  # a rank's end state after SIGTERM
EXIT_TERMINATED = 128 + signal.SIGTERM  # what a shell reports for a process that SIGTERM ended


@dataclass(frozen=True)
class Place:
    """Where a rank runs: its node (torchrun's node rank, GROUP_RANK) and host name (None: never heard from)."""

    rank: int
    node: int
    host: str | None = None


def describe(places: list[Place]) -> str:
    """"rank 1 (node 1, host gpu-7)", or "ranks 4, 5 (node 1, host gpu-7)" for several of one node."""
    by_node: dict[int, list[Place]] = {}
    for place in sorted(places, key=lambda p: p.rank):
        by_node.setdefault(place.node, []).append(place)
    parts = []
    for node, group in by_node.items():
        ranks = ", ".join(str(p.rank) for p in group)
        host = next((p.host for p in group if p.host), None)
        parts.append(f"rank{'s' if len(group) > 1 else ''} {ranks} (node {node}{f', host {host}' if host else ''})")
    return "; ".join(parts)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def this_place() -> Place:
    rank = _env_int("RANK", 0)
    return Place(rank, _env_int("GROUP_RANK", rank // max(1, _env_int("LOCAL_WORLD_SIZE", 1))), socket.gethostname())


def expected_node(rank: int) -> int:
    """The node torchrun gives `rank`: ranks are numbered node by node, LOCAL_WORLD_SIZE per node."""
    return rank // max(1, _env_int("LOCAL_WORLD_SIZE", 1))


def code_digest() -> str:
    """SHA-256 over the package's own source files (path and content): two checkouts of one version with
    different edits differ here."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


class PeerWatch:
    """One rank's heartbeat and its watch over the others (see the module docstring).

    `store_factory()` returns a connected client of the launcher's store (a torch.distributed Store);
    `timeout_s` 0 keeps the start check and turns the watch off. `exit` ends the process (tests pass
    their own)."""

    def __init__(self, store_factory: Callable[[], Any], *, world_size: int, timeout_s: float,
                 place: Place | None = None, interval_s: float | None = None, prefix: str = "sgsd/peers",
                 exit: Callable[[int], None] = os._exit) -> None:
        self.place = place or this_place()
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.interval_s = interval_s or min(HEARTBEAT_MAX_S, max(0.05, timeout_s / 5))
        self.prefix = f"{prefix}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self._store_factory, self._exit = store_factory, exit
        self._store = store_factory()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_store: Any = None
        self.started_at = time.monotonic()
        self.places: dict[int, Place] = {self.place.rank: self.place}
        self._beat = 0
        self._last: dict[int, tuple[int, float]] = {}  # rank -> (counter, monotonic time it last moved)
        self._ended_at: dict[int, tuple[str, float]] = {}
        self._ended_count = 0

    # -- keys ----------------------------------------------------------------------------------------
    def _key(self, kind: str, rank: int) -> str:
        return f"{self.prefix}/{kind}/{rank}"

    @property
    def others(self) -> list[int]:
        return [r for r in range(self.world_size) if r != self.place.rank]

    # -- life cycle ----------------------------------------------------------------------------------
    def start(self) -> "PeerWatch":
        self._store.set(self._key("where", self.place.rank), json.dumps([self.place.node, self.place.host]))
        self._bump(self._store)
        if self.timeout_s > 0:
            self._thread = threading.Thread(target=self._run, name="sgsd-peer-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self, state: str) -> None:
        """This rank is done (`left`) or failed with an error of its own (`failed`): the others stop
        watching it. The thread ends."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval_s + 5)
        try:
            self._store.set(self._key("end", self.place.rank), state)
            self._store.add(f"{self.prefix}/ended", 1)
        except Exception:  # noqa: BLE001 - the store's host may be gone at the end; nothing depends on this
            pass

    # -- the start check -----------------------------------------------------------------------------
    def agree(self, parts: dict[str, str], stage: str = "start") -> None:
        """Every rank publishes `parts` (name -> digest) and reads every other rank's; a rank whose parts
        differ from rank 0's is refused with one line, the same on every rank. Waits for late ranks
        (the watch names one that never comes). `stage` names the check, so a launch can agree more than
        once (on its config before it touches the output directory, on its inputs once they are read)."""
        self._store.set(self._key(f"digest-{stage}", self.place.rank), json.dumps(parts, sort_keys=True))
        keys = [self._key(f"digest-{stage}", r) for r in range(self.world_size)]
        wait_s = self.timeout_s * 2 + 60 if self.timeout_s > 0 else 1800.0
        try:
            self._store.wait(keys, timedelta(seconds=wait_s))
        except Exception as err:  # noqa: BLE001 - a store timeout: some rank never published
            missing = [r for r in range(self.world_size) if not self._store.check([keys[r]])]
            raise UserError(f"{describe([self._where(r) for r in missing])} did not reach the start check "
                            f"within {wait_s:.0f} s ({type(err).__name__})") from None
        digests = [json.loads(v) for v in self._store.multi_get(keys)]
        for rank in range(self.world_size):
            self.places[rank] = self._where(rank)
        differing = {r: sorted(k for k in set(d) | set(digests[0]) if d.get(k) != digests[0].get(k))
                     for r, d in enumerate(digests) if d != digests[0]}
        if differing:
            ranks = sorted(differing)
            what = sorted({k for names in differing.values() for k in names})
            raise UserError(f"{describe([self.places[r] for r in ranks])} started with another {', '.join(what)} than "
                            f"{describe([self.places[0]])}; start every node with the same command, code and inputs")

    def node_count(self) -> int:
        return len({p.node for p in self.places.values()})

    def _where(self, rank: int) -> Place:
        """Where `rank` said it runs; torchrun's node of it when it never said (or the store is gone)."""
        if rank in self.places and self.places[rank].host is not None:
            return self.places[rank]
        key = self._key("where", rank)
        store = self._thread_store if threading.current_thread() is self._thread else self._store
        try:
            if store.check([key]):
                node, host = json.loads(store.get(key))
                self.places[rank] = Place(rank, int(node), host)
                return self.places[rank]
        except Exception:  # noqa: BLE001 - the store is gone: say what torchrun's numbering says
            pass
        return Place(rank, expected_node(rank))

    # -- the heartbeat thread ------------------------------------------------------------------------
    def _bump(self, store: Any) -> None:
        self._beat += 1
        store.set(self._key("beat", self.place.rank), str(self._beat))

    def _read(self, store: Any) -> tuple[dict[int, int], dict[int, str]]:
        """Every other rank's counter (0: never beat) and the end state of those that ended."""
        present = [r for r in self.others if r in self._last and self._last[r][0] > 0]
        absent = [r for r in self.others if r not in present]
        counts = dict(zip(present, (int(v) for v in store.multi_get([self._key("beat", r) for r in present])))) \
            if present else {}
        for rank in absent:
            key = self._key("beat", rank)
            counts[rank] = int(store.get(key)) if store.check([key]) else 0
        ended: dict[int, str] = {}
        ended_count = int(store.add(f"{self.prefix}/ended", 0))
        if ended_count != self._ended_count:  # some rank ended since the last look: which
            self._ended_count = ended_count
            for rank in self.others:
                key = self._key("end", rank)
                if rank not in self._ended_at and store.check([key]):
                    ended[rank] = store.get(key).decode()
        return counts, ended

    def _run(self) -> None:
        # its own client: the main thread's may wait in `agree` for minutes, holding that client's lock
        store = self._thread_store = self._store_factory()
        store_ok_at = time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            try:
                self._bump(store)
                counts, ended = self._read(store)
            except Exception:  # noqa: BLE001 - the store's host is unreachable (or frozen: the call timed out)
                if self._stop.is_set():
                    return
                if now - store_ok_at > self.timeout_s:
                    host = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
                    self._give_up(f"lost the launcher's store at {host} (kept by node 0's launcher) for "
                                  f"{now - store_ok_at:.0f} s: node 0 stopped (killed, frozen or cut off)", set())
                continue
            store_ok_at = now
            for rank, state in ended.items():
                self._ended_at[rank] = (state, now)
            found = self.verdict(counts, now)
            if found:
                self._give_up(*found)

    def verdict(self, counts: dict[int, int], now: float) -> tuple[str, set[int]] | None:
        """(the line that ends the run, the lost ranks), or None while every peer is alive, busy or done.
        `counts`: each peer's heartbeat counter as just read (0: never beat); records when each moved."""
        silent, never = [], []
        for rank in self.others:
            count, previous = counts.get(rank, 0), self._last.get(rank)
            if previous is None:  # silence of a peer never heard from counts from this rank's start
                self._last[rank] = (count, now if count else self.started_at)
            elif count != previous[0]:
                self._last[rank] = (count, now)
            if rank not in self._ended_at and now - self._last[rank][1] > self.timeout_s:
                (never if count == 0 else silent).append(rank)
        # a peer that failed says why itself, and its launcher stops its node: the rest wait well past the
        # grace in which it prints its line (on its own node the launcher stops them first)
        failed = [r for r, (state, at) in self._ended_at.items()
                  if state == "failed" and now - at > 3 * PEER_FAILURE_GRACE_S]
        terminated = [r for r, (state, at) in self._ended_at.items()
                      if state == TERMINATED and now - at > 3 * PEER_FAILURE_GRACE_S]
        setting = f"distributed.peer_timeout_s={self.timeout_s:g}"
        if silent:
            return (f"{describe([self._where(r) for r in silent])} stopped answering: no heartbeat for "
                    f"{self.timeout_s:g} s ({setting}; killed, frozen or cut off)"), set(silent + never)
        if never:
            return (f"{describe([self._where(r) for r in never])} never started: no heartbeat in "
                    f"{self.timeout_s:g} s since this rank started ({setting})"), set(never)
        if failed:
            return f"{describe([self._where(r) for r in failed])} stopped with an error (its own output says why)", set(failed)
        if terminated:
            return terminated_line(self._where(r) for r in terminated), set(terminated)
        return None

    def terminated_peers(self) -> list[Place]:
        """Peers that said they received SIGTERM."""
        return [self._where(r) for r, (state, _) in sorted(self._ended_at.items()) if state == TERMINATED]

    def others_ended(self, store: Any) -> dict[int, str]:
        """Every other rank that ended, with its end state (read now, from `store`)."""
        keys = {r: self._key("end", r) for r in self.others}
        return {r: store.get(key).decode() for r, key in keys.items() if store.check([key])}

    def suspects(self, silent_for_s: float) -> list[Place]:
        """Peers (not ended) whose heartbeat has not moved for `silent_for_s`: whom a lost connection lost."""
        now = time.monotonic()
        return [self._where(r) for r, (_, at) in sorted(self._last.items())
                if r not in self._ended_at and now - at >= silent_for_s]

    def _give_up(self, verdict: str, lost: set[int]) -> None:
        """End this process: the lowest surviving rank of this node says the verdict (one line per node);
        the others leave after the grace time, if their launcher has not stopped them already."""
        try:
            self._thread_store.set(self._key("end", self.place.rank), "lost-peer")
            self._thread_store.add(f"{self.prefix}/ended", 1)
        except Exception:  # noqa: BLE001 - best effort: the others find the lost peer themselves
            pass
        mates = [r for r in range(self.world_size) if r not in lost and r not in self._ended_at
                 and self._where(r).node == self.place.node]
        if not mates or min(mates) == self.place.rank:
            report(verdict)
        else:
            time.sleep(PEER_FAILURE_GRACE_S)
        self._exit(EXIT_PEER_LOST)


_REPORTED = threading.Lock()
_reported = False


def report(reason: str) -> bool:
    """Print `sgsd: error (rank R): <reason>; ...` once per process (the heartbeat thread and the main
    thread may both find the loss); False when a line was printed already."""
    global _reported
    with _REPORTED:
        if _reported:
            return False
        _reported = True
    rank = os.environ.get("RANK", "0")
    print(f"sgsd: error (rank {rank}): {reason}; the run stops here (the same command on every node resumes it "
          "from the last complete checkpoint)", file=sys.stderr, flush=True)
    return True


# -- the watch of this process -------------------------------------------------------------------------

_active: PeerWatch | None = None  # one per process, as the process group is


def active_watch() -> PeerWatch | None:
    return _active


def launcher_store(timeout_s: float) -> Callable[[], Any] | None:
    """A function connecting a client to torch elastic's agent store (torchrun, `accelerate launch`), or
    None when the launch has none. `timeout_s` bounds every call: a frozen store host raises after it."""
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not address or not port:
        return None

    def connect() -> Any:
        import torch.distributed as dist

        return dist.TCPStore(address, int(port), is_master=False, timeout=timedelta(seconds=timeout_s),
                             wait_for_workers=False)

    return connect


@contextmanager
def watching_peers(timeout_s: float) -> Iterator[PeerWatch | None]:
    """Run the body with this rank's `PeerWatch` (None in one process or without the launcher's store).
    A normal end tells the others this rank is done; an error of its own, that it failed (they stop
    watching it; its own line says why); a lost peer keeps the watch running until the process ends,
    so that the line about the loss can name whom it lost (`loss_report`)."""
    global _active

    world = launched_world_size()
    connect = launcher_store(max(timeout_s, 30.0)) if world > 1 else None
    if connect is None:
        yield None
        return
    watch = _active = PeerWatch(connect, world_size=world, timeout_s=timeout_s).start()
    try:
        yield watch
    except BaseException as err:
        if not (isinstance(err, Exception) and is_peer_loss(err)):
            watch.stop("failed")
        raise
    watch.stop("left")


def loss_report() -> str | None:
    """After this rank lost a connection to a peer (and waited `PEER_FAILURE_GRACE_S`): the line naming
    the peers whose heartbeat stopped, None when none did (a peer that failed with its own error)."""
    watch = _active
    if watch is None:
        return None
    terminated = watch.terminated_peers()
    if terminated:
        return terminated_line(terminated)
    lost = watch.suspects(silent_for_s=min(PEER_FAILURE_GRACE_S / 2, 3 * watch.interval_s))
    if not lost:
        return None
    return f"{describe(lost)} stopped answering (its heartbeat stopped: killed, frozen or cut off)"


def report_loss() -> None:
    """After a lost connection to a peer and the grace time: the line naming whom (or saying that another
    process stopped with an error of its own)."""
    report(loss_report() or "another process of the run stopped (its error says why)")


def node_count() -> int:
    """How many nodes took part: the distinct nodes the ranks reported at the start check, else the
    launcher's node count (GROUP_WORLD_SIZE), else 1."""
    watch = _active
    if watch is not None and len(watch.places) == watch.world_size:
        return watch.node_count()
    return _env_int("GROUP_WORLD_SIZE", 1)


# -- SIGTERM: one line, the peers told ---------------------------------------------------------------------

def terminated_line(places: Iterable[Place]) -> str:
    return (f"{describe(list(places))} was terminated (SIGTERM: a scheduler's preemption, a `kill`, or its "
            "launcher passing one on)")


def _on_sigterm() -> None:
    """This process received SIGTERM: one line (unless another rank ended first: then this SIGTERM is its
    launcher stopping the rest, and that rank's line says why), the others told, then the exit."""
    watch, first = _active, True
    if watch is not None:
        try:
            store = watch._store_factory()
            first = all(state == "left" for state in watch.others_ended(store).values())
            store.set(watch._key("end", watch.place.rank), TERMINATED)
            store.add(f"{watch.prefix}/ended", 1)
        except Exception:  # noqa: BLE001 - the store's host is gone too: say it ourselves
            pass
    if first:
        report(terminated_line([watch.place if watch is not None else this_place()]))
    sys.stderr.flush()
    os._exit(EXIT_TERMINATED)


def _sigterm_waiter(receiver: socket.socket) -> None:
    while True:
        try:
            data = receiver.recv(64)
        except OSError:
            return
        if not data:  # closed
            return
        if signal.SIGTERM in data:  # the wakeup fd carries every handled signal's number: only SIGTERM is ours
            _on_sigterm()
        if b"\0" in data:  # `reporting_termination` ended (no signal has the number 0), maybe after another signal
            return


_at_fork_registered = False
_reporting = False  # inside `reporting_termination`


def _forget_in_child() -> None:
    """A forked child (a data-loader worker) keeps the default SIGTERM: its parent's pipe is not its own."""
    if not _reporting:
        return
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except (ValueError, OSError):  # forked from a thread other than the main one: nothing was inherited there
        pass


@contextmanager
def reporting_termination() -> Iterator[None]:
    """In the body, SIGTERM ends this process with one line (`_on_sigterm`), whatever the main thread is
    doing. Only from the main thread (signal handlers belong to it); elsewhere the body runs as is."""
    global _at_fork_registered, _reporting
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    receiver, sender = socket.socketpair()
    sender.setblocking(False)
    try:
        previous_fd = signal.set_wakeup_fd(sender.fileno(), warn_on_full_buffer=False)
    except ValueError:  # not the main interpreter
        receiver.close(), sender.close()
        yield
        return
    # the interpreter's C handler writes the signal's number to `sender`; the Python-level handler (run
    # by the main thread whenever it returns to Python) has nothing left to do
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    if not _at_fork_registered:
        os.register_at_fork(after_in_child=_forget_in_child)
        _at_fork_registered = True
    waiter = threading.Thread(target=_sigterm_waiter, args=(receiver,), name="sgsd-sigterm", daemon=True)
    waiter.start()
    _reporting = True
    try:
        yield
    finally:
        _reporting = False
        signal.signal(signal.SIGTERM, previous)
        signal.set_wakeup_fd(previous_fd)
        try:
            sender.send(b"\0")
        except OSError:
            pass
        waiter.join(timeout=5)
        receiver.close(), sender.close()
