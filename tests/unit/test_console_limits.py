"""The serial console keeps a bounded window of lines in memory, the log file everything.

Against a fake peer over a real ``socket.socketpair()``, as in test_console_qmp.py.  The
follower pattern is the lab's progress relay (harness/lab/l1.py): it must neither miss nor
repeat a line when the window has moved on between two looks.
"""

from __future__ import annotations

import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.errors import GuestError
from harness.qemu.console import Console


@pytest.fixture
def small(tmp_path: Path) -> Iterator[tuple[Console, socket.socket, Path]]:
    ours, peer = socket.socketpair()
    log = tmp_path / "guest0.console.log"
    console = Console("guest0", ours, log, tail_lines=5, keep_lines=100, keep_bytes=4096,
                      max_line_bytes=1024)
    try:
        yield console, peer, log
    finally:
        console.close()
        peer.close()


def _drained(console: Console, count: int) -> None:
    deadline = time.monotonic() + 10
    while console.line_count < count:
        assert time.monotonic() < deadline, f"only {console.line_count} of {count} lines"
        time.sleep(0.01)


def test_memory_keeps_the_latest_lines_the_log_all(
        small: tuple[Console, socket.socket, Path]) -> None:
    console, peer, log = small
    raw = b"".join(b"line %d\r\n" % n for n in range(5000))
    peer.sendall(raw)
    _drained(console, 5000)
    kept = console.lines()
    assert len(kept) == 100
    assert [ln.number for ln in kept] == list(range(4900, 5000))
    assert kept[-1].text == "line 4999" and console.line_count == 5000
    assert console.tail().splitlines() == [f"line {n}" for n in range(4995, 5000)]
    console.close()
    assert log.read_bytes() == raw


def test_the_byte_bound_holds_with_long_lines(
        small: tuple[Console, socket.socket, Path]) -> None:
    console, peer, _ = small
    peer.sendall(b"".join(b"%04d" % n + b"x" * 996 + b"\n" for n in range(50)))  # 1000 B each
    _drained(console, 50)
    kept = console.lines()
    assert sum(len(ln.text) for ln in kept) <= 4096
    assert [ln.text[:4] for ln in kept] == ["0046", "0047", "0048", "0049"]


def test_a_line_without_an_end_is_cut_not_grown(
        small: tuple[Console, socket.socket, Path]) -> None:
    """A guest that prints a megabyte without a newline cannot grow the reader's buffer."""
    console, peer, log = small
    peer.sendall(b"z" * 10_000 + b"\nafter\n")
    console.wait_for("^after$", 5)
    texts = [ln.text for ln in console.lines()]
    assert console.line_count == 11  # cut every 1024 bytes: 9 full pieces, the rest, "after"
    assert texts[-1] == "after" and texts[-2] == "z" * (10_000 - 9 * 1024)
    assert all(len(t) <= 1024 for t in texts) and sum(map(len, texts)) <= 4096
    console.close()
    assert log.read_bytes() == b"z" * 10_000 + b"\nafter\n"


def test_wait_for_finds_a_new_line_after_the_window_moved(
        small: tuple[Console, socket.socket, Path]) -> None:
    console, peer, _ = small
    peer.sendall(b"".join(b"noise %d\n" % n for n in range(1000)))
    threading.Timer(0.2, peer.sendall, (b"harness-init: ready\n",)).start()
    assert console.wait_for(r"^harness-init: (\w+)", 5).group(1) == "ready"


def test_a_panic_is_still_seen_behind_a_flood(
        small: tuple[Console, socket.socket, Path]) -> None:
    console, peer, _ = small
    peer.sendall(b"".join(b"noise %d\n" % n for n in range(1000))
                 + b"Kernel panic - not syncing: Attempted to kill init!\n")
    with pytest.raises(GuestError, match="Kernel panic"):
        console.wait_for("never", 5)


def test_a_follower_sees_every_line_once_as_the_window_moves(
        small: tuple[Console, socket.socket, Path]) -> None:
    """The lab's relay: ``lines(since=seen)`` and the last number seen, 30 lines at a time
    while the window holds 100 and the sender is far ahead at times."""
    console, peer, _ = small
    seen = 0
    relayed: list[int] = []

    def send() -> None:
        for n in range(3000):
            peer.sendall(b"[%05d] progress\n" % n)
            if n % 500 == 0:
                time.sleep(0.05)

    sender = threading.Thread(target=send)
    sender.start()
    while len(relayed) < 3000 and (sender.is_alive() or console.line_count > seen):
        new = console.lines(since=seen)
        for line in new[:30]:
            relayed.append(line.number)
        if new:
            seen = new[min(len(new), 30) - 1].number + 1
        time.sleep(0.001)
    sender.join()
    # Lines that left the window before a look are gone from memory (the log has them); no
    # line is relayed twice and the order holds.
    assert relayed == sorted(set(relayed)) and relayed[-1] == 2999


def test_a_follower_that_keeps_up_misses_nothing(
        small: tuple[Console, socket.socket, Path]) -> None:
    console, peer, _ = small
    seen = 0
    relayed: list[str] = []
    for batch in range(40):
        peer.sendall(b"".join(b"[%05d]\n" % (batch * 50 + n) for n in range(50)))
        _drained(console, (batch + 1) * 50)
        new = console.lines(since=seen)
        relayed += [ln.text for ln in new]
        seen = new[-1].number + 1 if new else seen
    assert relayed == [f"[{n:05d}]" for n in range(2000)]


def test_memory_stays_bounded_under_a_console_flood(tmp_path: Path) -> None:
    ours, peer = socket.socketpair()
    tracemalloc.start()
    try:
        console = Console("guest0", ours, tmp_path / "c.log")  # the defaults
        line = b"[ 12.345678] virtio_net virtio0 eth0: some driver message, again\n"
        chunk = line * 1000
        for _ in range(300):  # 20 MB, 300,000 lines
            peer.sendall(chunk)
        _drained(console, 300_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        console.close()
        peer.close()
    assert len(console.lines()) == 10_000
    assert peak < 12 << 20, f"peak {peak} bytes"
    assert (tmp_path / "c.log").stat().st_size == 300 * len(chunk)
