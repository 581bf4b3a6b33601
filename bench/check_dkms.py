"""Time `rustko check --kdir` from the command line over the DKMS corpus against `readelf -rW`.

The corpus is the modules of Debian 12's DKMS packages (main) built by Debian's DKMS for one
kernel (tests/dkmscorpus.py: built once into /var/tmp/rustko-dkms-corpus, outside the clone; the
first run builds it, many minutes). Both tools run over the same files, read once before so that
neither pays for a cold page cache, and the library is byte-compiled first, as pip and the .deb's
postinst leave it. Prints wall times and ratios (issue 15's goal: the command,
start-up and reading Module.symvers included, <= 2x readelf over the corpus), once over every
module in one run and once per package as a set (one command per package, as the test does).

    PYTHONPATH=site_scons .venv/bin/python bench/check_dkms.py [--release R] [PACKAGE...]
"""

from __future__ import annotations

import argparse
import compileall
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import dkmscorpus  # noqa: E402
import rustko  # noqa: E402


def rustko_command() -> list[str]:
    """`rustko` as users start it: the console script beside this interpreter (PYTHONPATH still
    puts the checkout's library first), else the module."""
    script = Path(sys.executable).with_name("rustko")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "rustko.cli"]


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", default=dkmscorpus.RELEASES[0], choices=dkmscorpus.RELEASES)
    parser.add_argument("packages", nargs="*", help="DKMS packages (default: the test case set, dkmscorpus.CHOSEN)")
    args = parser.parse_args()
    packages = args.packages or dkmscorpus.CHOSEN[args.release]
    folders = dkmscorpus.build(packages, (args.release,), lambda line: print(line, file=sys.stderr))[args.release]
    kdir = Path("/usr/src") / f"linux-headers-{args.release}"
    if not kdir.is_dir():
        sys.exit(f"no headers at {kdir}: run ./dev setup")
    sets = {package: sorted(str(p) for p in folder.glob("*.ko")) for package, folder in folders.items()}
    sets = {package: files for package, files in sets.items() if files}
    files = [f for group in sets.values() for f in group]
    for f in files:  # the page cache warm for both tools
        Path(f).read_bytes()
    compileall.compile_dir(Path(rustko.__file__).parent, quiet=1)
    check = [*rustko_command(), "check", "--kdir", str(kdir)]
    readelf = min(timed(["readelf", "-rW", *files]) for _ in range(3))
    whole = min(timed([*check, *files]) for _ in range(3))
    readelf_each = sum(timed(["readelf", "-rW", *group]) for group in sets.values())
    each = sum(timed([*check, *group]) for group in sets.values())
    bare = min(timed([sys.executable, "-c", "pass"]) for _ in range(3))
    numpy = min(timed([sys.executable, "-c", "import numpy"]) for _ in range(3))
    size = sum(os.path.getsize(f) for f in files)
    print(f"{args.release}: {len(files)} modules of {len(sets)} packages, {size / 2**20:.1f} MiB, "
          f"{os.cpu_count()} cores, load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}; "
          f"best of 3: python -c pass {bare:.3f} s, python -c 'import numpy' {numpy:.3f} s")
    print(f"{'readelf -rW (one run)':<34}{readelf:8.2f} s")
    print(f"{'rustko check --kdir (one run)':<34}{whole:8.2f} s   {whole / readelf:.2f}x  (goal <= 2x)")
    print(f"{'readelf -rW (per package)':<34}{readelf_each:8.2f} s")
    print(f"{'rustko check --kdir (per package)':<34}{each:8.2f} s   {each / readelf_each:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
