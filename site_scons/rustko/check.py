"""`rustko check`: would the target kernel's module loader accept this `.ko`?

Mirrors the loader's stages in the order the kernel runs them (kernel/module/main.c in 6.1 and
6.12): vermagic (`check_modinfo`), symbol resolution (`simplify_symbols`, with modversions and
namespaces), then relocations (`apply_relocations`, only sections whose target is SHF_ALLOC). The
relocation rules themselves are data in `rustko.relocs`.

ELF parsing is plain `numpy.frombuffer` over bounds-checked slices: relocation arrays are decoded
and classified in bulk, so a whole distribution tree checks in seconds. pyelftools is used only to
find the source line of a finding (DWARF), never on the fast path.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import pickle
import re
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, astuple, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from . import relocs
from .cache import cache_root
from .errors import RustkoError
from .relocs import ArchRules, Version

if TYPE_CHECKING:
    from .kernel import KernelInfo

# ELF constants (include/uapi/linux/elf.h).
SHT_SYMTAB, SHT_RELA, SHT_NOBITS, SHT_REL = 2, 4, 8, 9
SHF_ALLOC = 0x2
SHF_EXECINSTR = 0x4
SHF_RELA_LIVEPATCH = 0x00100000
SHN_UNDEF, SHN_ABS, SHN_COMMON, SHN_XINDEX = 0, 0xFFF1, 0xFFF2, 0xFFFF
STB_GLOBAL = 1
STT_FUNC, STT_SECTION = 2, 3

SHDR64 = np.dtype([("name", "<u4"), ("type", "<u4"), ("flags", "<u8"), ("addr", "<u8"),
                   ("offset", "<u8"), ("size", "<u8"), ("link", "<u4"), ("info", "<u4"),
                   ("addralign", "<u8"), ("entsize", "<u8")])
SYM64 = np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"),
                  ("value", "<u8"), ("size", "<u8")])
RELA64 = np.dtype([("offset", "<u8"), ("info", "<u8"), ("addend", "<i8")])

# Distinct (stage, section, type, symbol) groups kept per module; a hostile file can hold
# millions of relocations, a report needs the first few of each kind.
MAX_FINDINGS = 500
# Decompressed modules larger than this are refused as input (a decompression bomb guard).
MAX_MODULE_BYTES = 1 << 30

# Licenses the kernel treats as GPL-compatible: include/linux/license.h (6.1.192, 6.12.117).
GPL_COMPATIBLE: frozenset[str] = frozenset({
    "GPL", "GPL v2", "GPL and additional rights", "Dual BSD/GPL", "Dual MIT/GPL", "Dual MPL/GPL",
})

# Loader messages outside the per-arch relocation code, kernel/module/*.c (6.1.192 and 6.12.117;
# main.c and version.c define no pr_fmt, so lines carry no prefix).
MSG_UNKNOWN_SYMBOL = "{name}: Unknown symbol {symbol} (err {err})"
MSG_VERMAGIC = "{name}: version magic '{have}' should be '{want}'"
MSG_NO_VERSION = "{name}: no symbol version for {symbol}"
MSG_BAD_VERSION = "{name}: disagrees about version of symbol {symbol}"
MSG_NAMESPACE = "{name}: module uses symbol ({symbol}) from namespace {ns}, but does not import it."
MSG_COMMON = "{name}: please compile with -fno-common"
# include/linux/moduleloader.h: the weak apply_relocate() for arches without SHT_REL support.
MSG_REL = "module {name}: REL relocation unsupported"
ENOENT, EINVAL = 2, 22
# kernel/module/main.c ignore_undef_symbol (6.1.192, 6.12.117): unresolved names the loader
# forgives, per e_machine (GNU as before 2.37 leaves an unreferenced _GLOBAL_OFFSET_TABLE_).
IGNORED_UNDEFINED: dict[int, frozenset[str]] = {3: frozenset({"_GLOBAL_OFFSET_TABLE_"}),
                                                62: frozenset({"_GLOBAL_OFFSET_TABLE_"})}

# Undefined symbols a Rust object leaves behind when part of its runtime is missing: what
# is missing, and how to fix it. Matched in order; the first pattern that matches wins.
UNDEFINED_EXPLAINED: tuple[tuple[str, str, str], ...] = (
    (r"^__rust_(alloc|dealloc|realloc|alloc_zeroed)$",
     "`alloc` is used (Box/Vec/String) but no #[global_allocator] is defined",
     "define a #[global_allocator] backed by kmalloc/kfree (krealloc), or avoid alloc types"),
    (r"^__rust_alloc_error_handler$|^__rg_oom$|^__rust_no_alloc_shim_is_unstable",
     "the allocator shim was not generated: alloc is linked without a #[global_allocator]/"
     "#[alloc_error_handler] in the final crate",
     "define #[global_allocator] in the top crate and build it as a staticlib with -Clto=fat"),
    (r"^rust_begin_unwind$|^rust_panic$|^__rust_start_panic$",
     "no #[panic_handler]: core's panic machinery calls it",
     "define a #[panic_handler] (e.g. printing with _printk and calling BUG) and build with "
     "`-Cpanic=abort`"),
    (r"^_Unwind_|^rust_eh_personality$|^__gcc_personality",
     "unwinding support is referenced: kernel code cannot unwind",
     "build core and the crate with `-Cpanic=abort`"),
    (r"^__(u|)(div|mod)ti3$|^__udivmodti4$|^__(ash|lsh)[lr]ti3$|^__multi3$|^__muloti4$",
     "128-bit integer arithmetic needs a compiler_builtins helper the kernel does not export",
     "avoid u128/i128 division/multiplication, or provide the helper in the module's "
     "compiler_builtins"),
    (r"^__(add|sub|mul|div|neg|cmp|eq|ne|lt|le|gt|ge|unord|extend|trunc|fix|fixuns|float|floatun|pow)"
     r"(s|d|t|x|h)?(f|i|s|d|t)?[a-z0-9]*$|^(sqrt|fmod|floor|ceil|round|trunc|exp|log|pow|sin|cos)f?$",
     "floating point used in kernel code: the kernel has no soft-float helpers and must not touch "
     "FPU registers outside kernel_fpu_begin/end",
     "remove the f32/f64 arithmetic (use integers or fixed point); formatting a float with `{}` "
     "needs these helpers too"),
    (r"^_ZN4core|^_RNv.*4core|^_ZN5alloc|^_RN.*5alloc|^_ZN17compiler_builtins|^_RN.*17compiler_builtins",
     "a function from core/alloc/compiler_builtins is referenced but not linked into the object",
     "link the crate with core into one object: build it as a staticlib with `-Clto=fat` (core "
     "built with `-Cembed-bitcode=yes`)"),
    (r"^_ZN|^_R",
     "a mangled Rust symbol is undefined: a crate dependency was not linked into the module",
     "build the top crate as a staticlib with `-Clto=fat` so every dependency ends up in one object"),
)


@dataclass
class Finding:
    """One reason the loader would refuse a module (or, severity "warning", taint it)."""

    path: str
    stage: str  # "vermagic" | "symbol" | "relocation" | "input"
    kind: str
    kernel: list[str]  # the lines the kernel prints; unknowable values as <val>/<loc>
    hint: str
    symbol: str = ""
    section: str = ""
    offset: int | None = None
    reloc_type: int | None = None
    reloc_name: str = ""
    count: int = 1
    explanation: str = ""
    function: str = ""
    source: str = ""
    severity: str = "error"

    def kernel_regex(self) -> re.Pattern[str]:
        """A pattern matching the kernel's real lines (values the checker cannot know wildcarded)."""
        parts = [re.escape(line) for line in self.kernel]
        # A serial console ends lines with \r\n, and each line may carry printk's timestamp.
        text = r"\r?\n(?:\[ *\d+\.\d+\] )?".join(parts)
        for placeholder in ("<val>", "<loc>"):
            text = text.replace(re.escape(placeholder), "[0-9a-fx()ptrvl]+")
        return re.compile(text)


