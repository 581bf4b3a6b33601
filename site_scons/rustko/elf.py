"""ELF decoding for the checker, done once: headers, sections, symbols, relocations, .modinfo,
__versions, a module's own exports and its appended signature.

Plain `numpy.frombuffer` over bounds-checked slices: relocation arrays are decoded in bulk, so a
whole distribution tree checks in seconds. Nothing here knows what the loader accepts
(`rustko.loader`, `rustko.relocs`) or reads anything but the bytes it is given, except
`read_module_bytes`/`iter_modules`, the input layer.
"""

from __future__ import annotations

import functools

import gzip
import io
import lzma
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import RustkoError

# ELF constants (include/uapi/linux/elf.h).
SHT_SYMTAB, SHT_RELA, SHT_NOBITS, SHT_REL = 2, 4, 8, 9
SHF_ALLOC = 0x2
SHF_EXECINSTR = 0x4
SHF_COMPRESSED = 0x800          # include/uapi/linux/elf.h: section data compressed (Elf64_Chdr first)
SHF_RELA_LIVEPATCH = 0x00100000
SHN_UNDEF, SHN_ABS, SHN_COMMON, SHN_XINDEX = 0, 0xFFF1, 0xFFF2, 0xFFFF
STB_GLOBAL, STB_WEAK = 1, 2
STT_FUNC, STT_SECTION = 2, 3

SHDR64 = np.dtype([("name", "<u4"), ("type", "<u4"), ("flags", "<u8"), ("addr", "<u8"),
                   ("offset", "<u8"), ("size", "<u8"), ("link", "<u4"), ("info", "<u4"),
                   ("addralign", "<u8"), ("entsize", "<u8")])
SYM64 = np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"),
                  ("value", "<u8"), ("size", "<u8")])
RELA64 = np.dtype([("offset", "<u8"), ("info", "<u8"), ("addend", "<i8")])


# Decompressed modules larger than this are refused as input (a decompression bomb guard).
MAX_MODULE_BYTES = 1 << 30
# include/linux/module_signature.h (6.1, 6.12): the marker scripts/sign-file appends, and the
# 12-byte struct module_signature right before it.
MODULE_SIG_STRING = b"~Module signature appended~\n"
SIGNATURE_INFO = 12


@dataclass(frozen=True)
class ModuleExport:
    """One symbol a module exports (its __ksymtab entry), as modpost records it."""

    name: str
    crc: int
    gpl_only: bool
    namespace: str


