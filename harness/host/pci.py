"""PCI functions as sysfs shows them: identity, driver, IOMMU group, MSI/MSI-X, and host use.

A device the host is using (a network interface that is up with addresses or routes, a block
device with a mounted filesystem, swap or a device-mapper holder) must not be taken away from
it; neither may any device in the same IOMMU group, since VFIO takes the whole group.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Literal

from harness.errors import HostError
from harness.host.iommu import group_members
from harness.host.view import Evidence, HostView
from harness.interrupts import normalize_bdf

log = logging.getLogger(__name__)

PCI_CAP_ID_MSI = 0x05
PCI_CAP_ID_MSIX = 0x11
_PCI_STATUS = 0x06
_PCI_STATUS_CAP_LIST = 0x10
_PCI_CAPABILITY_LIST = 0x34
_CONFIG_HEADER = 0x40  # what an unprivileged reader of sysfs ``config`` gets

#: Drivers a device may be bound to while another device of its IOMMU group is assigned:
#: these set ``driver_managed_dma`` (or are VFIO), so the group stays viable.
GROUP_SAFE_DRIVERS = frozenset({"vfio-pci", "pci-stub", "pcieport"})


# --- MSI / MSI-X from config space ---------------------------------------------------------


@dataclass(frozen=True)
class MsiCapability:
    """MSI and MSI-X support read from the capability list; ``known`` False if unreadable."""

    known: bool
    msi_vectors: int | None  # multiple message capable, if the function has MSI
    msix_vectors: int | None  # table size, if the function has MSI-X
    detail: str
    evidence: tuple[Evidence, ...]

    @property
    def has_msi(self) -> bool:
        return self.msi_vectors is not None or self.msix_vectors is not None


def parse_msi_capability(config: bytes | None, source: str) -> MsiCapability:
    """Walk the standard capability list (MSI cap id 0x05, MSI-X cap id 0x11).

    MSI: vectors = 2 ** multiple-message-capable (message control bits 3:1).  MSI-X: table
    size = (message control & 0x7ff) + 1.  A reader without CAP_SYS_ADMIN gets only the first
    64 bytes of ``config``, so a capability list that leaves them is reported as unknown.
    """
    if config is None:
        return MsiCapability(False, None, None, "config space unreadable",
                             (Evidence(source, "(absent)", "cannot read config space"),))
    if len(config) < _CONFIG_HEADER:
        return MsiCapability(False, None, None, f"config space is {len(config)} bytes",
                             (Evidence(source, f"{len(config)} bytes", "truncated header"),))
    status = int.from_bytes(config[_PCI_STATUS:_PCI_STATUS + 2], "little")
    if not status & _PCI_STATUS_CAP_LIST:
        return MsiCapability(True, None, None, "no capability list: INTx only",
                             (Evidence(source, f"status {status:#06x}",
                                       "no capability list (status bit 4 clear): no MSI/MSI-X"),))
    msi = msix = None
    found: list[Evidence] = []
    pos = config[_PCI_CAPABILITY_LIST] & 0xFC
    seen: set[int] = set()
    while pos and pos not in seen and len(seen) < 48:
        seen.add(pos)
        if pos + 4 > len(config):
            return MsiCapability(False, msi, msix,
                                 f"only {len(config)} bytes of config space are readable "
                                 "(run as root to read the capability list)",
                                 (*found, Evidence(source, f"{len(config)} bytes",
                                                   f"capability at {pos:#x} is beyond what "
                                                   "this user may read")))
        cap_id, nxt = config[pos], config[pos + 1] & 0xFC
        control = int.from_bytes(config[pos + 2:pos + 4], "little")
        if cap_id == PCI_CAP_ID_MSI:
            msi = 1 << ((control >> 1) & 0x7)
            found.append(Evidence(source, f"cap {cap_id:#04x} at {pos:#x}, control {control:#06x}",
                                  f"MSI, {msi} vector(s), {'enabled' if control & 1 else 'off'}"))
        elif cap_id == PCI_CAP_ID_MSIX:
            msix = (control & 0x7FF) + 1
            found.append(Evidence(source, f"cap {cap_id:#04x} at {pos:#x}, control {control:#06x}",
                                  f"MSI-X, table size {msix}, "
                                  f"{'enabled' if control & 0x8000 else 'off'}"))
        pos = nxt
    parts = []
    if msi is not None:
        parts.append(f"MSI {msi}")
    if msix is not None:
        parts.append(f"MSI-X {msix}")
    detail = ", ".join(parts) if parts else "no MSI or MSI-X capability: INTx only"
    if not found:
        found.append(Evidence(source, f"capability list at {config[_PCI_CAPABILITY_LIST]:#x}",
                              "no MSI (0x05) or MSI-X (0x11) capability"))
    return MsiCapability(True, msi, msix, detail, tuple(found))


# --- host use ------------------------------------------------------------------------------


@dataclass(frozen=True)
class InUse:
    """Why the host needs a device: ``"eth0 is up with 192.0.2.2/24"``."""

    kind: Literal["net", "block"]
    name: str
    reason: str
    evidence: tuple[Evidence, ...]


def _under(view: HostView, class_dir: str, device_dir: str) -> list[str]:
    """Entries of ``/sys/class/<class>`` whose real path lies inside the device's directory."""
    names = []
    for name in view.listdir(class_dir):
        target = view.realpath(f"{class_dir}/{name}")
        if target.startswith(device_dir + os.sep):
            names.append(name)
    return names


