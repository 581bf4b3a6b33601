"""Time `rustko vmtest` boots: where the seconds of a test run go (cache fill vs. TCG boot).

Usage: PYTHONPATH=site_scons .venv/bin/python bench/vmtest.py MODULE.ko [BOOTS] [--kernel VMLINUZ]
"""

from __future__ import annotations

import argparse
import statistics
import time

from rustko.vm import arch_of, vmtest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module")
    parser.add_argument("boots", type=int, nargs="?", default=3)
    parser.add_argument("--kernel")
    args = parser.parse_args()
    arch = arch_of(args.module)
    started = time.monotonic()
    first = vmtest(args.module, kernel=args.kernel, arch=arch)
    print(f"first run (kernel and initramfs cache filled if needed): {time.monotonic() - started:.1f} s, ok={first.ok}")
    qemu = [first.seconds]
    for _ in range(args.boots - 1):
        qemu.append(vmtest(args.module, kernel=args.kernel, arch=arch).seconds)
    print(f"QEMU wall time over {len(qemu)} boots: median {statistics.median(qemu):.1f} s, max {max(qemu):.1f} s")


if __name__ == "__main__":
    main()
