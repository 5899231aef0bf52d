"""The newc writer, read back by an independent reader written here and by GNU cpio itself."""

from __future__ import annotations

import io
import random
import shutil
import stat
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.images.cpio import Entry, write_newc

FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor", "devminor",
          "rdevmajor", "rdevminor", "namesize", "check")


@dataclass(frozen=True)
class Member:
    name: str
    header: dict[str, int]
    data: bytes


def read_newc(blob: bytes) -> list[Member]:
    """The SVR4 "newc" format, from the spec: 110-byte ASCII header, name + NUL padded to 4,
    data padded to 4; stops at TRAILER!!! and insists on nothing but zero padding after it."""
    members = []
    pos = 0
    while True:
        assert pos % 4 == 0, f"header at unaligned offset {pos}"
        assert blob[pos:pos + 6] == b"070701", f"bad magic at {pos}: {blob[pos:pos + 6]!r}"
        raw = blob[pos + 6:pos + 110]
        assert len(raw) == 104 and all(c in b"0123456789ABCDEF" for c in raw), raw
        header = {f: int(raw[i * 8:(i + 1) * 8], 16) for i, f in enumerate(FIELDS)}
        name_end = pos + 110 + header["namesize"]
        assert blob[name_end - 1] == 0, "name not NUL-terminated"
        name = blob[pos + 110:name_end - 1].decode()
        data_start = name_end + (-name_end) % 4
        assert blob[name_end:data_start] == b"\0" * (data_start - name_end)
        data_end = data_start + header["filesize"]
        data = blob[data_start:data_end]
        pos = data_end + (-data_end) % 4
        assert blob[data_end:pos] == b"\0" * (pos - data_end)
        members.append(Member(name, header, data))
        if name == "TRAILER!!!":
            assert blob[pos:].strip(b"\0") == b""
            return members


def archive(entries: Iterable[Entry], mtime: int = 0) -> bytes:
    out = io.BytesIO()
    write_newc(out, entries, mtime)
    return out.getvalue()


SAMPLE = [
    Entry.directory("etc"),
    Entry.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
    Entry.file("init", b"#!/bin/sh\nexec /sbin/init\n", 0o755),
    Entry.char_device("dev/console", 5, 1),
    Entry.char_device("dev/null", 1, 3, 0o666),
    Entry.symlink("bin/sh", "/bin/busybox"),
    Entry.directory("dev"),
    Entry.file("empty", b""),
    Entry.file("abc", b"x"),  # 1, 2 and 3 bytes of data: each needs different padding
    Entry.file("ab", b"xy"),
    Entry.file("a", b"xyz"),
]


def by_name(members: list[Member]) -> dict[str, Member]:
    return {m.name: m for m in members}


def test_round_trip_through_an_independent_reader() -> None:
    members = read_newc(archive(SAMPLE))
    assert [m.name for m in members] == sorted(e.path for e in SAMPLE) + ["TRAILER!!!"]
    found = by_name(members)
    for entry in SAMPLE:
        member = found[entry.path]
        assert member.data == entry.data
        assert member.header["mode"] == entry.mode
        assert member.header["filesize"] == len(entry.data)
        assert member.header["namesize"] == len(entry.path.encode()) + 1
        assert (member.header["uid"], member.header["gid"]) == (0, 0)
        assert member.header["nlink"] == 1 and member.header["check"] == 0


def test_modes_carry_type_and_permission_bits() -> None:
    found = by_name(read_newc(archive(SAMPLE)))
    assert found["etc"].header["mode"] == stat.S_IFDIR | 0o755
    assert found["init"].header["mode"] == stat.S_IFREG | 0o755
    assert found["etc/passwd"].header["mode"] == stat.S_IFREG | 0o644
    assert found["bin/sh"].header["mode"] == stat.S_IFLNK | 0o777
    assert found["bin/sh"].data == b"/bin/busybox"