def _ip_json(view: HostView, name: str) -> tuple[list[dict[str, object]] | None, str]:
    text, source = view.command_output(name)
    if text is None:
        return None, source
    try:
        data = json.loads(text)
    except ValueError:
        log.warning("%s: not JSON", source)
        return None, source
    return ([d for d in data if isinstance(d, dict)] if isinstance(data, list) else None), source


def _addresses(view: HostView, ifname: str) -> tuple[list[str], Evidence | None]:
    """Global/site addresses of ``ifname`` (link-local ones do not make it in use)."""
    data, source = _ip_json(view, "ip-addr")
    if data is not None:
        for entry in data:
            if entry.get("ifname") != ifname:
                continue
            infos = entry.get("addr_info")
            addrs = [f"{a.get('local')}/{a.get('prefixlen')}"
                     for a in (infos if isinstance(infos, list) else [])
                     if isinstance(a, dict) and a.get("scope") not in ("link", "host")]
            return addrs, Evidence(source, f"{ifname}: {' '.join(addrs) or '(none)'}",
                                   f"{len(addrs)} non-link-local address(es)")
        return [], Evidence(source, f"{ifname}: (not listed)", "no addresses")
    # No ip(8) output: IPv6 from procfs (IPv4 addresses are not in procfs).
    text = view.read_text("/proc/net/if_inet6")
    if text is None:
        return [], None
    addrs = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 6 and fields[5] == ifname and int(fields[3], 16) & 0x30 == 0:
            address = ":".join(fields[0][i:i + 4] for i in range(0, 32, 4))
            addrs.append(f"{address}/{int(fields[2], 16)}")
    return addrs, Evidence("/proc/net/if_inet6", f"{ifname}: {' '.join(addrs) or '(none)'}",
                           f"{len(addrs)} global IPv6 address(es) (IPv4 not visible here)")


_ROUTE_SKIP_TYPES = {"local", "broadcast", "multicast", "anycast"}


def _routes(view: HostView, ifname: str) -> tuple[list[str], Evidence | None]:
    data, source = _ip_json(view, "ip-route")
    if data is not None:
        routes = []
        for r in data:
            dst = str(r.get("dst", ""))
            if r.get("dev") != ifname or r.get("type") in _ROUTE_SKIP_TYPES \
                    or dst.startswith(("fe80:", "ff00:", "ff")):
                continue
            routes.append(dst + (f" via {r['gateway']}" if r.get("gateway") else ""))
        return routes, Evidence(source, f"{ifname}: {'; '.join(routes) or '(none)'}",
                                f"{len(routes)} route(s) through {ifname}")
    text = view.read_text("/proc/net/route")
    if text is None:
        return [], None
    routes = [line.split()[1] for line in text.splitlines()[1:]
              if line.split() and line.split()[0] == ifname]
    return routes, Evidence("/proc/net/route", f"{ifname}: {len(routes)} route(s)",
                            f"{len(routes)} IPv4 route(s) through {ifname}")


def _net_in_use(view: HostView, ifname: str) -> InUse | None:
    state_path = f"/sys/class/net/{ifname}/operstate"
    state = view.read_value(state_path) or "(absent)"
    evidence = [Evidence(state_path, state, "the link is up" if state == "up" else
                         f"operstate {state}")]
    if state == "down":
        return None
    addrs, addr_ev = _addresses(view, ifname)
    routes, route_ev = _routes(view, ifname)
    evidence += [e for e in (addr_ev, route_ev) if e is not None]
    if not addrs and not routes:
        return None
    what = []
    if addrs:
        what.append("addresses " + ", ".join(addrs))
    if routes:
        what.append("routes " + ", ".join(routes))
    return InUse("net", ifname, f"{ifname} is {state} with {' and '.join(what)}",
                 tuple(evidence))


