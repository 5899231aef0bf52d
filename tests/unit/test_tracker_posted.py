"""The tracker's posted-interrupt path: ``kvm:kvm_pi_irte_update`` in every kernel era's format.

READ THIS FIRST.  We found no recorded ``kvm_pi_irte_update`` output of a real host in any
public source we could reach (tests/data/trace/README.md lists what was searched).  So
every ``kvm_pi_irte_update`` line in this module is RENDERED here, not recorded.  Some
inputs are real and some are rendered:

REAL, used unchanged:
  * tests/data/lab/irqfd/trace.txt and no-kvm-msix/trace.txt.  These are the 6.1 lab
    kernel's registration, connect, teardown, ``avic_pi`` kprobe, ``irq_handler_entry`` and
    ``kvm_msi_set_irq`` records.  No line is edited, removed or renumbered.
  * The lab's host /proc/interrupts samples and the L2 guest's counts.
  * The posted host's ``vfio-msix[N](0000:c8:00.0)`` rows, which are all 0:
    tests/data/interrupts/x86-intel-host-vfio-posted-c8-excerpt.txt.
  * The kernel's ``TP_printk`` formats:
    - tests/data/trace/kvm_pi_irte_update-formats.txt, kernel source text;
    - tests/data/lab/formats/kvm-kvm_pi_irte_update.txt, the lab kernel's own
      ``print fmt``.

RENDERED, not recorded:
  * Each ``kvm_pi_irte_update`` line.  It is a verbatim kernel format applied to these
    values:
    - host irq and GSI: from the real ``avic_pi ... set=1`` kprobe record that the line
      follows.  Those records are at irqfd/trace.txt lines 622, 655 and 708 (irq 30) and
      662 and 687 (irq 31).
    - guest vector: from the real ``kvm_msi_set_irq`` record that follows that irq's
      ``irq_handler_entry``: 39 (0x27) for irq 30, 40 (0x28) for irq 31.
    - vCPU: 0, because L2 ran with ``-smp 1``.
    - ``pi_desc_addr``: 0.  The real value is unknown; the tracker ignores the field.
  * Placement and prefix: each line carries the real ``avic_pi`` record's
    task-pid/cpu/flags/timestamp prefix.  It is inserted right after that record, where
    ``avic_pi_update_irte`` on a posting 6.1 host would have traced it.
  * Irq 29 (virtio config) never fired in the run, so its guest vector is unknown.  Its
    ``set=1`` sites (lines 594, 615, 648) get no line.
  * Where a test adds a "disabled" line, its docstring says where.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.bypass.tracker import BypassTracker, PostedState, VectorWiring
from harness.config.model import DeliveryPath
from harness.host.tracefs import TraceRecord, parse_trace, parse_trace_line
from harness.interrupts import InterruptSnapshot, parse_proc_interrupts
from harness.verdict import classify

DATA = Path(__file__).resolve().parents[1] / "data"
LAB = DATA / "lab"
FORMATS = DATA / "trace" / "kvm_pi_irte_update-formats.txt"
LAB_FORMAT = LAB / "formats" / "kvm-kvm_pi_irte_update.txt"
POSTED_HOST = DATA / "interrupts" / "x86-intel-host-vfio-posted-c8-excerpt.txt"
BDF = "0000:00:05.0"
POSTED_BDF = "0000:c8:00.0"
LAB_VCPU = 0  # L2 ran -smp 1
UNKNOWN_PI_DESC_ADDR = 0


# --- the kernel's formats ------------------------------------------------------------------


@dataclass(frozen=True)
class PrintkFormat:
    """One ``TP_printk``: the C format, the ``__entry`` fields in order, the ``set`` words."""

    era: str
    fmt: str
    args: tuple[str, ...]
    states: tuple[str, str]  # (set, not set)

    def render(self, *, enabled: bool, host_irq: int, vcpu: int, gsi: int, gvec: int) -> str:
        values: dict[str, str | int] = {
            "set": self.states[0] if enabled else self.states[1], "host_irq": host_irq,
            "vcpu_id": vcpu, "gsi": gsi, "gvec": gvec, "pi_desc_addr": UNKNOWN_PI_DESC_ADDR}
        python_fmt = self.fmt.replace("%llx", "%x").replace("%u", "%d")
        return python_fmt % tuple(values[a] for a in self.args)


_LITERAL = re.compile(r'"((?:[^"\\]|\\.)*)"')
_ENTRY = re.compile(r"(?:__entry|REC)->(\w+)")
_TERNARY = re.compile(r'(?:__entry|REC)->set \? "([^"]*)" : "([^"]*)"')


def _parse_printk(era: str, text: str) -> PrintkFormat:
    first = _ENTRY.search(text)
    ternary = _TERNARY.search(text)
    assert first is not None and ternary is not None, text
    fmt = "".join(_LITERAL.findall(text[:first.start()]))
    args = tuple(_ENTRY.findall(text[first.start():]))
    assert fmt.count("%") == len(args), (era, fmt, args)
    return PrintkFormat(era, fmt, args, (ternary[1], ternary[2]))


def kernel_formats() -> dict[str, PrintkFormat]:
    """The verbatim formats by era, and the lab 6.1 kernel's own ``print fmt`` as "6.1-lab"."""
    out = {}
    for block in re.split(r"^== ", FORMATS.read_text(), flags=re.M)[1:]:
        head, _source, printk = block.split("\n", 2)
        era = head.split(":", 1)[0]
        out[era] = _parse_printk(era, printk)
    (fmt_line,) = [ln for ln in LAB_FORMAT.read_text().splitlines()
                   if ln.startswith("print fmt: ")]
    out["6.1-lab"] = _parse_printk("6.1-lab", fmt_line)
    return out


