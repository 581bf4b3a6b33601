"""rustc 1.78 (bullseye's rustc-web, the kernel's own minimum since 6.11) to the newest: the flag
rows that Kbuild conditions on `rustc-min-version` follow the rustc that compiles, and the support
crate, every template and both examples built by bullseye's rustc-web 1.78 (installed in
rustko's bullseye root, run on the host with that root's own libraries) load in Debian's real
5.10 kernel under QEMU (amd64; one template on arm64 too). At the other end of Debian's own
kernels, trixie's rustc 1.85.1 (the rustc Debian built its 7.3 kernel with) builds examples/hello
and every template for 7.3 amd64, and the real 7.3 kernel loads them all in one boot.

The bullseye and trixie roots are the ones `rustko kdir --release` prepares for Kbuild
(/var/tmp/rustko-debian, shared with test_generations); the 1.78 packages (about 40 MB) and the
1.85.1 ones (about 110 MB to download, 600 MB unpacked) join them once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, copy_example, release_kdir, require_kdir, rustko, scons
from rustko import flags, roots, toolchain, vm
from rustko.errors import RustkoError
from rustko.kernel import probe
from rustko.new import TEMPLATES
from test_generations import LOGS, hello_and_templates
from test_support import TEMPLATE_LOG, TEMPLATE_PARAMS, TEMPLATE_RUNS

RELEASE = "5.10.0-32-amd64"
ARM64 = "5.10.0-32-arm64"
# bullseye's rustc-web 1.78 (bullseye main); bullseye-security's newer rustc-web would win without the pin.
RUST_178 = "1.78.0+dfsg1-2~deb11u3"
PACKAGES_178 = ("rustc-web", "rust-web-src", "libstd-rust-web-dev", "libstd-rust-web-1.78")
# trixie's rustc 1.85.1 (trixie main; trixie-backports' newer ones would win without the pin):
# Debian's 7.3.4+deb13 kernel was built with it (its .config: CONFIG_RUSTC_VERSION=108501).
RELEASE_73 = "7.3.4+deb13-amd64"
RUST_185 = "1.85.1+dfsg1-1+deb13u1"
PACKAGES_185 = ("rustc", "rust-src", "libstd-rust-dev", "libstd-rust-1.85")
HOST_RUSTC = Path("/usr/bin/rustc")
HELLO = re.escape("hello from Rust: sorted [2, 3, 5, 7, 11, 13], sum 41")
CGLOBAL = r"C global read from Rust: direct (\d+), via accessor \1, after \+1 \d+$"


@pytest.fixture(scope="session")
def kdir510() -> Path:
    return release_kdir(RELEASE)


@pytest.fixture(scope="session")
def kdir510arm64(kdir510: Path) -> Path:
    return release_kdir(ARM64)


def _pinned_rustc(kdir: Path, version: str, packages: tuple[str, ...]) -> Path:
    """The rustc of `packages` at `version`, installed once into the root that builds for `kdir`."""
    root = roots.owning(kdir)
    assert root is not None
    pinned = [f"{name}={version}" for name in packages]
    if not all(roots.installed(root, package) for package in pinned):
        with roots.locked(root / "var" / "rustko-packages"):
            roots.install(root, pinned)
    return root / "usr" / "bin" / "rustc"


@pytest.fixture(scope="session")
def rustc178(kdir510: Path) -> Path:
    """bullseye's rustc 1.78 in the bullseye root (the root that builds for the 5.10 KDIR)."""
    return _pinned_rustc(kdir510, RUST_178, PACKAGES_178)


@pytest.fixture(scope="session")
def kdir73() -> Path:
    return release_kdir(RELEASE_73)


@pytest.fixture(scope="session")
def rustc185(kdir73: Path) -> Path:
    """trixie's rustc 1.85.1 (with rust-src) in the trixie root (the root that builds for 7.3)."""
    return _pinned_rustc(kdir73, RUST_185, PACKAGES_185)


def _version_line(rustc: Path) -> str:
    """`rustc --version` as the user would run it (the rooted rustc through rustko's launcher)."""
    tools = toolchain.find(str(rustc))
    out = subprocess.run([str(tools.rustc), "--version"], capture_output=True, text=True, check=True)
    return out.stdout


