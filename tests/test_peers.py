"""The heartbeat watch and the start check (`sgsd.peers`) in one process, over a real TCPStore on 127.0.0.1:
each `PeerWatch` plays one rank. The launches of two nodes are in tests/test_multinode.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from datetime import timedelta

import pytest
import torch.distributed as dist

from sgsd import peers
from sgsd.config import load_config
from sgsd.errors import ConfigError, UserError
from sgsd.peers import PEER_FAILURE_GRACE_S, PeerWatch, Place, describe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def store():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))

    def connect():
        return dist.TCPStore("127.0.0.1", server.port, is_master=False, wait_for_workers=False,
                             timeout=timedelta(seconds=10))

    yield connect


@pytest.fixture(autouse=True)
def fresh_report(monkeypatch):
    monkeypatch.setattr(peers, "_reported", False)


def _watch(connect, rank: int, *, world: int = 2, timeout: float = 60.0, **kwargs) -> PeerWatch:
    return PeerWatch(connect, world_size=world, timeout_s=timeout, place=Place(rank, rank, f"host{rank}"), **kwargs)


def test_describe_names_ranks_by_node():
    assert describe([Place(1, 1, "gpu-7")]) == "rank 1 (node 1, host gpu-7)"
    assert describe([Place(5, 1, "b"), Place(4, 1, "b"), Place(0, 0)]) == "rank 0 (node 0); ranks 4, 5 (node 1, host b)"


def test_verdict_tells_a_busy_peer_from_a_silent_one_and_one_that_never_started(store):
    watch = _watch(store, 0, world=3, timeout=10.0)
    start = watch.started_at
    # rank 1 beats (a busy rank's thread keeps beating), rank 2 never does
    assert watch.verdict({1: 1, 2: 0}, start + 1) is None
    assert watch.verdict({1: 2, 2: 0}, start + 9) is None
    line, lost = watch.verdict({1: 3, 2: 0}, start + 10.5)
    assert lost == {2} and line.startswith("rank 2 (node 2) never started: no heartbeat in 10 s")
    # rank 1's counter stops at 3 (moved last at start + 10.5): silent after the timeout, not before
    assert watch.verdict({1: 3, 2: 1}, start + 20) is None
    line, lost = watch.verdict({1: 3, 2: 2}, start + 21)
    assert lost == {1} and line.startswith("rank 1 (node 1) stopped answering: no heartbeat for 10 s "
                                           "(distributed.peer_timeout_s=10; killed, frozen or cut off)")


def test_verdict_ignores_peers_that_left_and_names_one_that_failed_after_its_grace(store):
    watch = _watch(store, 0, world=3, timeout=10.0)
    start = watch.started_at
    watch.verdict({1: 1, 2: 1}, start)
    watch._ended_at = {1: ("left", start + 1), 2: ("failed", start + 1)}
    assert watch.verdict({1: 1, 2: 1}, start + 3 * PEER_FAILURE_GRACE_S) is None  # rank 2 still gets to say why
    line, lost = watch.verdict({1: 1, 2: 1}, start + 1 + 3 * PEER_FAILURE_GRACE_S + 0.1)
    assert lost == {2} and line == "rank 2 (node 2) stopped with an error (its own output says why)"


def test_agree_passes_identical_ranks_and_refuses_one_that_differs_on_every_rank(store):
    parts = {"config": "a", "code": "1", "data": "d"}
    watches = [_watch(store, r, timeout=0).start() for r in (0, 1)]
    errors: list[BaseException | None] = [None, None]

    def agree(rank, given):
        try:
            watches[rank].agree(given)
        except UserError as err:
            errors[rank] = err

    threads = [threading.Thread(target=agree, args=(r, parts)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert errors == [None, None] and watches[0].node_count() == 2

    other = [_watch(store, r, timeout=0, prefix="second") for r in (0, 1)]
    watches[:] = [w.start() for w in other]
    threads = [threading.Thread(target=agree, args=(r, p)) for r, p in ((0, parts), (1, {**parts, "config": "b", "code": "2"}))]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert str(errors[0]) == str(errors[1]) == ("rank 1 (node 1, host host1) started with another code, config than rank 0 "
                                                "(node 0, host host0); start every node with the same command, code and inputs")


def test_a_frozen_peer_ends_the_watching_rank_with_one_line_and_a_busy_one_does_not(store, capsys):
    exits: list[int] = []
    done = threading.Event()

    def exit_(code):
        exits.append(code)
        done.set()

    timeout = 0.6
    survivor = _watch(store, 0, timeout=timeout, interval_s=0.05, exit=exit_).start()
    peer = _watch(store, 1, timeout=timeout, interval_s=0.05, exit=lambda code: None).start()
    time.sleep(4 * timeout)  # both beat: nothing happens however long the main threads are busy
    assert exits == []
    peer._stop.set()  # the peer's heartbeat stops as a frozen process's does (no end state written)
    frozen_at = time.monotonic()
    assert done.wait(10)
    # the timeout counts from the peer's last beat the survivor saw, up to one interval (0.05 s) before the
    # freeze; the verdict comes at the survivor's next read, an interval later, plus store round trips and
    # this machine's load (2 cores shared)
    assert timeout - 0.05 <= time.monotonic() - frozen_at < timeout + 2.0
    survivor._stop.set()
    assert exits == [1]
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sgsd: error (rank 0): rank 1 (node 1, host host1) stopped answering")


def test_a_peer_that_left_is_not_watched(store):
    exits: list[int] = []
    survivor = _watch(store, 0, timeout=0.5, interval_s=0.05, exit=exits.append).start()
    peer = _watch(store, 1, timeout=0.5, interval_s=0.05).start()
    peer.stop("left")
    time.sleep(2.0)
    survivor.stop("left")
    assert exits == []


def test_peer_timeout_setting_is_checked_when_the_config_is_built():
    assert load_config(None, ["distributed.peer_timeout_s=0"]).distributed.peer_timeout_s == 0
    for bad in ("0.5", "-3", "1e9", "nan", "inf"):
        with pytest.raises(ConfigError, match=r"distributed\.peer_timeout_s\S*:( \S+:)? (must be a finite number in \[0, 86400\]|expected 0 \(off\) or at least 1 second|expected a number)"):
            load_config(None, [f"distributed.peer_timeout_s={bad}"])


def test_fault_injection_signals_are_parsed_and_checked(monkeypatch):
    from sgsd.trainers.callbacks import FaultInjection

    monkeypatch.setenv(FaultInjection.ENV, "rank=1,step=3,signal=STOP")
    fault = FaultInjection.from_env()
    assert (fault.rank, fault.step, fault.signal) == (1, 3, "STOP")
    for bad in ("rank=1,step=3,signal=TERM", "rank=1,save_delay=2,signal=KILL"):
        monkeypatch.setenv(FaultInjection.ENV, bad)
        with pytest.raises(ConfigError, match="signal=KILL|STOP"):
            FaultInjection.from_env()


def test_verdict_and_loss_report_name_a_peer_that_was_terminated(store, monkeypatch):
    watch = _watch(store, 0, world=2, timeout=10.0)
    start = watch.started_at
    watch.verdict({1: 1}, start)
    watch._ended_at = {1: (peers.TERMINATED, start + 1)}
    assert watch.verdict({1: 1}, start + 3 * PEER_FAILURE_GRACE_S) is None  # the main thread's report comes first
    line, lost = watch.verdict({1: 1}, start + 1 + 3 * PEER_FAILURE_GRACE_S + 0.1)
    assert lost == {1} and line.startswith("rank 1 (node 1) was terminated (SIGTERM")
    monkeypatch.setattr(peers, "_active", watch)
    assert peers.loss_report() == line


def _rank(rank: int, port: int, out, **env) -> subprocess.Popen:
    environment = {**os.environ, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "GROUP_RANK": str(rank),
                   "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "TORCHELASTIC_USE_AGENT_STORE": "True", "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "sigterm_worker.py"), str(out)], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _sgsd_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("sgsd: ")]


def test_the_sigterm_waiter_reads_other_signals_and_its_end_in_one_read(monkeypatch):
    """The wakeup fd carries every handled signal's number: another signal arriving with the end marker in
    one read must end the waiter (not leave it blocked), and must not count as SIGTERM."""
    import socket

    called = []
    monkeypatch.setattr(peers, "_on_sigterm", lambda: called.append(True))
    receiver, sender = socket.socketpair()
    waiter = threading.Thread(target=peers._sigterm_waiter, args=(receiver,), daemon=True)
    waiter.start()
    sender.send(bytes([signal.SIGINT, 0]))
    waiter.join(timeout=5)  # a read that returns at once; 5 s is only the bound of a failing run
    assert not waiter.is_alive() and called == []
    receiver.close(), sender.close()


@pytest.mark.parametrize("then", ["the peer names it", "the launcher stops the peer"])
def test_sigterm_inside_a_collective_says_so_in_one_line_and_the_peer_names_it(tmp_path, then):
    # two ranks, one per simulated node, joined through a store this test keeps (as node 0's launcher keeps
    # torchrun's), each waiting in a receive that never completes; rank 1 gets SIGTERM there
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    ranks = [_rank(r, server.port, tmp_path) for r in (0, 1)]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-rank{r}").exists() for r in (0, 1)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in ranks), ranks[0].communicate()[0]
            time.sleep(0.05)
        time.sleep(0.5)  # into the receive
        ranks[1].send_signal(signal.SIGTERM)
        lines = _sgsd_lines(ranks[1].communicate(timeout=60)[0])
        assert ranks[1].returncode == 128 + signal.SIGTERM
        assert len(lines) == 1 and re.match(r"sgsd: error \(rank 1\): rank 1 \(node 1, host [^)]+\) was terminated "
                                            r"\(SIGTERM.*; the run stops here \(the same command on every node resumes "
                                            r"it from the last complete checkpoint\)$", lines[0]), lines
        if then == "the launcher stops the peer":  # as torchrun does with the rest of a node: no second line
            ranks[0].send_signal(signal.SIGTERM)
            assert _sgsd_lines(ranks[0].communicate(timeout=60)[0]) == [] and ranks[0].returncode == 143
        else:  # its receive fails; after the grace it names rank 1 and why
            lines = _sgsd_lines(ranks[0].communicate(timeout=60)[0])
            assert ranks[0].returncode == 1
            assert len(lines) == 1 and re.match(r"sgsd: error \(rank 0\): rank 1 \(node 1, host [^)]+\) was "
                                                r"terminated \(SIGTERM", lines[0]), lines
    finally:
        for process in ranks:
            process.kill()
            process.wait()