def _mounts(view: HostView) -> tuple[dict[str, str], dict[str, str], str]:
    """(major:minor -> mount point, /dev/name -> mount point, source)."""
    by_devno: dict[str, str] = {}
    by_name: dict[str, str] = {}
    text = view.read_text("/proc/self/mountinfo")
    if text is not None:
        for line in text.splitlines():
            fields = line.split()
            if len(fields) > 4:
                by_devno.setdefault(fields[2], fields[4])
            if " - " in line:
                source = line.split(" - ", 1)[1].split()
                if len(source) > 1:
                    by_name.setdefault(source[1], fields[4])
        return by_devno, by_name, "/proc/self/mountinfo"
    text = view.read_text("/proc/mounts") or ""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 1:
            by_name.setdefault(fields[0], fields[1])
    return by_devno, by_name, "/proc/mounts"


def _block_in_use(view: HostView, disk: str) -> InUse | None:
    by_devno, by_name, mount_source = _mounts(view)
    swaps = {line.split()[0] for line in (view.read_text("/proc/swaps") or "").splitlines()[1:]
             if line.split()}
    base = f"/sys/class/block/{disk}"
    names = [disk] + [p for p in view.listdir(base) if view.exists(f"{base}/{p}/partition")]
    reasons: list[str] = []
    evidence: list[Evidence] = []
    for name in names:
        dev_path = f"{base}/{name}/dev" if name != disk else f"{base}/dev"
        devno = view.read_value(dev_path)
        mount = by_devno.get(devno or "") or by_name.get(f"/dev/{name}")
        if mount:
            reasons.append(f"/dev/{name} is mounted on {mount}")
            evidence.append(Evidence(mount_source, f"{devno or ''} /dev/{name} {mount}".strip(),
                                     f"/dev/{name} is mounted on {mount}"))
        if f"/dev/{name}" in swaps:
            reasons.append(f"/dev/{name} is swap")
            evidence.append(Evidence("/proc/swaps", f"/dev/{name}", "in use as swap"))
        holders_dir = (f"{base}/{name}/holders" if name != disk else f"{base}/holders")
        holders = view.listdir(holders_dir)
        if holders:
            reasons.append(f"/dev/{name} is held by {', '.join(holders)}")
            evidence.append(Evidence(holders_dir, " ".join(holders),
                                     "a device-mapper/md device sits on it"))
    if not reasons:
        return None
    return InUse("block", disk, "; ".join(reasons), tuple(evidence))


def _9p_in_use(view: HostView, bdf: str) -> list[InUse]:
    """virtio-9p shares of the device that are mounted (the lab's L1 root is one)."""
    found = []
    mountinfo = view.read_text("/proc/self/mountinfo") or ""
    for child in view.listdir(f"/sys/bus/pci/devices/{bdf}"):
        tag_path = f"/sys/bus/pci/devices/{bdf}/{child}/mount_tag"
        tag = view.read_value(tag_path)
        if not child.startswith("virtio") or not tag:
            continue
        tag = tag.rstrip("\x00")
        for line in mountinfo.splitlines():
            fields = line.split(" - ", 1)
            source = fields[1].split() if len(fields) == 2 else []
            if len(source) > 1 and source[0] == "9p" and source[1] == tag:
                point = fields[0].split()[4]
                found.append(InUse("block", tag, f"9p share {tag!r} is mounted on {point}",
                                   (Evidence(tag_path, tag, "the device's 9p mount tag"),
                                    Evidence("/proc/self/mountinfo", line.strip(),
                                             f"mounted on {point}"))))
                break
    return found


def device_in_use(bdf: str, view: HostView) -> tuple[InUse, ...]:
    """Network interfaces, block devices and 9p shares of ``bdf`` that the host is using."""
    device_dir = view.realpath(f"/sys/bus/pci/devices/{bdf}")
    found: list[InUse] = _9p_in_use(view, bdf)
    for ifname in _under(view, "/sys/class/net", device_dir):
        use = _net_in_use(view, ifname)
        if use:
            found.append(use)
    for disk in _under(view, "/sys/class/block", device_dir):
        if view.exists(f"/sys/class/block/{disk}/partition"):
            continue  # partitions are checked with their disk
        use = _block_in_use(view, disk)
        if use:
            found.append(use)
    return tuple(found)