FORMAT = kernel_formats()


# --- facts taken from the real lab trace -----------------------------------------------------


def _int(record: TraceRecord, key: str) -> int:
    value = record.int(key)
    assert value is not None, (key, record)
    return value


@dataclass(frozen=True)
class AvicPiSite:
    """A real ``avic_pi`` kprobe record: KVM updating one IRTE (connect: set=1)."""

    index: int  # 0-based line index in trace.txt
    host_irq: int
    gsi: int
    set: bool
    prefix: str  # "  qemu-system-x86-297     [000] d..1.    35.125304:"


def lab_lines(run: str) -> list[str]:
    return (LAB / run / "trace.txt").read_text().splitlines()


def avic_pi_sites(lines: list[str]) -> list[AvicPiSite]:
    sites = []
    for index, line in enumerate(lines):
        record = parse_trace_line(line)
        if record is not None and record.event == "avic_pi":
            prefix = line.split(" avic_pi: ", 1)[0]
            sites.append(AvicPiSite(index, _int(record, "host_irq"), _int(record, "gsi"),
                                    _int(record, "set") == 1, prefix))
    return sites


def guest_vectors(lines: list[str]) -> dict[int, int]:
    """Host irq -> the guest vector KVM injected from its vfio handler (irqfd run, hardirq)."""
    seen: dict[int, set[int]] = {}
    running: dict[int, int] = {}  # cpu -> host irq whose handler just started there
    for record in parse_trace(lines):
        if record.event == "irq_handler_entry":
            running[record.cpu] = _int(record, "irq")
        elif record.event == "kvm_msi_set_irq" and record.cpu in running:
            vec = re.search(r"\bvec (\d+)", record.body)
            assert vec is not None, record
            seen.setdefault(running.pop(record.cpu), set()).add(int(vec[1]))
    assert all(len(v) == 1 for v in seen.values()), seen
    return {irq: min(v) for irq, v in seen.items()}


IRQFD = lab_lines("irqfd")
SITES = avic_pi_sites(IRQFD)
VECTORS = guest_vectors(IRQFD)


def pi_line(fmt: PrintkFormat, site: AvicPiSite, *, enabled: bool, vcpu: int = LAB_VCPU) -> str:
    body = fmt.render(enabled=enabled, host_irq=site.host_irq, vcpu=vcpu, gsi=site.gsi,
                      gvec=VECTORS[site.host_irq])
    return f"{site.prefix} kvm_pi_irte_update: {body}"


