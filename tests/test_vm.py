"""`rustko vmtest` against the real Debian 6.1 and 6.12 kernels, with C modules built by Kbuild.

The kernels are those of the newest installed headers of each series (and for arm64, of the
headers `rustko kdir` fetches), so every assertion names the release the headers say. Every boot
is real (QEMU, TCG). The boots are started together once per session, two at a time (the machine
has two cores), and each test reads the result it needs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from conftest import require_kdir, rustko, tool
from rustko import vm
from rustko.errors import RustkoError
from rustko.kernel import probe

REPO = Path(__file__).resolve().parent.parent
INITSTATE = "cat /sys/module/hello/initstate"

SOURCES = {
    "hello": """
static int __init hello_init(void) { pr_info("hello: rustko vmtest says hi\\n"); return 0; }
static void __exit hello_exit(void) { pr_info("hello: bye\\n"); }
module_init(hello_init);
module_exit(hello_exit);
""",
    "nodev": """
static int __init nodev_init(void) { pr_info("nodev: no device here\\n"); return -ENODEV; }
module_init(nodev_init);
""",
    "unknownsym": """
extern int rustko_no_such_export(void);
static int __init unknownsym_init(void) { return rustko_no_such_export(); }
module_init(unknownsym_init);
""",
    "sticky": """
static int __init sticky_init(void) { pr_info("sticky: here to stay\\n"); return 0; }
module_init(sticky_init);
""",
    "crasher": """
static int __init crasher_init(void) { BUG(); return 0; }
module_init(crasher_init);
""",
}


def build(root: Path, series: str, names: Sequence[str], kdir: Path | None = None, *make_args: str) -> dict[str, Path]:
    """C modules built by one Kbuild run against the newest installed headers of `series` (or `kdir`)."""
    folder = root / series
    folder.mkdir()
    for name in names:
        (folder / f"{name}.c").write_text(
            "#include <linux/module.h>\n#include <linux/init.h>\n" + SOURCES[name] + 'MODULE_LICENSE("GPL");\n'
        )
    (folder / "Kbuild").write_text("obj-m := " + " ".join(f"{name}.o" for name in names) + "\n")
    proc = subprocess.run(
        ["make", "-s", "-C", str(kdir or require_kdir(series)), f"M={folder}", "KBUILD_MODPOST_WARN=1", *make_args],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return {name: folder / f"{name}.ko" for name in names}


@pytest.fixture(scope="session")
def releases() -> dict[str, str]:
    """The release of each series' newest installed headers: the kernel its modules boot in."""
    return {series: probe(require_kdir(series)).release for series in ("6.1", "6.12")}


def arm64_boot(root: Path) -> tuple[str, subprocess.CompletedProcess[str]]:
    """Cross-build hello for Debian's newest arm64 6.1 headers (`rustko kdir`), boot it with the CLI.

    Runs in the boot pool, so missing arm64 parts fail only the arm64 test.
    """
    tool("qemu-system-aarch64")
    tool("aarch64-linux-gnu-gcc")
    foreign = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout
    if "arm64" not in foreign.split():
        pytest.fail("dpkg has no arm64 architecture, so apt cannot fetch arm64 headers: run ./dev setup")
    made = rustko("kdir", "--arch", "arm64")
    assert made.returncode == 0, made.stderr
    kdir = Path(made.stdout.strip())
    module = build(root, "arm64", ["hello"], kdir, "ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-")["hello"]
    return probe(kdir).release, cli(str(module), "--run", "uname -m", "--run", INITSTATE)


def with_gotpcrel(module: Path, out: Path) -> Path:
    """A copy whose first PLT32 relocation in code is GOTPCREL (9): what Rust without -Zplt emits."""
    from elftools.elf.elffile import ELFFile

    data = bytearray(module.read_bytes())
    with open(module, "rb") as handle:
        for section in ELFFile(handle).iter_sections():
            if section.name.startswith(".rela") and section.name.endswith("text"):
                for index, rela in enumerate(section.iter_relocations()):
                    if rela["r_info_type"] == 4:
                        offset = section["sh_offset"] + index * section["sh_entsize"] + 8
                        data[offset : offset + 8] = ((rela["r_info_sym"] << 32) | 9).to_bytes(8, "little")
                        out.write_bytes(data)
                        return out
    raise AssertionError(f"{module} has no PLT32 relocation to rewrite")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "site_scons"))
    return subprocess.run(
        [sys.executable, "-m", "rustko.cli", "vmtest", *args], cwd=REPO, env=env, capture_output=True, text=True
    )


