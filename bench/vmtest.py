"""Time `rustko vmtest` boots: where the seconds of a test run go (cache fill vs. TCG boot).

Without MODULE.ko (as `./dev bench` runs it), boots a C hello module that Kbuild builds against
the newest installed 6.1 amd64 headers, so a fresh machine measures Debian's matching kernel.

Usage: PYTHONPATH=site_scons .venv/bin/python bench/vmtest.py [MODULE.ko] [--boots N] [--kernel VMLINUZ]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from check_tree import newest_61_headers
from rustko.vm import arch_of, vmtest

HELLO = """\
#include <linux/module.h>
#include <linux/init.h>
static int __init hello_init(void) { pr_info("hello: bench\\n"); return 0; }
static void __exit hello_exit(void) { }
module_init(hello_init);
module_exit(hello_exit);
MODULE_LICENSE("GPL");
"""


def hello_module(folder: Path) -> Path:
    """hello.ko built in `folder` by Kbuild for the newest 6.1 headers."""
    (folder / "hello.c").write_text(HELLO)
    (folder / "Kbuild").write_text("obj-m := hello.o\n")
    done = subprocess.run(["make", "-s", "-C", str(newest_61_headers()), f"M={folder}", "modules"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"Kbuild failed for the bench's hello module:\n{done.stderr}")
    return folder / "hello.ko"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", nargs="?", help="default: a C hello module for the 6.1 headers")
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--kernel")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rustko-bench-") as tmp:
        module = args.module or str(hello_module(Path(tmp)))
        arch = arch_of(module)
        started = time.monotonic()
        first = vmtest(module, kernel=args.kernel, arch=arch)
        print(f"first run (kernel and initramfs cache filled if needed): {time.monotonic() - started:.1f} s, ok={first.ok}")
        qemu = [first.seconds]
        for _ in range(args.boots - 1):
            qemu.append(vmtest(module, kernel=args.kernel, arch=arch).seconds)
    print(f"QEMU wall time over {len(qemu)} boots: median {statistics.median(qemu):.1f} s, max {max(qemu):.1f} s")


if __name__ == "__main__":
    main()
