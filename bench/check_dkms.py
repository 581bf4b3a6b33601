"""Time `rustko check --kdir` from the command line over the DKMS corpus against `readelf -rW`.

The corpus is the modules of Debian 12's DKMS packages (main) built by Debian's DKMS for one
kernel (tests/dkmscorpus.py: built once into /var/tmp/rustko-dkms-corpus, outside the clone; the
first run builds it, many minutes). Both tools run over the same files, read once before so that
neither pays for a cold page cache, and the library is byte-compiled first, as pip and the .deb's
postinst leave it. The two commands run interleaved (readelf, rustko, readelf, ...) so that both
see the same load; prints the medians of wall time and of CPU time (user + system) and their
ratios (issue 15's goal: the command, start-up and reading Module.symvers included, <= 2x
readelf over the corpus), once over every module in one run and once per package as a set (one
command per package, as the test does), then where one in-process run spends its time.

    PYTHONPATH=site_scons .venv/bin/python bench/check_dkms.py [--release R] [PACKAGE...]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import dkmscorpus  # noqa: E402
import rustko  # noqa: E402
from check_tree import rustko_command  # noqa: E402


RUNS = 5


def timed(argv: list[str]) -> tuple[float, float]:
    """(wall, CPU = user + system) seconds of one run of `argv`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def interleaved(commands: list[list[list[str]]]) -> list[tuple[float, float]]:
    """Median (wall, CPU) of each command group (a group's commands run one after another),
    the groups taking turns RUNS times."""
    runs: list[list[tuple[float, float]]] = [[] for _ in commands]
    for _ in range(RUNS):
        for group, out in zip(commands, runs):
            times = [timed(argv) for argv in group]
            out.append((sum(w for w, _ in times), sum(c for _, c in times)))
    return [(median(w for w, _ in out), median(c for _, c in out)) for out in runs]


BREAKDOWN = """
import json, sys, time
from pathlib import Path
marks, last = [], (time.perf_counter(), time.process_time())
def mark(label):
    global last
    now = (time.perf_counter(), time.process_time())
    marks.append((label, now[0] - last[0], now[1] - last[1]))
    last = (time.perf_counter(), time.process_time())
from rustko import check, cli
mark("imports (rustko.cli, rustko.check)")
files, kdir = json.loads(sys.argv[1]), sys.argv[2]
view = check._view(kdir, ())
mark("KDIR probe, Module.symvers")
from rustko.elf import Elf, read_module_bytes
elves = [Elf(read_module_bytes(Path(f)), f) for f in files]
mark("reading the files, ELF headers")
pure, real = [0.0, 0.0], check._clean_small
def clean(*args):
    start = (time.perf_counter(), time.process_time())
    said = real(*args)
    pure[0] += time.perf_counter() - start[0]
    pure[1] += time.process_time() - start[1]
    return said
check._clean_small = clean
for elf in elves:
    check._check_read(elf, view, None, None, False)
mark("checking each module, once")
marks.append(("  of which the pure relocation pass", *pure))
check._clean_small = real
numpy = "numpy" in sys.modules
check.check_paths(files, kdir)
mark("check_paths: exports gathered, each module checked, findings located")
print(json.dumps([marks, numpy, "numpy" in sys.modules]))
"""


def breakdown(files: list[str], kdir: Path) -> list[tuple[str, float, float]]:
    """Where one in-process run spends its time, stage by stage (wall, CPU), in a fresh
    interpreter so that its imports count."""
    done = subprocess.run([sys.executable, "-c", BREAKDOWN, json.dumps(files), str(kdir)],
                          capture_output=True, text=True, check=True)
    marks, before, after = json.loads(done.stdout)
    return [*marks, (f"numpy imported by the checks: {before}, by check_paths: {after}", 0.0, 0.0)]


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
    (readelf, readelf_cpu), (whole, whole_cpu), (readelf_each, _), (each, _) = interleaved(
        [[["readelf", "-rW", *files]], [[*check, *files]],
         [["readelf", "-rW", *group] for group in sets.values()],
         [[*check, *group] for group in sets.values()]])
    (bare, _), (numpy, numpy_cpu) = interleaved([[[sys.executable, "-c", "pass"]],
                                                 [[sys.executable, "-c", "import numpy"]]])
    size = sum(os.path.getsize(f) for f in files)
    print(f"{args.release}: {len(files)} modules of {len(sets)} packages, {size / 2**20:.1f} MiB, "
          f"{os.cpu_count()} cores, load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}; "
          f"medians of {RUNS}, interleaved: python -c pass {bare:.3f} s, python -c 'import numpy' "
          f"{numpy:.3f} s ({numpy_cpu:.3f} s CPU)")
    print(f"{'':34}{'wall':>8}   {'CPU':>8}")
    print(f"{'readelf -rW (one run)':<34}{readelf:8.3f} s {readelf_cpu:8.3f} s")
    print(f"{'rustko check --kdir (one run)':<34}{whole:8.3f} s {whole_cpu:8.3f} s   "
          f"{whole / readelf:.2f}x wall, {whole_cpu / readelf_cpu:.2f}x CPU  (goal <= 2x)")
    print(f"{'readelf -rW (per package)':<34}{readelf_each:8.3f} s")
    print(f"{'rustko check --kdir (per package)':<34}{each:8.3f} s   {each / readelf_each:.2f}x")
    print("where one in-process run spends its time (one run, not a median):             wall       CPU")
    for label, wall, cpu in breakdown(files, kdir):
        print(f"  {label:<52}{wall:8.3f} s {cpu:8.3f} s CPU" if wall or cpu else f"  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
