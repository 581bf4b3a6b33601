"""Cross-building for arm64 on this amd64 host, end to end and without mocks: `rustko kdir` makes
a KDIR from Debian's arm64 headers, `scons ARCH=arm64` builds Rust modules against it, and
Debian's real arm64 6.1 kernel (QEMU, TCG) loads them, or refuses them exactly as the checker said.

Builds run two at a time and each module boots as soon as it is built (each boot is about 6 s,
the arm64 sysroot about 25 s once).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

from conftest import copy_example, require_kdir, rustko, scons
from rustko import check, vm
from rustko.kernel import probe

SERIES_61 = re.compile(r"6\.1\.0-\d+-arm64")  # Debian 12's arm64 6.1 flavour, e.g. 6.1.0-56-arm64


def _require_arm64_tools() -> None:
    """Missing parts are a failure, not a skip: `./dev setup` installs them."""
    for program, package in (("qemu-system-aarch64", "qemu-system-arm"), ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
                             ("apt-get", "apt"), ("dpkg-deb", "dpkg")):
        if shutil.which(program) is None:
            pytest.fail(f"{program} is not installed ({package}): run ./dev setup")
    foreign = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout
    if "arm64" not in foreign.split():
        pytest.fail("dpkg has no arm64 architecture: run ./dev setup")


@pytest.fixture(scope="session")
def arm64_kdir() -> Path:
    _require_arm64_tools()
    proc = rustko("kdir", "--arch", "arm64")  # the newest 6.1 arm64 headers Debian offers
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip())


@pytest.fixture(scope="session")
def release(arm64_kdir: Path) -> str:
    return probe(arm64_kdir).release


Run = tuple[Path, subprocess.CompletedProcess[str], "vm.VmResult | None"]


def _build_and_boot(project: Path, kdir: Path, *args: str) -> Run:
    """scons, then (if a .ko came out, even a refused one: kept unpublished for inspection in
    build/.rustko/NAME/) a boot with the arch read from the ELF."""
    built = scons(project, f"KDIR={kdir}", *args)
    ko = project / "build" / f"{project.name}.ko"
    if not ko.is_file():
        ko = project / "build" / ".rustko" / project.name / f"{project.name}.ko"
    return project, built, (vm.vmtest(ko, arch=vm.arch_of(ko)) if ko.is_file() else None)


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory, arm64_kdir: Path) -> Iterator[dict[str, Future]]:
    """Every build + boot of this file, two at a time; the two sysroots (arm64, x86_64) build in parallel."""
    root = tmp_path_factory.mktemp("arm64")
    kdir61 = require_kdir("6.1")
    hello = copy_example(root / "hello-arm64" / "hello", "hello")
    cglobal = copy_example(root / "cglobal-arm64" / "cglobal", "cglobal")
    cglobal_x86 = copy_example(root / "cglobal-x86" / "cglobal", "cglobal")
    pic = copy_example(root / "cglobal-pic" / "cglobal", "cglobal")
    sconstruct = pic / "SConstruct"
    sconstruct.write_text(sconstruct.read_text().replace(
        'c_sources=', 'rustflags=["-Crelocation-model=pic"], c_sources='))
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {
        "hello": pool.submit(_build_and_boot, hello, arm64_kdir, "ARCH=arm64"),
        "cglobal-x86": pool.submit(_build_and_boot, cglobal_x86, kdir61),
        "cglobal": pool.submit(_build_and_boot, cglobal, arm64_kdir, "ARCH=aarch64"),
        "pic": pool.submit(_build_and_boot, pic, arm64_kdir, "ARCH=arm64"),
    }
    yield futures
    pool.shutdown()


def _loaded(run: Future, line: str) -> vm.VmResult:
    _, built, booted = run.result()
    assert built.returncode == 0, built.stdout + built.stderr
    assert booted is not None and booted.ok, booted and (booted.failure or booted.console[-3000:])
    assert any(line in entry for entry in booted.module_log), booted.module_log
    return booted


def test_kdir_is_prepared_once_from_debians_packages(arm64_kdir: Path, release: str) -> None:
    assert probe(arm64_kdir).arch == "arm64" and SERIES_61.fullmatch(release), release
    assert (arm64_kdir / "scripts").resolve() == Path("/usr/lib/linux-kbuild-6.1/scripts")
    common = release.removesuffix("-arm64") + "-common"
    assert (arm64_kdir / "Makefile").read_text().startswith(f"include ../linux-headers-{common}/Makefile")
    assert not str(arm64_kdir).startswith("/usr/src")
    started = time.monotonic()
    again = rustko("kdir", "--arch", "aarch64", "--release", release)
    assert again.returncode == 0, again.stderr
    assert time.monotonic() - started < 10
    assert again.stdout == f"{arm64_kdir}\n" and again.stderr == ""


def test_kdir_refuses_an_unknown_release_with_a_hint() -> None:
    proc = rustko("kdir", "--arch", "arm64", "--release", "6.1.0-0-rustko-none-arm64")
    assert proc.returncode == 2
    assert "error: `apt-get download linux-headers-6.1.0-0-rustko-none-arm64:arm64` failed" in proc.stderr
    assert "help: `apt-cache pkgnames linux-headers-6.1 | grep -- '-arm64$'` lists the releases" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_hello_cross_built_loads_in_debians_arm64_kernel(runs: dict[str, Future], release: str) -> None:
    booted = _loaded(runs["hello"], "hello from Rust: sorted [2, 3, 5, 7, 11, 13], sum 41")
    assert booted.arch == "arm64" and booted.kernel.name == f"vmlinuz-{release}"
    assert any("goodbye from Rust" in line for line in booted.module_log)


def test_cglobal_reads_a_c_global_in_arm64(runs: dict[str, Future]) -> None:
    _loaded(runs["cglobal"], "C global read from Rust: direct 42, via accessor 42, after +1 43")


def test_cglobal_reads_a_c_global_in_x86_64(runs: dict[str, Future]) -> None:
    booted = _loaded(runs["cglobal-x86"], "C global read from Rust: direct 42, via accessor 42, after +1 43")
    assert booted.arch == "x86_64"


def test_static_model_reads_the_global_through_adrp(runs: dict[str, Future]) -> None:
    """The seed's root cause, measured: the static model addresses C data with ADRP + LDST."""
    project, built, _ = runs["cglobal"].result()
    assert built.returncode == 0, built.stderr
    from elftools.elf.elffile import ELFFile
    from elftools.elf.relocation import RelocationSection

    types: set[int] = set()
    with open(project / "build/cglobal.ko", "rb") as handle:
        elf = ELFFile(handle)
        symbols = elf.get_section_by_name(".symtab")
        for section in elf.iter_sections():
            if isinstance(section, RelocationSection) and section.name.startswith(".rela.text"):
                types |= {rel["r_info_type"] for rel in section.iter_relocations()
                          if symbols.get_symbol(rel["r_info_sym"]).name == "cglobal_answer"}
    # Rust's reads: ADRP's page (275), then its low 12 bits folded into the 32-bit load (285); no GOT.
    assert types == {275, 285}, types