def test_rustc_version_reads_real_version_lines(rustc178: Path) -> None:
    old, new = _version_line(rustc178), _version_line(HOST_RUSTC)
    assert old.strip() == "rustc 1.78.0"  # Debian's build prints no commit
    assert toolchain.rustc_version(old) == (1, 78, 0)
    major, minor, _ = toolchain.rustc_version(new)
    assert (major, minor) >= (1, 93), new  # the host's rustc-web (1.96 when written)
    assert toolchain.find(str(rustc178)).lib_src == (rustc178.parent.parent / "src/rustc-1.78.0/library").resolve()


def test_flag_rows_follow_the_rustc_that_compiles(rustc178: Path, kdir510: Path) -> None:
    """5.10 (RETPOLINE, no IBT) and 6.12 (IBT, CALL_PADDING): each rustc gets the spelling Kbuild
    (or the kernel's target.json) gives it."""
    old = toolchain.find(str(rustc178)).version
    new = toolchain.find(str(HOST_RUSTC)).version
    k510 = probe(kdir510)
    assert k510.enabled("RETPOLINE") and not k510.enabled("X86_KERNEL_IBT")
    old_flags = flags.codegen_flags(k510, old)
    assert "-Ctarget-feature=+retpoline-external-thunk,+retpoline-indirect-branches,+retpoline-indirect-calls" in old_flags
    assert "-Zretpoline-external-thunk" not in old_flags
    assert "-Zretpoline-external-thunk" in flags.codegen_flags(k510, new)

    k612 = probe(require_kdir("6.12"))
    assert k612.enabled("X86_KERNEL_IBT") and k612.enabled("CALL_PADDING")
    new_flags = flags.codegen_flags(k612, new)
    assert "-Cjump-tables=n" in new_flags and "-Zno-jump-tables" not in new_flags
    # 1.78 cannot pad functions: the kernel's own Kconfig refuses RUST with CALL_PADDING below 1.81.
    with pytest.raises(RustkoError) as refused:
        flags.codegen_flags(k612, old)
    assert "CONFIG_CALL_PADDING" in refused.value.message and "RUSTC_VERSION >= 108100" in refused.value.message
    assert "1.81" in (refused.value.hint or "")
    # Between 1.81 and 1.93 (trixie's rustc 1.85.1): padding, and the old jump-table spelling.
    middle = flags.codegen_flags(k612, "1.85.1")
    assert "-Zno-jump-tables" in middle and "-Cjump-tables=n" not in middle
    assert any(flag.startswith("-Zpatchable-function-entry=") for flag in middle)


NO_CORE = "#![feature(no_core)]\n#![no_core]\n"  # nothing to compile but the options
ARCHES = ("x86_64", "um", "arm64", "riscv64")