# --- devices -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PciDevice:
    bdf: str
    vendor_id: int | None
    device_id: int | None
    class_code: int | None  # 24-bit: base class, subclass, prog-if
    driver: str | None
    driver_override: str | None
    iommu_group: str | None
    msi: MsiCapability
    in_use: tuple[InUse, ...]

    @property
    def is_bridge(self) -> bool:
        return self.class_code is not None and self.class_code >> 8 == 0x0604

    @property
    def ids(self) -> str:
        def hex4(v: int | None) -> str:
            return "????" if v is None else f"{v:04x}"
        return f"{hex4(self.vendor_id)}:{hex4(self.device_id)}"

    @property
    def group_safe(self) -> bool:
        """Bound so that VFIO may still take the group (vfio-pci, pci-stub, pcieport, none)."""
        return self.driver is None or self.driver in GROUP_SAFE_DRIVERS or \
            "vfio" in self.driver

    def to_dict(self) -> dict[str, object]:
        return {"bdf": self.bdf, "ids": self.ids,
                "class": None if self.class_code is None else f"{self.class_code:06x}",
                "driver": self.driver, "driver_override": self.driver_override,
                "iommu_group": self.iommu_group,
                "msi": {"known": self.msi.known, "msi_vectors": self.msi.msi_vectors,
                        "msix_vectors": self.msi.msix_vectors, "detail": self.msi.detail},
                "in_use": [u.reason for u in self.in_use]}


def _hex_attr(view: HostView, path: str) -> int | None:
    value = view.read_value(path)
    try:
        return int(value, 16) if value else None
    except ValueError:
        return None


def list_pci_devices(view: HostView) -> tuple[str, ...]:
    return view.listdir("/sys/bus/pci/devices")


def read_pci_device(bdf: str, view: HostView) -> PciDevice:
    """One function's sysfs state; :class:`HostError` if the host has no such device."""
    try:
        bdf = normalize_bdf(bdf)
    except ValueError as exc:
        raise HostError(bdf, str(exc)) from exc
    base = f"/sys/bus/pci/devices/{bdf}"
    if not view.exists(base):
        raise HostError(bdf, f"no such PCI device ({base} does not exist)")
    override = view.read_value(f"{base}/driver_override")
    return PciDevice(
        bdf=bdf, vendor_id=_hex_attr(view, f"{base}/vendor"),
        device_id=_hex_attr(view, f"{base}/device"), class_code=_hex_attr(view, f"{base}/class"),
        driver=view.link_name(f"{base}/driver"),
        driver_override=None if override in (None, "", "(null)") else override,
        iommu_group=view.link_name(f"{base}/iommu_group"),
        msi=parse_msi_capability(view.read_bytes(f"{base}/config"), f"{base}/config"),
        in_use=device_in_use(bdf, view))


@dataclass(frozen=True)
class Assignability:
    """Whether VFIO could take ``device`` now, and every reason it could not."""

    device: PciDevice
    group_devices: tuple[PciDevice, ...]  # the other members of its IOMMU group
    reasons: tuple[str, ...]

    @property
    def assignable(self) -> bool:
        return not self.reasons


def check_assignable(bdf: str, view: HostView, *, iommu_on: bool) -> Assignability:
    """The device must be free, the IOMMU on, and every other group member VFIO-safe and free."""
    device = read_pci_device(bdf, view)
    reasons: list[str] = []
    if not iommu_on:
        reasons.append("the IOMMU is off (no IOMMU groups): VFIO cannot take any device")
    if device.is_bridge:
        reasons.append("it is a PCI bridge; VFIO does not assign bridges")
    reasons += [f"in use by the host: {u.reason}" for u in device.in_use]
    others: list[PciDevice] = []
    if device.iommu_group is not None:
        for member in group_members(view, device.iommu_group):
            if member == device.bdf:
                continue
            try:
                other = read_pci_device(member, view)
            except HostError:
                continue  # platform devices share groups on Arm; they carry no PCI driver
            others.append(other)
            if other.in_use:
                reasons.append(f"IOMMU group {device.iommu_group} also holds {other.bdf}, in "
                               f"use by the host: {other.in_use[0].reason}")
            elif not other.group_safe:
                reasons.append(f"IOMMU group {device.iommu_group} also holds {other.bdf} "
                               f"bound to {other.driver}; VFIO needs every group member on "
                               "vfio-pci, unbound, or a bridge on pcieport")
    elif iommu_on:
        reasons.append("it is in no IOMMU group")
    return Assignability(device, tuple(others), tuple(reasons))

