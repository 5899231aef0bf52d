"""Hot-plug of a scenario device behind its PCIe root port: unplug, plug back, and what the
guest's vectors did.

A device with ``hotplug: true`` sits alone behind a root port (:mod:`harness.qemu.argv`), so
QMP ``device_del`` / ``device_add`` work on it (the root bus of q35 and virt cannot
hot-plug).  Unplugging waits for QEMU's ``DEVICE_DELETED`` event, which comes once the guest
has let the device go (ACPI on q35, native PCIe hot-plug on virt, where the kernel waits out
the 5 s attention-button delay), and checks that the guest's PCI function is gone.  Plugging
back adds the device with the very ``-device`` options it was booted with, at the same
address, so its vectors keep their identity (guest address and MSI-X entry); a NIC gets its
address back (the guest's init set it only at boot), and the step waits until the guest's
driver holds the device's vectors again.

Each step is an :class:`HotplugEvent`, appended to ``hotplug.jsonl`` in the run folder (the
device, when, which guest IRQs went or came) and returned to the caller: a scenario's
``hotplug`` workload (its result says what happened) or ``harness hotplug`` through the
``up`` process.
"""

from __future__ import annotations

import json
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from harness.config.model import Hotplug, HotplugAction, Workload
from harness.errors import GuestError, HarnessError, UsageError
from harness.guest.agent import GuestSnapshot
from harness.qemu.argv import PlacedDevice
from harness.qemu.qmp import QmpError
from harness.result import WorkloadResult
from harness.vm import GuestVM

Progress = Callable[[str], None]

LOG = "hotplug.jsonl"


@dataclass(frozen=True)
class HotplugEvent:
    vm: str
    device: str
    action: str  # "unplug" | "plug"
    bdf: str
    at: float  # time.time() when the step ended
    seconds: float
    vectors: tuple[str, ...]  # "IRQ name" of the device's vectors that went (unplug) or came
    # an assigned device: the host's bypass wiring of its vfio vectors right after the step
    # (one line each; none once unplugged), as the up process's tracker saw it
    wiring: tuple[str, ...] | None = None

    def describe(self) -> str:
        what = "went" if self.action == "unplug" else "came"
        vectors = ", ".join(self.vectors) or "none"
        text = (f"{self.action} {self.vm}/{self.device} ({self.bdf}) in {self.seconds:.1f} s; "
                f"vectors that {what}: {vectors}")
        if self.wiring is not None:
            text += "; host wiring now: " + ("; ".join(self.wiring) or
                                              "none (no vfio vector of it on the host)")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "vectors": list(self.vectors),
                "wiring": None if self.wiring is None else list(self.wiring)}


#: Adds to an event what the host saw right after the step (an assigned device's wiring).
Observe = Callable[[HotplugEvent], HotplugEvent]


def _placed(vm: GuestVM, device_id: str) -> PlacedDevice:
    for p in vm.placed:
        if p.device.id == device_id:
            if not p.device.hotplug:
                raise UsageError(f"{vm.name}/{device_id} sits on the root bus, which cannot "
                                 "hot-plug: give it hotplug: true in the scenario")
            if p.device.ssh_nic():
                raise UsageError(f"{vm.name}/{device_id} is the NIC the harness reaches the "
                                 "guest through: it cannot be unplugged")
            return p
    raise UsageError(f"VM {vm.name} has no device {device_id!r} (it has "
                     f"{', '.join(p.device.id for p in vm.placed)})")


def _vectors(snap: GuestSnapshot, bdf: str) -> tuple[str, ...]:
    """The device's MSI/MSI-X vectors in the guest, as "IRQ name"."""
    func = snap.device(bdf)
    if func is None:
        return ()
    out = []
    for irq, _ in func.msi_irqs:
        line = snap.interrupts.by_label(irq)
        out.append(f"{irq} {line.name}" if line is not None else irq)
    return tuple(out)


def device_options(argv: list[str], device_id: str) -> dict[str, str]:
    """The ``-device`` of ``device_id`` in a QEMU argv, as QMP ``device_add`` arguments
    (the harness's option values never hold a comma: see qemu_options)."""
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag != "-device":
            continue
        driver, *props = value.split(",")
        options = dict(p.split("=", 1) for p in props if "=" in p)
        if options.get("id") == device_id:
            return {"driver": driver, **options}
    raise HarnessError(f"device {device_id}: not in QEMU's command line")