@dataclass
class Symbols:
    """The module's symbol table, as arrays, plus its string table."""

    table: np.ndarray
    strtab: bytes

    def name(self, index: int) -> str:
        return _cstring(self.strtab, int(self.table["name"][index]))


def _cstring(blob: bytes, start: int) -> str:
    if start >= len(blob):
        return ""
    end = blob.find(b"\0", start)
    return blob[start:end if end >= 0 else len(blob)].decode("utf-8", "replace")


class Elf:
    """A bounds-checked view of an ELF64 little-endian relocatable object."""

    def __init__(self, data: bytes, path: str) -> None:
        self.data = data
        self.path = path
        if len(data) < 64 or data[:4] != b"\x7fELF":
            raise RustkoError(f"{path}: not an ELF file")
        if data[4] != 2 or data[5] != 1:
            raise RustkoError(f"{path}: only 64-bit little-endian ELF modules are supported")
        header = np.frombuffer(data, dtype=np.dtype([
            ("type", "<u2"), ("machine", "<u2"), ("version", "<u4"), ("entry", "<u8"),
            ("phoff", "<u8"), ("shoff", "<u8"), ("flags", "<u4"), ("ehsize", "<u2"),
            ("phentsize", "<u2"), ("phnum", "<u2"), ("shentsize", "<u2"), ("shnum", "<u2"),
            ("shstrndx", "<u2")]), count=1, offset=16)[0]
        if int(header["type"]) != 1:
            raise RustkoError(f"{path}: not a relocatable object (e_type {int(header['type'])}); "
                              "modules are ET_REL")
        self.machine = int(header["machine"])
        shoff, shnum = int(header["shoff"]), int(header["shnum"])
        if shnum and int(header["shentsize"]) != SHDR64.itemsize:
            raise RustkoError(f"{path}: unexpected section header size {int(header['shentsize'])}")
        self.shdrs = self._array(SHDR64, shoff, shnum, "section header table")
        self.names: list[str] = [f"section {i}" for i in range(shnum)]
        shstrndx = int(header["shstrndx"])
        if shstrndx == SHN_XINDEX and shnum:
            shstrndx = int(self.shdrs["link"][0])
        if shnum and shstrndx >= shnum:
            raise RustkoError(f"{path}: section name table index {shstrndx} out of range")
        self.shstrtab = self.section_bytes(shstrndx) if shnum else b""
        self.names = [_cstring(self.shstrtab, int(n)) for n in self.shdrs["name"]]

    def _array(self, dtype: np.dtype, offset: int, count: int, what: str) -> np.ndarray:
        if offset + count * dtype.itemsize > len(self.data):
            raise RustkoError(f"{self.path}: {what} extends past the end of the file "
                              "(truncated or corrupt)")
        return np.frombuffer(self.data, dtype=dtype, count=count, offset=offset)

    def section_bytes(self, index: int) -> bytes:
        if int(self.shdrs["type"][index]) == SHT_NOBITS:
            return b""
        offset, size = int(self.shdrs["offset"][index]), int(self.shdrs["size"][index])
        if offset + size > len(self.data):
            raise RustkoError(f"{self.path}: section {self.names[index]!r} extends past the end "
                              "of the file (truncated or corrupt)")
        return self.data[offset:offset + size]

    def section_array(self, index: int, dtype: np.dtype) -> np.ndarray:
        size = int(self.shdrs["size"][index])
        return self._array(dtype, int(self.shdrs["offset"][index]), size // dtype.itemsize,
                           f"section {self.names[index]!r}")

    def find(self, name: str) -> int | None:
        try:
            return self.names.index(name)
        except ValueError:
            return None

    def symbols(self) -> Symbols:
        indexes = np.flatnonzero(self.shdrs["type"] == SHT_SYMTAB)
        if len(indexes) == 0:
            return Symbols(np.zeros(0, SYM64), b"")
        index = int(indexes[0])
        if int(self.shdrs["entsize"][index]) not in (0, SYM64.itemsize):
            raise RustkoError(f"{self.path}: symbol table entry size is not {SYM64.itemsize}")
        link = int(self.shdrs["link"][index])
        if link >= len(self.shdrs):
            raise RustkoError(f"{self.path}: symbol table names string table {link}, out of range")
        return Symbols(self.section_array(index, SYM64), self.section_bytes(link))

    def modinfo(self) -> dict[str, list[str]]:
        index = self.find(".modinfo")
        info: dict[str, list[str]] = {}
        if index is None:
            return info
        for entry in self.section_bytes(index).split(b"\0"):
            key, sep, value = entry.decode("utf-8", "replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
        return info


# --- kernel side ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Export:
    crc: int
    owner: str
    gpl_only: bool
    namespace: str


@dataclass
class KernelView:
    """What the checker needs from a KDIR: rules version, exports, expected vermagic, config."""

    arch: str
    version: Version
    exports: dict[str, Export] | None = None
    vermagic: str | None = None
    force_load: bool = False
    allow_missing_ns: bool = False


def read_symvers(path: Path) -> dict[str, Export]:
    """Parse Module.symvers (scripts/mod/modpost.c write_dump: crc, symbol, owner, export, ns).

    Parsed once per file version and kept in the cache: every build checks its module against
    the same 25,000 exports, and parsing them costs more than the check itself.
    """
    try:
        info = path.stat()
    except OSError as err:
        raise RustkoError(f"cannot read {path}: {err.strerror}",
                          "KDIR must contain Module.symvers (a headers package or a built tree)")
    key = hashlib.sha256(f"{path.resolve()}|{info.st_size}|{info.st_mtime_ns}".encode()).hexdigest()[:24]
    cached = cache_root() / "symvers" / f"{key}.pickle"
    try:
        with open(cached, "rb") as handle:
            return {name: Export(*row) for name, row in pickle.load(handle).items()}
    except (OSError, pickle.UnpicklingError, EOFError, TypeError, ValueError):
        pass
    exports = _parse_symvers(path)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
        with open(tmp, "wb") as handle:
            pickle.dump({name: astuple(e) for name, e in exports.items()}, handle, pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only cache only costs speed
    return exports


def _parse_symvers(path: Path) -> dict[str, Export]:
    exports: dict[str, Export] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        raise RustkoError(f"cannot read {path}: {err.strerror}",
                          "KDIR must contain Module.symvers (a headers package or a built tree)")
    for line in text.splitlines():
        cols = line.split("\t")
        if len(cols) < 4:
            continue
        try:
            crc = int(cols[0], 16)
        except ValueError:
            continue
        exports[cols[1]] = Export(crc, cols[2], cols[3].endswith("_GPL"),
                                  cols[4] if len(cols) > 4 else "")
    return exports


def expected_vermagic(kernel: "KernelInfo") -> str:
    """VERMAGIC_STRING as include/linux/vermagic.h builds it for this .config (6.1/6.12 text)."""
    cfg = kernel.config
    on = {key for key, value in cfg.items() if value == "y"}
    preempt = ("preempt " if "CONFIG_PREEMPT_BUILD" in on or (
        "CONFIG_PREEMPT" in on and "CONFIG_PREEMPT_BUILD" not in cfg)
        else "preempt_rt " if "CONFIG_PREEMPT_RT" in on else "")
    arch_magic = {"arm64": "aarch64", "riscv64": "riscv"}.get(kernel.arch, "")
    randstruct = ""
    hash_file = kernel.kdir / "include/generated/randstruct_hash.h"
    if "CONFIG_RANDSTRUCT" in on and hash_file.is_file():
        match = re.search(r'RANDSTRUCT_HASHED_SEED\s+"([0-9a-f]+)"', hash_file.read_text())
        if match:
            randstruct = "RANDSTRUCT_" + match.group(1)
    return (kernel.release + " " + ("SMP " if "CONFIG_SMP" in on else "") + preempt
            + ("mod_unload " if "CONFIG_MODULE_UNLOAD" in on else "")
            + ("modversions " if "CONFIG_MODVERSIONS" in on else "") + arch_magic + randstruct)


@lru_cache(maxsize=4)
def kernel_view(kdir: str) -> KernelView:
    """Probe KDIR once per process (workers call this too)."""
    from .kernel import probe

    info = probe(kdir)
    return KernelView(
        arch=info.arch, version=tuple(info.version), exports=read_symvers(info.symvers),
        vermagic=expected_vermagic(info), force_load=info.enabled("MODULE_FORCE_LOAD"),
        allow_missing_ns=info.enabled("MODULE_ALLOW_MISSING_NAMESPACE_IMPORTS"),
    )


# --- reading input ----------------------------------------------------------------------------
MODULE_SUFFIXES = (".ko", ".o", ".ko.xz", ".ko.gz", ".ko.zst")


def read_module_bytes(path: Path) -> bytes:
    """The ELF bytes of a module, decompressing .xz/.gz/.zst (as kmod does) when needed."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise RustkoError(f"cannot read {path}: {err.strerror}")
    try:
        if path.name.endswith(".xz"):
            return lzma.LZMADecompressor().decompress(raw, max_length=MAX_MODULE_BYTES)
        if path.name.endswith(".gz"):
            with gzip.GzipFile(fileobj=__import__("io").BytesIO(raw)) as stream:
                return stream.read(MAX_MODULE_BYTES)
    except (lzma.LZMAError, OSError, EOFError) as err:
        raise RustkoError(f"{path}: cannot decompress: {err}")
    if path.name.endswith(".zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise RustkoError(f"{path}: zstd-compressed, but the `zstd` tool is not installed",
                              "apt-get install zstd")
        done = subprocess.run([zstd, "-dc"], input=raw, capture_output=True, timeout=60)
        if done.returncode != 0:
            raise RustkoError(f"{path}: cannot decompress: {done.stderr.decode(errors='replace').strip()}")
        return done.stdout
    return raw


def iter_modules(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Expand PATH arguments: files as given, directories searched recursively for modules."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*")
                              if p.name.endswith(MODULE_SUFFIXES) and p.is_file())
        elif path.exists():
            yield path
        else:
            raise RustkoError(f"{path}: no such file or directory")


# --- the checks -------------------------------------------------------------------------------
def _module_name(elf: Elf, modinfo: dict[str, list[str]], path: Path) -> str:
    if modinfo.get("name"):
        return modinfo["name"][0]
    stem = path.name.split(".")[0]
    return stem.replace("-", "_")


@lru_cache(maxsize=1)
def _uml_releases() -> frozenset[str]:
    from .uml import uml_releases

    return frozenset(uml_releases())


def _uml_by_release(elf: Elf) -> str | None:
    """"um" for an x86-64 module built for the installed UML kernel's release: UML's vermagic
    has no arch marker, and its ELF machine is x86-64's."""
    if elf.machine != relocs.rules_for("um").e_machine:
        return None
    vermagic = elf.modinfo().get("vermagic", [""])[0].split()
    return "um" if vermagic and vermagic[0] in _uml_releases() else None


def _rules(arch: str | None, machine: int, path: str) -> ArchRules:
    if arch is None:
        arch = relocs.BY_MACHINE.get(machine)
        if arch is None:
            raise RustkoError(f"{path}: ELF machine {machine} is not an architecture rustko checks",
                              "supported: x86_64, arm64 (aarch64), um, riscv64")
    try:
        rules = relocs.rules_for(arch)
    except KeyError:
        raise RustkoError(f"unknown architecture '{arch}'",
                          f"use one of: {', '.join(sorted(relocs.ARCH_ALIASES))}") from None
    if rules.e_machine != machine:
        raise RustkoError(f"{path}: ELF machine {machine} does not match --arch {arch} "
                          f"(expects {rules.e_machine})")
    return rules


def _check_vermagic(elf: Elf, modinfo: dict[str, list[str]], name: str, view: KernelView,
                    path: str) -> list[Finding]:
    have = modinfo.get("vermagic", [None])[0]
    if view.vermagic is None:
        return []
    if have is None:
        if view.force_load:
            return []
        return [Finding(path, "vermagic", "no-vermagic", [],
                        "the module has no vermagic and this kernel lacks CONFIG_MODULE_FORCE_LOAD: "
                        "build it with Kbuild (modpost writes vermagic into NAME.mod.c)")]
    has_crcs = elf.find("__versions") is not None
    a, b = have, view.vermagic
    if has_crcs:  # kernel/module/version.c same_magic: the release is ignored with modversions
        a, b = a[len(a.split(" ")[0]):], b[len(b.split(" ")[0]):]
    if a == b:
        return []
    return [Finding(path, "vermagic", "vermagic",
                    [MSG_VERMAGIC.format(name=name, have=have, want=view.vermagic)],
                    "rebuild the module against this kernel's headers (KDIR); the flags after the "
                    "release (SMP, preempt, mod_unload, modversions) come from its .config")]


def explain_undefined(symbol: str) -> tuple[str, str]:
    """(what is missing, how to fix it) for a Rust runtime symbol; ("", "") for anything else."""
    for pattern, why, fix in UNDEFINED_EXPLAINED:
        if re.search(pattern, symbol):
            return why, fix
    return "", ""


def _versions(elf: Elf) -> dict[str, int] | None:
    index = elf.find("__versions")
    if index is None:
        return None
    blob = elf.section_bytes(index)
    entries = np.frombuffer(blob, dtype=np.dtype([("crc", "<u8"), ("name", "S56")]),
                            count=len(blob) // 64)
    return {n.decode("utf-8", "replace"): int(c) for c, n in zip(entries["crc"], entries["name"])}


def _check_symbols(elf: Elf, syms: Symbols, modinfo: dict[str, list[str]], name: str,
                   view: KernelView, path: str) -> list[Finding]:
    """simplify_symbols + resolve_symbol (kernel/module/main.c) against Module.symvers."""
    out: list[Finding] = []
    table = syms.table
    common = np.flatnonzero(table["shndx"] == SHN_COMMON)
    for index in common:
        symbol = syms.name(int(index))
        if not symbol.startswith("__gnu_lto"):
            out.append(Finding(path, "symbol", "common", [MSG_COMMON.format(name=name)],
                               "compile C with -fno-common (Kbuild does); define the variable once",
                               symbol=symbol))
            break
    if view.exports is None:
        return out
    bind = table["info"] >> 4
    undefined = np.flatnonzero((table["shndx"] == SHN_UNDEF) & (bind == STB_GLOBAL))
    license = modinfo.get("license", ["unspecified"])[0]
    gpl_ok = license in GPL_COMPATIBLE
    imports = set(modinfo.get("import_ns", []))
    versions = _versions(elf)
    for index in undefined:
        symbol = syms.name(int(index))
        if not symbol:
            continue
        export = view.exports.get(symbol)
        if export is not None and not export.gpl_only and not export.namespace and (
                not export.crc or versions is None or versions.get(symbol) == export.crc):
            continue  # the common case, resolved as the kernel would
        if export is None and symbol in IGNORED_UNDEFINED.get(elf.machine, ()):
            continue
        unknown = [MSG_UNKNOWN_SYMBOL.format(name=name, symbol=symbol, err=-ENOENT)]
        if export is None:
            why, fix = explain_undefined(symbol)
            out.append(Finding(path, "symbol", "unknown-symbol", unknown,
                               fix or "the kernel does not export this symbol: define it in the "
                               "module, or use an exported API (grep KDIR/Module.symvers)",
                               symbol=symbol, explanation=why))
        elif export.gpl_only and not gpl_ok:
            out.append(Finding(path, "symbol", "gpl-only", unknown,
                               f"the symbol is EXPORT_SYMBOL_GPL and the module license is "
                               f"'{license}': use a GPL-compatible license "
                               f"({', '.join(sorted(GPL_COMPATIBLE))})", symbol=symbol))
        elif export.crc and versions is not None and versions.get(symbol) != export.crc:
            first = MSG_NO_VERSION if symbol not in versions else MSG_BAD_VERSION
            out.append(Finding(path, "symbol", "symbol-version",
                               [first.format(name=name, symbol=symbol),
                                MSG_UNKNOWN_SYMBOL.format(name=name, symbol=symbol, err=-EINVAL)],
                               "the module was built against other headers: rebuild with this "
                               "kernel's KDIR (its Module.symvers holds the CRCs)", symbol=symbol))
        elif export.namespace and export.namespace not in imports and not view.allow_missing_ns:
            out.append(Finding(path, "symbol", "namespace",
                               [MSG_NAMESPACE.format(name=name, symbol=symbol, ns=export.namespace),
                                MSG_UNKNOWN_SYMBOL.format(name=name, symbol=symbol, err=-EINVAL)],
                               f"add MODULE_IMPORT_NS({export.namespace}) to the module",
                               symbol=symbol))
    return out


def _fits(values: np.ndarray, kind: str) -> np.ndarray:
    """Whether 64-bit values survive truncation to 32 bits as the x86 loader checks it."""
    if kind == "u32":
        return values <= np.uint64(0xFFFFFFFF)
    return (values >= np.uint64(0xFFFFFFFF80000000)) | (values <= np.uint64(0x7FFFFFFF))


@lru_cache(maxsize=32)
def _tables(arch: str, version: Version) -> tuple[np.ndarray, np.ndarray]:
    """Lookup arrays indexed by type number: accepted?, bytes written (x86 nonzero check)."""
    rules = relocs.BY_ARCH[arch]
    accepted = rules.accepted_types(version)
    size = max(accepted, default=0) + 2
    lut = np.zeros(size, dtype=bool)
    lut[list(accepted)] = True
    widths = np.zeros(size, dtype=np.int64)
    for t, width in rules.sizes.items():
        if t < size:
            widths[t] = width
    return lut, widths


def _check_relocations(elf: Elf, syms: Symbols, rules: ArchRules, version: Version, name: str,
                       path: str) -> list[Finding]:
    """apply_relocations: every SHT_RELA/SHT_REL section whose target section is SHF_ALLOC.

    All applied RELA sections of the file are concatenated and classified in one vectorised
    pass; findings keep the loader's order (section index, then entry, after arm64's branch
    partition), so the first one is the line the kernel prints.
    """
    groups: dict[tuple, Finding] = {}
    shdrs = elf.shdrs
    lut, widths = _tables(rules.arch, version)
    overflow_first = rules.overflow_first_since is not None and version >= rules.overflow_first_since
    nsyms = len(syms.table)

    def add(key: tuple, offset: int, make) -> None:
        if key in groups:
            groups[key].count += 1
        elif len(groups) < MAX_FINDINGS:
            groups[key] = make(offset)

    parts: list[bytes] = []
    owners: list[int] = []
    kinds = shdrs["type"]
    candidates = np.flatnonzero(((kinds == SHT_RELA) | (kinds == SHT_REL))
                                & ((shdrs["flags"] & np.uint64(SHF_RELA_LIVEPATCH)) == 0))
    for rsec in candidates.tolist():
        target = int(shdrs["info"][rsec])
        if target >= len(shdrs) or not int(shdrs["flags"][target]) & SHF_ALLOC:
            continue
        if elf.names[target] in (".modinfo", "__versions"):  # the loader clears their SHF_ALLOC
            continue
        if int(kinds[rsec]) == SHT_REL:
            if int(shdrs["size"][rsec]):
                add(("rel", rsec), 0, lambda off, rsec=rsec: Finding(
                    path, "relocation", "rel-section", [MSG_REL.format(name=name)],
                    "the loader only applies RELA sections on this architecture: emit RELA "
                    "relocations (the default for x86_64/aarch64/riscv64 toolchains)",
                    section=elf.names[rsec], offset=off))
            continue
        count = int(shdrs["size"][rsec]) // RELA64.itemsize
        if count:
            offset = int(shdrs["offset"][rsec])
            if offset + count * RELA64.itemsize > len(elf.data):
                raise RustkoError(f"{path}: section {elf.names[rsec]!r} extends past the end of "
                                  "the file (truncated or corrupt)")
            parts.append(elf.data[offset:offset + count * RELA64.itemsize])
            owners.append(rsec)
    if not parts:
        return list(groups.values())
    rows = np.frombuffer(b"".join(parts), dtype=RELA64)
    counts = np.array([len(p) // RELA64.itemsize for p in parts])
    rsecs = np.repeat(np.array(owners), counts)
    targets = shdrs["info"][rsecs].astype(np.int64)
    rtype = (rows["info"] & np.uint64(0xFFFFFFFF)).astype(np.int64)
    symidx = (rows["info"] >> np.uint64(32)).astype(np.int64)
    if int(symidx.max()) >= nsyms:
        raise RustkoError(f"{path}: a relocation refers to symbol {int(symidx.max())}, the symbol "
                          f"table has {nsyms}")
    clipped = np.minimum(rtype, len(lut) - 1)
    ok = lut[clipped] & (rtype < len(lut) - 1)
    problems: list[np.ndarray] = [np.flatnonzero(~ok)]
    labels = ["unknown"]
    if rules.sizes:
        width = np.where(ok, widths[clipped], 0)
        sec_size = shdrs["size"][targets]
        end = rows["offset"] + width.astype(np.uint64)
        outside = (width > 0) & ((end > sec_size) | (end < rows["offset"]))
        problems.append(np.flatnonzero(outside))
        labels.append("outside")
        readable = (width > 0) & ~outside & (shdrs["type"][targets] != SHT_NOBITS)
        body = np.frombuffer(elf.data, dtype=np.uint8)
        nonzero = np.zeros(len(rows), dtype=bool)
        sel = np.flatnonzero(readable)
        if len(sel):
            start = shdrs["offset"][targets[sel]] + rows["offset"][sel]
            past = start + width[sel].astype(np.uint64) > np.uint64(len(body))
            if past.any():
                raise RustkoError(f"{path}: a relocated section extends past the end of the file")
            for size in (4, 8):
                mine = width[sel] == size
                if mine.any():
                    at = start[mine].astype(np.int64)
                    window = body[at[:, None] + np.arange(size)]
                    nonzero[sel[mine]] = window.any(axis=1)
        problems.append(np.flatnonzero(nonzero))
        labels.append("nonzero")
        problems.append(_overflows(rows, rtype, symidx, syms, rules, elf.find(".data..percpu"), ok))
        labels.append("overflow")
    found = sorted((int(i), label) for idx, label in zip(problems, labels) for i in idx.tolist())
    if rules.branch_partition and found:
        rank = _partitioned_rank(rsecs, rtype, symidx, syms, shdrs, rules, [i for i, _ in found])
        found.sort(key=lambda item: (int(rank[item[0]]), item[1]))
    for i, kind in found:
        t, s, off = int(rtype[i]), int(symidx[i]), int(rows["offset"][i])
        tname = elf.names[int(targets[i])]
        symbol = syms.name(s) if s else ""
        if s and int(syms.table["info"][s]) & 0xF == STT_SECTION:
            shndx = int(syms.table["shndx"][s])
            symbol = elf.names[shndx] if shndx < len(elf.names) else symbol
        add((kind, tname, t, symbol), off, lambda off, t=t, s=s, kind=kind, symbol=symbol, i=i,
            tname=tname: _reloc_finding(path, name, rules, version, kind, tname, off, t, symbol,
                                        _exact_value(syms, s, int(rows["addend"][i])),
                                        overflow_first))
    return list(groups.values())


def _partitioned_rank(rsecs: np.ndarray, rtype: np.ndarray, symidx: np.ndarray, syms: Symbols,
                      shdrs: np.ndarray, rules: ArchRules, wanted: list[int]) -> np.ndarray:
    """Each entry's place in the order the loader applies them (`rules.branch_partition`).

    The kernel walks each executable section's table with two indices, swapping every entry
    that is not a partitioned branch at the front with the last partitioned branch at the back:
    the leftmost such entry lands in the rightmost branch's slot. Only sections with findings
    are reordered (the only ones whose order can show).
    """
    rank = np.arange(len(rsecs))
    for rsec in np.unique(rsecs[wanted]).tolist():
        target = int(shdrs["info"][rsec])
        if not int(shdrs["flags"][target]) & SHF_EXECINSTR:
            continue
        mine = np.flatnonzero(rsecs == rsec)
        branch = (np.isin(rtype[mine], rules.branch_partition)
                  & (syms.table["shndx"][symidx[mine]].astype(np.int64) != target))
        count = int(branch.sum())
        front = np.flatnonzero(~branch[:count])
        back = np.flatnonzero(branch[count:])[::-1] + count
        place = np.arange(len(mine))
        place[front], place[back] = back, front
        rank[mine] = mine[0] + place
    return rank


def _exact_value(syms: Symbols, index: int, addend: int) -> int | None:
    """S+A when the checker can know it (absolute symbols), else None."""
    if int(syms.table["shndx"][index]) == SHN_ABS or index == 0:
        return (int(syms.table["value"][index]) + addend) & 0xFFFFFFFFFFFFFFFF
    return None


def _overflows(rows: np.ndarray, rtype: np.ndarray, symidx: np.ndarray, syms: Symbols,
               rules: ArchRules, pcpu: int | None, ok: np.ndarray) -> np.ndarray:
    """Rows whose S+A cannot fit the 32-bit field wherever the loader places the module.

    S is bounded by where it will live: module-local symbols in [MODULES_VADDR, MODULES_END);
    per-CPU module symbols (x86_64 SMP: zero-based per-CPU offsets) below 2 GiB; absolute symbols
    exactly; undefined symbols are kernel exports in the kernel image, which on x86_64 is linked
    at 0xffffffff80000000 and up: inside the sign-extended range (32S fits, as every -mcmodel=kernel
    module relies on) and never inside the zero-extended one (32 overflows). Per-CPU *exports*
    reached through R_X86_64_32 would be a false positive; -mcmodel=kernel code uses 32S for them.
    """
    checked = np.zeros(len(rows), dtype=bool)
    for t in rules.overflow_checked:
        checked |= rtype == t
    checked &= ok
    sel = np.flatnonzero(checked)
    if not len(sel) or rules.module_range is None or rules.kernel_range is None:
        return sel[:0]
    sym = syms.table[symidx[sel]]
    addend = rows["addend"][sel].astype(np.uint64)
    value = sym["value"]
    shndx = sym["shndx"].astype(np.int64)
    low = np.full(len(sel), rules.module_range.low, dtype=np.uint64)
    high = np.full(len(sel), rules.module_range.high - 1, dtype=np.uint64)
    undef = shndx == SHN_UNDEF
    low[undef], high[undef] = rules.kernel_range.low, rules.kernel_range.high - 1
    absolute = (shndx == SHN_ABS) | (symidx[sel] == 0)
    low[absolute] = high[absolute] = 0
    if pcpu is not None and rules.percpu_range is not None:
        percpu = shndx == pcpu
        low[percpu], high[percpu] = rules.percpu_range.low, rules.percpu_range.high - 1
    value = np.where(undef, 0, value).astype(np.uint64)
    with np.errstate(over="ignore"):
        lo, hi = low + value + addend, high + value + addend
    bad = np.zeros(len(sel), dtype=bool)
    for t, kind in rules.overflow_checked.items():
        mine = rtype[sel] == t
        bad |= mine & ~(_fits(lo, kind) & _fits(hi, kind))
    return sel[bad]


def _reloc_finding(path: str, name: str, rules: ArchRules, version: Version, kind: str,
                   section: str, offset: int, rtype: int, symbol: str, exact: int | None,
                   overflow_first: bool) -> Finding:
    rname = rules.name(rtype)
    val = f"{exact:x}" if exact is not None else "<val>"
    fields = {"name": name, "type": rtype, "val": val, "loc": "<loc>"}
    common = {"symbol": symbol, "section": section, "offset": offset, "reloc_type": rtype,
              "reloc_name": rname}
    if kind == "unknown":
        return Finding(path, "relocation", "unsupported-relocation",
                       [rules.unknown.at(version).format(**fields)], rules.hint(rtype), **common)
    if kind == "overflow":
        return Finding(path, "relocation", "overflow",
                       rules.overflow.at(version).format(**fields).split("\n"),
                       rules.overflow_hint, **common)
    if kind == "nonzero":
        return Finding(path, "relocation", "nonzero-target", [rules.nonzero.at(version).format(**fields)],
                       "the relocated field must hold zero in the object (RELA keeps the addend in "
                       "the entry): do not pre-fill it, e.g. no REL-style addends from a custom "
                       "linker step", **common)
    return Finding(path, "relocation", "outside-section", [],
                   f"the relocation writes past the end of {section}: the object is corrupt",
                   **common)


# Rust v0 crate disambiguators (`core[1eb95a942f2852f8]`) say nothing to a reader.
CRATE_HASH = re.compile(r"\[[0-9a-f]{8,16}\]")


def demangle(names: list[str]) -> dict[str, str]:
    """Readable names for Rust (v0, legacy) and C++ symbols, through binutils' c++filt, which
    knows Rust v0 since 2.36; names stay as they are when it is not installed."""
    mangled = sorted({n for n in names if n.startswith(("_R", "_ZN"))})
    tool = shutil.which("c++filt")
    if not mangled or tool is None:
        return {}
    try:
        out = subprocess.run([tool], input="\n".join(mangled), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    lines = out.stdout.splitlines()
    if out.returncode != 0 or len(lines) != len(mangled):
        return {}
    return {name: CRATE_HASH.sub("", line) for name, line in zip(mangled, lines)}


def _function_at(elf: Elf, syms: Symbols, section: str, offset: int) -> str:
    index = elf.find(section)
    table = syms.table
    if index is None or not len(table):
        return ""
    hit = np.flatnonzero((table["shndx"] == index) & ((table["info"] & 0xF) == STT_FUNC)
                         & (table["value"] <= np.uint64(offset))
                         & (table["value"] + table["size"] > np.uint64(offset)))
    return syms.name(int(hit[0])) if len(hit) else ""


def _source_lines(elf: Elf, wanted: list[tuple[int, int]]) -> dict[tuple[int, int], str]:
    """(section index, offset) -> "file:line" from the DWARF line program, when there is DWARF.

    In a relocatable object every section starts at address 0; each line-program sequence starts
    with a DW_LNE_set_address relocated against its own section, so sequences are matched to
    sections through those relocations (.rela.debug_line), in order.
    """
    from io import BytesIO

    from elftools.common.exceptions import DWARFError, ELFError
    from elftools.dwarf.dwarfinfo import DWARFInfo
    from elftools.elf.elffile import ELFFile

    if elf.find(".debug_line") is None or elf.find(".debug_info") is None:
        return {}
    found: dict[tuple[int, int], str] = {}
    try:
        dwarf: DWARFInfo = ELFFile(BytesIO(elf.data)).get_dwarf_info(relocate_dwarf_sections=True)
        seq_sections = _line_sequence_sections(elf)
        seq_no = 0
        for cu in dwarf.iter_CUs():
            program = dwarf.line_program_for_CU(cu)
            if program is None:
                continue
            prev = None
            for entry in program.get_entries():
                state = entry.state
                if entry.command == 2 and entry.is_extended:  # DW_LNE_set_address
                    prev = None
                if state is None:
                    continue
                section = seq_sections[seq_no] if seq_no < len(seq_sections) else -1
                if prev is not None:
                    for key in wanted:
                        if key not in found and key[0] == section and prev.address <= key[1] < state.address:
                            found[key] = f"{_file_name(program, prev.file)}:{prev.line}"
                prev = state
                if state.end_sequence:
                    seq_no += 1
                    prev = None
    except (ELFError, DWARFError, ValueError, KeyError, IndexError, AttributeError, TypeError, AssertionError,
            UnicodeDecodeError, OverflowError, MemoryError, RecursionError):
        # Source lines decorate a finding; a corrupt DWARF section must not hide the finding.
        return found
    return found


def _file_name(program: object, index: int) -> str:
    """A line-program file entry as a path (DWARF 5 counts files from 0, older from 1)."""
    version = program.header.version
    files, dirs = program["file_entry"], program["include_directory"]
    index -= 1 if version < 5 else 0
    if not 0 <= index < len(files):
        return "?"
    entry = files[index]
    name = entry.name.decode("utf-8", "replace")
    dir_index = entry.dir_index - (1 if version < 5 else 0)
    if not name.startswith("/") and 0 <= dir_index < len(dirs):
        name = dirs[dir_index].decode("utf-8", "replace") + "/" + name
    return name


def _line_sequence_sections(elf: Elf) -> list[int]:
    """For each DW_LNE_set_address in .debug_line (file order), the section it is relative to."""
    line = elf.find(".debug_line")
    for rsec in np.flatnonzero(elf.shdrs["type"] == SHT_RELA):
        if int(elf.shdrs["info"][rsec]) != line:
            continue
        rows = elf.section_array(int(rsec), RELA64)
        syms = elf.symbols()
        rows = np.sort(rows, order="offset")
        rtype = rows["info"] & np.uint64(0xFFFFFFFF)
        is_addr = np.isin(rtype, [1, 257, 2])  # R_X86_64_64, R_AARCH64_ABS64, R_RISCV_64
        idx = (rows["info"][is_addr] >> np.uint64(32)).astype(np.int64)
        return [int(syms.table["shndx"][i]) for i in idx if i < len(syms.table)]
    return []


def check_bytes(data: bytes, path: str, kernel: KernelView | None = None, arch: str | None = None,
                version: Version | None = None, locate: bool = True) -> list[Finding]:
    """Check one module image already in memory; see `check_module`."""
    elf = Elf(data, path)
    rules = _rules(arch or (kernel.arch if kernel else None) or _uml_by_release(elf), elf.machine, path)
    version = version or (kernel.version if kernel else relocs.LATEST)
    syms = elf.symbols()
    modinfo = elf.modinfo()
    name = _module_name(elf, modinfo, Path(path))
    findings: list[Finding] = []
    is_module = elf.find(".gnu.linkonce.this_module") is not None or bool(modinfo)
    if kernel is not None and is_module:
        findings += _check_vermagic(elf, modinfo, name, kernel, path)
    if is_module:
        findings += _check_symbols(elf, syms, modinfo, name,
                                   kernel or KernelView(rules.arch, version), path)
    findings += _check_relocations(elf, syms, rules, version, name, path)
    if locate and findings:
        sites = [f for f in findings if f.section and f.offset is not None]
        for f in sites:
            f.function = _function_at(elf, syms, f.section, f.offset)
        names = demangle([f.function for f in sites if f.function])
        for f in sites:
            f.function = names.get(f.function, f.function)
        keys = {(elf.find(f.section), f.offset): f for f in sites}
        for key, where in _source_lines(elf, list(keys)).items():
            keys[key].source = where
    return findings


def check_module(path: str | Path, kernel: "KernelInfo | KernelView | None" = None,
                 arch: str | None = None, version: tuple[int, ...] | None = None) -> list[Finding]:
    """Every reason the target kernel would refuse the module at PATH (empty: loadable).

    `kernel` is a `rustko.kernel.KernelInfo` (or a KernelView); without it only relocations are
    checked, for `arch` (default: from e_machine) and `version` (default: the latest rules).
    Raises RustkoError for unreadable or malformed input.
    """
    view = _as_view(kernel)
    p = Path(path)
    return check_bytes(read_module_bytes(p), str(p), view, arch, version)


def _as_view(kernel: object) -> KernelView | None:
    if kernel is None or isinstance(kernel, KernelView):
        return kernel
    return kernel_view(str(kernel.kdir))  # a rustko.kernel.KernelInfo


# --- reporting --------------------------------------------------------------------------------
def format_report(findings: list[Finding], path: str | Path) -> str:
    """Compact, cargo-style text for one module's findings ("" when there are none)."""
    errors = [f for f in findings if f.severity == "error"]
    if not findings:
        return ""
    lines = [f"{'error: module would be refused' if errors else 'warning: module taints the kernel'}: {path}"]
    said: set[str] = set()
    for f in findings:
        if f.reloc_name:
            where = f"{f.section}+{f.offset:#x}" if f.offset is not None else f.section
            more = f" ({f.count} sites)" if f.count > 1 else ""
            against = f" against {f.symbol}" if f.symbol else ""
            lines.append(f"  --> {where}  {f.reloc_name} ({f.reloc_type}){against}{more}")
            if f.function or f.source:
                lines.append(f"   |  in {f.function or '?'}" + (f" at {f.source}" if f.source else ""))
        elif f.symbol:
            lines.append(f"  --> symbol {f.symbol}  ({f.kind})")
        else:
            lines.append(f"  --> {f.kind}")
        for text in f.kernel:
            lines.append(f"  = kernel: {text}")
        if f.explanation:
            lines.append(f"  = note: {f.explanation}")
        if f.hint:
            lines.append(f"  = help: {f.hint}" if f.hint not in said else "  = help: as above")
            said.add(f.hint)
    return "\n".join(lines)


def _check_one(job: tuple[str, str | None, str | None, Version | None]) -> tuple[str, list[Finding] | str]:
    path, kdir, arch, version = job
    try:
        view = kernel_view(kdir) if kdir else None
        return path, check_module(path, view, arch, version)
    except RustkoError as err:
        return path, str(err)


def check_paths(paths: Iterable[str | Path], kdir: str | None = None, arch: str | None = None,
                version: Version | None = None, jobs: int | None = None
                ) -> list[tuple[str, list[Finding] | str]]:
    """Check every module under PATHS, in parallel for many files; errors stay per file."""
    files = [str(p) for p in iter_modules(paths)]
    if kdir:
        kernel_view(kdir)  # fail early, once, on a bad KDIR
    work = [(f, kdir, arch, version) for f in files]
    workers = min(jobs or os.cpu_count() or 1, max(1, len(files) // 16))
    if workers <= 1:
        return [_check_one(w) for w in work]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_check_one, work, chunksize=max(1, len(work) // (workers * 8))))


def _parse_version(text: str) -> Version:
    if not re.fullmatch(r"\d+\.\d+(\.\d+)?", text):
        raise RustkoError(f"bad --kernel-version '{text}'", "write it as X.Y or X.Y.Z, e.g. 6.1")
    return tuple(int(x) for x in text.split("."))


def run(args: argparse.Namespace) -> int:
    if args.kdir and (args.arch or args.kernel_version):
        raise RustkoError("--kdir cannot be combined with --arch/--kernel-version",
                          "the KDIR decides both")
    version = _parse_version(args.kernel_version) if args.kernel_version else None
    if args.arch and args.arch not in relocs.ARCH_ALIASES:
        raise RustkoError(f"unknown architecture '{args.arch}'",
                          f"use one of: {', '.join(sorted(relocs.ARCH_ALIASES))}")
    results = check_paths(args.paths, args.kdir, args.arch, version)
    if not results:
        raise RustkoError(f"no modules (.ko, .o) found in {' '.join(args.paths)}")
    bad_input = [(p, r) for p, r in results if isinstance(r, str)]
    refused = [(p, r) for p, r in results
               if not isinstance(r, str) and any(f.severity == "error" for f in r)]
    if args.json:
        print(json.dumps({
            "modules": [{"path": p, "error": r} if isinstance(r, str) else
                        {"path": p, "loadable": not any(f.severity == "error" for f in r),
                         "findings": [asdict(f) for f in r]} for p, r in results],
            "checked": len(results), "refused": len(refused), "unreadable": len(bad_input),
        }, indent=2))
    else:
        for p, r in results:
            if isinstance(r, str):
                print(r, file=sys.stderr)
            elif r:
                print(format_report(r, p))
        print(f"checked {len(results)} module(s): {len(refused)} would be refused"
              + (f", {len(bad_input)} unreadable" if bad_input else ""))
    if bad_input:
        return 2
    return 1 if refused else 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check", help="prove .ko files loadable by the target kernel",
        description="Check kernel modules the way the kernel's module loader would. "
                    "Exit 0: all loadable; 1: at least one would be refused; 2: bad input.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help=".ko/.o file or directory")
    parser.add_argument("--kdir", help="kernel build dir / headers: enables symbol and vermagic checks")
    parser.add_argument("--arch", help="x86_64, arm64, um, riscv64 (default: from the ELF header)")
    parser.add_argument("--kernel-version", help="X.Y[.Z] whose loader rules apply (default: latest)")
    parser.add_argument("--json", action="store_true", help="print findings as JSON")
    parser.set_defaults(run=run)
