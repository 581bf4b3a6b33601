"""Issue 13: the README's promises kept. Licences as the kernel reads them, names that can build,
the kernel's config as `--cfg`, Ctrl-C said as such, and the small CLI promises; real rustc, real
Debian headers, real kernels in QEMU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, copy_example, require_kdir, rustko, scons, tool
from rustko import licenses, project, vm
from rustko.errors import RustkoError
from rustko.flags import config_cfgs, rustc_cfg_line
from rustko.kernel import probe

# --- licences ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spdx, kernel", [
    ("GPL-2.0-only", "GPL"),
    ("GPL-2.0-or-later", "GPL"),
    ("GPL-2.0+", "GPL"),
    ("GPL-2.0 OR MIT", "Dual MIT/GPL"),
    ("MIT OR GPL-2.0-only", "Dual MIT/GPL"),
    ("MIT/GPL-2.0", "Dual MIT/GPL"),
    ("(BSD-3-Clause OR GPL-2.0-only)", "Dual BSD/GPL"),
    ("MPL-2.0 OR GPL-2.0-or-later", "Dual MPL/GPL"),
    ("Apache-2.0 OR GPL-2.0-only", "GPL"),
    ("GPL-2.0-only WITH Linux-syscall-note", "GPL and additional rights"),
    ("Dual MIT/GPL", "Dual MIT/GPL"),
    ("GPL", "GPL"),
    ("Proprietary", "Proprietary"),
])
def test_spdx_expressions_become_kernel_licence_strings(spdx: str, kernel: str) -> None:
    assert licenses.module_license(spdx, "Cargo.toml") == kernel
    assert kernel in licenses.KERNEL_LICENSES


@pytest.mark.parametrize("spdx", ["MIT OR Apache-2.0", "GPL-3.0-only", "GPL-2.0-only AND MIT", "LGPL-2.1",
                                  "GPL-2.0-only OR", "(GPL-2.0-only"])
def test_licences_the_kernel_cannot_say_are_refused(spdx: str) -> None:
    with pytest.raises(RustkoError) as raised:
        licenses.module_license(spdx, "Cargo.toml")
    assert "taint the kernel as proprietary" in raised.value.message
    assert all(f'"{name}"' in raised.value.hint for name in licenses.KERNEL_LICENSES)


def test_the_kernels_list_is_the_one_in_its_headers() -> None:
    """KERNEL_LICENSES holds exactly the strings license_is_gpl_compatible() compares, plus
    Proprietary, in both header series."""
    for series in ("6.1", "6.12"):
        common = Path(str(require_kdir(series)).replace("-amd64", "-common"))
        text = (common / "include/linux/license.h").read_text()
        gpl = {name for name, compatible in licenses.KERNEL_LICENSES.items() if compatible}
        assert {line.split('"')[1] for line in text.splitlines() if "strcmp(license" in line} == gpl
        assert '"Proprietary"' in (common / "include/linux/module.h").read_text()


def _licensed(tmp_path: Path, licence_line: str) -> Path:
    project_dir = copy_example(tmp_path / "lic")
    manifest = project_dir / "Cargo.toml"
    manifest.write_text(manifest.read_text().replace('license = "GPL"\n', licence_line))
    return project_dir


def test_refused_and_missing_licences_stop_the_build(tmp_path: Path, kdir61: Path) -> None:
    refused = scons(_licensed(tmp_path / "a", 'license = "MIT OR Apache-2.0"\n'), f"KDIR={kdir61}")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert ("error: licence 'MIT OR Apache-2.0' ([package] in Cargo.toml) has no MODULE_LICENSE string"
            in refused.stderr), refused.stderr
    assert '"Dual MIT/GPL"' in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "a/lic/build/lic.ko").exists() and not (tmp_path / "a/lic/build/hello.ko").exists()

    missing = scons(_licensed(tmp_path / "b", ""), f"KDIR={kdir61}")
    assert missing.returncode == 2
    assert "error: the module has no licence" in missing.stderr
    assert 'add `license = "GPL-2.0-only"` under [package] in Cargo.toml' in missing.stderr


@pytest.fixture(scope="session")
def gpl_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A crate licensed GPL-2.0-only that calls ktime_get (EXPORT_SYMBOL_GPL) and has code under
    #[cfg(CONFIG_SMP)], built for Debian's 6.1."""
    project_dir = _licensed(tmp_path_factory.mktemp("gpl"), 'license = "GPL-2.0-only"\n')
    (project_dir / "src" / "lib.rs").write_text(
        "#![no_std]\nuse rustko::prelude::*;\n"
        'unsafe extern "C" { fn ktime_get() -> i64; }\n'
        "struct M;\nimpl rustko::Module for M {\n    fn init() -> Result<Self> {\n"
        "        // SAFETY: ktime_get takes nothing and may be called from process context.\n"
        "        let now = unsafe { ktime_get() };\n"
        '        pr_info!("ktime_get from a GPL-2.0-only crate: positive {}", now > 0);\n'
        '        #[cfg(CONFIG_SMP)]\n        pr_info!("cfg CONFIG_SMP: compiled in");\n'
        '        #[cfg(not(CONFIG_SMP))]\n        pr_info!("cfg CONFIG_SMP: left out");\n'
        '        #[cfg(CONFIG_X86_64 = "y")]\n        pr_info!("cfg CONFIG_X86_64=\\"y\\": compiled in");\n'
        "        Ok(M)\n    }\n}\nrustko::module!(M);\n")
    built = scons(project_dir, f"KDIR={require_kdir('6.1')}")
    assert built.returncode == 0, built.stdout + built.stderr
    return project_dir / "build" / "hello.ko"


