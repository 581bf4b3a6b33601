"""A kernel of another Debian release against the host's own, measured in one run.

Prints (median of several runs each) a clean build of examples/hello, sysroot warm, against the
KDIR of `rustko kdir --release RELEASE` (Kbuild in that release's root) and against the host's
6.1 headers, and their ratio (goal: at most 1.5x); the KDIR preparation itself is timed once,
and is instant when the root is already there.

    .venv/bin/python bench/generations.py [--release 7.3.4+deb13-amd64] [--kdir /usr/src/linux-headers-6.1...] [--runs N]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", default="7.3.4+deb13-amd64")
    parser.add_argument("--kdir", default=(sorted(glob.glob("/usr/src/linux-headers-6.1.*-amd64")) or [""])[-1])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    start = time.perf_counter()
    other = subprocess.run([sys.executable, "-m", "rustko.cli", "kdir", "--release", args.release], env=ENV,
                           check=True, capture_output=True, text=True).stdout.strip()
    note(f"bench/generations.py: rustko kdir --release {args.release}: {time.perf_counter() - start:.1f} s -> {other}")
    with tempfile.TemporaryDirectory(prefix="rustko-bench-") as tmp:
        project = Path(tmp) / "hello"
        shutil.copytree(REPO / "examples" / "hello", project, ignore=shutil.ignore_patterns("build", ".sconsign*"))
        clean_build(project, other)  # warms the sysroots of both flag sets
        clean_build(project, args.kdir)
        theirs = statistics.median(clean_build(project, other) for _ in range(args.runs))
        ours = statistics.median(clean_build(project, args.kdir) for _ in range(args.runs))
    row(f"clean build for {args.release} (Kbuild in its Debian root) vs for the host's {Path(args.kdir).name}",
        theirs, ours, 1.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
