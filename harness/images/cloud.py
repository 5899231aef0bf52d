"""Bring-your-own cloud images: a qcow2 overlay (the image is never written) and a
cloud-init NoCloud seed that authorizes the run's key, installs the agent, and prints the
markers the harness waits for on the serial console, the SSH host key among them.

Needs ``qemu-img`` (qemu-utils) and ``genisoimage`` on the host.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

from harness.errors import HostError, ImageError
from harness.images.builder import guest_images_dir


def _markers(console: str) -> dict[str, str]:
    """Console markers, the same lines the builtin guest's /init prints, on ``/dev/<console>``."""
    tty = f"/dev/{console}"
    return {
        "start": f'echo "harness-init: start $(cut -d" " -f1 /proc/uptime)" > {tty}',
        "ready": ('k=$(cut -d" " -f1,2 /etc/ssh/ssh_host_ed25519_key.pub); '
                  f'echo "harness-hostkey: $k" > {tty}; '
                  f'echo "harness-init: ready $(cut -d" " -f1 /proc/uptime)" > {tty}'),
    }


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise HostError(name, f"not installed; cloud images need it (apt-get install {package})")
    return path


def user_data(public_key_line: str, user: str, console: str) -> str:
    """The #cloud-config document (JSON is valid YAML, and needs no YAML writer)."""
    agent = (guest_images_dir() / "agent" / "harness-agent").read_bytes()
    markers = _markers(console)
    config = {
        "disable_root": user != "root",
        "users": [{"name": user, "ssh_authorized_keys": [public_key_line],
                   **({} if user == "root" else {"sudo": "ALL=(ALL) NOPASSWD:ALL",
                                                  "shell": "/bin/sh"})}],
        "ssh_pwauth": False,
        "write_files": [{"path": "/usr/local/bin/harness-agent", "permissions": "0755",
                         "encoding": "b64", "content": base64.b64encode(agent).decode()}],
        "bootcmd": [["sh", "-c", markers["start"]]],
        "runcmd": [["sh", "-c", markers["ready"]]],
    }
    return "#cloud-config\n" + json.dumps(config, indent=1) + "\n"


def make_seed(folder: Path, name: str, public_key_line: str, user: str, console: str) -> Path:
    """A NoCloud seed ISO (volume label "cidata") in ``folder``."""
    genisoimage = _tool("genisoimage", "genisoimage")
    src = folder / f"{name}.seed"
    src.mkdir(exist_ok=True)
    (src / "user-data").write_text(user_data(public_key_line, user, console))
    (src / "meta-data").write_text(f"instance-id: harness-{name}\nlocal-hostname: {name}\n")
    iso = folder / f"{name}.seed.iso"
    done = subprocess.run([genisoimage, "-quiet", "-output", str(iso), "-volid", "cidata",
                           "-joliet", "-rock", str(src / "user-data"), str(src / "meta-data")],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ImageError(f"genisoimage failed: {done.stderr.strip()[-300:]}")
    return iso


def make_overlay(disk: Path, fmt: str, folder: Path, name: str) -> Path:
    """A qcow2 overlay backed by the user's image, so the run never writes to it."""
    qemu_img = _tool("qemu-img", "qemu-utils")
    if not disk.is_file():
        raise ImageError(f"cloud image {disk}: no such file")
    overlay = folder / f"{name}.overlay.qcow2"
    done = subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-F", fmt, "-b",
                           str(disk.resolve()), str(overlay)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ImageError(f"qemu-img create (overlay of {disk}) failed: "
                         f"{done.stderr.strip()[-300:]}")
    return overlay
