"""`rustko check` against real objects: Kbuild C modules, rustc objects, Debian's own modules.

Fixtures are built with the real compilers into a cache under /var/tmp (never the repo), keyed by
their source and the headers, so a cold cache builds them and new headers get new ones; bad modules
are made the way users make them (wrong flags), or by the byte edits a mismatched build leaves
(vermagic, license) in a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import copy_example, require_kdir, scons
from rustko import check, relocs, vm
from rustko.cache import cached_dir
from rustko.cli import main
from rustko.errors import RustkoError
from rustko.kernel import KernelInfo, probe

RUSTC = Path("/usr/bin/rustc")
CACHE = Path(os.environ.get("RUSTKO_TEST_CACHE", "/var/tmp/rustko/check-fixtures"))

C_MODULE = r"""
#include <linux/module.h>
#include <linux/jiffies.h>
#include <linux/timekeeping.h>
static int table[16];
unsigned long mod_addr(void) { return (unsigned long)&table[3]; }
EXPORT_SYMBOL(mod_addr);
#ifdef MISSING
extern void rustko_no_such_fn(void);
extern void *__rust_alloc(unsigned long, unsigned long);
#endif
static int __init m_init(void)
{
#ifdef MISSING
	rustko_no_such_fn();
	pr_info("%p\n", __rust_alloc(8, 8));
#endif
#ifdef GPLONLY
	pr_info("%llu\n", ktime_get_mono_fast_ns());
#endif
	pr_info("m %lu %lu\n", jiffies, mod_addr());
	return 0;
}
static void __exit m_exit(void) { }
module_init(m_init);
module_exit(m_exit);
MODULE_LICENSE("GPL");
"""

# variant -> extra ccflags; each is what a user would write to get that object.
VARIANTS: dict[str, str] = {
    "good": "",
    "pic": "-fPIC -mcmodel=small",
    "small": "-mcmodel=small",
    "large": "-mcmodel=large -mfunction-return=keep -mindirect-branch=keep",
    "missing": "-DMISSING",
    "gplonly": "-DGPLONLY",
}

RUST_LIB = r"""
#![feature(no_core, lang_items)]
#![no_core]
#![crate_type = "lib"]
#[lang = "pointee_sized"] pub trait PointeeSized {}
#[lang = "meta_sized"] pub trait MetaSized: PointeeSized {}
#[lang = "sized"] pub trait Sized: MetaSized {}
#[lang = "copy"] pub trait Copy {}
impl Copy for i32 {}
extern "C" { static kernel_counter: i32; fn kernel_fn(x: i32); }
#[no_mangle]
pub unsafe extern "C" fn read_counter() -> i32 { kernel_fn(1); kernel_counter }
"""


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _build_c(variant: str) -> Path:
    """The C module of `variant`, built by Kbuild against the newest 6.1 headers."""
    kdir = require_kdir("6.1")
    flags = VARIANTS[variant]

    def fill(tmp: Path) -> None:
        (tmp / "m.c").write_text(C_MODULE)
        (tmp / "Kbuild").write_text(f"obj-m += m.o\nccflags-y += {flags}\n")
        done = subprocess.run(["make", "-s", "-C", str(kdir), f"M={tmp}", "modules",
                               "KBUILD_MODPOST_WARN=1"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    return cached_dir(CACHE / f"c-{variant}-{_key(C_MODULE, flags, str(kdir))}", fill) / "m.ko"


@pytest.fixture(scope="session")
def c_modules() -> dict[str, Path]:
    return {variant: _build_c(variant) for variant in VARIANTS}


def _edited(src: Path, dest: Path, old: bytes, new: bytes) -> Path:
    """A copy of `src` with one same-length string replaced inside .modinfo/.text bytes."""
    data = src.read_bytes()
    assert len(old) == len(new) and data.count(old) >= 1, old
    dest.write_bytes(data.replace(old, new, 1))
    return dest


@pytest.fixture(scope="session")
def kernel(kdir61: Path) -> KernelInfo:
    return probe(kdir61)


def _rust_objects() -> Path:
    if not RUSTC.is_file():
        pytest.fail(f"{RUSTC} (rustc-web) is not installed: run ./dev setup")

    def fill(tmp: Path) -> None:
        (tmp / "lib.rs").write_text(RUST_LIB)
        for target, short in (("x86_64-unknown-none", "x86"), ("aarch64-unknown-none-softfloat", "a64")):
            for model in ("pic", "static"):
                extra = ["-Ccode-model=kernel"] if short == "x86" else []
                done = subprocess.run(
                    [str(RUSTC), "--target", target, "--emit", "obj", f"-Crelocation-model={model}",
                     "-Cpanic=abort", "-O", "-g", *extra, "-o", str(tmp / f"{short}-{model}.o"),
                     str(tmp / "lib.rs")],
                    capture_output=True, text=True, env={**os.environ, "RUSTC_BOOTSTRAP": "1"})
                assert done.returncode == 0, done.stderr

    return cached_dir(CACHE / f"rust-{_key(RUST_LIB, str(RUSTC.stat().st_mtime))}", fill)


def kinds(findings: list[check.Finding]) -> list[str]:
    return [f.kind for f in findings]


# --- relocation rules -----------------------------------------------------------------------
def test_rules_tables_are_consistent() -> None:
    for rules in relocs.BY_ARCH.values():
        assert set(rules.accepted) <= set(rules.names), rules.arch
        assert all(rule.source for rule in rules.accepted.values())
        for t in rules.hints:
            assert not rules.accepts(t, relocs.LATEST), (rules.arch, t)
    assert relocs.X86_64.accepts(4, (4, 16)) and not relocs.X86_64.accepts(4, (4, 15))
    assert relocs.ARM64.unknown.at((6, 1)).startswith("module {name}")
    assert relocs.ARM64.unknown.at((6, 12)).startswith("Modules: module {name}")


# --- real C modules (Kbuild, Debian 6.1 headers) ---------------------------------------------
def test_good_and_large_model_modules_pass(c_modules, kernel) -> None:
    assert check.check_module(c_modules["good"], kernel) == []
    # -mcmodel=large gives R_X86_64_64, which the x86_64 loader applies.
    assert check.check_module(c_modules["large"], kernel) == []


def test_pic_module_is_refused_with_the_kernels_words(c_modules, kernel) -> None:
    findings = check.check_module(c_modules["pic"], kernel)
    relocs_found = [f for f in findings if f.stage == "relocation"]
    assert {f.reloc_type for f in relocs_found} == {41, 42}
    jiffies = next(f for f in relocs_found if f.symbol == "jiffies")
    assert jiffies.kernel == ["module: m: Unknown rela relocation: 42"]
    assert jiffies.reloc_name == "R_X86_64_REX_GOTPCRELX"
    assert jiffies.section == ".init.text" and jiffies.function == "m_init"
    line = C_MODULE.splitlines().index('\tpr_info("m %lu %lu\\n", jiffies, mod_addr());') + 1
    assert jiffies.source.endswith(f"m.c:{line}")  # the line reading jiffies, from DWARF
    assert "-Crelocation-model=static" in jiffies.hint
    # The x86 loader forgives an undefined _GLOBAL_OFFSET_TABLE_ (seen in the real 6.1 kernel).
    assert [f for f in findings if f.stage == "symbol"] == []


def test_small_code_model_overflows(c_modules, kernel) -> None:
    findings = check.check_module(c_modules["small"], kernel)
    assert findings and set(kinds(findings)) == {"overflow"}
    first = findings[0]
    assert first.reloc_type == 10 and first.function == "mod_addr"
    assert first.kernel == ["module: overflow in relocation type 10 val <val>",
                            "module: `m' likely not compiled with -mcmodel=kernel"]
    assert first.kernel_regex().match("module: overflow in relocation type 10 val ffffffffc0a0200c\n"
                                      "module: `m' likely not compiled with -mcmodel=kernel")
    assert "-Ccode-model=kernel" in first.hint


def test_uml_needs_the_large_model(c_modules) -> None:
    """The kernel-model object passes on x86_64 but overflows in UML's user-space module range."""
    good = check.check_module(c_modules["good"], arch="um")
    assert good and {f.reloc_type for f in good} == {11}
    assert all("-Ccode-model=large" in f.hint for f in good)
    assert check.check_module(c_modules["large"], arch="um") == []


