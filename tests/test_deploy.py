"""rustko as Debian ships things: its .deb installed with apt-get, and Debian's own DKMS
rebuilding a Rust module for each kernel, in a debootstrapped bookworm root (`debroot`).

Everything in the root runs as a kernel package's hook would: as root, with a minimal PATH, no
virtual environment and no PYTHONPATH. The modules DKMS installs are then loaded into the real
Debian kernels of their releases under QEMU.
"""

from __future__ import annotations

import lzma
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

import debroot
from conftest import REPO, copy_example, rustko

RELEASES = ("6.1.0-56-amd64", "6.12.117+deb12-amd64")
LATER = RELEASES[1]   # its headers are installed after `dkms add`
SRC = "/usr/src/hello-0.1.0"


def in_root(root: Path, script: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return debroot.run(root, "sh", "-c", script, timeout=timeout)


def ok(root: Path, script: str, timeout: float = 900) -> str:
    proc = in_root(root, script, timeout)
    assert proc.returncode == 0, f"{script}\n{proc.stdout[-6000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`./dev deb` in a clean clone of this checkout's last commit."""
    clone = tmp_path_factory.mktemp("clone") / "rustko"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    proc = subprocess.run([str(clone / "dev"), "deb"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    built = clone / proc.stdout.strip()
    assert built.name.startswith("rustko_") and built.name.endswith("_all.deb") and built.is_file()
    return built


@pytest.fixture(scope="module")
def root(deb: Path) -> Iterator[Path]:
    """A fresh bookworm root with the .deb installed by apt-get (dependencies from the archive)."""
    path = debroot.overlay_root("deploy-test")
    shutil.copy(deb, path / "tmp" / deb.name)
    ok(path, f"apt-get install -y -q --no-install-recommends /tmp/{deb.name}")
    yield path
    debroot.close_root(path)


def test_deb_installs_the_command_library_and_scons_tool(root: Path, deb: Path) -> None:
    info = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True, check=True)
    for need in ("scons", "python3-pyelftools", "python3-numpy", "rustc-web | rustc", "rust-web-src | rust-src"):
        assert need in info.stdout
    out = ok(root, "command -v rustko; rustko --help; python3 -c 'import rustko; print(rustko.__file__)'; "
                   "dpkg -L rustko")
    assert out.startswith("/usr/bin/rustko\n")
    assert "dkms" in out and "vmtest" in out
    assert "/usr/lib/python3/dist-packages/rustko/__init__.py" in out
    assert "/usr/share/scons/site_scons/site_tools/rustko/__init__.py" in out
    # The postinst built the sysroot for the installed headers into root's machine-wide cache.
    again = ok(root, "rustko sysroot --installed")
    assert f"sysroot for {RELEASES[0]} (x86_64): /var/cache/rustko/sysroot/" in again and "(already there)" in again


def test_debian_scons_builds_a_project_with_the_installed_tool(root: Path) -> None:
    """Debian's /usr/bin/scons (4.4) finds the tool in its system site_scons: no toolpath, no venv."""
    project = copy_example(root / "root" / "hello")
    out = ok(root, "cd /root/hello && /usr/bin/scons -Q KDIR=/usr/src/linux-headers-6.1.0-56-amd64 && "
                   "/usr/bin/scons -Q -c")
    assert "  CHECK   hello.ko" in out and "scons: *** " not in out
    assert not (project / "build").exists()
    # Root's builds keep their cache (the sysroot) in /var/cache/rustko, not in a home.
    assert any((debroot.CACHE / "sysroot").iterdir())
    assert not (root / "root/.cache/rustko").exists()


@pytest.fixture(scope="module")
def registered(root: Path) -> Path:
    """examples/hello under /usr/src/hello-0.1.0 with the dkms.conf the installed `rustko dkms`
    wrote, added to DKMS while only the 6.1 headers are installed."""
    copy_example(root / SRC.lstrip("/"))
    ok(root, f"rustko dkms {SRC} && dkms add hello/0.1.0")
    return root


def test_dkms_conf_names_the_module_and_runs_scons(registered: Path) -> None:
    conf = (registered / SRC.lstrip("/") / "dkms.conf").read_text()
    for line in ('PACKAGE_NAME="hello"', 'PACKAGE_VERSION="0.1.0"', 'BUILT_MODULE_NAME[0]="hello"',
                 'BUILT_MODULE_LOCATION[0]="build/"', 'DEST_MODULE_LOCATION[0]="/updates/dkms"',
                 'AUTOINSTALL="yes"', 'MAKE[0]="scons -Q KDIR=${kernel_source_dir}"'):
        assert line in conf.splitlines()


def installed(root: Path, release: str, name: str = "hello") -> list[Path]:
    return sorted((root / "lib/modules" / release / "updates/dkms").glob(f"{name}.ko*"))


def loadable_copy(module: Path, dest: Path) -> Path:
    """The installed module as a plain .ko (DKMS compresses when the kernel's own modules are)."""
    data = module.read_bytes()
    if module.suffix == ".xz":
        data = lzma.decompress(data)
    dest.write_bytes(data)
    return dest


@pytest.fixture(scope="module")
def built(registered: Path) -> Path:
    """`dkms install` for 6.1; the 6.12 headers installed afterwards, whose postinst hook runs DKMS."""
    ok(registered, f"dkms install hello/0.1.0 -k {RELEASES[0]}")
    ok(registered, f"apt-get install -y -q --no-install-recommends linux-headers-{LATER}")
    return registered


def test_installing_new_headers_builds_the_module_and_autoinstall_rebuilds_it(built: Path) -> None:
    assert installed(built, LATER), "the headers' postinst hook (dkms autoinstall) built nothing"
    ok(built, f"dkms unbuild hello/0.1.0 -k {LATER}")
    assert not installed(built, LATER)
    out = ok(built, f"dkms autoinstall -k {LATER}")
    assert installed(built, LATER), out
    status = ok(built, "dkms status hello")
    for release in RELEASES:
        assert f"hello/0.1.0, {release}, x86_64: installed" in status


@pytest.mark.parametrize("release", RELEASES)
def test_dkms_installed_module_loads_in_its_real_kernel(built: Path, release: str, tmp_path: Path) -> None:
    (module,) = installed(built, release)
    ko = loadable_copy(module, tmp_path / "hello.ko")
    signature = ko.read_bytes()
    # Debian's DKMS signs with its own MOK key (/var/lib/dkms/mok.key, made on first use).
    assert signature.endswith(b"~Module signature appended~\n")
    assert (built / "var/lib/dkms/mok.key").is_file() and (built / "var/lib/dkms/mok.pub").is_file()
    result = rustko("vmtest", str(ko))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hello: hello from Rust" in result.stdout
    assert release in result.stdout + result.stderr


BROKEN_CASES = {
    "notrust": ("src/lib.rs", "fn oops() -> u32 { \"not a number\" }\n", "error[E0308]: mismatched types"),
    "picmod": ("SConstruct", 'env = Environment(tools=["default", "rustko"])\n'
               'env.RustKernelModule("picmod", "src/lib.rs", rustflags=["-Crelocation-model=pic", "-Zplt=no"])\n',
               "module: picmod: Unknown rela relocation: 9"),
}


@pytest.mark.parametrize("name", BROKEN_CASES)
def test_failed_dkms_build_keeps_rustkos_message_and_installs_nothing(built: Path, name: str) -> None:
    path, text, message = BROKEN_CASES[name]
    src = built / f"usr/src/{name}-0.1.0"
    copy_example(src)
    manifest = src / "Cargo.toml"
    manifest.write_text(manifest.read_text().replace('name = "hello"', f'name = "{name}"'))
    (src / "SConstruct").write_text((src / "SConstruct").read_text().replace('"hello"', f'"{name}"'))
    target = src / path
    target.write_text(target.read_text() + text if path.endswith(".rs") else text)
    ok(built, f"rustko dkms /usr/src/{name}-0.1.0 && dkms add {name}/0.1.0")
    proc = in_root(built, f"dkms install {name}/0.1.0 -k {RELEASES[0]}")
    assert proc.returncode != 0 and "Bad return status for module build" in proc.stdout, proc.stdout
    log = (built / f"var/lib/dkms/{name}/0.1.0/build/make.log").read_text()
    assert message in log and "Traceback" not in log, log
    assert not installed(built, RELEASES[0], name)
    ok(built, f"dkms remove {name}/0.1.0 --all")


def test_kernel_without_usable_headers_fails_with_rustkos_message(built: Path) -> None:
    """A /lib/modules/R/build that is no kernel build directory (headers half removed)."""
    release = "6.1.0-0-rustkotest"
    (built / f"lib/modules/{release}/build/include").mkdir(parents=True)
    proc = in_root(built, f"dkms install hello/0.1.0 -k {release}")
    assert proc.returncode != 0, proc.stdout
    log = (built / "var/lib/dkms/hello/0.1.0/build/make.log").read_text()
    assert "error: " in log and f"/lib/modules/{release}/build" in log, log
    assert not installed(built, release)
    missing = in_root(built, "dkms install hello/0.1.0 -k 6.1.0-99-amd64")
    assert missing.returncode != 0 and "kernel headers for kernel 6.1.0-99-amd64 cannot be found" in missing.stdout
    shutil.rmtree(built / f"lib/modules/{release}")


def test_dkms_remove_leaves_nothing(built: Path) -> None:
    ok(built, "dkms remove hello/0.1.0 --all")
    for release in RELEASES:
        assert not installed(built, release)
        depends = (built / "lib/modules" / release / "modules.dep")
        assert not depends.exists() or "hello" not in depends.read_text()
    assert not (built / "var/lib/dkms/hello").exists()
    assert ok(built, "dkms status").strip() == ""


def test_rustko_dkms_reads_the_project(tmp_path: Path) -> None:
    """Name and version from Cargo.toml, one BUILT_MODULE per RustKernelModule call, build_dir kept."""
    (tmp_path / "Cargo.toml").write_text('[package]\nname = "two-mods"\nversion = "1.2.3"\n')
    (tmp_path / "SConstruct").write_text(
        'env = Environment(tools=["default", "rustko"])\n'
        'env.RustKernelModule("first", "src/lib.rs")\n'
        "env.RustKernelModule('second', 'other/lib.rs', build_dir='#out/second')\n")
    result = rustko("dkms", str(tmp_path))
    assert result.returncode == 0, result.stderr
    conf = (tmp_path / "dkms.conf").read_text().splitlines()
    for line in ('PACKAGE_NAME="two-mods"', 'PACKAGE_VERSION="1.2.3"', 'BUILT_MODULE_NAME[0]="first"',
                 'BUILT_MODULE_LOCATION[0]="build/"', 'BUILT_MODULE_NAME[1]="second"',
                 'BUILT_MODULE_LOCATION[1]="out/second/"', 'DEST_MODULE_LOCATION[1]="/updates/dkms"'):
        assert line in conf


def test_rustko_dkms_refuses_what_dkms_could_not_use(tmp_path: Path) -> None:
    missing = rustko("dkms", str(tmp_path))
    assert missing.returncode == 2 and "SConstruct" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "SConstruct").write_text('env = Environment(tools=["default", "rustko"])\n'
                                         'env.RustKernelModule("solo")\n')
    unversioned = rustko("dkms", str(tmp_path))
    assert unversioned.returncode == 2 and "--version" in unversioned.stderr
    assert not (tmp_path / "dkms.conf").exists()
    assert rustko("dkms", str(tmp_path), "--version", "2.0").returncode == 0
    assert 'PACKAGE_NAME="solo"' in (tmp_path / "dkms.conf").read_text()


def test_rustko_new_projects_carry_a_dkms_conf(tmp_path: Path) -> None:
    created = rustko("new", "fresh", "--dir", str(tmp_path / "fresh"))
    assert created.returncode == 0, created.stderr
    conf = (tmp_path / "fresh" / "dkms.conf").read_text().splitlines()
    assert 'PACKAGE_NAME="fresh"' in conf and 'BUILT_MODULE_NAME[0]="fresh"' in conf
