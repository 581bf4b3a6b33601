"""Time `rustko check` over Debian's whole 6.1 amd64 module tree against `readelf -rW`.

The tree is the one of the installed 6.1 headers' release: `linux-image-<release>-unsigned`,
fetched with apt and unpacked once into rustko's cache (vm.debian_modules), never the repo. Both
tools run over the same files, read once before so that neither pays for a cold page cache, and
the library is byte-compiled first, as pip and the .deb's postinst leave it. Prints the wall
times (the best of 3 runs over the tree, the median of 5 for one module) and their ratios
(goals: <= 0.5x over the tree, in-process and from the command line, start-up included; one
module from the command line, --kdir included, <= 0.15 s, shown beside `python -c pass`).

    PYTHONPATH=site_scons .venv/bin/python bench/check_tree.py [--kdir DIR] [--symbols]
"""

from __future__ import annotations

import argparse
import compileall
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import rustko
from rustko import check
from rustko.kernel import probe
from rustko.vm import debian_modules
from table import note, row


def newest_61_headers() -> Path:
    """The newest Debian 6.1 amd64 headers under /usr/src (what `./dev setup` installs)."""
    found = [p for p in Path("/usr/src").glob("linux-headers-6.1.*-amd64")
             if re.fullmatch(r"linux-headers-6\.1\.\d+-\d+-amd64", p.name)]
    if not found:
        sys.exit("no Debian 6.1 amd64 headers under /usr/src: run ./dev setup")
    return max(found, key=lambda p: [int(n) for n in re.findall(r"\d+", p.name)])


def rustko_command() -> list[str]:
    """`rustko` as users start it: the console script beside this interpreter (PYTHONPATH still
    puts the checkout's library first), else the module."""
    script = Path(sys.executable).with_name("rustko")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "rustko.cli"]


def children_cpu() -> float:
    """CPU seconds (user+sys) of the children waited for so far: beside a wall time, what a
    busy machine does not change as much."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_readelf(files: list[str], cpu: list[float] | None = None) -> float:
    start, used = time.perf_counter(), children_cpu()
    batch = 200
    for i in range(0, len(files), batch):
        subprocess.run(["readelf", "-rW", *files[i:i + batch]], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
    if cpu is not None:
        cpu.append(children_cpu() - used)
    return time.perf_counter() - start


def time_cli(args: list[str], cpu: list[float] | None = None) -> float:
    start, used = time.perf_counter(), children_cpu()
    subprocess.run([*rustko_command(), "check", *args], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    if cpu is not None:
        cpu.append(children_cpu() - used)
    return time.perf_counter() - start


def time_rustko(tree: Path, kdir: str | None) -> tuple[float, int, int]:
    start = time.perf_counter()
    results = check.check_paths([tree], kdir=kdir)
    elapsed = time.perf_counter() - start
    return elapsed, len(results), sum(1 for _, r in results if r)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kdir", type=Path, help="headers whose release's modules are checked "
                        "(default: the newest installed 6.1 amd64 headers)")
    parser.add_argument("--symbols", action="store_true",
                        help="also check symbols and vermagic against those headers")
    args = parser.parse_args()
    kdir = args.kdir or newest_61_headers()
    tree = debian_modules(probe(kdir).release)
    files = sorted(str(p) for p in tree.rglob("*.ko"))
    if not files or any(tree.rglob("*.ko.*")):
        sys.exit(f"{tree} has compressed modules, which readelf cannot read: pick a release that "
                 "ships plain .ko files (Debian's 6.1 does)")
    size = sum(os.path.getsize(f) for f in files)
    for f in files:  # the page cache warm for both tools
        Path(f).read_bytes()
    compileall.compile_dir(Path(rustko.__file__).parent, quiet=1)
    readelf_cpu: list[float] = []
    readelf = min(time_readelf(files, readelf_cpu) for _ in range(3))
    runs = [time_rustko(tree, str(kdir) if args.symbols else None) for _ in range(3)]
    ours, checked, refused = min(runs)
    symbols = ["--kdir", str(kdir)] if args.symbols else []
    cli_cpu: list[float] = []
    cli = min(time_cli([*symbols, str(tree)], cli_cpu) for _ in range(3))
    # One module from the command line, start-up included, against readelf on the same file and
    # against the interpreter's bare start-up and numpy's import: what the 0.15 s goal is made of.
    module = next((f for f in files if f.endswith("/fs/fat/fat.ko")), files[0])  # mid-sized, loads
    one, one_readelf, bare, numpy = [], [], [], []
    for _ in range(5):
        one.append(time_cli(["--kdir", str(kdir), module]))  # as one checks a module one built
        one_readelf.append(time_readelf([module]))
        bare.append(time_python("pass"))
        numpy.append(time_python("import numpy"))
    note(f"bench/check_tree.py: {tree}: {len(files)} modules, {size / 2**20:.0f} MiB, {os.cpu_count()} cores, "
         f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])} at the end; "
         f"{checked} checked, {refused} refused; CPU seconds (user+sys, least of 3) over the "
         f"tree: `readelf -rW` {min(readelf_cpu):.2f}, `rustko check` command {min(cli_cpu):.2f}; "
         f"one module: {Path(module).name}, medians of 5 "
         f"(`readelf -rW` of it {median(one_readelf):.4f} s, python -c 'import numpy' {median(numpy):.3f} s)")
    row(f"`rustko check` in-process vs `readelf -rW`, {len(files)} modules", ours, readelf, 0.5)
    row(f"`rustko check` command vs `readelf -rW`, {len(files)} modules", cli, readelf, 0.5)
    met = "" if median(one) <= 0.15 else ", ABOVE GOAL"
    row(f"`rustko check --kdir` command, one module (goal <= 0.15 s{met}) vs `python -c pass`",
        median(one), median(bare), None)
    return 0


def time_python(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(main())
