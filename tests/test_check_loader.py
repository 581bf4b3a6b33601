"""Differential, rule by rule: C modules made for each loader rule (Kbuild against Debian's 6.1
headers, 6.12's, or 7.3's in a trixie root; patched with Python where a rule needs bytes no
compiler writes) are checked, then loaded into the real Debian kernel in QEMU; the kernel must give
the verdict the checker predicts, with the first line it said the kernel would print and the error
insmod reports."""

from __future__ import annotations

import base64
import functools
import struct
import sys
import subprocess
from pathlib import Path

import pytest

from conftest import release_kdir, require_kdir, tool
from rustko import check, roots
from rustko.cache import cached_dir
from rustko.cli import main
from rustko.elf import RELA64, Elf
from rustko.kernel import KernelInfo, probe
from rustko.vm import debian_kernel, vmtest
from test_check import CACHE, _key

SOURCE = r"""
#include <linux/module.h>
#include <linux/delay.h>
#include <linux/percpu.h>
#ifdef WEAK
#pragma weak msleep
extern int rustko_weak_nowhere __attribute__((weak));
/* A 32-bit absolute field against a weak symbol nobody exports: it resolves to 0 and fits. */
asm(".pushsection .data\n.weak rustko_weak_nowhere\n.long rustko_weak_nowhere\n.popsection");
#endif
#ifdef DUP
int rustko_dupl(void) { return 1; }
EXPORT_SYMBOL(rustko_dupl);
#endif
#ifdef PERCPU
static DEFINE_PER_CPU(struct { char bytes[PERCPU]; }, rk_big);
#endif
#ifdef BIG
static char rk_huge[BIG];
#endif
static int __init m_init(void)
{
#ifdef WEAK
	msleep(1);
	pr_info("weak %px\n", &rustko_weak_nowhere);
#endif
#ifdef PERCPU
	pr_info("percpu %p\n", per_cpu_ptr(&rk_big, 0));
#endif
#ifdef BIG
	pr_info("huge %px\n", rk_huge);
#endif
	pr_info("m loaded\n");
	return 0;
}
static void __exit m_exit(void) { }
module_init(m_init);
module_exit(m_exit);
MODULE_LICENSE("GPL");
"""

VARIANTS = {"plain": "", "weak": "-DWEAK", "dup": "-DDUP", "percpu": "-DPERCPU=16384",
            "percpu-huge": "-DPERCPU=40000", "small": "-mcmodel=small",
            # 1.75 GiB of .bss: more than x86_64's whole module area (1520 MiB at most).
            "huge-bss": "-DBIG=0x70000000",
            # 1152 MiB: more than a KASLR kernel's area (1008 MiB), less than the largest.
            "kaslr-bss": "-DBIG=0x48000000"}

SET_A = r"""
#include <linux/module.h>
int rkset_fn(int x) { return x + 1; }
EXPORT_SYMBOL_GPL(rkset_fn);
MODULE_LICENSE("GPL");
"""
SET_B = r"""
#include <linux/module.h>
extern int rkset_fn(int x);
static int __init b_init(void) { pr_info("rksetb %d\n", rkset_fn(41)); return 0; }
static void __exit b_exit(void) { }
module_init(b_init);
module_exit(b_exit);
MODULE_LICENSE("GPL");
"""