def test_missing_symbols_are_explained(c_modules, kernel) -> None:
    findings = {f.symbol: f for f in check.check_module(c_modules["missing"], kernel)}
    assert set(findings) == {"rustko_no_such_fn", "__rust_alloc"}
    assert findings["rustko_no_such_fn"].kernel == ["m: Unknown symbol rustko_no_such_fn (err -2)"]
    assert "global_allocator" in findings["__rust_alloc"].explanation


def test_gpl_only_symbol_needs_gpl_license(c_modules, kernel, tmp_path) -> None:
    assert check.check_module(c_modules["gplonly"], kernel) == []
    bsd = _edited(c_modules["gplonly"], tmp_path / "m.ko", b"license=GPL\0", b"license=BSD\0")
    findings = check.check_module(bsd, kernel)
    # check_modinfo taints first (a warning), then the GPL-only export is not found.
    assert kinds(findings) == ["license-taint", "gpl-only"]
    assert findings[0].severity == "warning"
    assert findings[0].kernel == ["m: module license 'BSD' taints kernel."]
    assert findings[1].kernel == ["m: Unknown symbol ktime_get_mono_fast_ns (err -2)"]
    assert "'BSD'" in findings[1].hint


def other_abi(release: str) -> str:
    """A release of the same length with another ABI number (6.1.0-56-amd64 -> 6.1.0-57-amd64)."""
    abi = re.search(r"^\d+\.\d+\.\d+-\d+", release)
    assert abi, release
    last = abi.end() - 1
    return release[:last] + str((int(release[last]) + 1) % 10) + release[last + 1:]


