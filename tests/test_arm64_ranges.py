"""Differential, arm64 overflow checks against the module's placement (rustko.arm64ranges): one
hand-made C module per case, each with one relocation of the type under test written in
assembly, built by Kbuild with Debian's cross gcc; the checker's verdict, then all modules of a
kernel in one boot of Debian's real arm64 kernel (QEMU TCG): 6.1 (module_alloc_base, kaslr.c)
and 7.3 (module_init_limits, the v6.5 rework and its "Modules: " prefix).

`rk_weak` is a weak symbol nobody exports: the loader leaves it at 0, so its values are exact
and the kernel's `val` is predictable. `jiffies` is a kernel symbol: somewhere in the image.
"""

from __future__ import annotations

import functools
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from conftest import release_kdir, rustko, tool
from rustko import check, roots, vm
from rustko.cache import cached_dir
from rustko.elf import SHT_SYMTAB
from rustko.kernel import KernelInfo, probe
from test_check import CACHE, _key

SOURCE = r"""
#include <linux/module.h>
#include <linux/jiffies.h>
/* Never executed: only its relocation matters. */
asm(".weak rk_weak\n"
    ".pushsection .text.rk, \"ax\"\n"
    ".globl rk_here\n"
    "rk_here:\n"
    "%s\n"
    ".popsection\n"
    ".pushsection .text.rk2, \"ax\"\n"
    "rk_other: ret\n"
    ".popsection\n");
static int __init rk_init(void) { pr_info("loaded %%lu\n", jiffies); return 0; }
static void __exit rk_exit(void) { }
module_init(rk_init);
module_exit(rk_exit);
MODULE_LICENSE("GPL");
"""