@dataclass(frozen=True)
class Signature:
    """The appended signature's struct module_signature fields and the PKCS#7 blob."""

    algo: int
    hash: int
    id_type: int
    signer_len: int
    key_id_len: int
    pad: bytes
    sig_len: int
    signed_len: int  # bytes before the struct (module + signature data)
    blob: bytes

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

    @functools.cached_property
    def _modinfo(self) -> dict[str, list[str]]:
        index = self.find(".modinfo")
        info: dict[str, list[str]] = {}
        if index is None:
            return info
        for entry in self.section_bytes(index).split(b"\0"):
            key, sep, value = entry.decode("utf-8", "replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
        return info

    def modinfo(self) -> dict[str, list[str]]:
        """.modinfo's key=value strings (read once: the vermagic and the module checks both ask)."""
        return self._modinfo

    def versions(self) -> dict[str, int] | None:
        """__versions: the CRC the module was built with per imported symbol (None: no table).

        struct modversion_info (include/linux/module.h, 6.1/6.12): u64 crc, char name[56]."""
        index = self.find("__versions")
        if index is None:
            return None
        blob = self.section_bytes(index)
        entries = np.frombuffer(blob, dtype=np.dtype([("crc", "<u8"), ("name", "S56")]),
                                count=len(blob) // 64)
        return {n.decode("utf-8", "replace"): int(c) & 0xFFFFFFFF
                for c, n in zip(entries["crc"], entries["name"])}

    def symbol_value_bytes(self, syms: Symbols, index: int, size: int) -> bytes:
        """`size` bytes at a defined symbol's place in its section ("" when out of range)."""
        shndx = int(syms.table["shndx"][index])
        if not 0 < shndx < len(self.shdrs) or int(self.shdrs["type"][shndx]) == SHT_NOBITS:
            return b""
        start = int(syms.table["value"][index])
        blob = self.section_bytes(shndx)
        return blob[start:start + size] if start + size <= len(blob) else b""

    def export_names(self, syms: Symbols) -> list[str]:
        """Just the names of `exports` (from the `__ksymtab_X` symbol names), cheaply."""
        strtab = syms.strtab
        names: list[str] = []
        at = strtab.find(b"\0__ksymtab_")
        while at >= 0:
            end = strtab.find(b"\0", at + 1)
            names.append(strtab[at + 11:end if end >= 0 else len(strtab)].decode("utf-8", "replace"))
            at = strtab.find(b"\0__ksymtab_", at + 1)
        return names

    def exports(self, syms: Symbols) -> list[ModuleExport]:
        """The symbols this module exports, read the way modpost's Module.symvers has them.

        EXPORT_SYMBOL leaves `__ksymtab_X` in `__ksymtab` or `__ksymtab_gpl` (scripts/module.lds.S
        merges `___ksymtab+X`/`___ksymtab_gpl+X`), `__crc_X` (a u32 in `__kcrctab*`) and
        `__kstrtabns_X` (the namespace string in `__ksymtab_strings`): include/linux/export.h
        (6.1), include/linux/export-internal.h (6.12)."""
        strtab = syms.strtab
        if b"__ksymtab_" not in strtab or not len(syms.table):
            return []
        names = syms.table["name"]
        starts: list[int] = []
        at = strtab.find(b"__ksymtab_")
        while at >= 0:
            if at == 0 or strtab[at - 1] == 0:
                starts.append(at)
            at = strtab.find(b"__ksymtab_", at + 1)
        found = np.flatnonzero(np.isin(names, np.array(starts, dtype=names.dtype))
                               & (syms.table["shndx"] != SHN_UNDEF))
        if not len(found):
            return []
        by_name = {syms.name(int(i)): int(i) for i in found}
        wanted = {f"__crc_{n[10:]}" for n in by_name} | {f"__kstrtabns_{n[10:]}" for n in by_name}
        extra: dict[str, int] = {}
        for prefix in (b"__crc_", b"__kstrtabns_"):
            at = strtab.find(prefix)
            offsets: list[int] = []
            while at >= 0:
                if at == 0 or strtab[at - 1] == 0:
                    offsets.append(at)
                at = strtab.find(prefix, at + 1)
            for i in np.flatnonzero(np.isin(names, np.array(offsets, dtype=names.dtype))).tolist():
                name = syms.name(i)
                if name in wanted:
                    extra[name] = i
        out = []
        for full, index in sorted(by_name.items()):
            name = full[len("__ksymtab_"):]
            shndx = int(syms.table["shndx"][index])
            section = self.names[shndx] if shndx < len(self.names) else ""
            crc = 0
            if f"__crc_{name}" in extra:
                raw = self.symbol_value_bytes(syms, extra[f"__crc_{name}"], 4)
                crc = int.from_bytes(raw, "little") if raw else 0
            namespace = ""
            if f"__kstrtabns_{name}" in extra:
                raw = self.symbol_value_bytes(syms, extra[f"__kstrtabns_{name}"], 256)
                namespace = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
            out.append(ModuleExport(name, crc, section.startswith(("__ksymtab_gpl", "___ksymtab_gpl")),
                                    namespace))
        return out

    def signature(self) -> Signature | None:
        """The appended signature (kernel/module/signing.c mod_verify_sig), None when unsigned."""
        data = self.data
        if not data.endswith(MODULE_SIG_STRING):
            return None
        modlen = len(data) - len(MODULE_SIG_STRING)
        if modlen <= SIGNATURE_INFO:
            return Signature(0, 0, 0, 0, 0, b"", 0, modlen, b"")
        info = data[modlen - SIGNATURE_INFO:modlen]
        sig_len = int.from_bytes(info[8:12], "big")
        signed = modlen - SIGNATURE_INFO
        blob = data[signed - sig_len:signed] if sig_len <= signed else b""
        return Signature(info[0], info[1], info[2], info[3], info[4], info[5:8], sig_len, modlen, blob)


# --- input ------------------------------------------------------------------------------------
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
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:
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


