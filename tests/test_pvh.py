"""The vmlinux inside Debian's x86 kernel images, which vmtest boots through QEMU's PVH entry
(tests/test_vm.py boots it and loads modules in it)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from rustko import pvh, vm

RELEASES = ("6.1.0-56-amd64", "6.12.117+deb12-amd64")  # xz and zstd payloads


@pytest.mark.parametrize("release", RELEASES)
def test_debian_bzimage_yields_its_pvh_vmlinux(release: str) -> None:
    vmlinuz = vm.debian_kernel(release, "x86_64")
    booted = pvh.boot_image(vmlinuz)
    assert booted != vmlinuz and booted.name == "vmlinux"
    data = booted.read_bytes()
    assert data.startswith(b"\x7fELF\x02") and pvh.PVH_NOTE in data
    assert f"Linux version {release}".encode() in data
    assert pvh.boot_image(vmlinuz) == booted, "made once, then found in the cache"


def test_other_images_boot_as_they_are(tmp_path: Path) -> None:
    arm64 = vm.debian_kernel("6.1.0-56-arm64", "arm64")  # an uncompressed arm64 Image
    assert pvh.payload_vmlinux(arm64.read_bytes()) is None
    broken = tmp_path / "vmlinuz"
    image = bytearray(vm.debian_kernel(RELEASES[0], "x86_64").read_bytes())
    start = ((image[pvh.SETUP_SECTS] or 4) + 1) * 512 + struct.unpack_from("<I", image, pvh.PAYLOAD)[0]
    image[start:start + 16] = bytes(16)  # the payload's start: no compressor's magic
    broken.write_bytes(bytes(image))
    assert pvh.boot_image(broken) == broken
