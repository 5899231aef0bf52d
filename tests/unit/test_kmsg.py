"""The host kernel's log from a moment on (harness.host.kmsg), on this host's /dev/kmsg."""

from __future__ import annotations

import os
import uuid

import pytest

from harness.host.kmsg import KernelLog, parse_record


def test_a_record_as_dev_kmsg_gives_it() -> None:
    # read from this machine's /dev/kmsg (a virtio disk resized); continuation lines dropped
    raw = ("5,461,14397491942,-;virtio_blk virtio1: [vda] new size: 536870912 512-byte logical "
           "blocks (275 GB/256 GiB)\n SUBSYSTEM=virtio\n DEVICE=+virtio:virtio1\n")
    record = parse_record(raw)
    assert record is not None
    assert (record.level, record.seconds) == (5, 14397.491942)
    assert record.text.endswith("(275 GB/256 GiB)") and "SUBSYSTEM" not in record.text
    assert str(record).startswith("[14397.491942] notice: virtio_blk virtio1:")
    user = parse_record("12,1,2,-;a user-space record at facility 1, warning")
    assert user is not None and user.level == 4
    assert parse_record("no separator") is None and parse_record("x,y;text") is None


@pytest.mark.skipif(not os.access("/dev/kmsg", os.R_OK | os.W_OK),
                    reason="/dev/kmsg is not readable and writable here (needs root)")
def test_only_what_was_logged_since_open_is_read() -> None:
    before = f"harness-test before {uuid.uuid4().hex}"
    after = f"harness-test after {uuid.uuid4().hex}"
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write(f"<4>{before}\n")
    log = KernelLog.open()
    assert log is not None
    try:
        with open("/dev/kmsg", "w") as kmsg:
            kmsg.write(f"<4>{after}\n")
        records, dropped = log.read()
        texts = [r.text for r in records]
        assert after in texts and before not in texts, texts
        (mine,) = [r for r in records if r.text == after]
        assert mine.level == 4 and dropped == 0
        assert log.read() == ([], 0)  # read once
    finally:
        log.close()


def test_a_log_that_cannot_be_opened_is_none() -> None:
    assert KernelLog.open("/nonexistent/kmsg") is None


@pytest.mark.skipif(not os.access("/dev/kmsg", os.R_OK | os.W_OK),
                    reason="/dev/kmsg is not readable and writable here (needs root)")
def test_the_latest_records_are_kept_and_the_rest_counted() -> None:
    log = KernelLog.open()
    assert log is not None
    try:
        tag = uuid.uuid4().hex
        with open("/dev/kmsg", "w") as kmsg:
            for i in range(5):
                kmsg.write(f"<6>harness-test {tag} {i}\n")
                kmsg.flush()
        records, dropped = log.read(limit=2)
        mine = [r.text for r in records if tag in r.text]
        assert mine == [f"harness-test {tag} 3", f"harness-test {tag} 4"]
        assert dropped >= 3
    finally:
        log.close()