def test_vermagic_mismatch(c_modules, kernel, tmp_path) -> None:
    bad = _edited(c_modules["good"], tmp_path / "m.ko", b"mod_unload ", b"mod_unl0ad ")
    findings = check.check_module(bad, kernel)
    assert kinds(findings) == ["vermagic"]
    assert findings[0].kernel == [
        f"m: version magic '{kernel.release} SMP preempt mod_unl0ad modversions ' should be "
        f"'{kernel.release} SMP preempt mod_unload modversions '"]
    # With modversions the kernel ignores the release part (same_magic): a different release
    # of the same length loads.
    other = _edited(c_modules["good"], tmp_path / "r.ko", f"{kernel.release} SMP".encode(),
                    f"{other_abi(kernel.release)} SMP".encode())
    assert check.check_module(other, kernel) == []


def test_vermagic_of_another_series_and_crcs(c_modules, tmp_path) -> None:
    findings = check.check_module(c_modules["good"], probe(require_kdir("6.12")))
    assert any(f.kind == "symbol-version" and f.symbol == "_printk" and
               f.kernel[0] == "m: disagrees about version of symbol _printk" for f in findings)


def test_nonzero_relocation_target(c_modules, kernel, tmp_path) -> None:
    """Bytes left in a relocated field: the 6.1 and 6.12 loaders refuse it, each in its words."""
    good = check.check_module(c_modules["good"], kernel)
    assert good == []
    elf = check.Elf(c_modules["good"].read_bytes(), "m.ko")
    text = elf.find(".init.text")
    rela = next(i for i in range(len(elf.shdrs)) if elf.names[i] == ".rela.init.text")
    row = elf.section_array(rela, check.RELA64)[-1]
    at = int(elf.shdrs["offset"][text]) + int(row["offset"])
    data = bytearray(c_modules["good"].read_bytes())
    data[at] = 0x5A
    bad = tmp_path / "m.ko"
    bad.write_bytes(bytes(data))
    old = check.check_module(bad, kernel)
    assert kinds(old) == ["nonzero-target"]
    assert old[0].kernel_regex().fullmatch(
        "module: x86/modules: Skipping invalid relocation target, existing value is nonzero "
        "for type 4, loc 00000000c8a1e2b3, val ffffffff81234560")
    new = check.check_module(bad, arch="x86_64", version=(6, 12))
    assert new[0].kernel[0].startswith("module: x86/modules: Invalid relocation target")


# --- rustc objects ---------------------------------------------------------------------------
def test_rustc_objects() -> None:
    objs = _rust_objects()
    assert check.check_module(objs / "x86-static.o") == []
    assert check.check_module(objs / "a64-static.o") == []
    x86 = check.check_module(objs / "x86-pic.o")
    assert {(f.reloc_name, f.symbol) for f in x86} == {("R_X86_64_GOTPCREL", "kernel_fn"),
                                                      ("R_X86_64_GOTPCREL", "kernel_counter")}
    assert all(f.function == "read_counter" and "lib.rs:" in f.source for f in x86)
    a64 = check.check_module(objs / "a64-pic.o", version=(6, 1))
    assert sorted(f.reloc_type for f in a64) == [311, 312]
    assert a64[0].kernel == ["module a64_pic: unsupported RELA relocation: 311"]
    assert "accessor" in a64[0].hint
    with pytest.raises(RustkoError, match="does not match --arch"):
        check.check_module(objs / "a64-pic.o", arch="x86_64")