@pytest.fixture(scope="session")
def modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("modules")
    in_61 = build(root, "6.1", ["hello", "nodev", "unknownsym", "crasher"])
    in_612 = build(root, "6.12", ["hello", "sticky"])
    built = {
        "hello-6.1": in_61["hello"],
        "hello-6.12": in_612["hello"],
        "nodev": in_61["nodev"],
        "unknownsym": in_61["unknownsym"],
        "crasher": in_61["crasher"],
        "sticky": in_612["sticky"],
    }
    built["gotpcrel"] = with_gotpcrel(built["hello-6.1"], root / "gotpcrel.ko")
    # Same release, other flags: with modversions the kernel compares the words after the release.
    data = built["hello-6.1"].read_bytes()
    assert data.count(b" mod_unload ") == 1
    built["badmagic"] = root / "badmagic.ko"
    built["badmagic"].write_bytes(data.replace(b" mod_unload ", b" mod_unl0ad "))
    return built


@pytest.fixture(scope="session")
def boots(
    modules: dict[str, Path], releases: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future]]:
    """All boots of the session, started at once; the kernels come from Debian via the cache."""
    tool("qemu-system-x86_64")
    kernel_61 = vm.debian_kernel(releases["6.1"])
    vm.debian_kernel(releases["6.12"])
    pool = ThreadPoolExecutor(max_workers=2)
    futures: dict[str, Future] = {
        # the longest boot first, so the two workers finish together
        "cli-arm64": pool.submit(arm64_boot, tmp_path_factory.mktemp("arm64")),
        "hello-6.1": pool.submit(vm.vmtest, modules["hello-6.1"], run=(INITSTATE, "echo to stderr >&2; false")),
        "cli-6.12": pool.submit(cli, str(modules["hello-6.12"]), "--run", INITSTATE),
        "nodev": pool.submit(vm.vmtest, modules["nodev"]),
        "cli-badmagic": pool.submit(cli, str(modules["badmagic"]), "--kernel", str(kernel_61)),
        "unknownsym": pool.submit(vm.vmtest, modules["unknownsym"], kernel=kernel_61),
        "gotpcrel": pool.submit(vm.vmtest, modules["gotpcrel"]),
        "sticky": pool.submit(vm.vmtest, modules["sticky"]),
        "crasher": pool.submit(vm.vmtest, modules["crasher"]),
        "timeout": pool.submit(vm.vmtest, modules["hello-6.1"], timeout=1),
    }
    yield futures
    pool.shutdown()


def test_hello_loads_in_6_1_and_commands_decide_the_verdict(
    boots: dict[str, Future], releases: dict[str, str]
) -> None:
    result: vm.VmResult = boots["hello-6.1"].result()
    assert result.loaded and result.unloaded
    assert "hello: rustko vmtest says hi" in result.module_log
    assert result.module_log.index("hello: rustko vmtest says hi") < result.module_log.index("hello: bye")
    assert result.commands == [
        ("cat /sys/module/hello/initstate", 0, "live"),
        ("echo to stderr >&2; false", 1, "to stderr"),
    ]
    assert not result.ok, "a --run command that exits 1 must fail the verdict"
    assert result.refusal is None and result.insmod_error is None and not result.crash
    assert f"Linux version {releases['6.1']} " in result.console


def test_cli_hello_loads_in_6_12(boots: dict[str, Future], releases: dict[str, str]) -> None:
    proc: subprocess.CompletedProcess[str] = boots["cli-6.12"].result()
    assert proc.returncode == 0, proc.stderr
    assert "  hello: rustko vmtest says hi\n" in proc.stdout
    assert "$ cat /sys/module/hello/initstate  (exit 0)\n  live\n" in proc.stdout
    assert f"vmlinuz-{releases['6.12']} (x86_64)" in proc.stdout
    assert "ok: hello loaded and unloaded cleanly" in proc.stdout


def test_cli_arm64_module_boots_debians_arm64_kernel(boots: dict[str, Future]) -> None:
    release, proc = boots["cli-arm64"].result()
    assert proc.returncode == 0, proc.stderr
    assert f"vmlinuz-{release} (arm64)" in proc.stdout
    assert "  hello: rustko vmtest says hi\n" in proc.stdout
    assert "$ uname -m  (exit 0)\n  aarch64\n" in proc.stdout


def test_init_returning_enodev_is_reported(boots: dict[str, Future]) -> None:
    result: vm.VmResult = boots["nodev"].result()
    assert not result.loaded and not result.unloaded and not result.ok
    assert result.insmod_error is not None and "No such device" in result.insmod_error
    assert "nodev: no device here" in result.module_log
    assert result.refusal is None, "the loader accepted it; init itself failed"