def log_event(run_dir: Path, event: HotplugEvent) -> None:
    """Append the event to the run folder's hotplug.jsonl."""
    with (run_dir / LOG).open("a") as fh:
        fh.write(json.dumps(event.to_dict()) + "\n")


def unplug(vm: GuestVM, device_id: str, timeout: float = 60.0,
           observe: Observe | None = None) -> HotplugEvent:
    """``device_del`` and wait until QEMU reports the device deleted and the guest's PCI
    function is gone."""
    placed = _placed(vm, device_id)
    if vm.machine is None or vm.machine.qmp is None:
        raise GuestError(vm.name, "not running")
    qmp = vm.machine.qmp
    started = time.monotonic()
    before = vm.snapshot()
    if before.device(placed.bdf) is None:
        raise UsageError(f"{vm.name}/{device_id} is not plugged in (no {placed.bdf} in the "
                         "guest)")
    seen = len(qmp.events)
    qmp.execute("device_del", {"id": device_id})
    deadline = started + timeout
    while not any(e.get("event") == "DEVICE_DELETED"
                  and (e.get("data") or {}).get("device") == device_id
                  for e in qmp.events[seen:]):
        if time.monotonic() > deadline:
            raise GuestError(vm.name, f"{device_id}: no DEVICE_DELETED within {timeout:g} s "
                             "(the guest did not release it)", vm.console_tail())
        time.sleep(0.1)
    after = vm.snapshot()
    if after.device(placed.bdf) is not None:
        raise GuestError(vm.name, f"{device_id}: QEMU deleted it, yet the guest still lists "
                         f"{placed.bdf}")
    event = HotplugEvent(vm.name, device_id, "unplug", placed.bdf, time.time(),
                         time.monotonic() - started, _vectors(before, placed.bdf))
    if observe is not None:
        event = observe(event)
    log_event(vm.run_dir, event)
    return event


def plug(vm: GuestVM, device_id: str, timeout: float = 60.0,
         observe: Observe | None = None) -> HotplugEvent:
    """``device_add`` the device back as it was booted; wait until its guest driver holds
    its vectors (a NIC's address is set again)."""
    placed = _placed(vm, device_id)
    if vm.machine is None or vm.machine.qmp is None:
        raise GuestError(vm.name, "not running")
    started = time.monotonic()
    if vm.snapshot().device(placed.bdf) is not None:
        raise UsageError(f"{vm.name}/{device_id} is plugged in already ({placed.bdf})")
    try:
        vm.machine.qmp.execute("device_add", device_options(vm.machine.argv, device_id))
    except QmpError as exc:
        raise GuestError(vm.name, f"{device_id}: device_add failed: {exc.reason}") from exc
    deadline = started + timeout
    if placed.device.nic:
        address, _ = placed.guest_address()
        done = vm.run(["sh", "-c", _nic_up_script(placed.mac, address, timeout)], timeout)
        if done.exit_status != 0:
            raise GuestError(vm.name, f"{device_id}: its interface did not come back: "
                             f"{(done.stderr or done.stdout).strip()[-300:]}")
    named_by = None  # a driver may request its vectors a moment after it enabled them
    while True:
        snap = vm.snapshot()
        func = snap.device(placed.bdf)
        if func is not None and func.driver and func.msi_irqs:
            named = all(snap.interrupts.by_label(irq) is not None for irq, _ in func.msi_irqs)
            named_by = named_by or time.monotonic() + 5.0
            if named or time.monotonic() > min(named_by, deadline):
                break
            time.sleep(0.3)
            continue
        if time.monotonic() > deadline:
            state = ("absent" if func is None else
                     f"driver {func.driver or 'none'}, {len(func.msi_irqs)} vectors")
            raise GuestError(vm.name, f"{device_id}: not back in the guest within "
                             f"{timeout:g} s ({placed.bdf} {state})", vm.console_tail())
        time.sleep(0.5)
    event = HotplugEvent(vm.name, device_id, "plug", placed.bdf, time.time(),
                         time.monotonic() - started, _vectors(snap, placed.bdf))
    if observe is not None:
        event = observe(event)
    log_event(vm.run_dir, event)
    return event


