"""A kernel of another Debian release against the host's own, measured in one run.

Reports the two costs issue 9 names:
- preparing a KDIR and root for a new release, once: `rustko kdir --release RELEASE` timed. It is
  instant when this machine already has the root; `--cold` times it in a fresh state folder
  (debootstrap of the release, apt lists, the headers with their gcc and linux-kbuild; minutes,
  and 600 to 900 MB written under /var/tmp, removed afterwards).
- a second build for the same release: clean builds of examples/hello, sysroot warm (median of
  several), against that KDIR (Kbuild in the release's root) and against the host's 6.1 headers,
  and their ratio (goal: at most 1.5x).

    .venv/bin/python bench/generations.py [--release 7.3.4+deb13-amd64] [--kdir /usr/src/linux-headers-6.1...] [--runs N] [--cold]
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from table import note, row

REPO = Path(__file__).resolve().parent.parent
SCONS = str(Path(sys.executable).parent / "scons")
ENV = {**os.environ, "PYTHONPATH": str(REPO / "site_scons")}


def clean_build(project: Path, kdir: str) -> float:
    shutil.rmtree(project / "build", ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([SCONS, "-Q", f"KDIR={kdir}"], cwd=project, check=True, env=ENV,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def prepare(release: str, cold: bool) -> str:
    """Time `rustko kdir --release` (in a fresh state folder with --cold) and print it; the KDIR."""
    with tempfile.TemporaryDirectory(prefix="rustko-bench-cold-", dir="/var/tmp") as fresh:
        env = {**ENV, "RUSTKO_DEBIAN": fresh, "RUSTKO_CACHE": fresh} if cold else ENV
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "rustko.cli", "kdir", "--release", release], env=env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        size = subprocess.run(["du", "-sm", fresh], capture_output=True, text=True).stdout.split()[0] if cold else ""
    state = f"a fresh root, {size} MB" if cold else "this machine's root; --cold times a fresh one"
    note(f"bench/generations.py: preparing a KDIR and root for {release}, once ({state}): {seconds:.1f} s")
    kdir = subprocess.run([sys.executable, "-m", "rustko.cli", "kdir", "--release", release], env=ENV,
                          check=True, capture_output=True, text=True).stdout.strip()
    return kdir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", default="7.3.4+deb13-amd64")
    parser.add_argument("--kdir", default=(sorted(glob.glob("/usr/src/linux-headers-6.1.*-amd64")) or [""])[-1])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="time the preparation in a fresh state folder")
    args = parser.parse_args()
    other = prepare(args.release, args.cold)
    with tempfile.TemporaryDirectory(prefix="rustko-bench-") as tmp:
        project = Path(tmp) / "hello"
        shutil.copytree(REPO / "examples" / "hello", project, ignore=shutil.ignore_patterns("build", ".sconsign*"))
        clean_build(project, other)  # warms the sysroots of both flag sets
        clean_build(project, args.kdir)
        theirs = statistics.median(clean_build(project, other) for _ in range(args.runs))
        ours = statistics.median(clean_build(project, args.kdir) for _ in range(args.runs))
    row(f"a second build for {args.release} (clean, sysroot warm, Kbuild in its Debian root) vs the host "
        f"build for {Path(args.kdir).name}", theirs, ours, 1.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
