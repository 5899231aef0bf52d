#!/usr/bin/env python3
"""Record real kernel data from the nested "virtual lab" (run on L0, as root).

L0 (this machine) runs QEMU under TCG with an emulated Intel IOMMU (interrupt remapping)
and an emulated virtio-net device at 0000:00:05.0. L1 boots the Debian 6.1 *generic*
kernel (it has 9p) on this machine's own root filesystem, exported read-only over 9p
under a tmpfs overlay, so L1 has this machine's qemu-system-x86_64, bash and lspci.
L1 (l1-lab.sh) loads kvm_amd (TCG emulates SVM) and vfio-pci, binds the NIC to
vfio-pci, records a host fixture, sets up tracefs kprobes on the IRQ bypass manager,
and runs L2 (the project's builtin guest image plus a small init, l2-init) twice with
the NIC assigned: once on KVM's irqfd path and once with x-no-kvm-msix=on.

Usage (from the repository root):
    guest-images/lab-capture/capture.py [--out tests/data/lab] [--pings 200] [--keep-work]

Needs: qemu-system-x86, pciutils (lspci, used inside L1), kmod (depmod/modprobe), cpio,
apt-get (downloads the kernel package into the work directory; nothing is installed on
this machine). Results land in OUT (run directories, l1-host/, logs, summary.json); the
README there is written by hand and is not touched.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MAC = "52:54:00:12:34:56"
BDF = "0000:00:05.0"
L1_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay"]
RUNS = "irqfd:,no-kvm-msix:x-no-kvm-msix=on"


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, **kw)


def builtin_image() -> dict[str, str]:
    """`harness image build`: kernel, initrd and release of the builtin L2 image."""
    out = run([str(REPO / ".venv/bin/harness"), "image", "build"], cwd=REPO,
              capture_output=True, text=True).stdout
    info = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        if key in ("kernel", "initrd", "release"):
            info[key] = value.strip()
    return info


def pack_cpio(root: Path, dest: Path) -> None:
    names = run(["find", "."], cwd=root, capture_output=True).stdout
    with open(dest, "wb") as f:
        run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=root,
            input=names, stdout=f)


def prepare(work: Path, image: dict[str, str], kernel_pkg: str) -> str:
    """Kernel for L1 (extracted, depmod'ed), L1 initramfs, L2 kernel + initrd."""
    run(["apt-get", "download", "-q", kernel_pkg], cwd=work, capture_output=True)
    deb = next(work.glob(f"{kernel_pkg}_*.deb"))
    run(["dpkg-deb", "-x", str(deb), str(work / "kernel")])
    deb.unlink()
    version = next((work / "kernel/lib/modules").iterdir()).name
    run(["depmod", "-b", str(work / "kernel"), version])

    rd = work / "l1rd"
    (rd / "bin").mkdir(parents=True)
    (rd / "modules").mkdir()
    with open(image["initrd"], "rb") as f:  # busybox-static from the builtin image
        run(["cpio", "-idm", "--quiet", "bin/busybox"], cwd=rd, stdin=f)
    deps = []
    for mod in L1_MODULES:  # one per call: further names would be taken as parameters
        deps += run(["modprobe", "-d", str(work / "kernel"), "-S", version, "--show-depends",
                     mod], capture_output=True, text=True).stdout.splitlines()
    order = []
    for line in deps:
        parts = line.split()
        if parts and parts[0] == "insmod" and parts[1] not in order:
            order.append(parts[1])
    for path in order:
        shutil.copy(path, rd / "modules" / Path(path).name)
    (rd / "modules.list").write_text("".join(Path(p).name + "\n" for p in order))
    shutil.copy(HERE / "l1-initramfs-init", rd / "init")
    os.chmod(rd / "init", 0o755)
    pack_cpio(rd, work / "l1-initramfs.cpio")
    shutil.rmtree(rd)

    l2 = work / "l2"
    add = work / "l2add"
    l2.mkdir()
    add.mkdir()
    shutil.copy(image["kernel"], l2 / "vmlinuz")
    shutil.copy(HERE / "l2-init", add / "lab-init")
    os.chmod(add / "lab-init", 0o755)
    pack_cpio(add, work / "l2add.cpio")
    with open(l2 / "initrd.cpio", "wb") as f:  # the kernel accepts concatenated archives
        f.write(Path(image["initrd"]).read_bytes())
        f.write((work / "l2add.cpio").read_bytes())
    shutil.rmtree(add)
    (work / "l2add.cpio").unlink()
    return version


def l0_argv(work: Path, version: str, pings: int) -> list[str]:
    append = " ".join([
        "console=ttyS0", "intel_iommu=on", "panic=-1", "loglevel=4",
        f"lab.script={HERE / 'l1-lab.sh'}", f"lab.bdf={BDF}", f"lab.mac={MAC}",
        f"lab.pings={pings}", f"lab.runs={RUNS}",
    ])
    return [
        "qemu-system-x86_64", "-name", "l1", "-accel", "tcg",
        "-machine", "q35,kernel-irqchip=split", "-cpu", "qemu64,+svm,+npt",
        "-smp", "2", "-m", "2048", "-nodefaults", "-no-user-config", "-display", "none",
        "-no-reboot", "-serial", "stdio",
        "-device", "intel-iommu,intremap=on,device-iotlb=on",
        "-kernel", str(work / f"kernel/boot/vmlinuz-{version}"),
        "-initrd", str(work / "l1-initramfs.cpio"),
        "-append", append,
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot,addr=0x3",
        "-fsdev", f"local,id=lab,path={work},security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=lab,mount_tag=lab,addr=0x4",
        "-netdev", "user,id=n0",
        "-device", "virtio-net-pci,netdev=n0,mac=" + MAC
        + ",iommu_platform=on,disable-legacy=on,ats=on,romfile=,addr=0x5",
    ]


def run_l0(argv: list[str], log: Path, timeout: float) -> tuple[int, list[tuple[float, str]]]:
    lines: list[tuple[float, str]] = []
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.stdout is not None
    with open(log, "w") as f:
        try:
            for raw in proc.stdout:
                t = time.monotonic() - t0
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                lines.append((t, text))
                f.write(f"[{t:8.3f}] {text}\n")
                f.flush()
                sys.stdout.write(f"[{t:8.3f}] {text}\n")
                if t > timeout:
                    raise TimeoutError
            rc = proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except (TimeoutError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = -9
    lines.append((time.monotonic() - t0, "<qemu exit>"))
    return rc, lines


# ---- post-processing ----------------------------------------------------------------------
STAMP = re.compile(r"^\[(\d+\.\d+)\] ?(.*)$")


def console(path: Path) -> list[tuple[float, str]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        m = STAMP.match(line)
        if m:
            out.append((float(m.group(1)), m.group(2)))
    return out


def block(lines: list[tuple[float, str]], name: str) -> str:
    text, inside = [], False
    for _, line in lines:
        if line.startswith(f"lab-l2: {name}-begin"):
            inside = True
        elif line.startswith(f"lab-l2: {name}-end"):
            break
        elif inside:
            text.append(line)
    return "".join(t + "\n" for t in text)


def irq_counts(text: str) -> dict[str, int]:
    """Per-line total over CPUs, keyed by the line's last field (the action name)."""
    lines = text.splitlines()
    if not lines:
        return {}
    ncpu = len(lines[0].split())
    counts = {}
    for line in lines[1:]:
        f = line.split()
        if not f or not f[0].endswith(":") or not f[0][:-1].isdigit():
            continue
        counts[f[-1]] = sum(int(x) for x in f[1:1 + ncpu] if x.isdigit())
    return counts


def samples(text: str) -> list[tuple[float, str]]:
    out, cur, t = [], [], None
    for line in text.splitlines():
        m = re.match(r"^# sample \d+ t=([\d.]+)", line)
        if m:
            if t is not None:
                out.append((t, "\n".join(cur)))
            t, cur = float(m.group(1)), []
        else:
            cur.append(line)
    if t is not None:
        out.append((t, "\n".join(cur)))
    return out


def marker(lines: list[tuple[float, str]], prefix: str) -> float | None:
    for t, line in lines:
        if line.startswith(prefix):
            return t
    return None


def summarize_run(d: Path) -> dict:
    con = console(d / "l2-console.log")
    before, after = block(con, "interrupts-before"), block(con, "interrupts-after")
    (d / "l2-interrupts-before.txt").write_text(before)
    (d / "l2-interrupts-after.txt").write_text(after)
    timing = dict(line.split() for line in (d / "l1-timing.txt").read_text().splitlines())
    start, exit_ = float(timing["qemu_start"]), float(timing["qemu_exit"])
    l2_start = marker(con, "lab-l2: start")
    ping_begin = marker(con, "lab-l2: ping-begin")
    ping_end = marker(con, "lab-l2: ping-end")
    poweroff = marker(con, "lab-l2: poweroff")
    text = "\n".join(line for _, line in con)
    ping = re.search(r"(\d+) packets transmitted, (\d+) packets received", text)
    rtt = re.search(r"round-trip min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+) ms", text)
    g0, g1 = irq_counts(before), irq_counts(after)
    guest = {k: g1[k] - g0.get(k, 0) for k in g1 if k.startswith("virtio")}
    host_last, host_t = {}, None
    for t, s in samples((d / "l1-interrupts-during.txt").read_text()):
        c = {k: v for k, v in irq_counts(s).items() if k.startswith("vfio")}
        if c:
            host_last, host_t = c, t
    events: dict[str, int] = {}
    handler: dict[str, int] = {}
    for line in (d / "trace.txt").read_text().splitlines():
        m = re.match(r"^\s*\S.*?\s+\[\d+\]\s+\S+\s+[\d.]+: (\w+): (.*)$", line)
        if m:
            events[m.group(1)] = events.get(m.group(1), 0) + 1
            if m.group(1) == "irq_handler_entry":
                name = m.group(2).split("name=", 1)[-1]
                handler[name] = handler.get(name, 0) + 1

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - start, 3)

    return {
        "qemu_rc": int(timing["qemu_rc"]),
        "l1_clock": {"qemu_start": start, "qemu_exit": exit_},
        "seconds": {
            "l2_boot_to_init": rel(l2_start),
            "ping_begin": rel(ping_begin),
            "ping": None if ping_begin is None or ping_end is None
            else round(ping_end - ping_begin, 3),
            "teardown_after_poweroff": None if poweroff is None else round(exit_ - poweroff, 3),
            "l2_total": round(exit_ - start, 3),
        },
        "ping": {
            "transmitted": int(ping.group(1)) if ping else None,
            "received": int(ping.group(2)) if ping else None,
            "rtt_min_avg_max_ms": [float(x) for x in rtt.groups()] if rtt else None,
        },
        "l2_guest_delta": guest,
        "l1_host_last_sample": {"t": host_t, "counts": host_last},
        "trace_events": dict(sorted(events.items())),
        "trace_irq_handler_entry": handler,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests/data/lab")
    ap.add_argument("--work", type=Path, help="work directory (default: a new temp dir)")
    ap.add_argument("--keep-work", action="store_true")
    ap.add_argument("--pings", type=int, default=200)
    ap.add_argument("--kernel-pkg", help="default: the generic -amd64-unsigned package "
                    "of the builtin image's kernel ABI")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()

    phases: dict[str, float] = {}
    t = time.monotonic()
    image = builtin_image()
    abi = image["release"].removesuffix("-cloud-amd64")
    kernel_pkg = args.kernel_pkg or f"linux-image-{abi}-amd64-unsigned"
    work = args.work or Path(tempfile.mkdtemp(prefix="lab-capture-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        version = prepare(work, image, kernel_pkg)
        phases["prepare"] = round(time.monotonic() - t, 3)
        argv = l0_argv(work, version, args.pings)
        t = time.monotonic()
        rc, lines = run_l0(argv, work / "l0-console.log", args.timeout)
        phases["l0_qemu_wall"] = round(time.monotonic() - t, 3)
        if not (work / "out").is_dir():
            print(f"capture failed: no results (qemu rc {rc}), see {work}/l0-console.log",
                  file=sys.stderr)
            args.keep_work = True
            return 1
        for name, prefix in [("l1_boot_to_script", "lab-l1: start"),
                             ("l1_modules_bound", "lab-l1: modules loaded"),
                             ("l1_host_fixture_done", "lab-l1: host fixture recorded"),
                             ("l1_tracing_ready", "lab-l1: tracing set up"),
                             ("l1_poweroff", "lab-l1: poweroff")]:
            phases[name] = marker(lines, prefix)
        for name, _ in (r.split(":", 1) for r in RUNS.split(",")):
            phases[f"run_{name}_l0"] = [marker(lines, f"lab-l1: run {name}: start"),
                                        marker(lines, f"lab-l1: run {name}: L2 exited")]
        args.out.mkdir(parents=True, exist_ok=True)
        for item in (work / "out").iterdir():
            dest = args.out / item.name
            if dest.is_dir():
                shutil.rmtree(dest)
            if item.is_dir():
                shutil.copytree(item, dest)
            else:
                shutil.copy(item, dest)
        shutil.copy(work / "l0-console.log", args.out / "l0-console.log")
        (args.out / "l0-qemu-argv.json").write_text(json.dumps(argv, indent=1) + "\n")
        summary = {"kernel_l1": version, "kernel_package_l1": kernel_pkg,
                   "l2_image": image, "l0_qemu_rc": rc,
                   "l0_seconds": phases, "runs": {}}
        for name, _ in (r.split(":", 1) for r in RUNS.split(",")):
            if (args.out / name).is_dir():
                summary["runs"][name] = summarize_run(args.out / name)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(json.dumps(summary, indent=1))
        return 0
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