def _nic_up_script(mac: str, address: str, timeout: float) -> str:
    """Find the interface with ``mac`` (it takes a moment to appear), bring it up with its
    address, as the guest's init did at boot."""
    tries = max(int(timeout * 5), 1)
    return (f"m={shlex.quote(mac)}; i=0; while [ $i -lt {tries} ]; do "
            "for d in /sys/class/net/*; do "
            "[ \"$(cat $d/address 2>/dev/null)\" = \"$m\" ] || continue; n=${d##*/}; "
            f"ip link set \"$n\" up && ip addr replace {shlex.quote(address)} dev \"$n\" "
            "&& exit 0; exit 1; done; i=$((i+1)); sleep 0.2; done; "
            "echo \"no interface with MAC $m\" >&2; exit 1")


def step(vm: GuestVM, hotplug: Hotplug, timeout: float,
         progress: Progress = lambda message: None,
         observe: Observe | None = None) -> list[HotplugEvent]:
    """One scenario step: unplug, plug, or both ``pause_s`` apart, within ``timeout``;
    ``observe`` may add to each event what the host saw right after it (its wiring)."""
    deadline = time.monotonic() + timeout
    events = []
    if hotplug.action in (HotplugAction.UNPLUG, HotplugAction.REPLUG):
        events.append(unplug(vm, hotplug.device, timeout, observe))
        progress(events[-1].describe())
    if hotplug.action is HotplugAction.REPLUG:
        time.sleep(min(hotplug.pause_s, max(deadline - time.monotonic(), 0.0)))
    if hotplug.action in (HotplugAction.PLUG, HotplugAction.REPLUG):
        events.append(plug(vm, hotplug.device, max(deadline - time.monotonic(), 1.0),
                           observe))
        progress(events[-1].describe())
    return events


def run_workload(workload: Workload, vm: GuestVM, progress: Progress) -> WorkloadResult:
    """A scenario's hotplug workload as a workload result: passed when every step did what it
    said; the events are in the run folder's hotplug.jsonl."""
    assert workload.hotplug is not None
    h = workload.hotplug
    argv = ("hotplug", h.action.value, h.device)
    label = workload.name or " ".join(argv)
    progress(f"{vm.name}: {label}")
    started = time.monotonic()
    try:
        events = step(vm, h, workload.timeout_s, progress)
        status, tail = 0, "\n".join(e.describe() for e in events)
    except (GuestError, UsageError, QmpError) as exc:
        status, tail = 1, str(exc)
    return WorkloadResult(vm.name, label, argv, status, time.monotonic() - started, tail[-2000:],
                          workload.timeout_s, False, 0, False)


def session_handlers(session: Any) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
    """``harness hotplug`` through the ``up`` process: it owns the VMs' QMP and agent.  One
    step at a time: a second request waits for the first."""
    one_at_a_time = threading.Lock()

    def hotplug(message: dict[str, Any]) -> dict[str, Any]:
        with one_at_a_time:
            return _hotplug(message)

    def _hotplug(message: dict[str, Any]) -> dict[str, Any]:
        vms = {vm.name: vm for vm in session.vms}
        name = str(message.get("vm"))
        if name not in vms:
            raise UsageError(f"no VM {name!r} in this session")
        try:
            action = HotplugAction(str(message.get("action")))
        except ValueError as exc:
            raise UsageError(f"unknown hotplug action {message.get('action')!r}") from exc
        h = Hotplug(str(message.get("device")), action, float(message.get("pause_s", 1.0)))
        vm = vms[name]
        host = next((p.device.assigned_host for p in vm.placed if p.device.id == h.device),
                    None)

        def observe(event: HotplugEvent) -> HotplugEvent:
            """The host's wiring of an assigned device's vectors now (the tracker's)."""
            if host is None or session.host is None:
                return event
            wiring = session.wiring({}).get("wiring", [])
            lines = tuple(f"entry {w['entry']}: {w['summary']}" for w in wiring
                          if w.get("bdf") == host)
            return replace(event, wiring=lines)

        events = step(vm, h, float(message.get("timeout", 120.0)), observe=observe)
        return {"ok": True, "events": [e.to_dict() for e in events]}

    return {"hotplug": hotplug}


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """The hotplug events of a run folder, oldest first."""
    try:
        text = (run_dir / LOG).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
