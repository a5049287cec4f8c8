#!/usr/bin/env python3
"""Cuts the ELF vmlinux out of an x86 bzImage and checks that it has a PVH entry note.

The setup header of a bzImage (Documentation/arch/x86/boot.rst) gives the compressed kernel:
payload_offset (u32 at 0x248) counts from the start of the protected-mode code, which begins
after the real-mode setup sectors ((setup_sects or 4) + 1) * 512; payload_length (u32 at 0x24c)
includes a 4-byte little-endian trailer holding the decompressed size. Debian compresses the
payload with zstd; gzip, xz and lz4 payloads are recognised too.

Usage: extract-vmlinux.py BZIMAGE OUTPUT
"""

import struct
import subprocess
import sys

HEADER_MAGIC = b"HdrS"
ELF_MAGIC = b"\x7fELF"
XEN_ELFNOTE_PHYS32_ENTRY = 18
DECOMPRESSORS = (
    (b"\x28\xb5\x2f\xfd", ["zstd", "-q", "-d", "-c"]),
    (b"\x1f\x8b", ["gzip", "-d", "-c"]),
    (b"\xfd7zXZ\x00", ["xz", "-d", "-c"]),
    (b"\x02\x21\x4c\x18", ["lz4", "-d", "-c"]),
)


def fail(message):
    sys.stderr.write(f"extract-vmlinux: error: {message}\n")
    sys.exit(1)


def payload(image):
    """Returns the compressed payload of a bzImage, without its size trailer."""
    if len(image) < 0x250 or image[0x202:0x206] != HEADER_MAGIC:
        fail("not a bzImage (no HdrS setup header at 0x202)")
    setup_sects = image[0x1F1] or 4
    (offset, length) = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    end = start + length - 4
    if length <= 4 or end > len(image):
        fail(f"payload {start:#x}+{length:#x} lies outside the {len(image)}-byte image")
    return image[start:end]


def decompress(data):
    for (magic, command) in DECOMPRESSORS:
        if data.startswith(magic):
            result = subprocess.run(command, input=data, capture_output=True, check=False)
            if result.returncode != 0:
                fail(f"{command[0]} failed: {result.stderr.decode(errors='replace').strip()}")
            return result.stdout
    fail(f"unknown payload compression (first bytes {data[:6].hex()})")
    return b""


def pvh_entry(elf):
    """Returns the 32-bit PVH entry address from the ELF's Xen notes, or None."""
    if not elf.startswith(ELF_MAGIC) or elf[4] != 2 or elf[5] != 1:
        fail("decompressed payload is not a little-endian ELF64 file")
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    (phentsize, phnum) = struct.unpack_from("<HH", elf, 0x36)
    for index in range(phnum):
        (p_type, _flags, p_offset, _vaddr, _paddr, p_filesz) = struct.unpack_from(
            "<IIQQQQ", elf, phoff + index * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        position = p_offset
        while position + 12 <= p_offset + p_filesz:
            (namesz, descsz, note_type) = struct.unpack_from("<III", elf, position)
            name_start = position + 12
            desc_start = name_start + ((namesz + 3) & ~3)
            name = elf[name_start:name_start + namesz].rstrip(b"\x00")
            if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                width = "<Q" if descsz == 8 else "<I"
                return struct.unpack_from(width, elf, desc_start)[0]
            position = desc_start + ((descsz + 3) & ~3)
    return None


def main():
    if len(sys.argv) != 3:
        fail("usage: extract-vmlinux.py BZIMAGE OUTPUT")
    with open(sys.argv[1], "rb") as source:
        image = source.read()
    elf = decompress(payload(image))
    entry = pvh_entry(elf)
    if entry is None:
        fail("the vmlinux has no Xen PVH entry note (type 18): kernel built without CONFIG_PVH")
    with open(sys.argv[2], "wb") as target:
        target.write(elf)
    print(f"vmlinux: {len(elf)} bytes, PVH entry {entry:#x}")


if __name__ == "__main__":
    main()
