"""Build speed of rustko against Kbuild itself, measured side by side in one run.

Prints four comparisons (median of several runs each, the first build once):
  1. no-op `scons` on examples/hello vs Kbuild's own no-op `make -C KDIR M=` on a C hello module
     (goal: at most 0.5x);
  2. a clean build of examples/hello with a warm sysroot cache vs a clean build of the C module
     (goal: at most 1.2x);
  3. an edit of one source file then a build, Rust vs C (goal: at most 1.2x);
  4. the first build with an empty cache (the sysroot crates examples/hello needs: core and
     compiler_builtins) vs the C module's clean build (goal: at most 5x);
  5. what a machine that installed rustko's .deb (or a container of its image) pays instead:
     `rustko sysroot` once, at install time, then the first build with an empty cache of its own
     reading that prebuilt sysroot, each vs the C module's clean build.

    .venv/bin/python bench/build.py [--kdir DIR] [--runs N] [--warm-only]

Python keeps its bytecode (__pycache__) as on any installed system (dpkg and pip compile it at
install): a PYTHONDONTWRITEBYTECODE in the caller's environment would have every run compile
rustko's sources again (about 80 ms of each `scons`, measured here).
"""

from __future__ import annotations

import argparse
import os
import resource
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
C_HELLO = """\
#include <linux/module.h>
#include <linux/init.h>
static int __init hello_init(void) { pr_info("hello from C\\n"); return 0; }
static void __exit hello_exit(void) { pr_info("goodbye from C\\n"); }
module_init(hello_init);
module_exit(hello_exit);
MODULE_LICENSE("GPL");
"""


CPU: dict[str, list[float]] = {}  # what -> CPU seconds (user + system) of each timed run


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, what: str = "") -> float:
    """Wall seconds of one run; its CPU seconds (every process it waited for) go to CPU[what]:
    on a shared machine the CPU a build needs says what the wall time cannot."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}, **(env or {})})
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.setdefault(what, []).append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return wall


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def default_kdir() -> Path:
    found = sorted(Path("/usr/src").glob("linux-headers-6.1.*-amd64"))
    if not found:
        sys.exit("no Debian 6.1 amd64 headers under /usr/src: run ./dev setup")
    return found[-1]




def report(kdir: Path, runs: int, load_start: str, noop_rust: float, noop_c: float, clean_rust: list[float],
           clean_c: list[float], edit_rust: list[float], edit_c: list[float]) -> None:
    """The notes and the three rows measured with a warm cache."""
    note(f"bench/build.py: KDIR {kdir}, {runs} runs each, medians; reference: Kbuild, C hello module; "
         f"load average {load_start} at the start, {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")
    note("  CPU seconds (user + system), medians: " + ", ".join(
        f"{what} {median(CPU[what]):.2f}" for what in ("no-op rust", "no-op C", "clean rust", "clean C",
                                                       "edit rust", "edit C")))
    row("no-op build: `scons` vs Kbuild's no-op `make -C KDIR M=`", noop_rust, noop_c, 0.5)
    row("clean build, warm sysroot cache, vs the C module's clean build", median(clean_rust), median(clean_c), 1.2)
    row("edit one source file, then build (Rust vs C)", median(edit_rust), median(edit_c), 1.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kdir", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warm-only", action="store_true",
                        help="only the first three rows (no build with an empty cache: minutes)")
    args = parser.parse_args()
    kdir = args.kdir or default_kdir()
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    env = {"PYTHONPATH": str(REPO / "site_scons")}
    with tempfile.TemporaryDirectory(prefix="rustko-bench-") as tmp:
        work = Path(tmp)
        rust = work / "hello"
        shutil.copytree(REPO / "examples/hello", rust, ignore=shutil.ignore_patterns("build"))
        c_mod = work / "chello"
        c_mod.mkdir()
        (c_mod / "chello.c").write_text(C_HELLO)
        (c_mod / "Kbuild").write_text("obj-m := chello.o\n")
        make = ["make", "-C", str(kdir), f"M={c_mod}", "modules"]
        scons = [SCONS, "-Q", f"KDIR={kdir}"]

        # Warm everything once (sysroot cache, page cache), then measure.
        timed(scons, rust, env)
        timed(make, c_mod)
        noop_rust = median([timed(scons, rust, env, "no-op rust") for _ in range(args.runs)])
        noop_c = median([timed(make, c_mod, what="no-op C") for _ in range(args.runs)])

        clean_rust, clean_c = [], []
        for _ in range(args.runs):
            timed(scons + ["-c"], rust, env)
            clean_rust.append(timed(scons, rust, env, "clean rust"))
            timed(["make", "-C", str(kdir), f"M={c_mod}", "clean"], c_mod)
            clean_c.append(timed(make, c_mod, what="clean C"))

        edit_rust, edit_c = [], []
        for index in range(args.runs):
            with open(rust / "src" / "lib.rs", "a") as source:
                source.write(f"\nconst _EDIT_{index}: u32 = {index};\n")
            edit_rust.append(timed(scons, rust, env, "edit rust"))
            with open(c_mod / "chello.c", "a") as source:
                source.write(f"\nstatic const int edit_{index} __attribute__((unused)) = {index};\n")
            edit_c.append(timed(make, c_mod, what="edit C"))

        if args.warm_only:
            report(kdir, args.runs, load_start, noop_rust, noop_c, clean_rust, clean_c, edit_rust, edit_c)
            return
        # A machine without a prebuilt sysroot: nothing in the machine-wide cache either.
        cold_cache, nowhere = work / "cache", work / "no-system-cache"
        timed(scons + ["-c"], rust, env)
        first = timed(scons, rust, {**env, "RUSTKO_CACHE": str(cold_cache), "RUSTKO_SYSTEM_CACHE": str(nowhere)})

        # A machine with rustko's .deb: its postinst ran `rustko sysroot` as root (every crate).
        system, user = work / "system-cache", work / "user-cache"
        as_root = {**env, "RUSTKO_CACHE": str(system), "RUSTKO_SYSTEM_CACHE": str(system)}

        def clean_c_build() -> float:
            timed(["make", "-C", str(kdir), f"M={c_mod}", "clean"], c_mod)
            return timed(make, c_mod)

        c_ref = [clean_c_build()]  # the reference of the two rows below, interleaved with them
        prebuild = timed([sys.executable, "-m", "rustko.cli", "sysroot", str(kdir)], work, as_root)
        c_ref.append(clean_c_build())
        timed(scons + ["-c"], rust, env)
        prebuilt = timed(scons, rust, {**env, "RUSTKO_CACHE": str(user), "RUSTKO_SYSTEM_CACHE": str(system)})
        c_ref.append(clean_c_build())

    report(kdir, args.runs, load_start, noop_rust, noop_c, clean_rust, clean_c, edit_rust, edit_c)
    row("first build, empty cache (core, compiler_builtins), vs the C module", first, median(clean_c), 5.0)
    row("`rustko sysroot` (the .deb's postinst, the image build; once per flag set) vs the C module",
        prebuild, median(c_ref), None)
    row("first build, empty user cache, sysroot prebuilt by the .deb, vs the C module", prebuilt, median(c_ref), 5.0)


if __name__ == "__main__":
    main()