def with_pi_lines(lines: list[str], fmt: PrintkFormat, *, teardowns: bool = False,
                  extra: dict[int, list[str]] | None = None,
                  only: set[int] | None = None) -> list[str]:
    """The real lines with a rendered ``kvm_pi_irte_update`` after each ``avic_pi set=1``.

    ``teardowns`` also renders a "disabled" line after each ``set=0`` (what 6.1 VMX traces
    on teardown; 6.1 AVIC does not).  ``extra`` inserts more lines after a line index.
    ``only`` limits the rendering to the ``avic_pi`` records at these 1-based line numbers.
    """
    by_index = {s.index: s for s in avic_pi_sites(lines)
                if s.host_irq in VECTORS and (only is None or s.index + 1 in only)}
    out = []
    for index, line in enumerate(lines):
        out.append(line)
        site = by_index.get(index)
        if site is not None and (site.set or teardowns):
            out.append(pi_line(fmt, site, enabled=site.set))
        out.extend((extra or {}).get(index, []))
    return out


def last_sample_with_msix(run: str) -> tuple[float, InterruptSnapshot]:
    """The last host /proc/interrupts sample taken while L2 ran (vfio-msix lines present)."""
    text = (LAB / run / "l1-interrupts-during.txt").read_text()
    parts = re.split(r"^# sample \d+ t=([\d.]+)\n", text, flags=re.M)[1:]
    samples = [(float(t), parse_proc_interrupts(body, f"{run}:{t}"))
               for t, body in zip(parts[0::2], parts[1::2], strict=True)]
    return [(t, s) for t, s in samples
            if any(a.startswith("vfio-msix") for ln in s.lines for a in ln.actions)][-1]


def replay(lines: list[str], run: str = "irqfd",
           whole: bool = False) -> tuple[BypassTracker, dict[int, VectorWiring]]:
    """Feed the records up to the last sample (or all of them); wiring at that sample."""
    t, snapshot = last_sample_with_msix(run)
    tracker = BypassTracker()
    tracker.feed(r for r in parse_trace(lines) if whole or r.timestamp <= t)
    return tracker, {w.entry: w for w in tracker.wiring(snapshot) if w.bdf == BDF}


# --- the real inputs are what the docstring says ---------------------------------------------


def test_insertion_sites_and_values_come_from_the_real_lab_trace() -> None:
    posting_sites = [s for s in SITES if s.set and s.host_irq in VECTORS]
    assert [(s.index + 1, s.host_irq) for s in posting_sites] == [
        (622, 30), (655, 30), (662, 31), (687, 31), (708, 30)]
    assert [s.index + 1 for s in SITES if s.set and s.host_irq == 29] == [594, 615, 648]
    assert {s.host_irq: s.gsi for s in SITES} == {29: 2, 30: 24, 31: 25}
    assert VECTORS == {30: 39, 31: 40}  # irq 29 (config) never fired: no vector known
    assert all(s.index < len(IRQFD) and IRQFD[s.index].startswith(s.prefix) for s in SITES)
    # irq 30's real connects and disconnects, named in the docstrings below
    churn = [(i + 1, r.event) for i, ln in enumerate(IRQFD)
             if (r := parse_trace_line(ln)) is not None
             and r.event in ("connect", "disconnect") and r.int("irq") == 30]
    assert churn == [(621, "connect"), (639, "disconnect"), (654, "connect"),
                     (696, "disconnect"), (707, "connect"), (1538, "disconnect")]


def test_the_lab_kernel_prints_the_format_of_the_4_8_source() -> None:
    assert FORMAT["6.1-lab"].fmt == FORMAT["4.8-6.9"].fmt
    assert FORMAT["6.1-lab"].args == FORMAT["4.8-6.9"].args
    assert FORMAT["6.1-lab"].states == ("enabled and being updated", "disabled")


def test_rendered_6_1_line_is_the_kernels_format_with_lab_values() -> None:
    site = SITES[[s.index + 1 for s in SITES].index(708)]
    assert pi_line(FORMAT["6.1-lab"], site, enabled=True) == (
        " qemu-system-x86-297     [000] d..1.    36.061219: kvm_pi_irte_update: VT-d PI is "
        "enabled and being updated for irq 30, vcpu 0, gsi: 0x18, gvec: 0x27, "
        "pi_desc_addr: 0x0")


