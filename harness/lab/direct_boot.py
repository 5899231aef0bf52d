"""Boot L1's kernel without decompressing it under TCG each time.

A compressed kernel image decompresses itself before it runs: under TCG that alone takes L1
about three seconds of every boot.  When the file carries a whole ELF ``vmlinux`` with a PVH
entry point (the ELF note ``XEN_ELFNOTE_PHYS32_ENTRY``, which Debian's kernels have), QEMU
can load that ELF directly (``-kernel vmlinux``: its PVH boot path, the same initramfs and
command line).  The ELF is taken out of the image once, on the host, and cached beside the
image cache under the image's key; any other image (one whose payload is not such an ELF, a
compression this module does not read) is booted as it is.
"""

from __future__ import annotations

import gzip
import lzma
import os
import struct
import zlib
from pathlib import Path

# The setup header of a compressed kernel image that QEMU boots with -kernel: its payload
# (the compressed ELF) is at payload_offset (0x248) after the setup sectors, payload_length
# (0x24c) long.  Layout: Documentation/arch/x86/boot.rst.
_SETUP_SECTS = 0x1F1
_HEADER_MAGIC = (0x202, b"HdrS")
_PAYLOAD = 0x248
_MAX_ELF_BYTES = 512 << 20
XEN_ELFNOTE_PHYS32_ENTRY = 18


def _payload(data: bytes) -> bytes | None:
    start, magic = _HEADER_MAGIC
    if data[start:start + len(magic)] != magic or len(data) < _PAYLOAD + 8:
        return None
    setup = (data[_SETUP_SECTS] or 4) + 1
    offset, length = struct.unpack_from("<II", data, _PAYLOAD)
    begin = setup * 512 + offset
    return data[begin:begin + length] if length and begin + length <= len(data) else None


def _decompress(payload: bytes) -> bytes | None:
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            return lzma.LZMADecompressor().decompress(payload, _MAX_ELF_BYTES)
        if payload.startswith(b"\x1f\x8b"):
            return gzip.decompress(payload)[:_MAX_ELF_BYTES]
    except (lzma.LZMAError, OSError, EOFError, zlib.error):
        return None
    return None


def has_pvh_entry(elf: bytes) -> bool:
    """An ELF64 little-endian file with a PT_NOTE holding XEN_ELFNOTE_PHYS32_ENTRY."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        base = phoff + i * phentsize
        if base + 56 > len(elf):
            return False
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, base)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, min(p_offset + p_filesz, len(elf))
        while pos + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def direct_kernel(kernel: Path, key: str, cache: Path) -> Path:
    """The kernel L0 should pass to QEMU: the cached PVH ``vmlinux`` inside ``kernel`` when
    it has one (made on first use), else ``kernel`` itself."""
    cached = cache / f"{key}.vmlinux"
    none = cache / f"{key}.none"
    if cached.exists():
        return cached
    if none.exists():
        return kernel
    cache.mkdir(parents=True, exist_ok=True)
    payload = _payload(kernel.read_bytes())
    elf = _decompress(payload) if payload is not None else None
    if elf is None or not has_pvh_entry(elf):
        none.write_bytes(b"")
        return kernel
    aside = cache / f".{key}.vmlinux.{os.getpid()}"
    aside.write_bytes(elf)
    os.replace(aside, cached)
    return cached