def test_pic_build_fails_at_the_check_and_the_kernel_agrees(runs: dict[str, Future], arm64_kdir: Path) -> None:
    project, built, booted = runs["pic"].result()
    output = built.stdout + built.stderr
    assert built.returncode != 0 and "Traceback" not in output
    line = 1 + next(i for i, text in enumerate((project / "src/lib.rs").read_text().splitlines())
                    if "let direct = cglobal_answer;" in text)
    assert "R_AARCH64_ADR_GOT_PAGE (311) against cglobal_answer" in output
    assert f"in rust_init at src/lib.rs:{line}" in output
    assert "-Crelocation-model=static" in output
    # The kernel stops at the first relocation it cannot apply; the checker lists them in the
    # order the arm64 loader applies them, so its first finding is the kernel's own line.
    assert not (project / "build/cglobal.ko").exists(), "a refused module is not published"
    findings = check.check_module(project / "build/.rustko/cglobal/cglobal.ko", probe(arm64_kdir))
    assert {f.reloc_type for f in findings} == {311, 312}
    assert booted is not None and not booted.loaded
    assert booted.refusal is not None and "invalid module format" in (booted.insmod_error or "")
    assert booted.refusal.splitlines() == findings[0].kernel
    assert re.fullmatch(r"module cglobal: unsupported RELA relocation: 31[12]", booted.refusal)


def test_every_module_of_debians_arm64_kernel_passes_the_check(arm64_kdir: Path, release: str) -> None:
    tree = vm.debian_modules(release, "arm64")
    proc = rustko("check", "--kdir", str(arm64_kdir), str(tree))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checked = int(re.search(r"checked (\d+) module\(s\): 0 would be refused", proc.stdout).group(1))
    assert checked > 3000


def test_a_missing_cross_toolchain_is_named_before_anything_runs(tmp_path: Path, arm64_kdir: Path) -> None:
    project = copy_example(tmp_path / "hello", "hello")
    proc = scons(project, f"KDIR={arm64_kdir}", "ARCH=arm64", "CROSS_COMPILE=rustko-missing-")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "the arm64 linker rustko-missing-ld is not installed" in proc.stderr
    assert "help: apt-get install gcc-aarch64-linux-gnu" in proc.stderr
    assert not (project / "build").exists()
