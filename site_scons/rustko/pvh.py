"""An x86 kernel's uncompressed vmlinux, which QEMU boots through its PVH entry point.

A bzImage makes the guest decompress the kernel first: under TCG that is slow (Debian 6.1's xz
payload: QEMU spent 9.7-9.8 s of CPU per boot with the bzImage, 4.2-4.5 s with its vmlinux, in
one run on this project's machine). A kernel built with CONFIG_PVH (Debian's are) carries a
`XEN_ELFNOTE_PHYS32_ENTRY` note (arch/x86/platform/pvh/head.S), and QEMU's `-kernel` starts an ELF
with that note there directly (hw/i386/x86.c, since QEMU 4.0). The vmlinux is the bzImage's own
payload, decompressed once here and kept in the cache; any image this cannot read (another
compressor, no PVH note) is booted as it is.
"""

from __future__ import annotations

import hashlib
import lzma
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Callable

from .cache import cache_root, cached_dir

# Documentation/arch/x86/boot.rst, "The Real-Mode Kernel Header": setup_sects at 0x1f1 (0 means
# 4), the "HdrS" magic at 0x202, boot protocol version at 0x206; payload_offset and payload_length
# (protocol 2.08+) at 0x248, counted from the protected-mode code after the setup sectors.
SETUP_SECTS, HDRS, VERSION, PAYLOAD = 0x1F1, 0x202, 0x206, 0x248
# include/xen/interface/elfnote.h XEN_ELFNOTE_PHYS32_ENTRY (18); x86_64's entry is a quad.
PVH_NOTE = struct.pack("<III4s", 4, 8, 18, b"Xen\0")


def _xz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _zstd(data: bytes) -> bytes:
    # cmd_zstd22_with_size appends the decompressed size (4 bytes), which zstd calls garbage.
    done = subprocess.run(["zstd", "-dcq"], input=data[:-4], capture_output=True, check=False)
    return done.stdout if done.returncode == 0 else b""


def _gzip(data: bytes) -> bytes:
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)


# The compressors of arch/x86/boot/compressed/Makefile that Debian's kernels use, by magic.
DECOMPRESS: tuple[tuple[bytes, Callable[[bytes], bytes]], ...] = (
    (b"\xfd7zXZ\x00", _xz),                 # CONFIG_KERNEL_XZ (Debian 6.1)
    (b"\x28\xb5\x2f\xfd", _zstd),           # CONFIG_KERNEL_ZSTD (Debian 6.12)
    (b"\x1f\x8b\x08", _gzip),               # CONFIG_KERNEL_GZIP
)


def payload_vmlinux(image: bytes) -> bytes | None:
    """The ELF vmlinux inside a bzImage with a PVH entry, else None."""
    if len(image) < PAYLOAD + 8 or image[HDRS:HDRS + 4] != b"HdrS":
        return None
    if struct.unpack_from("<H", image, VERSION)[0] < 0x208:
        return None
    setup = (image[SETUP_SECTS] or 4) + 1
    offset, length = struct.unpack_from("<II", image, PAYLOAD)
    payload = image[setup * 512 + offset:setup * 512 + offset + length]
    for magic, decompress in DECOMPRESS:
        if payload.startswith(magic):
            try:
                vmlinux = decompress(payload)
            except (lzma.LZMAError, zlib.error, OSError):
                return None
            if vmlinux.startswith(b"\x7fELF") and PVH_NOTE in vmlinux:
                return vmlinux
    return None


def boot_image(vmlinuz: Path) -> Path:
    """What QEMU's -kernel should get for `vmlinuz`: its vmlinux when it has a PVH entry (made once
    per image content, in the cache), else `vmlinuz` itself."""
    image = vmlinuz.read_bytes()
    entry = cache_root() / "kernels" / "pvh" / hashlib.sha256(image).hexdigest()[:24]

    def fill(tmp: Path) -> None:
        vmlinux = payload_vmlinux(image)
        if vmlinux is not None:
            (tmp / "vmlinux").write_bytes(vmlinux)

    found = cached_dir(entry, fill) / "vmlinux"
    return found if found.is_file() else vmlinuz