def _make(tmp: Path, kdir: Path, *args: str) -> None:
    """Kbuild in `tmp`: on the host, or in the Debian root a KDIR of another release lives in."""
    command = ["make", "-s", "-C", str(kdir), f"M={tmp}", "modules", "KBUILD_MODPOST_WARN=1", *args]
    done = subprocess.run(roots.kbuild_command(command, kdir, tmp), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


RELEASE_73 = "7.3.4+deb13-amd64"


@functools.lru_cache(maxsize=None)
def _kdir(series: str) -> Path:
    """6.1 and 6.12 from the host's headers; Debian's 7.3 prepared in a trixie root (as root)."""
    if series != "7.3":
        return require_kdir(series)
    return release_kdir(RELEASE_73)


def _build(variant: str, series: str = "6.1") -> Path:
    kdir = _kdir(series)
    flags = VARIANTS[variant]

    def fill(tmp: Path) -> None:
        (tmp / "m.c").write_text(SOURCE)
        (tmp / "Kbuild").write_text(f"obj-m += m.o\nccflags-y += {flags}\n")
        _make(tmp, kdir)

    return cached_dir(CACHE / f"loader-{variant}-{_key(SOURCE, flags, str(kdir))}", fill) / "m.ko"


def _build_set() -> Path:
    kdir = require_kdir("6.1")

    def fill(tmp: Path) -> None:
        (tmp / "rkseta.c").write_text(SET_A)
        (tmp / "rksetb.c").write_text(SET_B)
        (tmp / "Kbuild").write_text("obj-m += rkseta.o rksetb.o\n")
        _make(tmp, kdir)

    return cached_dir(CACHE / f"loader-set-{_key(SET_A, SET_B, str(kdir))}", fill)


@pytest.fixture(scope="module")
def kernel(kdir61: Path) -> KernelInfo:
    tool("qemu-system-x86_64")
    return probe(kdir61)


def _patch_crc(src: Path, dest: Path, symbol: str) -> Path:
    """A copy whose __versions entry for `symbol` holds another CRC (a module built against
    other headers looks like this)."""
    data = bytearray(src.read_bytes())
    elf = Elf(bytes(data), str(src))
    index = elf.find("__versions")
    start = int(elf.shdrs["offset"][index])
    blob = elf.section_bytes(index)
    for at in range(0, len(blob), 64):
        if blob[at + 8:at + 64].split(b"\0", 1)[0] == symbol.encode():
            crc = struct.unpack_from("<Q", data, start + at)[0]
            struct.pack_into("<Q", data, start + at, crc ^ 0x1)
            dest.write_bytes(bytes(data))
            return dest
    raise AssertionError(f"{symbol} not in __versions")


# busybox's insmod words for the loader's errors (modutils/modutils.c moderror), else strerror.
INSMOD_SAYS = {"ENOEXEC": "invalid module format", "ENOENT": "unknown symbol in module",
               "EINVAL": "Invalid argument", "EBADMSG": "Bad message", "ENOMEM": "Cannot allocate memory",
               "EPERM": "Operation not permitted"}


def _verdict(path: Path, kernel: KernelInfo, findings=None, run=()):
    """The checker's verdict next to the kernel's; asserts they agree and returns both."""
    findings = check.check_module(path, kernel) if findings is None else findings
    result = vmtest(path, arch="x86_64", run=run)
    errors = [f for f in findings if f.severity == "error"]
    if not errors:
        assert result.loaded, (findings, result.insmod_error, result.console[-2000:])
        return findings, result
    assert not result.loaded, (findings, result.console[-2000:])
    first = errors[0]
    if first.kernel:
        assert first.kernel_regex().search(result.console), (first.kernel, result.console[-2000:])
    assert INSMOD_SAYS[first.errno] in (result.insmod_error or ""), (first, result.insmod_error)
    return findings, result


def test_weak_symbols(kernel, tmp_path) -> None:
    """A weak symbol nobody exports is 0 (its 32-bit absolute field fits); a weak reference to an
    export still has its CRC checked."""
    good = _build("weak")
    findings, result = _verdict(good, kernel)
    assert findings == [] and result.ok and "weak 0000000000000000" in result.console
    bad = _patch_crc(good, tmp_path / "m.ko", "msleep")
    findings, _ = _verdict(bad, kernel)
    assert [f.kind for f in findings] == ["symbol-version"]
    assert findings[0].kernel == ["m: disagrees about version of symbol msleep",
                                  "m: Unknown symbol msleep (err -22)"]


def test_module_layout_is_the_first_crc(kernel, tmp_path) -> None:
    bad = _patch_crc(_build("plain"), tmp_path / "m.ko", "module_layout")
    findings, _ = _verdict(bad, kernel)
    assert findings[0].kind == "module-layout"
    assert findings[0].kernel == ["m: disagrees about version of symbol module_layout"]


def test_duplicate_export(kernel, tmp_path) -> None:
    """The module's export renamed to one the kernel has (same length, every occurrence)."""
    src = _build("dup")
    dup = tmp_path / "m.ko"
    dup.write_bytes(src.read_bytes().replace(b"rustko_dupl", b"kernel_read"))
    assert check.check_module(src, kernel) == []
    findings, _ = _verdict(dup, kernel)
    assert [f.kind for f in findings] == ["duplicate-export"]
    assert findings[0].kernel == ["m: exports duplicate symbol kernel_read (owned by kernel)"]


@pytest.mark.parametrize("series, line", [
    ("6.1", "module: x86/modules: Skipping invalid relocation target, existing value is nonzero "
            "for type "),
    # 7.x: "sec N, idx N" (the RELA section's index, the entry's index in it), loc unhashed.
    ("7.3", "module: x86/modules: Invalid relocation target, existing value is nonzero for sec "),
])
def test_relocations_write_live_memory(series: str, line: str, tmp_path) -> None:
    """Two relocations aimed at one field: the second finds the first one's value there."""
    tool("qemu-system-x86_64")
    kernel = probe(_kdir(series))
    src = _build("plain", series)
    data = bytearray(src.read_bytes())
    elf = Elf(bytes(data), str(src))
    rela = elf.find(".rela.init.text")
    rows = elf.section_array(rela, RELA64)
    types = (rows["info"] & 0xFFFFFFFF).tolist()
    pcs = [i for i, t in enumerate(types) if t in (2, 4)]
    first, second = pcs[0], pcs[1]
    base = int(elf.shdrs["offset"][rela])
    struct.pack_into("<Q", data, base + second * RELA64.itemsize, int(rows["offset"][first]))
    bad = tmp_path / "m.ko"
    bad.write_bytes(bytes(data))
    findings, _ = _verdict(bad, kernel)
    assert findings[0].kind == "nonzero-target" and findings[0].offset == int(rows["offset"][first])
    assert findings[0].kernel[0].startswith(line)
    if series == "7.3":
        assert f"sec {rela}, idx {second}, type " in findings[0].kernel[0]


@pytest.mark.parametrize("variant, kind, line", [
    ("percpu", "percpu-reserve", "m: Could not allocate 16384 bytes percpu data"),
    ("percpu-huge", "percpu-illegal", "illegal size (40000) or align ("),
])
def test_percpu_data_the_loader_cannot_place(variant: str, kind: str, line: str, kernel) -> None:
    """Larger than the reserve modules share: not allocated; larger than a unit: "illegal"."""
    findings, _ = _verdict(_build(variant), kernel)
    assert findings[0].kind == kind and findings[0].kernel[0].startswith(line)


def test_percpu_data_takes_no_module_memory_on_smp() -> None:
    """On an SMP kernel layout_and_allocate clears .data..percpu's SHF_ALLOC (it is allocated per
    CPU instead), so the module-area sums leave it out; on UP it is ordinary module data."""
    module = _build("percpu")
    elf = Elf(module.read_bytes(), str(module))
    smp = check._allocations(elf, (6, 1), percpu_apart=True)
    up = check._allocations(elf, (6, 1), percpu_apart=False)
    assert sum(up) - sum(smp) == elf.sections[elf.find(".data..percpu")].size == 16384


def test_unparsable_signature(kernel, tmp_path) -> None:
    """A signature trailer whose PKCS#7 data is not DER: fatal although 6.1 does not enforce
    signatures, with no kernel line (insmod: Bad message)."""
    junk = b"\x04\x03abc"
    info = bytes([0, 0, 2, 0, 0, 0, 0, 0]) + struct.pack(">I", len(junk))
    bad = tmp_path / "m.ko"
    bad.write_bytes(_build("plain").read_bytes() + junk + info + b"~Module signature appended~\n")
    findings, _ = _verdict(bad, kernel)
    assert [f.kind for f in findings] == ["signature-pkcs7"] and findings[0].kernel == []


def test_modules_checked_as_a_set(kernel, kdir61: Path, tmp_path) -> None:
    """rksetb needs rkseta's export: refused alone, loadable once rkseta is loaded (as modprobe
    does); `rustko check` of both says the same."""
    folder = _build_set()
    a, b = folder / "rkseta.ko", folder / "rksetb.ko"
    alone = check.check_module(b, kernel)
    assert [f.kind for f in alone] == ["unknown-symbol"]
    _verdict(b, kernel, alone)
    together = dict(check.check_paths([a, b], kdir=str(kdir61)))
    assert together == {str(a): [], str(b): []}
    # As KBUILD_EXTRA_SYMBOLS: the exporter's Module.symvers instead of the exporter itself.
    symvers = folder / "Module.symvers"
    assert "rkset_fn" in symvers.read_text()
    assert main(["check", "--kdir", str(kdir61), "--extra-symbols", str(symvers), str(b)]) == 0
    subprocess.run(["strip", "--strip-debug", "-o", str(tmp_path / "b.ko"), str(b)], check=True)
    stripped = (tmp_path / "b.ko").read_bytes()
    load_b = ("base64 -d > /tmp/rksetb.ko <<'EOF'\n" + base64.encodebytes(stripped).decode()
              + "EOF\ninsmod /tmp/rksetb.ko && rmmod rksetb")
    _, result = _verdict(a, kernel, [], run=[load_b])
    assert result.commands and result.commands[0][1] == 0, result.commands
    assert "rksetb 42" in result.console


@pytest.mark.parametrize("series", ["6.1", "6.12", "7.3"])
def test_overflow_and_nonzero_in_the_loaders_order(series: str, tmp_path) -> None:
    """One R_X86_64_32 field that both overflows and holds a nonzero byte: 6.1 checks the bytes
    first, 6.3 and later the overflow (arch/x86/kernel/module.c); the checker follows each."""
    tool("qemu-system-x86_64")
    kernel = probe(_kdir(series))
    src = _build("small", series)
    first = next(f for f in check.check_module(src, kernel) if f.kind == "overflow")
    elf = Elf(src.read_bytes(), str(src))
    data = bytearray(src.read_bytes())
    data[int(elf.shdrs["offset"][elf.find(first.section)]) + first.offset] = 0x5A
    bad = tmp_path / "m.ko"
    bad.write_bytes(bytes(data))
    findings, _ = _verdict(bad, kernel)
    assert (findings[0].section, findings[0].offset) == (first.section, first.offset)
    assert findings[0].kind == ("nonzero-target" if series == "6.1" else "overflow")
    if series == "7.3":  # 7.x names the RELA section and entry, then blames the code model
        assert findings[0].kernel[0].startswith("module: overflow in relocation type ")
        assert " sec " in findings[0].kernel[0] and " idx " in findings[0].kernel[0]
        assert findings[0].kernel[1] == "module: `m' likely not compiled with -mcmodel=kernel"


@pytest.mark.parametrize("series, variant", [("6.1", "huge-bss"), ("6.12", "huge-bss"),
                                             ("6.1", "kaslr-bss")])
def test_module_larger_than_the_module_area(series: str, variant: str) -> None:
    """More .bss than the module area: 6.1's module_alloc fails silently (PAGE_ALIGN(size) >
    MODULES_LEN), 6.12's execmem says so. Debian's KASLR config makes the area 1008 MiB."""
    tool("qemu-system-x86_64")
    kernel = probe(_kdir(series))
    ko = _build(variant, series)
    findings, _ = _verdict(ko, kernel)
    assert [f.kind for f in findings] == ["module-area"]
    assert findings[0].kernel == ([] if series == "6.1" else ["execmem: unable to allocate memory"])
    # Without a KDIR the .config is unknown: only what exceeds the largest area is refused.
    alone = [f.kind for f in check.check_module(ko, arch="x86_64", version=kernel.version)]
    assert alone == (["module-area"] if variant == "huge-bss" else [])


# 7.3's EXPORT_SYMBOL_FOR_MODULES: write_ibpb's namespace is "module:kvm,kvm-amd,kvm-intel".
NS_SOURCE = r"""
#include <linux/module.h>
#include <asm/nospec-branch.h>
#ifdef IMPORT
/* modpost refuses a "module:" import: written as xodule: and patched afterwards. */
MODULE_IMPORT_NS("xodule:kvm,kvm-amd,kvm-intel");
#endif
static int __init m_init(void) { pr_info("rkns %px\n", write_ibpb); return 0; }
static void __exit m_exit(void) { }
module_init(m_init);
module_exit(m_exit);
MODULE_LICENSE("GPL");
"""


def _build_ns() -> Path:
    """rkns (not a named module), kvm (named) and rkimp (imports the namespace) for 7.3."""
    kdir = _kdir("7.3")

    def fill(tmp: Path) -> None:
        for name in ("rkns", "kvm", "rkimp"):
            (tmp / f"{name}.c").write_text(NS_SOURCE)
        (tmp / "Kbuild").write_text("obj-m += rkns.o kvm.o rkimp.o\nCFLAGS_rkimp.o += -DIMPORT\n")
        # modpost would refuse rkns and rkimp: as CONFIG_MODULE_ALLOW_MISSING_NAMESPACE_IMPORTS
        _make(tmp, kdir, "CONFIG_MODULE_ALLOW_MISSING_NAMESPACE_IMPORTS=y")
        imp = tmp / "rkimp.ko"
        data = imp.read_bytes()
        assert data.count(b"import_ns=xodule:") == 1
        imp.write_bytes(data.replace(b"import_ns=xodule:", b"import_ns=module:"))

    return cached_dir(CACHE / f"loader-ns73-{_key(NS_SOURCE, str(kdir))}", fill)


@pytest.mark.parametrize("module, kinds, line", [
    ("rkns", ["namespace"], "rkns: module uses symbol (write_ibpb) from namespace "
                            "module:kvm,kvm-amd,kvm-intel, but does not import it."),
    ("kvm", [], ""),
    ("rkimp", ["import-module-ns"], "rkimp: module tries to import module namespace: "
                                    "module:kvm,kvm-amd,kvm-intel"),
])
def test_symbols_exported_for_named_modules(module: str, kinds: list[str], line: str) -> None:
    """Only the modules a `module:` namespace names may use its symbols; none may import it."""
    tool("qemu-system-x86_64")
    kernel = probe(_kdir("7.3"))
    ko = _build_ns() / f"{module}.ko"
    findings, result = _verdict(ko, kernel)
    assert [f.kind for f in findings] == kinds
    if line:
        assert findings[0].kernel[0] == line
    else:
        assert "rkns ffffffff" in result.console


ARM64_SOURCE = r"""
#include <linux/module.h>
#include <linux/jiffies.h>
#ifdef ABS32
/* A 32-bit absolute field holding a kernel address: arm64's kernel lives at 0xffff.... */
asm(".pushsection .data\n.globl rk_abs\nrk_abs: .long jiffies\n.popsection");
#endif
static int __init m_init(void) { pr_info("m %lu\n", jiffies); return 0; }
static void __exit m_exit(void) { }
module_init(m_init);
module_exit(m_exit);
MODULE_LICENSE("GPL");
"""


def test_arm64_overflow(tmp_path) -> None:
    """R_AARCH64_ABS32 against a kernel symbol overflows in arm64's loader (reloc_data)."""
    tool("qemu-system-aarch64")
    kdir = Path(subprocess.run([sys.executable, "-m", "rustko.cli", "kdir", "--arch", "arm64"],
                               capture_output=True, text=True, check=True).stdout.strip())

    def fill(tmp: Path) -> None:
        (tmp / "m.c").write_text(ARM64_SOURCE)
        (tmp / "Kbuild").write_text("obj-m += m.o\nccflags-y += -DABS32\n")
        done = subprocess.run(["make", "-s", "-C", str(kdir), f"M={tmp}", "ARCH=arm64",
                               "CROSS_COMPILE=aarch64-linux-gnu-", "modules"],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    ko = cached_dir(CACHE / f"loader-arm64-abs32-{_key(ARM64_SOURCE, str(kdir))}", fill) / "m.ko"
    kernel = probe(kdir)
    findings = check.check_module(ko, kernel)
    assert [f.kind for f in findings] == ["overflow"] and findings[0].reloc_type == 258
    assert findings[0].kernel == ["module m: overflow in relocation type 258 val <val>"]
    result = vmtest(ko, arch="arm64")
    assert not result.loaded
    assert findings[0].kernel_regex().search(result.console), result.console[-2000:]
    assert INSMOD_SAYS[findings[0].errno] in (result.insmod_error or "")


def test_struct_module_of_another_kernel() -> None:
    """A module built for 6.1 in 6.12: refused at its struct module's size, before any CRC."""
    kernel = probe(require_kdir("6.12"))
    ko = _build("plain")
    findings = check.check_module(ko, kernel)
    assert findings[0].kind == "this-module-size"
    assert findings[0].kernel == ["module m: .gnu.linkonce.this_module section size must match "
                                  "the kernel's built struct module size at run time"]
    result = vmtest(ko, kernel=debian_kernel(kernel.release), arch="x86_64")
    assert not result.loaded
    assert findings[0].kernel_regex().search(result.console), result.console[-2000:]
    assert INSMOD_SAYS[findings[0].errno] in (result.insmod_error or "")


def test_uml_overflow_says_it_depends_on_mem() -> None:
    """UML puts modules after its physical memory, so whether a 32-bit absolute field overflows
    depends on mem=: the finding says so (seen in tests/test_uml.py: refused with mem=3G)."""
    ko = _build("small")
    uml = [f for f in check.check_module(ko, arch="um", version=(6, 1)) if f.kind == "overflow"]
    assert uml and all("mem=" in f.explanation for f in uml)
    assert uml[0].kernel[0].startswith("subarch: overflow in relocation type ")
    assert "= note: where a UML module lands depends on the UML kernel's memory size (mem=)" \
        in check.format_report(uml, ko)
    x86 = [f for f in check.check_module(ko, arch="x86_64", version=(6, 1)) if f.kind == "overflow"]
    assert x86 and not any(f.explanation for f in x86)


def test_every_debian_73_module_passes() -> None:
    """No false refusals on the 4,225 modules of Debian's 7.3 (linux-modules-RELEASE), checked
    as one set: kvm-amd uses kvm's and the kernel's `module:` namespaces, vsock's transports
    their common module's."""
    from rustko import debian

    kdir = _kdir("7.3")

    def fill(tmp: Path) -> None:
        package = f"linux-modules-{RELEASE_73}"
        deb = debian.download(package, "amd64", tmp, "trixie")
        debian.extract(deb, tmp, ["./usr/lib/modules"])
        if deb.parent == tmp:  # downloaded here, not found in a cache
            deb.unlink()

    tree = cached_dir(CACHE / f"modules-{RELEASE_73}", fill) / "usr" / "lib" / "modules" / RELEASE_73
    results = check.check_paths([tree], kdir=str(kdir))
    assert len(results) > 4000
    assert {p: r for p, r in results if r} == {}