def test_gpl_crate_uses_a_gpl_only_export_without_tainting_6_1(gpl_module: Path) -> None:
    """Also `--run` before the module, and `--kernel` as a path relative to the caller's folder."""
    assert b"\0license=GPL\0" in gpl_module.read_bytes()
    release = probe(require_kdir("6.1")).release
    vmlinuz = vm.debian_kernel(release)
    proc = subprocess.run([sys.executable, "-m", "rustko.cli", "vmtest", "--run", "cat /proc/sys/kernel/tainted",
                           str(gpl_module), "--kernel", vmlinuz.name], cwd=vmlinuz.parent,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "  hello: ktime_get from a GPL-2.0-only crate: positive true\n" in proc.stdout
    assert "  hello: cfg CONFIG_SMP: compiled in\n" in proc.stdout
    assert '  hello: cfg CONFIG_X86_64="y": compiled in\n' in proc.stdout
    # kernel/module/main.c set_license would print "module license '...' taints kernel."
    assert "module license" not in proc.stdout
    tainted = int(proc.stdout.split("(exit 0)\n", 1)[1].split()[0])
    assert tainted & 1 == 0, f"TAINT_PROPRIETARY_MODULE set: {tainted}"


# --- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["core", "alloc", "rustko", "compiler_builtins", "std"])
def test_new_refuses_names_of_the_sysroots_crates(tmp_path: Path, name: str) -> None:
    result = rustko("new", name, "--dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: '{name}' cannot be a module name: the module's crate is named after it" in result.stderr
    assert not (tmp_path / "out").exists()


# --- the kernel's config as --cfg --------------------------------------------------------------


@pytest.mark.parametrize("series", ["6.1", "6.12"])
def test_cfgs_derived_from_config_are_kconfigs_rustc_cfg(series: str) -> None:
    """Without include/generated/rustc_cfg the lines are made from .config as kconfig makes them:
    the real file of Debian's headers is the reference (one hex value .config writes as "0")."""
    kernel = probe(require_kdir(series))
    derived = set("".join(rustc_cfg_line(name, value) for name, value in kernel.config.items()).splitlines())
    real = set((kernel.kdir / "include/generated/rustc_cfg").read_text().splitlines())
    assert len(real) > 10000
    assert derived ^ real == {'--cfg=CONFIG_MTD_NAND_DISKONCHIP_PROBE_ADDRESS="0"',
                              '--cfg=CONFIG_MTD_NAND_DISKONCHIP_PROBE_ADDRESS="0x0"'}
    assert config_cfgs(kernel) == [f"@{kernel.kdir}/include/generated/rustc_cfg"]


def test_kdir_without_rustc_cfg_gets_the_derived_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUSTKO_CACHE", str(tmp_path / "cache"))
    kdir = tmp_path / "kdir"
    kdir.mkdir()
    kernel = probe(require_kdir("6.1"))
    older = type(kernel)(kdir=kdir, release=kernel.release, version=kernel.version, arch=kernel.arch,
                         config={"CONFIG_SMP": "y", "CONFIG_HZ": "250", "CONFIG_LOCALVERSION": '"-a\\"b"'},
                         compiler=kernel.compiler)
    [argument] = config_cfgs(older)
    assert argument.startswith(f"@{tmp_path / 'cache'}/")
    assert Path(argument[1:]).read_text().splitlines() == [
        '--cfg=CONFIG_HZ="250"', '--cfg=CONFIG_LOCALVERSION="-a\\"b"', "--cfg=CONFIG_SMP", '--cfg=CONFIG_SMP="y"']


# --- Ctrl-C ------------------------------------------------------------------------------------


def _rustc_in_session(session: int, marker: str) -> bool:
    """Whether a rustc whose command line holds `marker` runs in process session `session`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == session and "rustc" in stat.split(")", 1)[0] and marker in cmdline:
            return True
    return False


def _ctrl_c(project_dir: Path, kdir: Path, marker: str, env: dict[str, str]) -> str:
    """Ctrl-C as a terminal sends it: SIGINT to the whole process group of a running `scons`,
    once rustc is at work on `marker`."""
    proc = subprocess.Popen([tool("scons"), "-Q", f"KDIR={kdir}"], cwd=project_dir, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not _rustc_in_session(proc.pid, marker):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    return output


def test_ctrl_c_while_rustc_compiles_the_crate(tmp_path: Path, kdir61: Path) -> None:
    project_dir = copy_example(tmp_path / "slow")
    (project_dir / "src" / "lib.rs").write_text(
        "#![no_std]\n#![allow(long_running_const_eval)]\nuse rustko::prelude::*;\n"
        "const SLOW: u64 = { let (mut i, mut s) = (0u64, 0u64); "
        "while i < 4_000_000_000 { s = s.wrapping_add(i ^ (s >> 3)); i += 1; } s };\n"
        "struct M;\nimpl rustko::Module for M {\n    fn init() -> Result<Self> {\n"
        '        pr_info!("{}", SLOW);\n        Ok(M)\n    }\n}\nrustko::module!(M);\n')
    output = _ctrl_c(project_dir, kdir61, "--crate-type=staticlib", {})
    assert "error: interrupted: rustc stopped while compiling the crate of module hello" in output, output
    assert "does not compile" not in output
    assert not (project_dir / "build" / "hello.ko").exists()


def test_ctrl_c_while_the_sysroot_builds(tmp_path: Path, kdir61: Path) -> None:
    cache = tmp_path / "cache"
    output = _ctrl_c(copy_example(tmp_path / "hello"), kdir61, "--crate-name=core", {"RUSTKO_CACHE": str(cache)})
    assert "error: interrupted: building `core` was stopped" in output, output
    assert "rust-web-src" not in output and "failed" not in output
    assert [p.name for p in (cache / "sysroot").iterdir() if not p.name.endswith(".lock")] == []


# --- small promises ----------------------------------------------------------------------------


def test_version() -> None:
    result = rustko("--version")
    assert result.returncode == 0 and result.stdout.strip() == "rustko 0.1.0"


def test_doctor_checks_qemu_and_cites_only_what_exists(kdir61: Path) -> None:
    result = rustko("doctor", "--kdir", str(kdir61))
    assert "FIELD-NOTES" not in result.stdout
    assert "qemu-system-x86_64" in result.stdout and "[vmtest]" in result.stdout
    assert f"@{kdir61}/include/generated/rustc_cfg" in result.stdout


def test_generated_readme_links_nowhere_bare(tmp_path: Path) -> None:
    assert rustko("new", "demo", "--dir", str(tmp_path / "demo")).returncode == 0
    readme = (tmp_path / "demo" / "README.md").read_text()
    assert "https://github.com/)" not in readme and "](https://github.com/" not in readme
    assert 'license = "GPL-2.0-only"' in (tmp_path / "demo" / "Cargo.toml").read_text()


def test_float_hint_names_no_flag_rustko_already_passes() -> None:
    from rustko.check import explain_undefined
    from rustko.sysroot import CRATES

    why, fix = explain_undefined("__mulsf3")
    assert "floating point" in why
    used = {arg for crate in CRATES.values() for arg in crate.extra}
    assert "no_fp_fmt_parse" in used and "no_fp_fmt_parse" not in fix


def test_missing_path_dependency_is_reported_missing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for path, what in (("vendor/absent", "does not exist"), ("empty", "has no Cargo.toml")):
        with pytest.raises(RustkoError) as raised:
            project.path_dependencies({"dependencies": {"util": {"path": path}}}, tmp_path)
        assert raised.value.message == f"dependency 'util': {(tmp_path / path).resolve()} {what}"
        assert "[package] name" not in str(raised.value)


def test_failing_init_is_reported_once(tmp_path: Path, kdir61: Path) -> None:
    """busybox's insmod retries a failed finit_module with init_module: the init runs twice in
    the guest, and the report shows its lines once."""
    (tmp_path / "nodev.c").write_text(
        "#include <linux/module.h>\n#include <linux/init.h>\n"
        'static int __init nodev_init(void) { pr_info("nodev: no device here\\n"); return -ENODEV; }\n'
        'module_init(nodev_init);\nMODULE_LICENSE("GPL");\n')
    (tmp_path / "Kbuild").write_text("obj-m := nodev.o\n")
    made = subprocess.run(["make", "-s", "-C", str(kdir61), f"M={tmp_path}"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    result = vm.vmtest(tmp_path / "nodev.ko")
    assert not result.loaded and "No such device" in (result.insmod_error or "")
    assert result.module_log.count("nodev: no device here") == 1, result.module_log
    assert result.console.count("nodev: no device here") == 2, "the guest's own log has both attempts"


def test_readme_documents_the_module_options() -> None:
    text = (REPO / "README.md").read_text()
    for word in ("build_dir=", "manifest=", "rustflags=", "RUSTKO_CACHE", "XDG_CACHE_HOME", "riscv64",
                 "#[cfg(CONFIG_SMP)]", "GPL-2.0-only"):
        assert word in text, word