def _compile(rustc: Path, flags_: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    (tmp / "t.rs").write_text(NO_CORE)
    return subprocess.run([str(rustc), "--crate-type=lib", "--emit=obj", *flags_, "t.rs", "-o", "t.o"],
                          cwd=tmp, capture_output=True, text=True, env={**os.environ, "RUSTC_BOOTSTRAP": "1"})


def _row_groups(arch: str, version: str) -> list[list[str]]:
    """The flags of the rows for `arch` that hold for rustc `version`, grouped by the config
    symbols that enable them (rows of one group go together; different groups may exclude each
    other, e.g. the two -Zbranch-protection rows). A group this rustc refuses is left out."""
    tools = flags.rustc_version(version)
    groups: dict[tuple[str, ...], list[str]] = {}
    refused: set[tuple[str, ...]] = set()
    for rule in flags.FLAG_RULES:
        if (rule.arches and arch not in rule.arches) or not flags._in_range(rule, tools):
            continue
        if rule.refuse:
            refused.add(rule.when)
        groups.setdefault(rule.when, []).extend(
            flag.replace("{FUNCTION_PADDING_BYTES}", "16") for flag in rule.flags)
    return [group for when, group in groups.items() if when not in refused and group]


@pytest.mark.parametrize("which", ["1.78", "host"])
def test_every_row_in_range_is_accepted_by_that_real_rustc(rustc178: Path, tmp_path: Path, which: str) -> None:
    """The rows rustko picks for a rustc are options that rustc knows (an unknown one is an
    error), and the spelling of the other end of each range is refused by it: the ranges are real."""
    tools = toolchain.find(str(rustc178 if which == "1.78" else HOST_RUSTC))
    for arch in ARCHES:
        kernel = SimpleNamespace(arch=arch)  # flags.target reads only the architecture
        target = flags.target(kernel, tools.version)  # type: ignore[arg-type]
        for group in _row_groups(arch, tools.version):
            proc = _compile(tools.rustc, ["--target", target, *group], tmp_path)
            assert proc.returncode == 0, (arch, group, proc.stderr)
    other = "1.96.0" if which == "1.78" else "1.78.0"

    def spellings(version: str) -> set[str]:
        return {flag for group in _row_groups("x86_64", version) for flag in group}

    foreign = sorted(flag for flag in spellings(other) - spellings(tools.version) if flag.startswith(("-Z", "-Cjump")))
    assert foreign
    for flag in foreign:
        proc = _compile(tools.rustc, ["--target", "x86_64-unknown-none", flag], tmp_path)
        assert proc.returncode != 0 and "unknown" in proc.stderr, (flag, proc.stderr)


def test_a_rustc_older_than_1_78_is_refused_with_the_reason() -> None:
    with pytest.raises(RustkoError) as refused:
        toolchain.require_supported("1.48.0", Path("/usr/bin/rustc"))  # bullseye's plain rustc
    assert "rustc 1.48.0" in refused.value.message and "1.78.0 or newer" in refused.value.message
    toolchain.require_supported("1.78.0", Path("/usr/bin/rustc"))


def _build_and_boot(project: Path, kdir: Path, rustc: Path, name: str,
                    run: list[str], params: list[str]) -> tuple[subprocess.CompletedProcess[str], vm.VmResult | None]:
    built = scons(project, f"KDIR={kdir}", f"RUSTC={rustc}")
    ko = project / "build" / f"{name}.ko"
    return built, (vm.vmtest(ko, arch=vm.arch_of(ko), run=run, params=params, timeout=400)
                   if ko.is_file() else None)


@pytest.fixture(scope="session")
def booted(tmp_path_factory: pytest.TempPathFactory, kdir510: Path, kdir510arm64: Path,
           rustc178: Path) -> dict[str, tuple]:
    """Every template, both examples and the support crate's runtime test module, built by
    rustc 1.78 for 5.10 amd64 and each loaded in the real 5.10 kernel (two QEMUs at a time); one
    template for arm64 too (rustc 1.78 spells the target aarch64-unknown-none -Ctarget-feature=-neon)."""
    base = tmp_path_factory.mktemp("rustc178")
    jobs: dict[str, tuple[Path, Path, str, list[str], list[str]]] = {}
    for template, (commands, _) in TEMPLATE_RUNS.items():
        project = base / template / "demo"
        created = rustko("new", "demo", "--template", template, "--dir", str(project))
        assert created.returncode == 0, created.stderr
        jobs[template] = (project, kdir510, "demo", commands, TEMPLATE_PARAMS.get(template, []))
    arm64 = base / "arm64" / "demo"
    created = rustko("new", "demo", "--template", "chardev", "--dir", str(arm64))
    assert created.returncode == 0, created.stderr
    jobs["chardev-arm64"] = (arm64, kdir510arm64, "demo", TEMPLATE_RUNS["chardev"][0], [])
    for example in ("hello", "cglobal"):
        jobs[f"examples/{example}"] = (copy_example(base / "examples" / example, example), kdir510, example, [], [])
    runtime = base / "runtime"
    shutil.copytree(REPO / "tests/modules/runtime", runtime, ignore=shutil.ignore_patterns("build"))
    jobs["runtime"] = (runtime, kdir510, "runtime", [], [])
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(_build_and_boot, project, kdir, rustc178, name, run, params)
                   for key, (project, kdir, name, run, params) in jobs.items()}
        results = {key: (jobs[key][0], *future.result()) for key, future in futures.items()}
    panicked = vm.vmtest(runtime / "build" / "runtime_panic.ko", timeout=400)
    results["runtime_panic"] = (runtime, results["runtime"][1], panicked)
    return results


def _built_by(project: Path, name: str, version: str = "1.78.0", debian: str = "bullseye") -> None:
    """The .ko's buildinfo names that rustc and the library sources of its package in its root."""
    info = json.loads((project / "build" / f"{name}.ko.buildinfo").read_text())
    assert info["rustc"]["version"] == version, info["rustc"]
    assert info["rustc"]["library"].endswith(f"/{debian}/usr/src/rustc-{version}/library"), info["rustc"]


