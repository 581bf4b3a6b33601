"""`rustko vmtest` against a naive boot of the same kernel, measured side by side in one run.

The naive boot is what one would type first (FIELD-NOTES): `qemu-system-x86_64 -accel tcg -cpu max
-m 512 -nographic -no-reboot` with `console=ttyS0 panic=-1` and a busybox initramfs whose /init
powers off at once. Prints, as medians over alternating runs:
  1. `rustko vmtest` of a C hello module (boot, insmod, rmmod, dmesg, power off) vs the naive boot
     (goal: at most 0.6x);
  2. `rustko new` -> `scons` (warm sysroot) -> `rustko vmtest`, all included, vs the naive boot
     (goal: at most 2x).
The kernel is Debian's image of the newest installed 6.1 amd64 headers (fetched once into the cache).

    PYTHONPATH=site_scons .venv/bin/python bench/vmtest.py [--boots N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from check_tree import newest_61_headers
from rustko.kernel import probe
from rustko import arch
from rustko.vm import Cpio, debian_kernel, vmtest
from table import note, row

REPO = Path(__file__).resolve().parent.parent
HELLO = """\
#include <linux/module.h>
#include <linux/init.h>
static int __init hello_init(void) { pr_info("hello: bench\\n"); return 0; }
static void __exit hello_exit(void) { }
module_init(hello_init);
module_exit(hello_exit);
MODULE_LICENSE("GPL");
"""


def hello_module(folder: Path, kdir: Path) -> Path:
    """hello.ko built in `folder` by Kbuild for `kdir`."""
    (folder / "hello.c").write_text(HELLO)
    (folder / "Kbuild").write_text("obj-m := hello.o\n")
    done = subprocess.run(["make", "-s", "-C", str(kdir), f"M={folder}", "modules"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"Kbuild failed for the bench's hello module:\n{done.stderr}")
    return folder / "hello.ko"


def naive_initrd(folder: Path) -> Path:
    """busybox and an /init that powers off at once."""
    archive = Cpio()
    for name in ("bin", "dev", "proc"):
        archive.directory(name)
    archive.chardev("dev/console", 5, 1)
    archive.file("bin/busybox", Path("/bin/busybox").read_bytes(), 0o755)
    archive.symlink("bin/sh", "busybox")
    archive.file("init", b"#!/bin/sh\n/bin/busybox poweroff -f\n", 0o755)
    path = folder / "naive.cpio.gz"
    path.write_bytes(archive.gzipped())
    return path


def naive_boot(vmlinuz: Path, initrd: Path) -> float:
    started = time.monotonic()
    subprocess.run(["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", "512", "-nographic", "-no-reboot",
                    "-kernel", str(vmlinuz), "-initrd", str(initrd), "-append", "console=ttyS0 panic=-1"],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                   timeout=600)
    return time.monotonic() - started


def new_build_vmtest(folder: Path, kdir: Path) -> float:
    """`rustko new` -> `scons` -> `rustko vmtest`, as a user types them."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "site_scons")}
    bin_dir = Path(sys.executable).parent
    started = time.monotonic()
    for cmd, cwd in (([sys.executable, "-m", "rustko.cli", "new", "benchmod"], folder),
                     ([str(bin_dir / "scons"), "-Q", f"KDIR={kdir}"], folder / "benchmod"),
                     ([sys.executable, "-m", "rustko.cli", "vmtest", "build/benchmod.ko"], folder / "benchmod")):
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")
    if "benchmod: hello from Rust" not in done.stdout:
        sys.exit(f"vmtest printed no line of the module:\n{done.stdout}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boots", type=int, default=3)
    args = parser.parse_args()
    kdir = newest_61_headers()
    vmlinuz = debian_kernel(probe(str(kdir)).release, "x86_64")
    with tempfile.TemporaryDirectory(prefix="rustko-bench-") as tmp:
        work = Path(tmp)
        module = hello_module(work, kdir)
        initrd = naive_initrd(work)
        first = vmtest(module, kernel=vmlinuz, arch="x86_64")  # fills the initramfs cache
        if not first.ok:
            sys.exit(f"vmtest of the bench's hello module failed:\n{first.console[-2000:]}")
        (work / "warm").mkdir()
        new_build_vmtest(work / "warm", kdir)  # the template's sysroot crates, built once if missing
        ours, naive, flow = [], [], []
        for index in range(args.boots):
            naive.append(naive_boot(vmlinuz, initrd))
            started = time.monotonic()
            vmtest(module, kernel=vmlinuz, arch="x86_64")
            ours.append(time.monotonic() - started)
            flow_dir = work / f"flow{index}"
            flow_dir.mkdir()
            flow.append(new_build_vmtest(flow_dir, kdir))
    note(f"bench/vmtest.py: kernel {vmlinuz.name} ({' '.join(arch.X86_64.vm.command)}), {args.boots} runs each, "
         "medians; reference: a naive boot (console=ttyS0 panic=-1, /init powers off)")
    row("`rustko vmtest` (C hello: boot, insmod, rmmod, power off) vs a naive boot", statistics.median(ours),
        statistics.median(naive), 0.6)
    row("`rustko new` -> `scons` -> `rustko vmtest`, warm sysroot, vs a naive boot", statistics.median(flow),
        statistics.median(naive), 2.0)


if __name__ == "__main__":
    main()
