"""The target spec against each kernel's own generator, and a module built with it in a real kernel.

Each kernel's `scripts/generate_rust_target.rs` is taken from that kernel's Debian source package
(linux-source-6.1 of bookworm, linux-source-6.12 and linux-source-7.3 of trixie and its backports),
compiled with the host's rustc as the kernel compiles it (a host program, KBUILD_HOSTRUSTFLAGS'
`--edition=2021 -O -Cstrip=debuginfo`) and fed the KDIR's include/config/auto.conf, as rust/Makefile (6.1) and
scripts/Makefile (6.12, 7.3) do. The generators are cached outside the clone
(/var/tmp/rustko-targetspec, `$RUSTKO_TARGETSPEC_SRC`); a cold run downloads each source package
once (about 150 MB each) and keeps only the generator.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import copy_example, release_kdir, rustko, scons
from rustko import build, debian, targetspec, toolchain, vm
from rustko.kernel import KernelInfo, probe

RUSTC = Path("/usr/bin/rustc")
CACHE = Path(os.environ.get("RUSTKO_TARGETSPEC_SRC") or "/var/tmp/rustko-targetspec")

# KDIR release -> (Debian release whose archive has the source of exactly that kernel; None: the
# host's, the source package).
KERNELS: dict[str, tuple[str | None, str]] = {
    "6.1.0-56-amd64": (None, "linux-source-6.1"),
    "6.12.117+deb13-amd64": ("trixie", "linux-source-6.12"),
    "7.3.4+deb13-amd64": ("trixie", "linux-source-7.3"),
}
# What rustc 1.96 says of the spec 6.1's generator writes (target-pointer-width became a number in
# rustc 1.91), and the fields where rustko's builtin target plus flags then differs from it on
# code: README's table.
REFUSED_61 = 'target-pointer-width: invalid type: string "64", expected u16'
DIFFER_61 = {"cpu", "data-layout", "emit-debug-gdb-scripts", "features", "llvm-target", "rustc-abi",
             "stack-probes"}
HELLO = "hello from Rust: sorted [2, 3, 5, 7, 11, 13], sum 41"


def _source_version(release: str | None, package: str, kernel: KernelInfo) -> str:
    """The source package version of exactly this kernel (`6.1.192-2` for 6.1.192)."""
    upstream = ".".join(map(str, kernel.version))
    if release is not None:
        debian.update(release)
    out = debian.apt(release, ["apt-cache", "madison", package])
    versions = re.findall(r"\|\s*(\S+)\s*\|", out)
    found = [v for v in versions if v.startswith(f"{upstream}-")]
    assert found, f"no {package} {upstream} in {versions}"
    return found[0]


def _generator(release: str | None, package: str, kernel: KernelInfo) -> Path:
    """The kernel's own generate_rust_target, compiled from its source package (cached)."""
    version = _source_version(release, package, kernel)
    folder = CACHE / f"{package}_{version}"
    binary = folder / "generate_rust_target"
    if binary.is_file():
        return binary
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        deb = debian.download(package, "all", Path(tmp), release=release, version=version)
        series = package.removeprefix("linux-source-")
        member = f"linux-source-{series}/scripts/generate_rust_target.rs"
        deb_proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        tar = subprocess.Popen(["tar", "-xO", f"./usr/src/linux-source-{series}.tar.xz"], stdin=deb_proc.stdout,
                               stdout=subprocess.PIPE)
        xz = subprocess.Popen(["xz", "-dc", "-T0"], stdin=tar.stdout, stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", tmp, member], stdin=xz.stdout, check=True)
        for proc in (xz, tar, deb_proc):
            proc.wait()
        shutil.copy(Path(tmp) / member, folder / "generate_rust_target.rs")
        subprocess.run([str(RUSTC), "--edition=2021", "-O", "-Cstrip=debuginfo", "-o", str(Path(tmp) / "gen"),
                        str(folder / "generate_rust_target.rs")], check=True, capture_output=True)
        os.replace(Path(tmp) / "gen", binary)
    return binary


@pytest.fixture(scope="session")
def kernels() -> dict[str, tuple[KernelInfo, Path]]:
    """Each KDIR and its kernel's compiled generator."""
    found: dict[str, tuple[KernelInfo, Path]] = {}
    for name, (release, package) in KERNELS.items():
        kernel = probe(release_kdir(name))
        found[name] = (kernel, _generator(release, package, kernel))
    return found


@pytest.fixture(scope="session")
def tools() -> toolchain.Toolchain:
    return toolchain.find(str(RUSTC))


def _run(generator: Path, config: dict[str, str], rustc_minor: int | None) -> str:
    """The generator's output for `config` (auto.conf lines), as if configured with rustc 1.minor."""
    lines = []
    for key, value in config.items():
        if key == "CONFIG_RUSTC_VERSION" and rustc_minor is not None:
            value = str(100000 + 100 * rustc_minor)
        lines.append(f"{key}={value}\n")
    if rustc_minor is not None and "CONFIG_RUSTC_VERSION" not in config:
        lines.append(f"CONFIG_RUSTC_VERSION={100000 + 100 * rustc_minor}\n")
    proc = subprocess.run([str(generator)], input="".join(lines), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _auto_conf(kernel: KernelInfo) -> dict[str, str]:
    """include/config/auto.conf, what the generator reads (set symbols only)."""
    config: dict[str, str] = {}
    for line in (kernel.kdir / "include/config/auto.conf").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            config[key] = value
    return config


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_rows_print_what_the_kernels_own_generator_prints(kernels: dict, name: str) -> None:
    """For the KDIR's config, with every rustc the generator distinguishes, and with the symbols
    its `cfg.has` rows test switched: same keys, same order, same values."""
    kernel, generator = kernels[name]
    config = _auto_conf(kernel)
    assert set(config) - {"CONFIG_RUSTC_VERSION"} <= set(kernel.config)  # probe reads the same symbols
    variants = [config]
    for symbol in ("MITIGATION_SLS", "MITIGATION_RETPOLINE", "RETPOLINE"):
        variants.append({k: v for k, v in config.items() if k != f"CONFIG_{symbol}"})
    variants.append({**config, "CONFIG_X86_NATIVE_CPU": "y", "CONFIG_CPU_BIG_ENDIAN": "y"})
    checked = 0
    for variant in variants:
        variant_kernel = KernelInfo(kdir=kernel.kdir, release=kernel.release, version=kernel.version,
                                    arch=kernel.arch, config=variant, compiler=kernel.compiler)
        for minor in (78, 85, 86, 90, 91, 96, 98):
            text = _run(generator, variant, minor)
            ours = targetspec.kernel_spec(variant_kernel, minor)
            assert ours is not None
            theirs = json.loads(text)
            assert list(ours.items()) == list(theirs.items()), (minor, variant_kernel.version, text)
            checked += 1
    assert checked == len(variants) * 7


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_the_spec_in_use_agrees_with_the_kernels_on_every_field_that_changes_code(
        kernels: dict, tools: toolchain.Toolchain, name: str, tmp_path: Path) -> None:
    kernel, generator = kernels[name]
    target = build.resolve(build.Options(kdir=str(kernel.kdir), rustc=str(RUSTC)))
    theirs = tmp_path / "target.json"
    theirs.write_text(_run(generator, _auto_conf(kernel), targetspec.rustc_minor(tools)))
    kernel_printed, refused = targetspec.printed(tools, str(theirs))
    flags = target.flags[2:]
    builtin, _ = targetspec.printed(tools, "x86_64-unknown-none")
    assert builtin is not None
    if name.startswith("6.1."):
        # rustc refuses 6.1's spec: the builtin target stays, and the table says what differs.
        assert kernel_printed is None and REFUSED_61 in refused and REFUSED_61 in target.spec.refused
        assert target.flags[:2] == ["--target", "x86_64-unknown-none"] and not target.spec.custom
        spec = json.loads(theirs.read_text())
        assert {d.field for d in targetspec.differences(builtin, spec, flags) if d.code} == DIFFER_61
        return
    assert kernel_printed is not None, refused
    assert target.spec.path is not None and target.flags[1:3] == [str(target.spec.path), "-Zunstable-options"]
    assert target.spec.path.read_text() == targetspec.render(json.loads(theirs.read_text()))
    used, _ = targetspec.printed(tools, str(target.spec.path))
    assert used == kernel_printed
    assert [d for d in targetspec.differences(used, kernel_printed, flags) if d.code] == []
    # ... and what the builtin target would have changed (README's table), so the choice matters.
    changed = {d.field for d in targetspec.differences(builtin, kernel_printed, flags) if d.code}
    expected = {"emit-debug-gdb-scripts", "features", "llvm-target", "stack-probes"}
    assert changed == (expected | {"cpu"} if name.startswith("6.12") else expected), changed


def test_doctor_prints_the_spec_and_where_it_comes_from(kernels: dict) -> None:
    new, _ = kernels["7.3.4+deb13-amd64"]
    proc = rustko("doctor", "--kdir", str(new.kdir), "--rustc", str(RUSTC))
    assert "target spec: the kernel's own target.json" in proc.stdout, proc.stdout
    assert 'stack-probes = {"kind": "none"}' in proc.stdout and "generate_rust_target.rs (6.1.192, 6.12.117, 7.3.4)" in proc.stdout
    assert re.search(r"--target \S+/targetspec/\w+/target.json", proc.stdout), proc.stdout
    old, _ = kernels["6.1.0-56-amd64"]
    proc = rustko("doctor", "--kdir", str(old.kdir), "--rustc", str(RUSTC))
    assert "target spec: rustc's builtin x86_64-unknown-none plus flags: rustc 1.96.0 refuses" in proc.stdout
    assert "llvm-target" in proc.stdout and "(the kernel's value NOT used)" in proc.stdout


def test_a_module_built_with_the_kernels_spec_loads_in_the_real_7_3_kernel(
        kernels: dict, tmp_path: Path) -> None:
    kernel, _ = kernels["7.3.4+deb13-amd64"]
    project = copy_example(tmp_path / "hello")
    built = scons(project, f"KDIR={kernel.kdir}", f"RUSTC={RUSTC}", "V=1")
    assert built.returncode == 0, built.stdout + built.stderr
    assert re.search(r"rustc --target \S+/target.json -Zunstable-options ", built.stdout + built.stderr)
    record = json.loads((project / "build" / "hello.ko.buildinfo").read_text())
    assert record["flags"][1].endswith("/target.json")
    booted = vm.vmtest(project / "build" / "hello.ko", arch="x86_64", timeout=400)
    assert booted.ok, booted.failure or booted.console[-3000:]
    assert any(line.endswith(HELLO) for line in booted.module_log), booted.module_log
    assert any(line.endswith("goodbye from Rust") for line in booted.module_log), booted.module_log
