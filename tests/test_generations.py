"""Kernels of other Debian releases, from this Debian 12 host, without mocks: `rustko kdir
--release` finds the Debian release whose archive has the headers (bullseye's 5.10, trixie's
6.12, trixie-backports' 7.3 built with CONFIG_RUST=y and without MODVERSIONS), prepares them in
a root of that release (its own gcc-10 / gcc-14 and linux-kbuild), scons builds examples/hello
and every `rustko new` template against them (amd64, and the arm64 twins cross-built), and
Debian's real kernels of those releases load and unload each, one boot per kernel. On 5.10 and
7.3 the same boot runs the checker's differential cases: the line `rustko check` predicts for a
PIC and a small-code-model build is the line the real kernel prints, and a module it passes loads.

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

from conftest import copy_example, release_kdir, rustko, scons
from rustko import check, roots, vm
from rustko.kernel import probe
from rustko.new import TEMPLATES

# Kernel release -> (Debian release whose root builds for it, the compiler its headers name,
# rustko's architecture). arm64 twins share their release's root (amd64 linux-kbuild, cross gcc).
RELEASES: dict[str, tuple[str, str, str]] = {
    "7.3.4+deb13-amd64": ("trixie", "gcc-14", "x86_64"),
    "5.10.0-32-amd64": ("bullseye", "gcc-10", "x86_64"),
    "6.12.117+deb13-amd64": ("trixie", "gcc-14", "x86_64"),
    "7.3.4+deb13-arm64": ("trixie", "gcc-14", "arm64"),
    "5.10.0-32-arm64": ("bullseye", "gcc-10", "arm64"),
}
# What each module built for every release prints in the kernel log while loaded and unloaded
# (templates with their default parameters).
LOGS: dict[str, list[str]] = {
    "hello": ["hello: hello from Rust: sorted [2, 3, 5, 7, 11, 13], sum 41", "hello: goodbye from Rust"],
    "tpl_hello": ["tpl_hello: hello from Rust: primes [2, 3, 5, 7], sum 17",
                  "tpl_hello: goodbye from Rust (4 primes)"],
    "tpl_params": ["tpl_params: hello #1", "tpl_params: hello #2", "tpl_params: hello #3"],
    "tpl_chardev": ["tpl_chardev: /dev/tpl_chardev is ready"],
}
# The checker's differential cases, on the oldest and the newest kernel: examples/cglobal (Rust
# reading a C global) as it is, and with rustflags the x86_64 loader refuses.
CHECKED: dict[str, list[str]] = {
    "good": [],
    "pic": ["-Crelocation-model=pic"],
    "small": ["-Ccode-model=small"],
}
CHECKED_RELEASES = ("5.10.0-32-amd64", "7.3.4+deb13-amd64")

# (project folder, its scons run, the module's result in the boot; None when no .ko was linked)
Run = tuple[Path, subprocess.CompletedProcess[str], "vm.VmResult | None"]


@pytest.fixture(scope="session")
def kdirs() -> dict[str, Path]:
    return {release: release_kdir(release) for release in RELEASES}


def hello_and_templates(folder: Path) -> dict[str, Path]:
    """examples/hello and a project of each template (`tpl_NAME`) under `folder`, by module name."""
    projects = {"hello": copy_example(folder / "hello")}
    for template in TEMPLATES:
        name = f"tpl_{template}"
        created = rustko("new", name, "--template", template, "--dir", str(folder / name))
        assert created.returncode == 0, created.stderr
        projects[name] = folder / name
    return projects


def _projects(folder: Path, release: str) -> dict[str, Path]:
    """Every module this release gets: examples/hello, each template, the checker's cases."""
    projects = hello_and_templates(folder)
    if release in CHECKED_RELEASES:
        for case, flags in CHECKED.items():
            project = copy_example(folder / case / "cglobal", "cglobal")
            sconstruct = project / "SConstruct"
            sconstruct.write_text(sconstruct.read_text().replace("c_sources=", f"rustflags={flags!r}, c_sources="))
            projects[case] = project
    return projects


def _module(project: Path) -> Path | None:
    """The linked .ko: published, or kept unpublished for inspection when the check refused it."""
    for ko in (project / "build" / f"{project.name}.ko",
               project / "build" / ".rustko" / project.name / f"{project.name}.ko"):
        if ko.is_file():
            return ko
    return None


def _boot(builds: dict[str, Future]) -> dict[str, Run]:
    """One boot of the release's kernel for all of its modules, once they are built."""
    done = {name: future.result() for name, future in builds.items()}
    kos = {name: _module(project) for name, (project, _built) in done.items()}
    linked = [name for name, ko in kos.items() if ko is not None]
    first = kos[linked[0]]
    results = dict(zip(linked, vm.vmtest_many([kos[n] for n in linked], arch=vm.arch_of(first), timeout=600)))
    return {name: (project, built, results.get(name)) for name, (project, built) in done.items()}