def test_cli_wrong_vermagic_is_refused_with_the_kernels_message(
    boots: dict[str, Future], releases: dict[str, str]
) -> None:
    proc: subprocess.CompletedProcess[str] = boots["cli-badmagic"].result()
    assert proc.returncode == 1
    release = releases["6.1"]
    assert (
        f"hello: version magic '{release} SMP preempt mod_unl0ad modversions ' "
        f"should be '{release} SMP preempt mod_unload modversions '"
    ) in proc.stderr
    assert "invalid module format" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_symbol_is_refused(boots: dict[str, Future]) -> None:
    result: vm.VmResult = boots["unknownsym"].result()
    assert not result.loaded and not result.ok
    assert result.refusal == "unknownsym: Unknown symbol rustko_no_such_export (err -2)"
    assert result.insmod_error is not None and "unknown symbol" in result.insmod_error


def test_unknown_relocation_is_refused(boots: dict[str, Future]) -> None:
    result: vm.VmResult = boots["gotpcrel"].result()
    assert not result.loaded and not result.ok
    assert result.refusal == "module: hello: Unknown rela relocation: 9"
    assert result.insmod_error is not None and "invalid module format" in result.insmod_error


def test_module_without_exit_fails_at_rmmod(boots: dict[str, Future]) -> None:
    result: vm.VmResult = boots["sticky"].result()
    assert result.loaded and not result.unloaded and not result.ok
    assert "sticky: here to stay" in result.module_log
    assert result.rmmod_error is not None and "sticky" in result.rmmod_error


def test_oops_in_init_is_a_failure_with_its_lines(boots: dict[str, Future]) -> None:
    result: vm.VmResult = boots["crasher"].result()
    assert not result.ok and not result.loaded
    assert any("kernel BUG at" in line for line in result.crash), result.module_log


def test_timeout_kills_qemu(boots: dict[str, Future]) -> None:
    result: vm.VmResult = boots["timeout"].result()
    assert not result.ok
    assert result.failure is not None and result.failure.startswith("timed out after 1 s")
    assert result.seconds < 5


def test_cli_missing_kernel_is_exit_2() -> None:
    proc = cli(str(REPO / "tests" / "test_vm.py"), "--kernel", "/nonexistent/vmlinuz")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_cli_missing_kernel_with_a_real_module(modules: dict[str, Path]) -> None:
    proc = cli(str(modules["hello-6.1"]), "--kernel", "/nonexistent/vmlinuz")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: kernel image /nonexistent/vmlinuz does not exist")
    assert "Traceback" not in proc.stderr


def test_cli_bad_inputs_are_exit_2(modules: dict[str, Path], tmp_path: Path) -> None:
    text = tmp_path / "notes.ko"
    text.write_text("not an ELF file\n")
    cases = {
        (str(text),): "is not an ELF kernel module",
        (str(tmp_path / "absent.ko"),): "cannot read module",
        (str(modules["hello-6.1"]), "--arch", "sparc"): "does not support architecture 'sparc'",
        (str(modules["hello-6.1"]), "--arch", "aarch64"): "is built for EM_X86_64, not for arm64",
    }
    for args, message in cases.items():
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_unknown_release_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUSTKO_CACHE", str(tmp_path))  # the failed fetch leaves its lock file here
    with pytest.raises(RustkoError) as raised:
        vm.debian_kernel("0.0.0-rustko-none-amd64")
    assert "linux-image-0.0.0-rustko-none-amd64-unsigned" in str(raised.value)
    assert raised.value.exit_code == 2


def test_initramfs_is_read_by_cpio(tmp_path: Path) -> None:
    archive = vm.Cpio()
    archive.directory("bin")
    archive.file("bin/tool", b"#!/bin/sh\necho odd-length\n", 0o755)
    archive.symlink("bin/sh", "busybox")
    archive.chardev("console", 5, 1)
    (tmp_path / "a.cpio.gz").write_bytes(archive.gzipped())
    listing = subprocess.run(
        f"gzip -dc {tmp_path / 'a.cpio.gz'} | cpio -itv", shell=True, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert [line.split()[0] for line in listing] == ["drwxr-xr-x", "-rwxr-xr-x", "lrwxrwxrwx", "crw-------"]
    assert listing[2].endswith("bin/sh -> busybox")
    assert "5,   1" in listing[3] or "5, 1" in listing[3]