@pytest.mark.parametrize("job", [*TEMPLATE_RUNS, "chardev-arm64"])
def test_template_built_by_rustc_1_78_works_in_the_real_5_10_kernel(booted: dict[str, tuple], job: str) -> None:
    template, release = ("chardev", ARM64) if job == "chardev-arm64" else (job, RELEASE)
    project, built, result = booted[job]
    assert built.returncode == 0, built.stdout + built.stderr
    _built_by(project, "demo")
    assert result is not None and result.ok, result and (result.failure or result.console[-3000:])
    assert vm.read_module(project / "build" / "demo.ko").vermagic.split()[0] == release
    for line in TEMPLATE_LOG[template]:
        assert line in result.module_log, result.module_log
    assert all(status == 0 for _cmd, status, _out in result.commands), result.commands
    for (_cmd, _status, got), want in zip(result.commands, TEMPLATE_RUNS[template][1]):
        assert want in got, result.commands


@pytest.mark.parametrize("example", ["hello", "cglobal"])
def test_example_built_by_rustc_1_78_loads_in_5_10(booted: dict[str, tuple], example: str) -> None:
    project, built, result = booted[f"examples/{example}"]
    assert built.returncode == 0, built.stdout + built.stderr
    _built_by(project, example)
    assert result is not None and result.ok, result and (result.failure or result.console[-3000:])
    wanted = HELLO if example == "hello" else CGLOBAL
    assert any(re.search(wanted, line) for line in result.module_log), result.module_log


def test_support_crate_runtime_built_by_rustc_1_78_in_5_10(booted: dict[str, tuple]) -> None:
    """The support crate's alloc, 128-bit helpers and panic path (its message on one line, from
    PanicInfo's Display: PanicInfo::message() needs 1.81) under 1.78 and 5.10."""
    project, built, good = booted["runtime"]
    assert built.returncode == 0, built.stdout + built.stderr
    _built_by(project, "runtime")
    assert good is not None and good.ok, good and (good.failure or good.console[-3000:])
    assert "runtime: try_reserve(1 TiB): ENOMEM" in good.module_log
    assert "runtime: try_push x1000: len 1000, sum 499500" in good.module_log
    a, b = 2**128 - 1, 18446744073709551629
    assert f"runtime: u128 {a} / {b} = {a // b} rem {a % b}" in good.module_log
    _, _, panicked = booted["runtime_panic"]
    assert not panicked.ok
    assert ("runtime_panic: panicked at src/lib.rs:44:44: index out of bounds: the len is 3 but the index is 7"
            in panicked.module_log), panicked.module_log
    assert panicked.crash and any("kernel BUG at" in line for line in panicked.crash)


def test_trixies_rustc_is_the_one_that_built_debians_7_3_kernel(rustc185: Path, kdir73: Path) -> None:
    kernel = probe(kdir73)
    assert _version_line(rustc185).strip() == kernel.value("RUSTC_VERSION_TEXT")
    assert kernel.value("RUSTC_VERSION") == "108501"


@pytest.fixture(scope="session")
def booted73(tmp_path_factory: pytest.TempPathFactory, kdir73: Path,
             rustc185: Path) -> dict[str, tuple[Path, subprocess.CompletedProcess[str], vm.VmResult | None]]:
    """examples/hello and every template (test_generations' names and lines), built by trixie's
    rustc 1.85.1 for 7.3 amd64 (two builds at a time), then one boot of the real 7.3 kernel
    loading and unloading each."""
    projects = hello_and_templates(tmp_path_factory.mktemp("rustc185"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        built = dict(zip(projects, pool.map(lambda project: scons(project, f"KDIR={kdir73}", f"RUSTC={rustc185}"),
                                            projects.values())))
    kos = {name: project / "build" / f"{name}.ko" for name, project in projects.items()
           if (project / "build" / f"{name}.ko").is_file()}
    loaded = dict(zip(kos, vm.vmtest_many(list(kos.values()), timeout=600))) if kos else {}
    return {name: (project, built[name], loaded.get(name)) for name, project in projects.items()}


@pytest.mark.parametrize("name", list(LOGS))
def test_built_by_trixies_rustc_1_85_loads_in_the_real_7_3_kernel(booted73: dict[str, tuple], name: str) -> None:
    assert set(LOGS) == {"hello", *(f"tpl_{t}" for t in TEMPLATES)}, "a template without its expected log lines"
    project, built, result = booted73[name]
    assert built.returncode == 0, built.stdout + built.stderr
    _built_by(project, name, "1.85.1", "trixie")
    assert result is not None and result.ok, result and (result.failure or result.console[-3000:])
    assert vm.read_module(project / "build" / f"{name}.ko").vermagic.split()[0] == RELEASE_73
    for line in LOGS[name]:
        assert line in result.module_log, result.module_log
    assert result.unloaded and result.rmmod_error is None