# --- the CLI ---------------------------------------------------------------------------------
def test_cli_exit_codes_and_json(c_modules, kdir61, tmp_path, capsys) -> None:
    kdir = ["--kdir", str(kdir61)]
    assert main(["check", *kdir, str(c_modules["good"])]) == 0
    capsys.readouterr()
    assert main(["check", *kdir, str(c_modules["pic"])]) == 1
    out = capsys.readouterr().out
    assert f"error: module would be refused: {c_modules['pic']}" in out
    assert "  --> .init.text+0x" in out and "R_X86_64_REX_GOTPCRELX (42) against jiffies" in out
    assert "  = kernel: module: m: Unknown rela relocation: 42" in out and "  = help: " in out
    assert main(["check", "--json", "--arch", "x86_64", "--kernel-version", "6.1",
                 str(c_modules["small"])]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["refused"] == 1 and report["modules"][0]["findings"][0]["reloc_type"] == 10
    assert main(["check", str(tmp_path / "nope.ko")]) == 2
    capsys.readouterr()
    assert main(["check", "--json", str(tmp_path / "nope.ko")]) == 2  # still JSON on stdout
    missing = json.loads(capsys.readouterr().out)
    assert missing["unreadable"] == 1 and "no such file" in missing["modules"][0]["error"]
    junk = tmp_path / "junk.ko"
    junk.write_bytes(b"\x7fELF" + b"\0" * 10)
    capsys.readouterr()
    assert main(["check", str(junk)]) == 2
    assert "junk.ko: not an ELF file" in capsys.readouterr().err
    assert main(["check", "--kernel-version", "six", str(c_modules["good"])]) == 2
    with pytest.raises(SystemExit) as usage:
        main(["check"])
    assert usage.value.code == 2


def test_compressed_modules(c_modules, tmp_path) -> None:
    raw = c_modules["pic"].read_bytes()
    import gzip
    import lzma
    (tmp_path / "m.ko.xz").write_bytes(lzma.compress(raw, check=lzma.CHECK_CRC32))
    (tmp_path / "m.ko.gz").write_bytes(gzip.compress(raw))
    results = check.check_paths([tmp_path])
    assert [Path(p).name for p, _ in results] == ["m.ko.gz", "m.ko.xz"]
    assert all(isinstance(r, list) and r for _, r in results)


# --- no false positives: every module Debian ships for 6.1 -----------------------------------
def test_every_debian_61_module_passes(kernel) -> None:
    """The image package of the installed headers' release, fetched with apt into the cache."""
    tree = vm.debian_modules(kernel.release)
    results = check.check_paths([tree], kdir=str(kernel.kdir))
    assert len(results) > 3000
    refused = {p: r for p, r in results if r}
    assert refused == {}


# --- source lines on a linked .ko: what addr2line -f -i says ---------------------------------
def _addr2line(ko: Path, section: str, offset: int) -> list[tuple[str, str]]:
    out = subprocess.run(["addr2line", "-f", "-i", "-C", "-e", str(ko), "-j", section, hex(offset)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    return [(CRATE_HASH.sub("", out[i]), out[i + 1]) for i in range(0, len(out) - 1, 2)]


CRATE_HASH = re.compile(r"\[[0-9a-f]{8,16}\]")
# c++filt spells v0 const generics with their type (`[u32; 6: usize]`), addr2line -C does not.
CONST_TYPE = re.compile(r": (usize|isize|u\d+|i\d+|bool|char)\b")


def _assert_like_addr2line(ko: Path, findings: list[check.Finding]) -> int:
    """Each located finding: its inlined frames, then its own, are addr2line's frames in order."""
    compared = 0
    for f in findings:
        if not f.source or f.offset is None:
            continue
        ours = [frame.rsplit(" at ", 1) for frame in f.inlined] + [[f.function, f.source]]
        theirs = _addr2line(ko, f.section, f.offset)[:len(ours)]
        assert len(theirs) == len(ours), (f, theirs)
        for (name, where), (their_name, their_where) in zip(ours, theirs):
            # Same file and line (a C file may be shown where it is now, see _local_source).
            assert their_where.rsplit("/", 1)[-1] == where.rsplit("/", 1)[-1], (f, theirs)
            assert CONST_TYPE.sub("", name) == their_name, (f, theirs)
        compared += 1
    return compared


def test_source_lines_match_addr2line_on_a_linked_ko(kdir61: Path, tmp_path, c_modules) -> None:
    """UML's 32S overflows give findings all over a kernel-model .ko: in the C module (static
    inlines from headers) and in a rustko-built hello (core inlined into the crate, LTO)."""
    c = check.check_module(c_modules["good"], arch="um")
    assert _assert_like_addr2line(c_modules["good"], c) >= 1
    project = copy_example(tmp_path / "hello")
    done = scons(project, f"KDIR={kdir61}")
    assert done.returncode == 0, done.stderr
    ko = project / "build/hello.ko"
    findings = check.check_module(ko, arch="um")
    assert _assert_like_addr2line(ko, findings) >= 5
    # The user's own frame is reported, with what was inlined into it.
    assert any(f.source.startswith("src/lib.rs:") and "/rustc/library/core/" in f.inlined[0]
               for f in findings if f.inlined)
    # The C shim, compiled by Kbuild from KDIR, is shown in the build folder where it is.
    shim = [f for f in findings if "hello_shim.c" in f.source]
    assert shim and all(f.source.startswith(f"{project}/build/.rustko/hello/kbuild/hello_shim.c:")
                        for f in shim)