# --- one record of each era -> the PostedState of its host irq -------------------------------


ERAS_WITH_HOST_IRQ = ["4.8-6.9", "6.1-lab", "6.10-6.16", "6.17+"]


@pytest.mark.parametrize("enabled", [True, False], ids=["enabled", "disabled"])
@pytest.mark.parametrize("era", ERAS_WITH_HOST_IRQ)
def test_each_format_records_the_posted_state_of_its_host_irq(era: str, enabled: bool) -> None:
    site = next(s for s in SITES if s.index + 1 == 708)  # irq 30, GSI 24
    # 6.17+ traces every IRTE update; a "disabled" one has no vCPU and prints vcpu -1.
    vcpu = -1 if era == "6.17+" and not enabled else LAB_VCPU
    (record,) = parse_trace([pi_line(FORMAT[era], site, enabled=enabled, vcpu=vcpu)])
    assert record.event == "kvm_pi_irte_update" and record.task == "qemu-system-x86"
    tracker = BypassTracker()
    tracker.feed([record])
    assert tracker.posted == {30: PostedState(host_irq=30, enabled=enabled, vcpu=vcpu, gsi=24,
                                              guest_vector=39, timestamp=36.061219)}


def test_a_4_4_record_without_host_irq_is_resolved_through_the_irqfd_gsi() -> None:
    tracker, wiring = replay(with_pi_lines(IRQFD, FORMAT["4.4-4.7"]))
    assert tracker.counts["kvm_pi_irte_update"] == 5
    assert {irq: (p.enabled, p.gsi, p.guest_vector) for irq, p in tracker.posted.items()} == {
        30: (True, 24, 39), 31: (True, 25, 40)}
    assert wiring[1].posted and wiring[2].posted


# --- posted = producer connected AND the latest IRTE update is "enabled" ---------------------


def test_connected_vectors_with_an_enabled_irte_are_posted() -> None:
    tracker, wiring = replay(with_pi_lines(IRQFD, FORMAT["6.1-lab"]))
    assert tracker.anomalies == []  # the added lines do not disturb the bypass replay
    assert tracker.counts["kvm_pi_irte_update"] == 5
    for entry, irq, gsi, vec in ((1, 30, 24, 39), (2, 31, 25, 40)):
        w = wiring[entry]
        assert (w.host_irq, w.connected, w.posted) == (irq, True, True), w
        assert (w.vcpu, w.gsi, w.guest_vector) == (LAB_VCPU, gsi, vec)
        assert f"posted to vCPU 0 vector {vec:#x}" in w.describe()
        assert w.as_verdict_wiring().posted
    # irq 29 is connected too, but no IRTE update was traced for it: not posted.
    assert (wiring[0].host_irq, wiring[0].connected, wiring[0].posted) == (29, True, False)
    assert 29 not in tracker.posted and wiring[0].vcpu is None


def test_the_latest_irte_update_of_a_host_irq_wins() -> None:
    """Real teardown/reconnect churn: disable at each set=0, enable again at each set=1.

    Disabled lines follow the set=0 records at lines 640 and 697 (irq 30) and 676 (irq 31).
    Irq 30 is reconnected at line 708, irq 31 at line 687.
    """
    tracker, wiring = replay(with_pi_lines(IRQFD, FORMAT["6.1-lab"], teardowns=True))
    assert tracker.counts["kvm_pi_irte_update"] == 8  # 5 enabled + 3 disabled (640, 676, 697)
    assert wiring[1].posted and wiring[2].posted
    assert tracker.posted[30].timestamp == 36.061219  # line 708, after line 697's disable
    assert tracker.posted[31].timestamp == 36.056627  # line 687, after line 676's disable