def _build(project: Path, kdir: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    return project, scons(project, f"KDIR={kdir}")


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory, kdirs: dict[str, Path]) -> Iterator[dict[str, Future]]:
    """Release -> its modules' runs. Builds run two at a time, release after release; each
    release boots as soon as its last module is built, while the next release builds."""
    root = tmp_path_factory.mktemp("generations")
    builders = ThreadPoolExecutor(max_workers=2)
    booter = ThreadPoolExecutor(max_workers=1)
    boots: dict[str, Future] = {}
    for release, kdir in kdirs.items():
        builds = {name: builders.submit(_build, project, kdir)
                  for name, project in _projects(root / release, release).items()}
        boots[release] = booter.submit(_boot, builds)
    yield boots
    builders.shutdown()
    booter.shutdown()


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


@pytest.mark.parametrize("release", list(RELEASES))
def test_hello_and_every_template_load_in_the_real_kernel(runs: dict[str, Future], kdirs: dict[str, Path],
                                                          release: str) -> None:
    assert set(LOGS) == {"hello", *(f"tpl_{t}" for t in TEMPLATES)}, "a template without its expected log lines"
    modules = runs[release].result()
    for name, lines in LOGS.items():
        project, built, booted = modules[name]
        assert built.returncode == 0, built.stdout + built.stderr
        assert booted is not None and booted.ok, (name, booted and (booted.failure or booted.console[-3000:]))
        for line in lines:
            assert line in booted.module_log, (name, booted.module_log)
        assert booted.unloaded and booted.rmmod_error is None
        vermagic = vm.read_module(project / "build" / f"{name}.ko").vermagic
        assert vermagic.split()[0] == release
        # Debian's 7.3 is built without CONFIG_MODVERSIONS (every CRC in its Module.symvers is 0).
        assert ("modversions" in vermagic.split()) != release.startswith("7.3"), vermagic
    assert probe(kdirs[release]).enabled("MODVERSIONS") != release.startswith("7.3")


def _refused_lines(booted: "vm.VmResult") -> str:
    """What the kernel printed for the refused insmod, without its taint notices."""
    return "\n".join(line for line in booted.module_log if "taint" not in line)


@pytest.mark.parametrize("release", CHECKED_RELEASES)
@pytest.mark.parametrize("case", list(CHECKED))
def test_the_check_predicts_the_real_kernel(runs: dict[str, Future], kdirs: dict[str, Path], release: str,
                                            case: str) -> None:
    project, built, booted = runs[release].result()[case]
    output = built.stdout + built.stderr
    assert "Traceback" not in output
    ko = _module(project)
    assert ko is not None and booted is not None, output
    findings = check.check_module(ko, probe(kdirs[release]))
    if case == "good":
        assert built.returncode == 0 and findings == [], output
        assert booted.ok, booted.failure or booted.console[-3000:]
        assert "cglobal: C global read from Rust: direct 42, via accessor 42, after +1 43" in booted.module_log
        return
    assert built.returncode != 0 and f"would be refused by kernel {release}" in output, output
    assert not (project / "build" / "cglobal.ko").exists()
    assert findings and not booted.loaded and booted.refusal is not None, booted.console[-3000:]
    # The loader stops at the first relocation it cannot apply and prints that one's lines: they
    # are, word for word (a runtime address aside), the lines of one of the check's findings,
    # once per attempt (busybox's insmod retries with init_module; the address may differ).
    kernel = _refused_lines(booted)
    predicted = [finding.kernel_regex().pattern for finding in findings]
    assert any(re.fullmatch(rf"{line}(?:\n{line})*", kernel) for line in predicted), \
        (kernel, [finding.kernel for finding in findings])
    kinds = {"pic": r"Unknown rela relocation: (9|41|42)$", "small": r"overflow in relocation type (10|11) "}
    assert re.search(kinds[case], kernel, re.M), kernel


def test_vmtest_refuses_one_boot_for_two_kernels(runs: dict[str, Future]) -> None:
    old, new = (runs[release].result()["hello"][0] / "build" / "hello.ko" for release in CHECKED_RELEASES)
    mixed = rustko("vmtest", str(old), str(new))
    assert mixed.returncode == 2 and "Traceback" not in mixed.stderr
    assert "built for kernel 5.10.0-32-amd64, other modules for 7.3.4+deb13-amd64" in mixed.stderr, mixed.stderr
    commands = rustko("vmtest", str(new), str(new), "--run", "true")
    assert commands.returncode == 2 and "--run and --param apply to one MODULE" in commands.stderr


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
