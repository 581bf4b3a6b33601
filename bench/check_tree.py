"""Time `rustko check` over Debian's whole 6.1 amd64 module tree against `readelf -rW`.

Unpacks linux-image-6.1.0-56-amd64-unsigned once into /var/tmp/rustko (never the repo),
decompressing .ko.xz/.ko.zst/.ko.gz modules if the package ships them compressed, then runs
both tools over the same files and prints the two wall times and their ratio (goal: <= 0.5).

    PYTHONPATH=site_scons .venv/bin/python bench/check_tree.py [--kdir DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from rustko import check
from rustko.cache import cached_dir

DEB_DIR = Path("/var/tmp/rustko/debs")
DEB_GLOB = "linux-image-6.1.0-56-amd64-unsigned_*_amd64.deb"
TREE = Path("/var/tmp/rustko/image-6.1-modules")


def module_tree() -> Path:
    debs = sorted(DEB_DIR.glob(DEB_GLOB))
    if not debs:
        sys.exit(f"no {DEB_GLOB} in {DEB_DIR}: `apt-get download linux-image-6.1.0-56-amd64-unsigned` there")

    def fill(tmp: Path) -> None:
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(tmp)], check=True)
        for packed in tmp.rglob("*.ko.*"):
            packed.with_name(packed.name.rsplit(".", 1)[0]).write_bytes(
                check.read_module_bytes(packed))
            packed.unlink()

    return cached_dir(TREE, fill) / "lib/modules"


def time_readelf(files: list[str]) -> float:
    start = time.perf_counter()
    batch = 200
    for i in range(0, len(files), batch):
        subprocess.run(["readelf", "-rW", *files[i:i + batch]], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def time_rustko(tree: Path, kdir: str | None) -> tuple[float, int, int]:
    start = time.perf_counter()
    results = check.check_paths([tree], kdir=kdir)
    elapsed = time.perf_counter() - start
    return elapsed, len(results), sum(1 for _, r in results if r)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kdir", help="also check symbols and vermagic against this KDIR")
    args = parser.parse_args()
    tree = module_tree()
    files = sorted(str(p) for p in tree.rglob("*.ko"))
    size = sum(os.path.getsize(f) for f in files)
    readelf = time_readelf(files)
    rustko, checked, refused = time_rustko(tree, args.kdir)
    print(f"{len(files)} modules, {size / 2**20:.0f} MiB, {os.cpu_count()} cores")
    print(f"{'readelf -rW':<16}{readelf:8.2f} s")
    print(f"{'rustko check':<16}{rustko:8.2f} s   ({checked} checked, {refused} refused)")
    print(f"{'ratio':<16}{rustko / readelf:8.2f}x  (goal <= 0.50x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
