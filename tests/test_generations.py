"""Kernels of other Debian releases, from this Debian 12 host, without mocks: `rustko kdir
--release` finds the Debian release whose archive has the headers (bullseye's 5.10, trixie-
backports' 7.3 built with CONFIG_RUST=y and without MODVERSIONS), prepares them in a root of
that release (its own gcc-10 / gcc-14 and linux-kbuild), scons builds examples/hello against
them (amd64, and the arm64 twins cross-built), and Debian's real kernels of those releases load
it under QEMU.

Roots, package lists and kernel images are cached machine-wide (rustko's cache and
/var/tmp/rustko-debian): a cold run debootstraps two roots (a few minutes each), a warm one reuses them.
"""

from __future__ import annotations

import os
import re
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

from conftest import copy_example, rustko, scons
from rustko import check, roots, vm
from rustko.kernel import probe

# Kernel release -> (Debian release whose root builds for it, the compiler its headers name,
# rustko's architecture). arm64 twins share their release's root (amd64 linux-kbuild, cross gcc).
RELEASES: dict[str, tuple[str, str, str]] = {
    "5.10.0-32-amd64": ("bullseye", "gcc-10", "x86_64"),
    "5.10.0-32-arm64": ("bullseye", "gcc-10", "arm64"),
    "7.3.4+deb13-amd64": ("trixie", "gcc-14", "x86_64"),
    "7.3.4+deb13-arm64": ("trixie", "gcc-14", "arm64"),
}
HELLO = "hello from Rust: sorted [2, 3, 5, 7, 11, 13], sum 41"

Run = tuple[Path, subprocess.CompletedProcess[str], "vm.VmResult | None"]


@pytest.fixture(scope="session")
def kdirs() -> dict[str, Path]:
    if os.geteuid() != 0:
        pytest.fail("kernels of other Debian releases are built in roots: run the tests as root")
    found: dict[str, Path] = {}
    for release in RELEASES:
        proc = rustko("kdir", "--release", release, timeout=1800)
        assert proc.returncode == 0, proc.stderr
        found[release] = Path(proc.stdout.strip())
    return found


def _build_and_boot(project: Path, kdir: Path) -> Run:
    built = scons(project, f"KDIR={kdir}")
    ko = project / "build" / f"{project.name}.ko"
    if not ko.is_file():  # a refused module stays unpublished, for inspection
        ko = project / "build" / ".rustko" / project.name / f"{project.name}.ko"
    return project, built, (vm.vmtest(ko, arch=vm.arch_of(ko), timeout=400) if ko.is_file() else None)


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory, kdirs: dict[str, Path]) -> Iterator[dict[str, Future]]:
    root = tmp_path_factory.mktemp("generations")
    pic = copy_example(root / "pic-7.3" / "cglobal", "cglobal")
    sconstruct = pic / "SConstruct"
    sconstruct.write_text(sconstruct.read_text().replace(
        "c_sources=", 'rustflags=["-Crelocation-model=pic"], c_sources='))
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {release: pool.submit(_build_and_boot, copy_example(root / release / "hello"), kdir)
               for release, kdir in kdirs.items()}
    futures["pic"] = pool.submit(_build_and_boot, pic, kdirs["7.3.4+deb13-amd64"])
    yield futures
    pool.shutdown()


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_kdir_is_prepared_in_a_root_of_its_own_debian_release(kdirs: dict[str, Path], release: str) -> None:
    kdir = kdirs[release]
    debian_release, compiler, arch = RELEASES[release]
    kernel = probe(kdir)
    assert kernel.release == release and kernel.arch == arch
    assert compiler in kernel.compiler, kernel.compiler
    root = roots.owning(kdir)
    assert root is not None and f"release {debian_release}" in (root / roots.MARKER).read_text()
    prefix = "x86_64-linux-gnu-" if arch == "x86_64" else "aarch64-linux-gnu-"
    assert os.access(root / "usr" / "bin" / f"{prefix}{compiler}", os.X_OK)
    again = rustko("kdir", "--release", release)
    assert again.returncode == 0 and again.stdout == f"{kdir}\n" and again.stderr == "", again.stderr


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_hello_loads_in_the_real_kernel(runs: dict[str, Future], kdirs: dict[str, Path], release: str) -> None:
    project, built, booted = runs[release].result()
    assert built.returncode == 0, built.stdout + built.stderr
    assert booted is not None and booted.ok, booted and (booted.failure or booted.console[-3000:])
    assert any(line.endswith(HELLO) for line in booted.module_log), booted.module_log
    assert any(line.endswith("goodbye from Rust") for line in booted.module_log), booted.module_log
    vermagic = vm.read_module(project / "build" / "hello.ko").vermagic
    assert vermagic.split()[0] == release
    # Debian's 7.3 is built without CONFIG_MODVERSIONS (every CRC in its Module.symvers is 0).
    assert ("modversions" in vermagic.split()) == release.startswith("5.10"), vermagic
    assert probe(kdirs[release]).enabled("MODVERSIONS") == release.startswith("5.10")


def test_pic_build_is_refused_on_7_3_as_the_check_predicted(runs: dict[str, Future], kdirs: dict[str, Path]) -> None:
    project, built, booted = runs["pic"].result()
    output = built.stdout + built.stderr
    assert built.returncode != 0 and "Traceback" not in output
    assert "would be refused by kernel 7.3.4+deb13-amd64" in output
    assert not (project / "build" / "cglobal.ko").exists()
    findings = check.check_module(project / "build" / ".rustko" / "cglobal" / "cglobal.ko",
                                  probe(kdirs["7.3.4+deb13-amd64"]))
    assert findings
    assert booted is not None and not booted.loaded and booted.refusal is not None, booted
    predicted = {line for finding in findings for line in finding.kernel}
    assert set(booted.refusal.splitlines()) <= predicted, (booted.refusal, predicted)
    assert re.search(r"Unknown rela relocation: (9|41|42)\b", booted.refusal)


def test_doctor_says_the_7_3_headers_have_config_rust_but_no_rust_outputs(kdirs: dict[str, Path]) -> None:
    proc = rustko("doctor", "--kdir", str(kdirs["7.3.4+deb13-amd64"]))
    assert "CONFIG_RUST=y (built with rustc 1.85.1" in proc.stdout, proc.stdout
    assert "but KDIR has no Rust build outputs" in proc.stdout
    assert "rustko uses its own sysroot" in proc.stdout
    assert "runs in the Debian root" in proc.stdout and "gcc-14" in proc.stdout
    old = rustko("doctor", "--kdir", str(kdirs["5.10.0-32-amd64"]))
    assert "CONFIG_RUST is not set" in old.stdout, old.stdout


def test_an_unknown_release_names_what_was_searched() -> None:
    proc = rustko("kdir", "--release", "7.3.4+deb13-rustko-none-amd64")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "linux-headers-7.3.4+deb13-rustko-none-amd64" in proc.stderr and "Traceback" not in proc.stderr
