"""L1's kernel booted without its self-decompression: the PVH note found in an ELF, the ELF
taken out of a compressed kernel image by its setup header, anything else left as it is.

The inputs are built here to the formats' specifications (the ELF64 header and program
headers, the x86 boot protocol's setup header fields, an xz stream); the real kernel is
booted this way by every lab run (tests/system/test_lab.py, tests/system/test_manual.py).
"""

from __future__ import annotations

import lzma
import struct
from pathlib import Path

from harness.lab.direct_boot import XEN_ELFNOTE_PHYS32_ENTRY, direct_kernel, has_pvh_entry


def elf_with_note(name: bytes, note_type: int) -> bytes:
    """An ELF64 LE header, one PT_NOTE program header and its note."""
    desc = struct.pack("<I", 0x1000000)
    padded = name + b"\0" * (-len(name) % 4)
    note = struct.pack("<III", len(name), len(desc), note_type) + padded + desc
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", ehdr, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", ehdr, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 64 + 56, 0, 0, len(note), len(note), 4)
    return bytes(ehdr) + phdr + note


def bzimage(payload: bytes, setup_sects: int = 4) -> bytes:
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", head, 0x248, 16, len(payload))  # payload_offset, _length
    return bytes(head) + b"\0" * 16 + payload


def test_the_pvh_entry_note_is_found_and_nothing_else_is_taken_for_it() -> None:
    assert has_pvh_entry(elf_with_note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY))
    assert not has_pvh_entry(elf_with_note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY - 1))
    assert not has_pvh_entry(elf_with_note(b"GNU\0", XEN_ELFNOTE_PHYS32_ENTRY))
    assert not has_pvh_entry(b"MZ" + b"\0" * 100)


def test_a_compressed_pvh_elf_is_taken_out_once_and_cached(tmp_path: Path) -> None:
    elf = elf_with_note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ)))
    cache = tmp_path / "cache"
    direct = direct_kernel(kernel, "k1", cache)
    assert direct == cache / "k1.vmlinux" and direct.read_bytes() == elf
    kernel.unlink()  # the cached one is used, the image is not read again
    assert direct_kernel(kernel, "k1", cache) == direct


def test_an_image_without_such_an_elf_is_booted_as_it_is(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    plain = tmp_path / "Image"
    plain.write_bytes(b"\0" * 0x38 + b"ARM\x64" + b"\0" * 64)  # not a setup header
    assert direct_kernel(plain, "arm", cache) == plain
    no_note = tmp_path / "vmlinuz"
    no_note.write_bytes(bzimage(lzma.compress(elf_with_note(b"GNU\0", 3))))
    assert direct_kernel(no_note, "k2", cache) == no_note
    assert (cache / "k2.none").exists()  # remembered: not decompressed again
