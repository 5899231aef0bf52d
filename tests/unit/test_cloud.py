"""The cloud-image helpers, with the real qemu-img and genisoimage (no guest boots here)."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from harness.errors import ImageError
from harness.images.builder import guest_images_dir
from harness.images.cloud import make_overlay, make_seed, user_data

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHarnessTestKeyOnlyxxxxxxxxxxxxxxxxxxxxxxxxx"


def test_user_data_is_cloud_config_with_key_agent_and_markers() -> None:
    text = user_data(KEY, "root", "ttyS0")
    assert text.startswith("#cloud-config\n")
    config = yaml.safe_load(text)
    assert config["disable_root"] is False
    assert config["users"][0] == {"name": "root", "ssh_authorized_keys": [KEY]}
    (agent,) = config["write_files"]
    assert agent["path"] == "/usr/local/bin/harness-agent"
    shipped = (guest_images_dir() / "agent" / "harness-agent").read_bytes()
    assert base64.b64decode(agent["content"]) == shipped
    assert "harness-init: start" in config["bootcmd"][0][2]
    assert "harness-hostkey:" in config["runcmd"][0][2]
    assert "> /dev/ttyS0" in config["runcmd"][0][2]
    other = yaml.safe_load(user_data(KEY, "root", "ttyAMA0"))
    assert "> /dev/ttyAMA0" in other["bootcmd"][0][2] and "ttyS0" not in other["runcmd"][0][2]


def test_a_non_root_user_gets_sudo_and_root_stays_locked() -> None:
    config = yaml.safe_load(user_data(KEY, "debian", "ttyS0"))
    assert config["disable_root"] is True
    assert config["users"][0]["sudo"] == "ALL=(ALL) NOPASSWD:ALL"


@pytest.mark.skipif(shutil.which("isoinfo") is None,
                    reason="host capability missing: isoinfo (genisoimage package)")
def test_seed_is_a_cidata_iso_holding_both_files(tmp_path: Path) -> None:
    iso = make_seed(tmp_path, "vm0", KEY, "root", "ttyS0")
    info = subprocess.run(["isoinfo", "-d", "-i", str(iso)], capture_output=True, text=True,
                          check=True).stdout
    assert "Volume id: cidata" in info
    listing = subprocess.run(["isoinfo", "-R", "-f", "-i", str(iso)], capture_output=True,
                             text=True, check=True).stdout.split()
    assert sorted(listing) == ["/meta-data", "/user-data"]


@pytest.mark.skipif(shutil.which("qemu-img") is None,
                    reason="host capability missing: qemu-img (qemu-utils package)")
def test_overlay_is_backed_by_the_image_and_leaves_it_alone(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    before = base.read_bytes()
    overlay = make_overlay(base, "qcow2", tmp_path, "vm0")
    info = subprocess.run(["qemu-img", "info", "--output=json", str(overlay)],
                          capture_output=True, text=True, check=True).stdout
    assert f'"backing-filename": "{base}"' in info
    assert base.read_bytes() == before


def test_overlay_of_a_missing_image_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        make_overlay(tmp_path / "nope.qcow2", "qcow2", tmp_path, "vm0")