def test_a_connected_vector_whose_latest_update_is_disabled_is_not_posted() -> None:
    """A "disabled" line for irq 30 is added after line 708's enabled one.

    This models an IRTE that went back to remapped mode while the irqfd stayed connected.
    The line uses the same 6.1 format.
    """
    site = next(s for s in SITES if s.index + 1 == 708)
    disabled = pi_line(FORMAT["6.1-lab"], site, enabled=False)
    tracker, wiring = replay(with_pi_lines(IRQFD, FORMAT["6.1-lab"],
                                           extra={site.index: [disabled]}))
    assert (wiring[1].connected, wiring[1].posted) == (True, False)
    assert wiring[1].vcpu is None and wiring[1].guest_vector is None
    assert wiring[1].describe().endswith("not posted")
    assert wiring[2].posted  # irq 31 is untouched
    assert tracker.posted[30].enabled is False


def test_an_enabled_irte_from_an_earlier_connection_does_not_make_a_reconnect_posted() -> None:
    """Only the first connects of irqs 30 and 31 (lines 622, 662) get an enabled line.

    The reconnects at lines 655/708 (irq 30) and 687 (irq 31) get none: that is what a
    6.1 AVIC host traces when those reconnects fall back to remapped mode.
    """
    tracker, wiring = replay(with_pi_lines(IRQFD, FORMAT["6.1-lab"], only={622, 662}))
    assert tracker.counts["kvm_pi_irte_update"] == 2
    assert wiring[1].connected and wiring[2].connected
    assert not wiring[1].posted and not wiring[2].posted


def test_an_enabled_irte_without_a_kvm_consumer_is_not_posted() -> None:
    """The no-kvm-msix run (QEMU relays MSI-X) with enabled lines for irqs 30 and 31.

    The lines are appended after the last record before the sample, with that record's
    prefix.  KVM never traces this itself: it checks the tracker's rule, not a kernel case.
    """
    lines = lab_lines("no-kvm-msix")
    t, _ = last_sample_with_msix("no-kvm-msix")
    last = max(i for i, ln in enumerate(lines)
               if (r := parse_trace_line(ln)) is not None and r.timestamp <= t)
    prefix = lines[last].split(": ", 1)[0] + ":"
    fmt = FORMAT["6.1-lab"]
    added = [f"{prefix} kvm_pi_irte_update: "
             + fmt.render(enabled=True, host_irq=irq, vcpu=LAB_VCPU, gsi=gsi, gvec=VECTORS[irq])
             for irq, gsi in ((30, 24), (31, 25))]
    tracker, wiring = replay(lines[:last + 1] + added + lines[last + 1:], run="no-kvm-msix")
    assert tracker.posted[30].enabled and tracker.posted[31].enabled
    for entry in (1, 2):
        w = wiring[entry]
        assert (w.producer, w.consumer, w.connected, w.posted) == (True, False, False, False)


def test_a_stale_enabled_irte_after_the_producer_is_gone_is_not_posted() -> None:
    """The whole irqfd run (L2 exited), checked against the last sample taken while L2 ran.

    On 6.1 AVIC the teardown is not traced, so the last update seen is still "enabled".
    """
    tracker, wiring = replay(with_pi_lines(IRQFD, FORMAT["6.1-lab"]), whole=True)
    assert tracker.counts["kvm_pi_irte_update"] == 5  # no "disabled" line was added
    assert tracker.manager.snapshot() == ()
    for w in wiring.values():
        assert (w.producer, w.connected, w.posted) == (False, False, False), w


# --- verdicts ----------------------------------------------------------------------------------


def guest_delta(name: str) -> int:
    """Real: the L2 guest's count for ``name`` over the ping (irqfd run)."""
    before = parse_proc_interrupts((LAB / "irqfd" / "l2-interrupts-before.txt").read_text())
    after = parse_proc_interrupts((LAB / "irqfd" / "l2-interrupts-after.txt").read_text())
    (row,) = [r for r in before.delta(after).rows if r.after and name in r.after.actions]
    return row.total


def posted_host_total(entry: int) -> int:
    """Real: a posting host's vfio-msix[entry] count (a counter read, so the delta is <= it)."""
    snapshot = parse_proc_interrupts(POSTED_HOST.read_text(), POSTED_HOST.name)
    (line,) = [ln for ln in snapshot.for_device(POSTED_BDF)
               if ln.vector is not None and ln.vector.entry == entry]
    return line.total