# name -> (assembly, (type, val) the loader refuses it with, or None: it loads)
CASES: dict[str, tuple[str, tuple[int, str] | None]] = {
    # MOVW_SABS_G0..G2 (reloc_insn_movw MOVNZ): a kernel address (negative) is inverted, so it
    # fits 48 bits (G2) but not 16 or 32 (G0, G1).
    "rk_sabs0_kernel": ("movz x0, #:abs_g0_s:jiffies", (270, "<val>")),
    "rk_sabs0_small": ("movz x0, #:abs_g0_s:rk_weak-0x1234", None),
    "rk_sabs1_kernel": ("movz x0, #:abs_g1_s:jiffies", (271, "<val>")),
    "rk_sabs1_small": ("movz x0, #:abs_g1_s:rk_weak+0x12345678", None),
    "rk_sabs2_huge": ("movz x0, #:abs_g2_s:rk_weak+0x1000000000000", (272, "1000000000000")),
    "rk_sabs2_kernel": ("movz x0, #:abs_g2_s:jiffies", None),
    # MOVW_PREL_G0..G2 (reloc_insn_movw MOVNZ of S+A-P).
    "rk_prel0_far": ("movz x0, #:prel_g0:rk_here+0x11000", (287, "<val>")),
    "rk_prel0_near": ("movz x0, #:prel_g0:rk_here+0x100", None),
    "rk_prel1_zero": ("movz x0, #:prel_g1:rk_weak", (289, "0")),
    "rk_prel1_kernel": ("movz x0, #:prel_g1:jiffies", None),
    "rk_prel2_huge": ("movz x0, #:prel_g2:rk_weak+0x1000000000000", (291, "1000000000000")),
    "rk_prel2_zero": ("movz x0, #:prel_g2:rk_weak", None),
    # ADR_PREL_PG_HI21 (reloc_insn_adrp): +-4 GiB of pages; every module's ADRPs to the kernel
    # and to its own other sections fit, an ADRP to address 0 does not.
    "rk_adrp_zero": ("adrp x0, rk_weak", (275, "0")),
    "rk_adrp_kernel": ("adrp x0, jiffies\nadrp x0, rk_other", None),
    # PC-relative fields against a symbol in another section: decided by the 2 GiB window.
    "rk_adr_zero": ("adr x0, rk_weak", (274, "0")),
    "rk_prel32_kernel": (".long jiffies - .", None),
    # Short PC-relative fields to another section of the same allocation (6.1: the core one;
    # from v6.4 the module's text): at most that allocation's size apart, so they fit.
    "rk_short_sections": ("tbz x0, #1, rk_other\ncbz x0, rk_other\nadr x0, rk_other\n"
                          "ldr x0, rk_other", None),
    # JUMP26/CALL26 are not range-checked: out of direct range (here: to address 0) the loader
    # branches through a PLT entry (module_emit_plt_entry) and the module loads.
    "rk_call26_zero": ("bl rk_weak\nb rk_weak", None),
}
# Depends on placement: the checker says so; the kernel refuses it unless the module happens to
# land within 1 MiB of jiffies (one placement in about two thousand).
DEPENDS = {"rk_lo19_kernel": "ldr x0, jiffies"}
def _tool(*command: str) -> Callable[[Path], None]:
    def run(path: Path) -> None:
        done = subprocess.run([*command, str(path)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    return run


def _second_symtab(path: Path) -> None:
    """Append a copy of .symtab's section header to the table (which ends the file)."""
    data = bytearray(path.read_bytes())
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    assert shoff + shnum * shentsize == len(data)
    symtab = next(i for i in range(shnum)
                  if struct.unpack_from("<I", data, shoff + i * shentsize + 4)[0] == SHT_SYMTAB)
    data += data[shoff + symtab * shentsize:shoff + (symtab + 1) * shentsize]
    struct.pack_into("<H", data, 0x3C, shnum + 1)
    path.write_bytes(data)


def _rename_this_module(path: Path) -> None:
    """Rename .gnu.linkonce.this_module (and its .rela twin, which shares the string)."""
    data = path.read_bytes()
    assert data.count(b".gnu.linkonce.this_module\0") == 1
    path.write_bytes(data.replace(b".gnu.linkonce.this_module\0", b".gnu.linkonce.this_modulX\0"))


STRIPPED = ("no-symbols", "rk_adrp_kernel: module has no symbols (stripped?)")
# Made from a module that loads, the way a packaging step can break one, each refused before any
# relocation: `strip` drops the symbol table (setup_load_info; elf_validity_cache_index_sym, which
# from 6.12 also refuses a second one), struct module's section renamed (as if the module was
# linked without modpost's .mod.o), objcopy --remove-section the empty .plt that Kbuild's module.lds adds
# (arm64's module_frob_arch_sections).
# name -> (how, {series: (finding kind, the kernel's line), absent: it loads})
DERIVED: dict[str, tuple[Callable[[Path], None], dict[str, tuple[str, str]]]] = {
    "rk_stripped": (_tool("aarch64-linux-gnu-strip"), {"6.1": STRIPPED, "7.3": STRIPPED}),
    "rk_two_symtabs": (_second_symtab, {"7.3": STRIPPED}),
    "rk_no_this_module": (_rename_this_module,
                          {"6.1": ("no-this-module", "rk_adrp_kernel: No module found in object"),
                           "7.3": ("this-module-count", "module rk_adrp_kernel: Exactly one "
                                   ".gnu.linkonce.this_module section must exist.")}),
    "rk_no_plt": (_tool("aarch64-linux-gnu-objcopy", "--remove-section=.plt"),
                  {series: ("plt-missing", "rk_adrp_kernel: module PLT section(s) missing")
                   for series in ("6.1", "7.3")}),
}
DERIVED_FROM = "rk_adrp_kernel"

RELEASES = {"6.1": None, "7.3": "7.3.4+deb13-arm64"}


@functools.lru_cache(maxsize=None)
def _kdir(series: str) -> Path:
    """6.1: `rustko kdir --arch arm64` on the host; 7.3: Debian's, prepared in a trixie root."""
    tool("qemu-system-aarch64")
    release = RELEASES[series]
    if release is not None:
        return release_kdir(release)
    proc = rustko("kdir", "--arch", "arm64")
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip())


def _sources() -> dict[str, str]:
    asm = {name: text for name, (text, _) in CASES.items()} | DEPENDS
    return {name: SOURCE % text.replace("\n", "\\n") for name, text in asm.items()}


@functools.lru_cache(maxsize=None)
def _built(series: str) -> Path:
    kdir = _kdir(series)
    sources = _sources()

    def fill(tmp: Path) -> None:
        for name, text in sources.items():
            (tmp / f"{name}.c").write_text(text)
        (tmp / "Kbuild").write_text("".join(f"obj-m += {name}.o\n" for name in sources))
        command = ["make", "-s", "-C", str(kdir), f"M={tmp}", "ARCH=arm64",
                   "CROSS_COMPILE=aarch64-linux-gnu-", "modules"]
        done = subprocess.run(roots.kbuild_command(command, kdir, tmp), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    return cached_dir(CACHE / f"arm64-ranges-{series}-{_key(*sources.values(), str(kdir))}", fill)


@functools.lru_cache(maxsize=None)
def _derived(series: str) -> Path:
    built = _built(series)

    def fill(tmp: Path) -> None:
        for name, (make, _) in DERIVED.items():
            shutil.copyfile(built / f"{DERIVED_FROM}.ko", tmp / f"{name}.ko")
            make(tmp / f"{name}.ko")

    recipe = _key(built.name, Path(__file__).read_text())  # an edit of DERIVED makes them anew
    return cached_dir(CACHE / f"arm64-derived-{series}-{recipe}", fill)


@functools.lru_cache(maxsize=None)
def _booted(series: str) -> tuple[KernelInfo, dict[str, vm.VmResult]]:
    """Every module of the series in one boot of its Debian kernel."""
    folder = _built(series)
    names = [*CASES, *DEPENDS]
    paths = [folder / f"{name}.ko" for name in names] + [_derived(series) / f"{name}.ko" for name in DERIVED]
    names += list(DERIVED)
    results = vm.vmtest_many(paths, arch="arm64", timeout=600)
    return probe(_kdir(series)), dict(zip(names, results))


def _prefix(series: str) -> str:
    return "Modules: " if series == "7.3" else ""


@pytest.mark.parametrize("series", list(RELEASES))
@pytest.mark.parametrize("name", list(CASES))
def test_checker_and_kernel_agree(series: str, name: str) -> None:
    kernel, results = _booted(series)
    ko = _built(series) / f"{name}.ko"
    result = results[name]
    findings = check.check_module(ko, kernel)
    refused = CASES[name][1]
    if refused is None:
        assert findings == [], [f.kernel for f in findings]
        assert result.loaded, (result.insmod_error, result.console[-2000:])
        assert any("loaded" in line for line in result.module_log), result.module_log
        return
    rtype, val = refused
    assert [(f.kind, f.reloc_type) for f in findings] == [("overflow", rtype)]
    line = f"{_prefix(series)}module {name}: overflow in relocation type {rtype} val {val}"
    assert findings[0].kernel == [line]
    assert "depends on where the loader puts the module" not in findings[0].explanation
    assert not result.loaded
    assert findings[0].kernel_regex().search(result.console), (line, result.console[-2000:])
    assert "invalid module format" in (result.insmod_error or "")


@pytest.mark.parametrize("series", list(RELEASES))
def test_depends_on_placement_says_so(series: str) -> None:
    """LD_PREL_LO19 to a kernel symbol: +-1 MiB against a 2 GiB window."""
    kernel, results = _booted(series)
    name = "rk_lo19_kernel"
    findings = check.check_module(_built(series) / f"{name}.ko", kernel)
    assert [(f.kind, f.reloc_type) for f in findings] == [("overflow", 273)]
    assert "depends on where the loader puts the module" in findings[0].explanation
    assert "2 GiB window" in findings[0].explanation
    result = results[name]
    if not result.loaded:  # the likely placement: the kernel's line is the checker's
        assert findings[0].kernel_regex().search(result.console), result.console[-2000:]


@pytest.mark.parametrize("series", list(RELEASES))
@pytest.mark.parametrize("name", list(DERIVED))
def test_sections_the_loader_needs(series: str, name: str) -> None:
    """A stripped module, one with two symbol tables, one without .plt: the checker's verdict
    is the kernel's, with its line."""
    kernel, results = _booted(series)
    findings = check.check_module(_derived(series) / f"{name}.ko", kernel)
    result = results[name]
    refused = DERIVED[name][1].get(series)
    if refused is None:
        assert findings == [], [f.kernel for f in findings]
        assert result.loaded, (result.insmod_error, result.console[-2000:])
        return
    kind, line = refused
    assert findings[0].kind == kind and findings[0].kernel == [line], findings
    assert not result.loaded
    assert findings[0].kernel_regex().search(result.console), (line, result.console[-2000:])
    assert "invalid module format" in (result.insmod_error or "")


def test_range_rows_and_placements_cite_the_kernel() -> None:
    """Every checked type names the helper it mirrors; every version has one placement model."""
    from rustko import arm64ranges, relocs

    assert all(rc.source for rc in relocs.ARM64_RANGE_CHECKS.values())
    assert relocs.ARM64_RANGE_CHECKS[272].limits() == (-(1 << 48), (1 << 48) - 1)
    assert relocs.ARM64_RANGE_CHECKS[275].limits() == (-(1 << 32), (1 << 32) - 1)
    for version in ((5, 10), (6, 1), (6, 12), (7, 3), relocs.LATEST):
        assert arm64ranges.placement(version).source
    assert arm64ranges.placement((6, 12)).short.endswith("module_init_limits")
