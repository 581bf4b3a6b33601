"""Issue 6: `scons ARCH=um` modules in Debian's User-Mode Linux kernel (user-mode-linux 6.1).

Everything is real: the KDIR is prepared from the exact linux-source that built the packaged
kernel, the modules are built by rustc and Kbuild, and the packaged `linux.uml` runs as a process
with a busybox initramfs. seeds/001's two failures are rebuilt on purpose with their rustflags:
the checker must name each, and the UML kernel must refuse each with the message it predicted.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import REPO, copy_example, rustko, scons
from rustko import uml
from rustko.kernel import probe


@pytest.fixture(scope="session")
def uml_kdir() -> Path:
    if not uml.KERNEL.is_file():
        pytest.fail(f"{uml.KERNEL} is missing: run ./dev setup (installs user-mode-linux)")
    result = rustko("kdir", "--arch", "um", timeout=900)
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip())


def test_kdir_matches_the_packaged_kernel(uml_kdir: Path) -> None:
    pkg = uml.package()
    kernel = probe(uml_kdir)
    assert (kernel.arch, kernel.release) == ("um", pkg.release)
    assert kernel.config["CONFIG_64BIT"] == "y" and "CONFIG_MODVERSIONS" not in kernel.config
    symvers = (uml_kdir / "Module.symvers").read_text()
    assert "0x00000000\t_printk\tvmlinux\tEXPORT_SYMBOL\t\n" in symvers
    before = (uml_kdir.stat().st_ino, (uml_kdir / "Module.symvers").stat().st_mtime_ns)
    again = rustko("kdir", "--arch", "um")
    assert again.returncode == 0 and Path(again.stdout.strip()) == uml_kdir
    # Cached: the same folder, not prepared again.
    assert (uml_kdir.stat().st_ino, (uml_kdir / "Module.symvers").stat().st_mtime_ns) == before


def test_every_module_of_debians_uml_kernel_passes_the_check(uml_kdir: Path) -> None:
    """No false positive on the ~1,100 modules the user-mode-linux package ships."""
    modules = Path("/usr/lib/uml/modules") / probe(uml_kdir).release
    assert len(list(modules.rglob("*.ko"))) > 500
    result = rustko("check", "--kdir", str(uml_kdir), str(modules))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_symvers_has_the_kernels_and_the_modules_exports(uml_kdir: Path) -> None:
    rows = [line.split("\t") for line in (uml_kdir / "Module.symvers").read_text().splitlines()]
    owners = {row[2] for row in rows}
    by_name = {row[1]: row for row in rows}
    assert "vmlinux" in owners and len(owners) > 100  # the kernel and its shipped modules
    assert by_name["_printk"][3] == "EXPORT_SYMBOL"
    assert any(row[3] == "EXPORT_SYMBOL_GPL" for row in rows)
    assert any(row[4] for row in rows)  # namespaced exports keep their namespace


def test_hello_loads_in_uml(tmp_path: Path, uml_kdir: Path) -> None:
    project = copy_example(tmp_path / "hello")
    built = scons(project, "ARCH=um", f"KDIR={uml_kdir}")
    assert built.returncode == 0, built.stdout + built.stderr
    ko = project / "build" / "hello.ko"
    relocs = rustko("check", "--kdir", str(uml_kdir), "--json", str(ko))
    assert relocs.returncode == 0, relocs.stdout + relocs.stderr
    booted = rustko("vmtest", str(ko), timeout=300)  # --arch um inferred from the vermagic
    assert booted.returncode == 0, booted.stdout + booted.stderr
    assert "(um)" in booted.stdout
    assert re.search(r"hello: hello from Rust: sorted \[2, 3, 5, 7, 11, 13\], sum 41", booted.stdout)
    assert "hello: goodbye from Rust" in booted.stdout
    assert "loaded and unloaded cleanly" in booted.stdout


def _jiffies(tmp_path: Path, rustflags: list[str]) -> Path:
    project = tmp_path / "jiffies"
    shutil.copytree(REPO / "tests" / "modules" / "jiffies", project,
                    ignore=shutil.ignore_patterns("build", ".sconsign*"))
    (project / "SConstruct").write_text(
        'env = Environment(tools=["default", "rustko"])\n'
        f'env.RustKernelModule("jiffies", "src/lib.rs", rustflags={rustflags!r})\n')
    return project


def test_kernel_data_from_rust_loads_in_uml(tmp_path: Path, uml_kdir: Path) -> None:
    project = _jiffies(tmp_path, [])
    built = scons(project, "ARCH=um", f"KDIR={uml_kdir}")
    assert built.returncode == 0, built.stdout + built.stderr
    booted = rustko("vmtest", "--arch", "um", str(project / "build" / "jiffies.ko"), timeout=300)
    assert booted.returncode == 0, booted.stdout + booted.stderr
    assert re.search(r"jiffies: jiffies read from Rust: \d+", booted.stdout)


# seeds/001: (rustflags that reproduce it, relocation the checker must name, kernel message)
SEEDS = {
    # 6.12's arch/um/Makefile `-Crelocation-model=pie` with target.json's default code model.
    "pie": (["-Crelocation-model=pie", "-Ccode-model=small"], "R_X86_64_GOTPCREL (9) against jiffies",
            "subarch: jiffies: Unknown rela relocation: 9"),
    # x86_64's kernel code model: module-local addresses as sign-extended 32-bit immediates.
    "kernel-model": (["-Ccode-model=kernel"], "R_X86_64_32S (11)",
                     "subarch: overflow in relocation type 11 val <val>"),
}


@pytest.mark.parametrize("seed", sorted(SEEDS))
def test_seed_failures_predicted_and_refused(tmp_path: Path, uml_kdir: Path, seed: str) -> None:
    rustflags, reloc, message = SEEDS[seed]
    project = _jiffies(tmp_path, rustflags)
    built = scons(project, "ARCH=um", f"KDIR={uml_kdir}")
    assert built.returncode != 0, "the build must fail on a module the kernel would refuse"
    assert reloc in built.stderr and message in built.stderr, built.stderr
    assert not (project / "build" / "jiffies.ko").exists(), "a refused module is not published"
    ko = project / "build" / ".rustko" / "jiffies" / "jiffies.ko"
    assert ko.is_file(), "the refused module stays for inspection"

    checked = rustko("check", "--kdir", str(uml_kdir), "--json", str(ko))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    findings = json.loads(checked.stdout)["modules"][0]["findings"]
    predicted = {line for f in findings for line in f["kernel"]}
    assert message in predicted
    # Without --kdir or --arch, the installed UML kernel's release in the vermagic says "um".
    bare = rustko("check", str(ko))
    assert bare.returncode == 1 and message.split(" val ")[0] in bare.stdout, bare.stdout + bare.stderr
    first = re.escape(message).replace(re.escape("<val>"), "[0-9a-f]+")

    booted = rustko("vmtest", str(ko), timeout=300)
    assert booted.returncode == 1, booted.stdout + booted.stderr
    assert "(um)" in booted.stdout
    assert re.search(rf"the kernel refused jiffies:\n  {first}$", booted.stderr, re.M), booted.stderr
    assert "invalid module format" in booted.stderr


def test_overflow_depends_on_mem_as_the_checker_predicts(tmp_path: Path, uml_kdir: Path) -> None:
    """Issue 14: the same -Ccode-model=kernel module loads in UML just below the mem= the checker
    names and is refused from it on, with the line the checker predicted (modules start at
    0x60000000 + mem= + 8 MiB; vmtest runs UML without brk randomization, which would add to it)."""
    project = _jiffies(tmp_path, ["-Ccode-model=kernel"])
    assert scons(project, "ARCH=um", f"KDIR={uml_kdir}").returncode != 0
    ko = project / "build" / ".rustko" / "jiffies" / "jiffies.ko"
    checked = rustko("check", "--kdir", str(uml_kdir), "--json", str(ko))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    findings = [f for f in json.loads(checked.stdout)["modules"][0]["findings"] if f["kind"] == "overflow"]
    notes = {f["explanation"] for f in findings}
    assert len(notes) == 1, notes
    threshold = re.search(r"refused with mem=(\d+)M or more", notes.pop())
    assert threshold, findings[0]
    mem = int(threshold[1])
    assert mem % 8 == 0 and 64 < mem < 3072
    predicted = re.escape(findings[0]["kernel"][0]).replace(re.escape("<val>"), "([0-9a-f]+)")

    below = rustko("vmtest", "--mem", f"{mem - 8}M", str(ko), timeout=300)
    assert below.returncode == 0, below.stdout + below.stderr
    assert re.search(r"jiffies: jiffies read from Rust: \d+", below.stdout)
    at = rustko("vmtest", "--mem", f"{mem}M", str(ko), timeout=300)
    assert at.returncode == 1, at.stdout + at.stderr
    refused = re.search(rf"the kernel refused jiffies:\n  {predicted}$", at.stderr, re.M)
    assert refused, at.stderr
    assert 0x80000000 <= int(refused[1], 16) < 0x80000000 + (16 << 20)  # just past 2 GiB


def test_vmtest_mem_is_for_uml_only() -> None:
    ko = next(Path("/usr/lib/uml/modules").rglob("*.ko"))
    bad = rustko("vmtest", "--arch", "x86_64", "--mem", "64M", str(ko))
    assert bad.returncode == 2 and "--mem is for UML" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    bad = rustko("vmtest", "--arch", "um", "--mem", "lots", str(ko))
    assert bad.returncode == 2 and "is not a memory size" in bad.stderr, bad.stderr


def test_arch_um_with_x86_headers_says_how_to_get_a_uml_kdir(tmp_path: Path, kdir61: Path) -> None:
    project = copy_example(tmp_path / "hello")
    built = scons(project, "ARCH=um", f"KDIR={kdir61}")
    assert built.returncode != 0 and "Traceback" not in built.stderr
    assert "is configured for x86_64, but ARCH=um" in built.stderr
    assert "KDIR=$(rustko kdir --arch um)" in built.stderr