def lab_host_delta(entry: int) -> int:
    """Real: the lab host's vfio-msix[entry] delta while L2 ran (every IRQ bounced)."""
    text = (LAB / "irqfd" / "l1-interrupts-during.txt").read_text()
    parts = re.split(r"^# sample \d+ t=[\d.]+\n", text, flags=re.M)[1:]
    samples = [parse_proc_interrupts(p) for p in parts]
    with_msix = [s for s in samples
                 if any(a.startswith("vfio-msix") for ln in s.lines for a in ln.actions)]
    rows = [r for r in with_msix[0].delta(with_msix[-1]).for_device(BDF)
            if r.vector is not None and r.vector.entry == entry]
    return sum(r.total for r in rows)


@pytest.mark.parametrize(("entry", "name"), [(1, "virtio0-input.0"), (2, "virtio0-output.0")])
def test_posted_wiring_with_the_posted_hosts_zero_counts_is_posted(entry: int, name: str) -> None:
    """Rendered posted wiring, plus real counts from two hosts.

    The guest delta is the lab L2's real count.  The host delta comes from the real posted
    host (c8:00.0), whose counters stayed 0.
    """
    _, wiring = replay(with_pi_lines(IRQFD, FORMAT["6.1-lab"]))
    guest, host = guest_delta(name), posted_host_total(entry)
    assert guest >= 195 and host == 0
    verdict, reason = classify(False, guest, host, wiring[entry].as_verdict_wiring())
    assert verdict is DeliveryPath.POSTED, reason
    assert reason.startswith("IRTE posted and the host did not see the IRQs")


def test_posted_wiring_with_the_lab_hosts_bounce_counts_is_an_irqfd_bounce() -> None:
    """The IRTE says posted, but the real host counter saw every IRQ: the counts decide."""
    _, wiring = replay(with_pi_lines(IRQFD, FORMAT["6.1-lab"]))
    guest, host = guest_delta("virtio0-input.0"), lab_host_delta(1)
    assert host >= guest * 0.9
    verdict, reason = classify(False, guest, host, wiring[1].as_verdict_wiring())
    assert verdict is DeliveryPath.IRQFD_BOUNCE, reason


def test_zero_host_counts_without_an_enabled_irte_fit_no_path() -> None:
    """The same real counts, but the wiring comes from the lab trace alone (never posted)."""
    _, wiring = replay(IRQFD)
    assert not wiring[1].posted
    verdict, reason = classify(False, guest_delta("virtio0-input.0"), posted_host_total(1),
                               wiring[1].as_verdict_wiring())
    assert verdict is None
    assert "too few IRQs for a bounce" in reason and "the IRTE is not posted" in reason


def test_a_posted_vector_moved_to_another_vcpu_keeps_its_route_history() -> None:
    """The guest moves a posted vector (a new affinity): KVM updates the IRTE again with the
    new vCPU.  The rendered move follows the last real enable of irq 30."""
    last = max((s for s in SITES if s.host_irq == 30 and s.set), key=lambda s: s.index)
    moved = pi_line(FORMAT["6.1-lab"], last, enabled=True, vcpu=1)
    tracker, wiring = replay(with_pi_lines(IRQFD, FORMAT["6.1-lab"],
                                           extra={last.index: [moved]}))
    w = wiring[1]
    assert w.posted and w.vcpu == 1
    assert w.vcpus == (LAB_VCPU, 1)
    assert f"moved: vCPU {LAB_VCPU} -> 1" in w.describe()
    assert wiring[2].vcpus == (LAB_VCPU,) and "moved" not in wiring[2].describe()


def test_a_vector_paired_before_a_live_trace_is_unknown_not_unpaired() -> None:
    """`harness trace` started after QEMU wired its vectors sees no registration: the vfio
    lines that were there at the start are reported as unknown."""
    _, snapshot = last_sample_with_msix("irqfd")
    labels = frozenset(ln.label for ln in snapshot.lines
                       if any(a.startswith("vfio-msix") for a in ln.actions))
    late = BypassTracker().wiring(snapshot, before_trace=labels)
    assert late and all("paired before the trace started: unknown" in w.describe()
                        for w in late)
    fresh = BypassTracker().wiring(snapshot)
    assert all("no bypass producer registered" in w.describe() for w in fresh)