def test_char_devices_have_rdev_and_no_data() -> None:
    found = by_name(read_newc(archive(SAMPLE)))
    console, null = found["dev/console"].header, found["dev/null"].header
    assert stat.S_ISCHR(console["mode"]) and stat.S_IMODE(console["mode"]) == 0o600
    assert (console["rdevmajor"], console["rdevminor"]) == (5, 1)
    assert (null["rdevmajor"], null["rdevminor"]) == (1, 3)
    assert stat.S_IMODE(null["mode"]) == 0o666
    assert console["filesize"] == 0 == null["filesize"]
    for member in found.values():
        assert (member.header["devmajor"], member.header["devminor"]) == (0, 0)
        if not stat.S_ISCHR(member.header["mode"]):
            assert (member.header["rdevmajor"], member.header["rdevminor"]) == (0, 0)


def test_trailer_ends_the_archive() -> None:
    members = read_newc(archive(SAMPLE))
    trailer = members[-1]
    assert trailer.name == "TRAILER!!!"
    assert trailer.header["ino"] == 0 and trailer.header["mode"] == 0
    assert trailer.header["filesize"] == 0 and trailer.data == b""
    assert [m.name for m in read_newc(archive([]))] == ["TRAILER!!!"]


def test_inodes_are_distinct_and_mtime_is_the_one_given() -> None:
    members = read_newc(archive(SAMPLE, mtime=1_700_000_000))[:-1]
    assert sorted(m.header["ino"] for m in members) == list(range(1, len(SAMPLE) + 1))
    assert {m.header["mtime"] for m in members} == {1_700_000_000}
    assert {m.header["mtime"] for m in read_newc(archive(SAMPLE))[:-1]} == {0}


def test_parents_come_before_their_members() -> None:
    names = [m.name for m in read_newc(archive(SAMPLE))]
    assert names.index("etc") < names.index("etc/passwd")
    assert names.index("dev") < names.index("dev/console")


def test_same_entries_in_any_order_give_identical_bytes() -> None:
    reference = archive(SAMPLE)
    rng = random.Random(1)
    for _ in range(20):
        shuffled = SAMPLE[:]
        rng.shuffle(shuffled)
        assert archive(shuffled) == reference
    assert archive(list(reversed(SAMPLE))) == reference
    assert archive(iter(SAMPLE)) == reference  # any iterable, consumed once


def test_a_changed_input_changes_the_bytes() -> None:
    changed = [*SAMPLE[:-1], Entry.file("a", b"xyZ")]
    assert archive(changed) != archive(SAMPLE)
    assert archive(SAMPLE, mtime=1) != archive(SAMPLE)


PATHS = st.text(alphabet="abcdefghij/._-", min_size=1, max_size=12).filter(
    lambda p: not p.startswith("/") and p != "TRAILER!!!")


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(PATHS, st.binary(max_size=70), max_size=8))
def test_any_set_of_files_reads_back(files: dict[str, bytes]) -> None:
    entries = [Entry.file(path, data) for path, data in files.items()]
    blob = archive(entries)
    assert len(blob) % 4 == 0
    members = read_newc(blob)
    assert {m.name: m.data for m in members[:-1]} == files


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio is not installed (cpio)")
def test_gnu_cpio_lists_the_archive() -> None:
    blob = archive(SAMPLE)
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=blob, capture_output=True,
                             check=True).stdout.decode().splitlines()
    assert listing == sorted(e.path for e in SAMPLE)
    verbose = subprocess.run(["cpio", "-itv", "--quiet"], input=blob, capture_output=True,
                             check=True).stdout.decode().splitlines()
    rows = {line.split()[-1] if " -> " not in line else line.split()[-3]: line
            for line in verbose}
    assert rows["dev/console"].startswith("crw-------")
    assert "5,   1" in rows["dev/console"]
    assert rows["bin/sh"].startswith("lrwxrwxrwx") and rows["bin/sh"].endswith("-> /bin/busybox")
    assert rows["init"].startswith("-rwxr-xr-x")
    assert rows["etc"].startswith("drwxr-xr-x")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio is not installed (cpio)")
def test_gnu_cpio_extracts_file_contents() -> None:
    files = [e for e in SAMPLE if stat.S_ISREG(e.mode)]
    blob = archive(files)
    for entry in files:
        out = subprocess.run(["cpio", "-i", "--quiet", "--to-stdout", entry.path], input=blob,
                             capture_output=True, check=True).stdout
        assert out == entry.data, entry.path
