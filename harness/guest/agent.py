"""The host side of the guest agent protocol (guest-images/agent/harness-agent).

The agent prints one JSON object per command.  The raw ``/proc/interrupts`` text travels
unparsed so host and guest captures go through the one parser in :mod:`harness.interrupts`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from harness.errors import GuestError
from harness.guest.ssh import GuestSSH
from harness.interrupts import InterruptSnapshot, parse_proc_interrupts

AGENT = "harness-agent"
PROTOCOL = 1

#: The largest answer the agent may give: a snapshot is /proc/interrupts (about 300 KB on a
#: guest with 256 vCPUs) and the PCI functions; anything past this is not an answer.
MAX_ANSWER_BYTES = 16 << 20


@dataclass(frozen=True)
class PciFunction:
    bdf: str
    vendor: str
    device: str
    driver: str
    msi_irqs: tuple[tuple[str, str], ...]  # (IRQ number, "msi" | "msix")
    irq: int = 0  # sysfs irq: its INTx line when it uses no MSI/MSI-X (0: none, or old agent)

    def msi_kind(self, irq: str) -> str | None:
        """"msi" or "msix" for one of the function's MSI IRQs, None if it is not one."""
        return next((kind for number, kind in self.msi_irqs if number == irq), None)

    @property
    def intx_irq(self) -> str | None:
        """The IRQ number of the function's INTx line while it uses no MSI or MSI-X: the
        kernel shows the first MSI IRQ in sysfs irq while MSI is on, so that one is not it."""
        if self.irq <= 0 or self.msi_irqs:
            return None
        return str(self.irq)


@dataclass(frozen=True)
class GuestSnapshot:
    taken_at: float  # host time.monotonic() when the answer arrived
    uptime: float
    kernel: str
    interrupts: InterruptSnapshot
    devices: tuple[PciFunction, ...]
    raw_interrupts: str

    def device(self, bdf: str) -> PciFunction | None:
        return next((d for d in self.devices if d.bdf == bdf), None)


def functions_from_json(items: Any) -> tuple[PciFunction, ...]:
    """The agent's ``devices`` list (also what a run folder keeps as ``<vm>.<label>.devices``)
    as PciFunctions; raises KeyError/TypeError/ValueError/AttributeError on a malformed one."""
    return tuple(
        PciFunction(str(d["bdf"]), str(d["vendor"]), str(d["device"]), str(d["driver"]),
                    tuple(sorted((str(k), str(v)) for k, v in d["msi_irqs"].items())),
                    int(d.get("irq", 0)))
        for d in items)


def functions_to_json(devices: tuple[PciFunction, ...]) -> str:
    """The inverse of :func:`functions_from_json`, for the run folder."""
    return json.dumps([{"bdf": d.bdf, "vendor": d.vendor, "device": d.device,
                        "driver": d.driver, "irq": d.irq, "msi_irqs": dict(d.msi_irqs)}
                       for d in devices], indent=1) + "\n"


class GuestAgent:
    def __init__(self, ssh: GuestSSH, timeout: float = 30.0) -> None:
        self._ssh = ssh
        self._timeout = timeout

    def _call(self, *args: str) -> dict[str, Any]:
        result = self._ssh.run([AGENT, *args], self._timeout, keep=MAX_ANSWER_BYTES)
        if result.timed_out:
            raise GuestError(self._ssh.name, f"{AGENT} {' '.join(args)}: no answer within "
                             f"{self._timeout:g} s (stopped)")
        if result.stdout_bytes > MAX_ANSWER_BYTES:
            raise GuestError(self._ssh.name, f"{AGENT} {' '.join(args)}: answer of "
                             f"{result.stdout_bytes} bytes, more than {MAX_ANSWER_BYTES}")
        if result.exit_status != 0:
            raise GuestError(self._ssh.name, f"{AGENT} {' '.join(args)} exited "
                             f"{result.exit_status}: {result.stderr.strip()[-300:]}")
        try:
            data = json.loads(result.stdout)
        except ValueError as exc:
            raise GuestError(self._ssh.name, f"{AGENT} {' '.join(args)}: not JSON: "
                             f"{result.stdout[:200]!r}") from exc
        if not isinstance(data, dict):
            raise GuestError(self._ssh.name, f"{AGENT}: expected a JSON object")
        return data

    def check_version(self) -> None:
        data = self._call("version")
        if data.get("protocol") != PROTOCOL:
            raise GuestError(self._ssh.name, f"{AGENT} speaks protocol "
                             f"{data.get('protocol')!r}, the harness speaks {PROTOCOL}")

    def snapshot(self) -> GuestSnapshot:
        data = self._call("snapshot")
        taken = time.monotonic()
        try:
            raw = str(data["interrupts"])
            devices = functions_from_json(data["devices"])
            return GuestSnapshot(taken, float(data["uptime"]), str(data["kernel"]),
                                 parse_proc_interrupts(raw, source=f"{self._ssh.name}:guest"),
                                 devices, raw)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise GuestError(self._ssh.name, f"{AGENT} snapshot: malformed answer: "
                             f"{exc}") from exc
