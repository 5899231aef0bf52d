"""Watch the live kernel's IRQ bypass events: probes in, records through the tracker, probes out.

Used by ``harness trace`` and by runs with assigned devices.  The probes are removed on every
exit path (KprobeSession is a context manager); reading ``trace_pipe`` waits on the file with
select, so a deadline or Ctrl-C ends the watch promptly.
"""

from __future__ import annotations

import os
import platform
import select
import time
from collections.abc import Callable
from pathlib import Path

from harness.bypass.tracker import GROUP, TRACEPOINTS, BypassTracker, probe_specs
from harness.host.tracefs import KprobeSession, TraceRecord, parse_trace_line


def bypass_session(release: str | None = None, tracefs: Path | None = None) -> KprobeSession:
    """The bypass probes under a group and instance named for this process, so that harness
    runs side by side on one host keep their probes and records apart."""
    name = f"{GROUP}_{os.getpid()}"
    return KprobeSession(name, probe_specs(release or platform.release()), TRACEPOINTS,
                         tracefs, instance=name)


def describe(record: TraceRecord) -> str:
    """One human line per bypass event."""
    what = {
        "prod": "register producer", "prod_ret": "  -> producer registration returned",
        "cons": "register consumer", "cons_ret": "  -> consumer registration returned",
        "unprod": "unregister producer", "uncons": "unregister consumer",
        "connect": "  KVM add_producer (connect)", "connect_ret": "  -> add_producer returned",
        "disconnect": "  KVM del_producer (disconnect)", "kvm_irqfd": "KVM_IRQFD",
        "fwd": "    KVM GICv4 set_forwarding", "fwd_ret": "    -> set_forwarding returned",
        "unfwd": "    KVM GICv4 unset_forwarding",
        "mapvlpi": "      its_map_vlpi (map as a vLPI)",
        "mapvlpi_ret": "      -> its_map_vlpi returned", "unmapvlpi": "      its_unmap_vlpi",
    }.get(record.event, record.event)
    fields = " ".join(f"{k}={v}" for k, v in record.fields) or record.body
    return f"{record.timestamp:14.6f} {record.task}-{record.pid:<7} {what} {fields}"


def watch(session: KprobeSession, tracker: BypassTracker, until: float | None,
          on_record: Callable[[TraceRecord], None] = lambda r: None,
          should_stop: Callable[[], bool] = lambda: False) -> None:
    """Feed records from trace_pipe to the tracker until the monotonic deadline or stop."""
    fd = os.open(session.tracefs / "instances" / session.instance / "trace_pipe",
                 os.O_RDONLY | os.O_NONBLOCK)
    partial = b""
    try:
        while not should_stop():
            timeout = 0.2 if until is None else min(0.2, until - time.monotonic())
            if timeout <= 0:
                break
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            *lines, partial = (partial + chunk).split(b"\n")
            for raw in lines:
                record = parse_trace_line(raw.decode(errors="replace"))
                if record is not None:
                    tracker.feed_one(record)
                    on_record(record)
    finally:
        os.close(fd)
