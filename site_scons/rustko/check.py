"""`rustko check`: would the target kernel's module loader accept this `.ko`?

Layered like pyelftools: `rustko.elf` decodes the file once; `rustko.loader` and `rustko.relocs`
hold the loader's rules as data (each row citing its kernel source); this module applies them in
the order `load_module` (kernel/module/main.c) does; `rustko.locate` finds the source line of a
finding and `rustko.report` shows it. The checks see only the module's bytes and a
`KernelView`: the host (KDIR, installed UML kernels, the cache) is read before, in
`check_module`/`check_paths`.
"""

from __future__ import annotations

import argparse
import operator
import os
import re
import sys
from functools import lru_cache
from itertools import compress, islice, repeat
from pathlib import Path
from collections.abc import Iterable

from . import loader, relocs
from .elf import (RELA64_SIZE, SIGNATURE_INFO, SHF_ALLOC, SHF_EXECINSTR, SHF_RELA_LIVEPATCH, SHN_ABS,
                  SHN_COMMON, SHN_UNDEF, SHT_NOBITS, SHT_REL, SHT_RELA, STB_GLOBAL, STB_WEAK,
                  STT_SECTION, Elf, Symbols, columns, iter_modules, read_module_bytes)
from .errors import RustkoError
from .kernelview import Export, KernelView, kernel_view, read_extra_symbols, read_symvers
from .loader import ENOENT, EINVAL, GPL_COMPATIBLE, IGNORED_UNDEFINED, RULES
from .relocs import ArchRules, Version
from .report import Finding, format_report, is_refused, results_json

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:
    import numpy as np

    from .kernel import KernelInfo

__all__ = ["Elf", "Finding", "KernelView", "RELA64", "check_bytes", "check_module", "check_paths",
           "explain_undefined", "format_report", "kernel_view", "read_symvers"]

# Distinct (stage, section, type, symbol) groups kept per module; a hostile file can hold
# millions of relocations, a report needs the first few of each kind.
MAX_FINDINGS = 500

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



def __getattr__(name: str) -> object:
    """RELA64, the numpy dtype, re-exported without importing numpy for every check."""
    if name == "RELA64":
        from . import elf

        return elf.RELA64
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def explain_undefined(symbol: str) -> tuple[str, str]:
    """(what is missing, how to fix it) for a Rust runtime symbol; ("", "") for anything else."""
    for pattern, why, fix in _undefined_explained():
        if pattern.search(symbol):
            return why, fix
    return "", ""


@lru_cache(maxsize=1)
def _undefined_explained() -> list[tuple[re.Pattern[str], str, str]]:
    """UNDEFINED_EXPLAINED compiled once (a run of many modules explains hundreds of symbols)."""
    return [(re.compile(pattern), why, fix) for pattern, why, fix in UNDEFINED_EXPLAINED]


def _finding(path: str, stage: str, kind: str, version: Version, hint: str, **fields: object
             ) -> Finding:
    """A finding for loader rule `kind`; `fields` fill both the kernel's lines and the Finding."""
    rule = RULES[kind]
    own = {k: v for k, v in fields.items() if k in Finding.FIELDS}
    return Finding(path, stage, kind, rule.text(version, **fields), hint, severity=rule.severity,
                   errno=rule.errno, **own)


def _module_name(modinfo: dict[str, list[str]], path: str) -> str:
    if modinfo.get("name"):
        return modinfo["name"][0]
    return Path(path).name.split(".")[0].replace("-", "_")


# --- stage 1: signature (module_sig_check) ---------------------------------------------------
def _check_signature(elf: Elf, name: str, version: Version, path: str) -> list[Finding]:
    sig = elf.signature()
    if sig is None:
        return []
    fix = ("re-sign the module with the kernel's scripts/sign-file, or cut the appended "
           "signature off (the signature data, its 12-byte info block and the marker)")
    if sig.signed_len <= SIGNATURE_INFO or sig.sig_len >= sig.signed_len - SIGNATURE_INFO:
        return [_finding(path, "signature", "signature-truncated", version,
                         "the signature trailer's length does not fit the file: " + fix)]
    if sig.id_type != loader.PKEY_ID_PKCS7:
        return [_finding(path, "signature", "signature-not-pkcs7", version,
                         "only PKCS#7 signatures (scripts/sign-file) are understood; the module "
                         "loads unsigned (taint) unless signatures are enforced")]
    if sig.algo or sig.hash or sig.signer_len or sig.key_id_len or any(sig.pad):
        return [_finding(path, "signature", "signature-params", version, fix)]
    if not _pkcs7_shape_ok(sig.blob):
        return [_finding(path, "signature", "signature-pkcs7", version,
                         "the signature data is not a DER PKCS#7 signedData message: " + fix)]
    return []


def _der_length(blob: bytes, at: int) -> tuple[int, int] | None:
    """(content length, content start) of the DER element whose length byte is at `at`."""
    if at >= len(blob):
        return None
    first = blob[at]
    if first < 0x80:
        return first, at + 1
    count = first & 0x7F
    if count == 0 or count > 4 or at + 1 + count > len(blob):
        return None
    return int.from_bytes(blob[at + 1:at + 1 + count], "big"), at + 1 + count


def _pkcs7_shape_ok(blob: bytes) -> bool:
    """The outer shape crypto/asymmetric_keys/pkcs7.asn1 requires: one SEQUENCE spanning the
    data whose first element is the signedData OID. Deeper faults are the kernel's to find."""
    if len(blob) < 2 or blob[0] != 0x30:
        return False
    outer = _der_length(blob, 1)
    if outer is None or outer[1] + outer[0] != len(blob):
        return False
    start = outer[1]
    return blob[start:start + len(loader.PKCS7_SIGNED_DATA)] == loader.PKCS7_SIGNED_DATA


# --- stage 2: ELF validity (elf_validity_check) ----------------------------------------------
def _check_this_module(elf: Elf, name: str, view: KernelView, version: Version,
                       path: str) -> list[Finding]:
    rule = RULES["this-module-size"]
    index = elf.find(".gnu.linkonce.this_module")
    if view.module_struct_size is None or version < rule.since or index is None:
        return []
    size = elf.sections[index].size
    if size == view.module_struct_size:
        return []
    return [_finding(path, "module", "this-module-size", version,
                     f"the module's struct module has {size} bytes, this kernel's "
                     f"{view.module_struct_size}: it was built against another kernel's headers; "
                     "rebuild it with this kernel's KDIR", name=name)]


# --- stage 3: module_layout and vermagic (check_modstruct_version, check_modinfo) ------------
def _bad_version_line(symbol: str, versions: dict[str, int]) -> str:
    """check_version's first line: the symbol missing from __versions, or its CRC differing."""
    return "no symbol version for" if symbol not in versions else "disagrees about version of symbol"


def _check_module_layout(versions: dict[str, int] | None, name: str, view: KernelView,
                         version: Version, path: str) -> list[Finding]:
    export = view.exports.get("module_layout") if view.exports is not None else None
    if export is None or not export.crc:
        return []
    fix = ("the module was built against another kernel's headers: rebuild it with this "
           "kernel's KDIR (its Module.symvers holds the CRCs)")
    if versions is None:
        if view.force_load:
            return []
        return [Finding(path, "vermagic", "module-layout", [], "the module has no __versions "
                        "table and this kernel has CONFIG_MODVERSIONS: build it with Kbuild "
                        "(modpost writes the CRCs)", errno=RULES["module-layout"].errno,
                        symbol="module_layout")]
    if versions.get("module_layout") == export.crc:
        return []
    return [_finding(path, "vermagic", "module-layout", version, fix, name=name,
                     first=_bad_version_line("module_layout", versions), symbol="module_layout")]


def _check_vermagic(elf: Elf, modinfo: dict[str, list[str]], name: str, view: KernelView,
                    version: Version, path: str) -> list[Finding]:
    have = modinfo.get("vermagic", [None])[0]
    if view.vermagic is None:
        return []
    if have is None:
        if view.force_load:
            return []
        return [_finding(path, "vermagic", "no-vermagic", version,
                         "the module has no vermagic and this kernel lacks CONFIG_MODULE_FORCE_LOAD: "
                         "build it with Kbuild (modpost writes vermagic into NAME.mod.c)")]
    a, b = have, view.vermagic
    if elf.find("__versions") is not None:  # kernel/module/version.c same_magic: release ignored
        a, b = a[len(a.split(" ")[0]):], b[len(b.split(" ")[0]):]
    if a == b:
        return []
    return [_finding(path, "vermagic", "vermagic", version,
                     "rebuild the module against this kernel's headers (KDIR); the flags after the "
                     "release (SMP, preempt, mod_unload, modversions) come from its .config",
                     name=name, have=have, want=view.vermagic)]


def _check_license(modinfo: dict[str, list[str]], name: str, version: Version,
                   path: str) -> list[Finding]:
    license = modinfo.get("license", ["unspecified"])[0]
    if license in GPL_COMPATIBLE:
        return []
    return [_finding(path, "vermagic", "license-taint", version,
                     f"the kernel treats '{license}' as proprietary: it taints the kernel and the "
                     "module cannot use GPL-only exports; if the code is GPL-compatible, use one "
                     f"of: {', '.join(sorted(GPL_COMPATIBLE))}", name=name, license=license)]


# --- stage 4: module memory (layout_and_allocate) --------------------------------------------
SHF_WRITE = 0x1
# kernel/module/main.c layout_sections: sections that stay in their own allocation
# (MOD_RO_AFTER_INIT since v6.4); counted in the whole-module sum only.
_RO_AFTER_INIT = frozenset({".data..ro_after_init", "__jump_table"})


def _allocations(elf: Elf, version: Version, percpu_apart: bool) -> list[int]:
    """Lower bounds of the sizes module memory is allocated in: the SHF_ALLOC sections grouped as
    kernel/module/main.c layout_sections groups them (alignment padding left out, so never an
    overestimate); one core and one init sum before v6.4, one per mod_mem_type since.
    `percpu_apart` (SMP kernels): layout_and_allocate clears SHF_ALLOC of find_pcpusec's
    .data..percpu ("a special allocation for per-cpu sections later", 5.10.262, 6.1.192,
    6.12.117), so it takes no module memory; on UP find_pcpusec returns 0 and it stays."""
    groups: dict[tuple[bool, str], int] = {}
    info_sections = {elf.find(".modinfo"), elf.find("__versions")}  # rewrite_section_headers
    if percpu_apart:
        info_sections.add(elf.find(".data..percpu"))
    for index, (flags, size) in enumerate((s.flags, s.size) for s in elf.sections):
        if not flags & SHF_ALLOC or index in info_sections:
            continue
        name = elf.names[index]
        kind = ("text" if flags & SHF_EXECINSTR else "ro_after_init" if name in _RO_AFTER_INIT
                else "data" if flags & SHF_WRITE else "rodata")
        key = (name.startswith(".init"), kind)
        groups[key] = groups.get(key, 0) + size
    if version >= loader.PER_TYPE_ALLOCATION_SINCE:
        return list(groups.values())
    return [sum(v for (init, _), v in groups.items() if init is part) for part in (False, True)]


def _check_module_area(elf: Elf, name: str, arch: str, view: KernelView, version: Version,
                       path: str) -> list[Finding]:
    """The module's largest allocation against the most its arch's module area can give
    (loader.MODULE_AREA); silent where the area is not computable from a KDIR (UML: mem=)."""
    table = loader.MODULE_AREA.get(arch)
    if table is None or table.size is None:
        return []
    area = view.module_area if view.module_area is not None else table.largest
    largest = max(_allocations(elf, version, percpu_apart=view.percpu_reserve is not None), default=0)
    if largest >= loader.LAYOUT_SIZE_WRAP:  # the loader's own sum wraps: no verdict
        return []
    if -(-largest // loader.PAGE_SIZE) * loader.PAGE_SIZE <= area:  # module_alloc's PAGE_ALIGN
        return []
    return [_finding(path, "module", table.rule, version,
                     f"the module needs {largest} bytes in one piece and the whole module area "
                     f"is {area} bytes: allocate large buffers at run time (vmalloc/kvmalloc) "
                     "instead of static arrays", name=name, explanation=table.note)]


# --- stage 5: per-CPU data (percpu_modalloc) -------------------------------------------------
def _check_percpu(elf: Elf, name: str, view: KernelView, version: Version,
                  path: str) -> list[Finding]:
    index = elf.find(".data..percpu")
    if index is None:
        return []
    raw = elf.sections[index].size
    if not raw or view.percpu_reserve is None:
        return []
    align = min(max(elf.sections[index].addralign, loader.PCPU_MIN_ALLOC_SIZE), 4096)
    size = -(-raw // loader.PCPU_MIN_ALLOC_SIZE) * loader.PCPU_MIN_ALLOC_SIZE
    fix = (f"the module's per-CPU data ({raw} bytes in .data..percpu) must fit the "
           f"{view.percpu_reserve}-byte reserve all modules share: allocate large per-CPU "
           "buffers at run time with alloc_percpu()/__alloc_percpu() instead of DEFINE_PER_CPU")
    if size > loader.PCPU_MIN_UNIT_SIZE:
        return [_finding(path, "percpu", "percpu-illegal", version, fix, name=name, size=size,
                         align=align, raw=raw, section=".data..percpu")]
    if raw > view.percpu_reserve:
        return [_finding(path, "percpu", "percpu-reserve", version, fix, name=name, raw=raw,
                         section=".data..percpu")]
    return []


# --- stage 6: imported namespaces (setup_modinfo) ---------------------------------------------
def _check_imports(modinfo: dict[str, list[str]], name: str, version: Version,
                   path: str) -> list[Finding]:
    if version < RULES["import-module-ns"].since:
        return []
    for ns in modinfo.get("import_ns", []):
        if ns.startswith(loader.MODULE_NS_PREFIX):
            return [_finding(path, "symbol", "import-module-ns", version,
                             "a `module:` namespace (EXPORT_SYMBOL_FOR_MODULES) is only for the "
                             "modules it names and is never imported: drop this MODULE_IMPORT_NS",
                             name=name, ns=ns)]
    return []


def _module_ns_allows(ns: str, name: str) -> bool:
    """kernel/module/main.c verify_module_namespace (7.3.4): `name` is one of the patterns
    after "module:" (a trailing `*` matches any tail; `-` and `_` are alike)."""
    mod = name.replace("-", "_")
    for pattern in ns[len(loader.MODULE_NS_PREFIX):].split(","):
        pattern = pattern.replace("-", "_")
        if pattern.endswith("*") and mod.startswith(pattern[:-1]) or pattern == mod:
            return True
    return False


# --- stage 7: symbols (simplify_symbols) ------------------------------------------------------
def _check_symbols(elf: Elf, syms: Symbols, modinfo: dict[str, list[str]],
                   versions: dict[str, int] | None, name: str, view: KernelView, version: Version,
                   path: str) -> list[Finding]:
    """simplify_symbols -> resolve_symbol (kernel/module/main.c) against the kernel's exports
    and the siblings'. A weak symbol nobody exports resolves to 0; a weak one that *is*
    exported goes through the same CRC and namespace checks as any other."""
    out: list[Finding] = []
    shndxs = syms.column("shndx")
    for index in [i for i, shndx in enumerate(shndxs) if shndx == SHN_COMMON] if SHN_COMMON in shndxs else []:
        symbol = syms.name(index)
        if not symbol.startswith("__gnu_lto"):
            out.append(_finding(path, "symbol", "common", version,
                                "compile C with -fno-common (Kbuild does); define the variable once",
                                name=name, symbol=symbol))
            break
    if view.exports is None:
        return out
    bind = [info >> 4 for info in syms.column("info")]
    undefined = [i for i, shndx in enumerate(shndxs)
                 if shndx == SHN_UNDEF and bind[i] in (STB_GLOBAL, STB_WEAK)]
    license = modinfo.get("license", ["unspecified"])[0]
    gpl_ok = license in GPL_COMPATIBLE
    imports = set(modinfo.get("import_ns", []))
    for index in undefined:
        symbol = syms.name(index)
        if not symbol:
            continue
        export = view.export(symbol)
        weak = bind[index] == STB_WEAK
        if export is not None and export.gpl_only and not gpl_ok:
            export_visible = None  # find_symbol skips GPL-only exports for a non-GPL module
        else:
            export_visible = export
        if export_visible is None:
            if weak or symbol in IGNORED_UNDEFINED.get(elf.machine, ()):
                continue  # "Ok if weak or ignored": the symbol's value stays 0
            if export is not None:
                out.append(_finding(path, "symbol", "gpl-only", version,
                                    f"the symbol is EXPORT_SYMBOL_GPL and the module license is "
                                    f"'{license}': use a GPL-compatible license "
                                    f"({', '.join(sorted(GPL_COMPATIBLE))})",
                                    name=name, symbol=symbol, err=-ENOENT))
                continue
            why, fix = explain_undefined(symbol)
            out.append(_finding(path, "symbol", "unknown-symbol", version,
                                fix or "the kernel does not export this symbol: define it in the "
                                "module, or use an exported API (grep KDIR/Module.symvers); if "
                                "another module exports it, check both together or pass its "
                                "Module.symvers with --extra-symbols",
                                name=name, symbol=symbol, err=-ENOENT, explanation=why))
            continue
        if export.crc and versions is not None and versions.get(symbol) != export.crc:
            out.append(_finding(path, "symbol", "symbol-version", version,
                                "the module was built against other headers: rebuild with this "
                                "kernel's KDIR (its Module.symvers holds the CRCs)"
                                + (f"; the export comes from module {export.owner}" if
                                   export.owner != "vmlinux" and view.exports.get(symbol) is None
                                   else ""),
                                name=name, symbol=symbol, err=-EINVAL,
                                first=_bad_version_line(symbol, versions)))
        elif export.namespace and export.namespace not in imports and not view.allow_missing_ns:
            ns = export.namespace
            if ns.startswith(loader.MODULE_NS_PREFIX) and version >= loader.MODULE_NS_SINCE:
                if _module_ns_allows(ns, name):
                    continue
                fix = (f"the symbol is exported with EXPORT_SYMBOL_FOR_MODULES for the modules "
                       f"{ns[len(loader.MODULE_NS_PREFIX):]} only: no other module may use it")
            else:
                fix = f"add MODULE_IMPORT_NS({ns}) to the module"
            out.append(_finding(path, "symbol", "namespace", version, fix,
                                name=name, symbol=symbol, ns=ns, err=-EINVAL))
    return out


def _weak_zero(syms: Symbols, view: KernelView | None) -> np.ndarray:
    """Per symbol: an undefined weak symbol the loader leaves at 0 (no visible export)."""
    import numpy as np

    table = syms.table
    weak = (table["shndx"] == SHN_UNDEF) & ((table["info"] >> 4) == STB_WEAK)
    out = np.zeros(len(table), dtype=bool)
    for index in np.flatnonzero(weak).tolist():
        if view is None or view.exports is None or view.export(syms.name(index)) is None:
            out[index] = True
    return out


def _sibling_resolved(syms: Symbols, view: KernelView | None) -> np.ndarray:
    """Per symbol: undefined, resolved by a module checked together (it lives in module memory)."""
    import numpy as np

    out = np.zeros(len(syms.table), dtype=bool)
    if view is None or not view.siblings:
        return out
    for index in np.flatnonzero(syms.table["shndx"] == SHN_UNDEF).tolist():
        symbol = syms.name(index)
        if symbol in view.siblings and (view.exports is None or symbol not in view.exports):
            out[index] = True
    return out


# --- stage 9: exports, after relocations (complete_formation -> verify_exported_symbols) --------
def _check_exports(elf: Elf, syms: Symbols, name: str, view: KernelView, version: Version,
                   path: str) -> list[Finding]:
    if view.exports is None:
        return []
    for symbol in elf.export_names(syms):
        owner = view.exports.get(symbol)
        if owner is not None and owner.owner == "vmlinux":
            return [_finding(path, "export", "duplicate-export", version,
                             "the kernel already exports this name: rename the module's symbol "
                             "(prefix it with the module name)", name=name, symbol=symbol,
                             owner="kernel")]
    return []


# --- stage 8: relocations (apply_relocations) -----------------------------------------------
def _fits(values: np.ndarray, kind: str) -> np.ndarray:
    """Whether 64-bit values survive truncation to 32 bits as the x86 loader checks it."""
    import numpy as np

    if kind == "u32":
        return values <= np.uint64(0xFFFFFFFF)
    return (values >= np.uint64(0xFFFFFFFF80000000)) | (values <= np.uint64(0x7FFFFFFF))


@lru_cache(maxsize=32)
def _tables(arch: str, version: Version) -> tuple[np.ndarray, np.ndarray]:
    """Lookup arrays indexed by type number: accepted?, bytes written (x86 nonzero check)."""
    import numpy as np

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


# When the pure-Python pass decides a module. Per RELA entry it costs about five times the
# numpy pass (about 4 and 0.8 microseconds with everything else a check does; fat.ko, 3,177
# entries, in bench/check_tree.py's machine), and importing numpy costs 0.2 s, as much as
# 50,000 to 70,000 entries more in Python. So: once numpy is imported, always numpy; before,
# Python for tables up to PURE_BUDGET entries; and a run whose modules add up to more than
# PURE_BYTES (about 30,000 entries: 1 per 60 bytes of module in Debian's tree) imports numpy
# before it starts (`check_paths`).
PURE_BUDGET = 60_000
PURE_BYTES = 2 << 20
MASK64 = (1 << 64) - 1


def _pure_pass(entries: int) -> bool:
    """Whether a module with `entries` RELA entries goes through `_clean_small` first."""
    return "numpy" not in sys.modules and entries <= PURE_BUDGET


@lru_cache(maxsize=32)
def _accepted(arch: str, version: Version) -> frozenset[int]:
    return relocs.BY_ARCH[arch].accepted_types(version)


def _clean_small(elf: Elf, syms: Symbols, rules: ArchRules, version: Version, parts: list[bytes],
                 owners: list[int], view: KernelView | None) -> bool:
    """True when the loader applies every entry of `parts` (the RELA tables of sections
    `owners`) without a finding, decided without numpy; False sends the module to the numpy
    pass, which makes the findings (and the errors for corrupt tables).

    The checks of the numpy pass, each answered for the whole table at once: the type and the
    symbol index once per distinct r_info; x86's field inside its section, zero in the file
    and written once (sorted (offset, width) pairs); the 32-bit overflow once per distinct
    (r_info, addend). Architectures with range checks or branch reordering (arm64) always take
    the numpy pass, where that logic lives."""
    if rules.range_checks or rules.branch_partition:
        return False
    accepted = _accepted(rules.arch, version)
    nsyms = len(syms)
    sizes = rules.sizes
    width: dict[int, int] = {}  # r_info -> bytes the loader writes (0: none)
    fields: dict[int, list[int]] = {}  # target section -> offset << 4 | width, per entry
    hot: dict[int, set[int]] = {}  # r_info -> addends, of the overflow-checked entries
    sections, data = elf.sections, elf.data
    checked: set[int] = set()  # r_info values whose type x86 checks for overflow
    for rsec, blob in zip(owners, parts):
        offsets, infos = columns(blob, "Q", RELA64_SIZE, (0, 1))
        for info in set(infos).difference(width):
            if info & 0xFFFFFFFF not in accepted or info >> 32 >= nsyms:
                return False
            width[info] = sizes.get(info & 0xFFFFFFFF, 0)
            if sizes and info & 0xFFFFFFFF in rules.overflow_checked:
                checked.add(info)
        if not sizes:
            continue
        target = sections[sections[rsec].info]
        widths = list(map(width.__getitem__, infos))
        ends = list(map(operator.add, offsets, widths))
        if max(ends) > target.size:
            return False  # outside the section (or an empty write past it: numpy decides)
        if target.type != SHT_NOBITS:
            base = target.offset
            if base + target.size > len(data):
                return False
            written = b"".join(map(data.__getitem__, map(slice, map(base.__add__, offsets),
                                                           map(base.__add__, ends))))
            if written.count(0) != len(written):
                return False  # a field is nonzero in the file
        fields.setdefault(sections[rsec].info, []).extend(
            map(operator.add, map(operator.lshift, offsets, repeat(4)), widths))
        if checked:
            addends = columns(blob, "q", RELA64_SIZE, (2,))[0]
            for info, addend in set(compress(zip(infos, addends), map(checked.__contains__, infos))):
                hot.setdefault(info, set()).add(addend)
    for keys in fields.values():
        keys.sort()
        starts = list(map(operator.rshift, keys, repeat(4)))
        ends = map(operator.add, starts, map(operator.and_, keys, repeat(15)))
        if any(map(operator.lt, islice(starts, 1, None), ends)):
            return False  # two entries write the same bytes (an empty write inside a field too)
    pcpu = elf.find(".data..percpu")
    for info, addends in hot.items():
        for base in _overflow_bases(syms, rules, pcpu, view, info):
            if any(map((1 << 32).__le__, map(MASK64.__and__, map(base.__add__, addends)))):
                return False  # S+A may not fit the 32-bit field
    return True


def _overflow_bases(syms: Symbols, rules: ArchRules, pcpu: int | None, view: KernelView | None,
                    info: int) -> tuple[int, ...]:
    """`_overflows` for one r_info: the lowest and highest S the symbol can have, plus 2**31 for
    a sign-extended field, so that S+A fits exactly when (base + A) mod 2**64 < 2**32."""
    if rules.module_range is None or rules.kernel_range is None:
        return ()
    index = info >> 32
    _, sinfo, _, shndx, value, _ = syms.sym(index)
    zero = sibling = False
    if shndx == SHN_UNDEF:
        symbol = syms.name(index)
        zero = sinfo >> 4 == STB_WEAK and (view is None or view.exports is None
                                           or view.export(symbol) is None)
        sibling = (view is not None and symbol in view.siblings
                   and (view.exports is None or symbol not in view.exports))
    low, high = rules.module_range.low, rules.module_range.high - 1
    if shndx == SHN_UNDEF and not sibling:
        low, high = rules.kernel_range.low, rules.kernel_range.high - 1
    if shndx == SHN_ABS or index == 0 or zero:
        low = high = 0
    if pcpu is not None and rules.percpu_range is not None and shndx == pcpu:
        low, high = rules.percpu_range.low, rules.percpu_range.high - 1
    value = 0 if shndx == SHN_UNDEF else value
    bias = 0 if rules.overflow_checked[info & 0xFFFFFFFF] == "u32" else 1 << 31
    return (low + value + bias, high + value + bias)


def _check_relocations(elf: Elf, syms: Symbols, rules: ArchRules, version: Version, name: str,
                       path: str, view: KernelView | None = None) -> list[Finding]:
    """apply_relocations: every SHT_RELA/SHT_REL section whose target section is SHF_ALLOC.

    A small table is first decided in pure Python (`_clean_small`): most modules have no
    finding, and numpy costs more than such a check. Otherwise all applied RELA sections of the
    file are concatenated and classified in one vectorised pass; findings keep the loader's
    order (section index, then entry, after arm64's branch partition), so the first one is the
    line the kernel prints. Relocations write live memory in that order: a field an earlier
    relocation wrote is nonzero for a later one (x86).
    """
    groups: dict[tuple, Finding] = {}

    def add(key: tuple, offset: int, make) -> None:
        if key in groups:
            groups[key].count += 1
        elif len(groups) < MAX_FINDINGS:
            groups[key] = make(offset)

    parts: list[bytes] = []
    owners: list[int] = []
    sections = elf.sections
    for rsec, rel in enumerate(sections):
        if rel.type not in (SHT_RELA, SHT_REL) or rel.flags & SHF_RELA_LIVEPATCH:
            continue
        target = rel.info
        if target >= len(sections) or not sections[target].flags & SHF_ALLOC:
            continue
        if elf.names[target] in (".modinfo", "__versions"):  # the loader clears their SHF_ALLOC
            continue
        if rel.type == SHT_REL:
            if rel.size:
                add(("rel", rsec), 0, lambda off, rsec=rsec: _finding(
                    path, "relocation", "rel-section", version,
                    "the loader only applies RELA sections on this architecture: emit RELA "
                    "relocations (the default for x86_64/aarch64/riscv64 toolchains)",
                    name=name, section=elf.names[rsec], offset=off))
            continue
        count = rel.size // RELA64_SIZE
        if count:
            if rel.offset + count * RELA64_SIZE > len(elf.data):
                raise RustkoError(f"{path}: section {elf.names[rsec]!r} extends past the end of "
                                  "the file (truncated or corrupt)")
            parts.append(elf.data[rel.offset:rel.offset + count * RELA64_SIZE])
            owners.append(rsec)
    if not parts or (_pure_pass(sum(map(len, parts)) // RELA64_SIZE)
                     and _clean_small(elf, syms, rules, version, parts, owners, view)):
        return list(groups.values())
    import numpy as np

    from .elf import RELA64

    shdrs = elf.shdrs
    lut, widths = _tables(rules.arch, version)
    overflow_first = rules.overflow_first_since is not None and version >= rules.overflow_first_since
    nsyms = len(syms.table)
    zero = _weak_zero(syms, view)
    sibling = _sibling_resolved(syms, view)
    # Within one entry, the order x86's __write_relocate_add meets its checks.
    label_rank = {"unknown": 0, "outside": 1, "overflow": 2 if overflow_first else 4,
                  "nonzero": 3, "overwritten": 3}
    rows = np.frombuffer(b"".join(parts), dtype=RELA64)
    counts = np.array([len(p) // RELA64.itemsize for p in parts])
    rsecs = np.repeat(np.array(owners), counts)
    firsts = np.repeat(np.cumsum(counts) - counts, counts)
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
        problems.append(_overwritten(rows, targets, width, readable & ~nonzero, rtype, symidx, zero,
                                     rules))
        labels.append("overwritten")
        problems.append(_overflows(rows, rtype, symidx, syms, rules, elf.find(".data..percpu"), ok,
                                   zero, sibling))
        labels.append("overflow")
    range_notes: dict[int, str] = {}
    if rules.range_checks:
        from . import arm64ranges  # arm64 only: its tables are not built for other modules

        picked, range_notes = arm64ranges.overflowing(rows, rtype, symidx, syms.table, shdrs, elf.names,
                                                      targets, zero, ok, rules, version)
        problems.append(picked)
        labels.append("overflow")
    found = sorted(((int(i), label) for idx, label in zip(problems, labels) for i in idx.tolist()),
                   key=lambda item: (item[0], label_rank[item[1]]))
    if rules.branch_partition and found:
        rank = _partitioned_rank(rsecs, rtype, symidx, syms, shdrs, rules, [i for i, _ in found])
        found.sort(key=lambda item: (int(rank[item[0]]), label_rank[item[1]]))
    note = _mem_note(rows, rtype, symidx, syms, rules, elf.find(".data..percpu"), zero, sibling,
                     [i for i, kind in found if kind == "overflow"])
    for i, kind in found:
        t, s, off = int(rtype[i]), int(symidx[i]), int(rows["offset"][i])
        tname = elf.names[int(targets[i])]
        symbol = syms.name(s) if s else ""
        if s and int(syms.table["info"][s]) & 0xF == STT_SECTION:
            shndx = int(syms.table["shndx"][s])
            symbol = elf.names[shndx] if shndx < len(elf.names) else symbol
        where = (int(rsecs[i]), i - int(firsts[i]))
        add((kind, tname, t, symbol), off, lambda off, t=t, s=s, kind=kind, symbol=symbol, i=i,
            tname=tname, where=where: _reloc_finding(
                path, name, rules, version, kind, tname, off, t, symbol,
                _exact_value(syms, s, int(rows["addend"][i]), bool(zero[s])), where,
                range_notes.get(i, note)))
    return list(groups.values())


def _mem_note(rows: np.ndarray, rtype: np.ndarray, symidx: np.ndarray, syms: Symbols, rules: ArchRules,
              pcpu: int | None, zero: np.ndarray, sibling: np.ndarray, overflowing: list[int]) -> str:
    """UML: the note of the module's overflow findings, with the smallest mem= that surely refuses it.

    A module-local symbol lands at or above MODULES_VADDR = mem_base + mem= + mem_gap (its section
    offset on top), so the row whose S+A is highest at mem=0 overflows first as mem= grows. Below
    that mem=, earlier vmalloc users and the module's own layout decide: the note says so.
    """
    import numpy as np

    if rules.mem_base is None or not overflowing:
        return rules.overflow_note
    sel = np.array(overflowing, dtype=np.int64)
    shndx = syms.table["shndx"][symidx[sel]].astype(np.int64)
    local = (shndx != SHN_UNDEF) & (shndx != SHN_ABS) & (shndx != SHN_COMMON) & (symidx[sel] != 0)
    local &= ~zero[symidx[sel]] & ~sibling[symidx[sel]]
    if pcpu is not None:
        local &= shndx != pcpu
    if not local.any():
        return rules.overflow_note
    sel = sel[local]
    offset = syms.table["value"][symidx[sel]].astype(np.int64) + rows["addend"][sel].astype(np.int64)
    limit = np.where(np.array([rules.overflow_checked[int(t)] == "u32" for t in rtype[sel]]), 1 << 32, 1 << 31)
    mem = int((limit - offset).min()) - rules.mem_base - rules.mem_gap
    mib = max(0, -(-mem // (1 << 20)))
    return (f"where a UML module lands depends on the UML kernel's memory size (mem=): module memory starts at "
            f"{rules.mem_base:#x} + mem= + {rules.mem_gap >> 20} MiB (arch/um/kernel/um_arch.c linux_main, "
            f"arch/um/include/asm/pgtable.h VMALLOC_START), so this module is refused with mem={mib}M or "
            f"more; with less it loads only if its sections and earlier vmalloc users stay below "
            f"{'4' if int(limit.min()) == 1 << 32 else '2'} GiB. A host that randomizes UML's brk adds "
            f"that gap to mem= (um_arch.c's exec-shield gap; about 0.9 GiB on a 6.18 host): run "
            f"UML under `setarch -R`")


def _partitioned_rank(rsecs: np.ndarray, rtype: np.ndarray, symidx: np.ndarray, syms: Symbols,
                      shdrs: np.ndarray, rules: ArchRules, wanted: list[int]) -> np.ndarray:
    """Each entry's place in the order the loader applies them (`rules.branch_partition`).

    The kernel walks each executable section's table with two indices, swapping every entry
    that is not a partitioned branch at the front with the last partitioned branch at the back:
    the leftmost such entry lands in the rightmost branch's slot. Only sections with findings
    are reordered (the only ones whose order can show).
    """
    import numpy as np

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


def _exact_value(syms: Symbols, index: int, addend: int, zero: bool) -> int | None:
    """S+A when the checker can know it (absolute symbols, weak ones left at 0), else None."""
    if zero:
        return addend & 0xFFFFFFFFFFFFFFFF
    if int(syms.table["shndx"][index]) == SHN_ABS or index == 0:
        return (int(syms.table["value"][index]) + addend) & 0xFFFFFFFFFFFFFFFF
    return None


def _overwritten(rows: np.ndarray, targets: np.ndarray, width: np.ndarray, clean: np.ndarray,
                 rtype: np.ndarray, symidx: np.ndarray, zero: np.ndarray,
                 rules: ArchRules) -> np.ndarray:
    """Rows whose field an earlier relocation of the same load already wrote (x86 checks the
    bytes as they are in live memory, kernel/module/main.c apply_relocations runs sections in
    index order, each table in entry order). A write of a value known to be 0 (an absolute
    relocation against a weak symbol left at 0, addend 0) leaves the field zero."""
    import numpy as np

    live = np.flatnonzero(width > 0)
    if len(live) < 2:
        return live[:0]
    order = live[np.lexsort((live, rows["offset"][live], targets[live]))]
    same = targets[order][1:] == targets[order][:-1]
    prev_end = rows["offset"][order][:-1] + width[order][:-1].astype(np.uint64)
    overlap = same & (rows["offset"][order][1:] < prev_end)
    pairs = np.flatnonzero(overlap)
    if not len(pairs):
        return live[:0]
    first, second = order[pairs], order[pairs + 1]
    earlier, later = np.minimum(first, second), np.maximum(first, second)
    wrote_zero = (zero[symidx[earlier]] & (rows["addend"][earlier] == 0)
                  & ~np.isin(rtype[earlier], list(rules.pc_relative)))
    hit = later[~wrote_zero]
    return np.unique(hit[clean[hit]])


def _overflows(rows: np.ndarray, rtype: np.ndarray, symidx: np.ndarray, syms: Symbols,
               rules: ArchRules, pcpu: int | None, ok: np.ndarray, zero: np.ndarray,
               sibling: np.ndarray) -> np.ndarray:
    """Rows whose S+A cannot fit the 32-bit field wherever the loader places the module.

    S is bounded by where it will live: module-local symbols in [MODULES_VADDR, MODULES_END);
    per-CPU module symbols (x86_64 SMP: zero-based per-CPU offsets) below 2 GiB; absolute symbols
    exactly; undefined symbols are kernel exports in the kernel image, which on x86_64 is linked
    at 0xffffffff80000000 and up: inside the sign-extended range (32S fits, as every -mcmodel=kernel
    module relies on) and never inside the zero-extended one (32 overflows). Per-CPU *exports*
    reached through R_X86_64_32 would be a false positive; -mcmodel=kernel code uses 32S for them.
    Undefined weak symbols nobody exports are 0 (kernel/module/main.c simplify_symbols); symbols
    a module checked together exports live in the module range.
    """
    import numpy as np

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
    undef = (shndx == SHN_UNDEF) & ~sibling[symidx[sel]]
    low[undef], high[undef] = rules.kernel_range.low, rules.kernel_range.high - 1
    absolute = (shndx == SHN_ABS) | (symidx[sel] == 0) | zero[symidx[sel]]
    low[absolute] = high[absolute] = 0
    if pcpu is not None and rules.percpu_range is not None:
        percpu = shndx == pcpu
        low[percpu], high[percpu] = rules.percpu_range.low, rules.percpu_range.high - 1
    value = np.where(shndx == SHN_UNDEF, 0, value).astype(np.uint64)
    with np.errstate(over="ignore"):
        lo, hi = low + value + addend, high + value + addend
    bad = np.zeros(len(sel), dtype=bool)
    for t, kind in rules.overflow_checked.items():
        mine = rtype[sel] == t
        bad |= mine & ~(_fits(lo, kind) & _fits(hi, kind))
    return sel[bad]


def _reloc_finding(path: str, name: str, rules: ArchRules, version: Version, kind: str,
                   section: str, offset: int, rtype: int, symbol: str, exact: int | None,
                   where: tuple[int, int], note: str = "") -> Finding:
    rname = rules.name(rtype)
    val = f"{exact:x}" if exact is not None and rtype not in rules.pc_relative else "<val>"
    fields = {"name": name, "type": rtype, "val": val, "loc": "<loc>", "sec": where[0],
              "idx": where[1]}
    common = {"symbol": symbol, "section": section, "offset": offset, "reloc_type": rtype,
              "reloc_name": rname, "errno": RULES["relocation"].errno}
    if kind == "unknown":
        return Finding(path, "relocation", "unsupported-relocation",
                       [rules.unknown.at(version).format(**fields)], rules.hint(rtype), **common)
    if kind == "overflow":
        return Finding(path, "relocation", "overflow",
                       rules.overflow.at(version).format(**fields).split("\n"),
                       rules.overflow_hint, explanation=note or rules.overflow_note, **common)
    if kind == "overwritten":
        return Finding(path, "relocation", "nonzero-target", [rules.nonzero.at(version).format(**fields)],
                       "two relocations write the same bytes: the loader applies them to live "
                       "memory in order, so the second finds the first one's value there; each "
                       "field may be relocated once", **common)
    if kind == "nonzero":
        return Finding(path, "relocation", "nonzero-target", [rules.nonzero.at(version).format(**fields)],
                       "the relocated field must hold zero in the object (RELA keeps the addend in "
                       "the entry): do not pre-fill it, e.g. no REL-style addends from a custom "
                       "linker step", **common)
    return Finding(path, "relocation", "outside-section", [],
                   f"the relocation writes past the end of {section}: the object is corrupt",
                   **common)


# --- architecture -----------------------------------------------------------------------------
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



# --- putting it together ----------------------------------------------------------------------
def _order(finding: Finding) -> int:
    rule = RULES.get(finding.kind)
    return rule.order if rule is not None else loader.RELOCATION_ORDER


def check_elf(elf: Elf, kernel: KernelView | None = None, arch: str | None = None,
              version: Version | None = None, locate: bool = True) -> list[Finding]:
    """Every reason the loader would refuse (or taint on) the decoded module, in its order.

    Pure: reads nothing but `elf` and `kernel`."""
    path = elf.path
    rules = _rules(arch or (kernel.arch if kernel else None), elf.machine, path)
    version = version or (kernel.version if kernel else relocs.LATEST)
    syms = elf.symbols()
    modinfo = elf.modinfo()
    name = _module_name(modinfo, path)
    findings: list[Finding] = []
    is_module = elf.find(".gnu.linkonce.this_module") is not None or bool(modinfo)
    if is_module:
        findings += _check_signature(elf, name, version, path)
    versions = elf.versions() if is_module and kernel is not None else None
    if kernel is not None and is_module:
        findings += _check_this_module(elf, name, kernel, version, path)
        findings += _check_module_layout(versions, name, kernel, version, path)
        findings += _check_vermagic(elf, modinfo, name, kernel, version, path)
    if is_module:
        findings += _check_license(modinfo, name, version, path)
        view = kernel or KernelView(rules.arch, version)
        findings += _check_module_area(elf, name, rules.arch, view, version, path)
        findings += _check_percpu(elf, name, view, version, path)
        findings += _check_imports(modinfo, name, version, path)
        findings += _check_symbols(elf, syms, modinfo, versions, name, view, version, path)
    findings += _check_relocations(elf, syms, rules, version, name, path, kernel)
    if kernel is not None and is_module:
        findings += _check_exports(elf, syms, name, kernel, version, path)
    findings.sort(key=_order)
    if locate and findings:
        from .locate import locate_findings
        locate_findings(elf, syms, findings)
    return findings


def check_bytes(data: bytes, path: str, kernel: KernelView | None = None, arch: str | None = None,
                version: Version | None = None, locate: bool = True) -> list[Finding]:
    """Check one module image already in memory; see `check_elf`."""
    return check_elf(Elf(data, path), kernel, arch, version, locate)


def check_module(path: str | Path, kernel: "KernelInfo | KernelView | None" = None,
                 arch: str | None = None, version: tuple[int, ...] | None = None,
                 locate: bool = True) -> list[Finding]:
    """Every reason the target kernel would refuse the module at PATH (empty: loadable).

    `kernel` is a `rustko.kernel.KernelInfo` (or a KernelView); without it only relocations and
    what the module says of itself are checked, for `arch` (default: from e_machine and, for an
    x86-64 module made for the installed UML kernel, "um") and `version` (default: the latest
    rules). `locate=False` leaves the findings' source lines to `locate_module`. Raises
    RustkoError for unreadable or malformed input.
    """
    p = Path(path)
    return _check_read(Elf(read_module_bytes(p), str(p)), _as_view(kernel), arch, version, locate)


def _check_read(elf: Elf, view: KernelView | None, arch: str | None, version: Version | None,
                locate: bool) -> list[Finding]:
    """`check_module` once the file is read."""
    if arch is None and view is None:
        arch = _uml_by_release(elf)
    findings = check_elf(elf, view, arch, version, locate)
    for f in findings:
        f.source = _local_source(Path(elf.path), f.source)
    return findings


def locate_module(path: str, findings: list[Finding]) -> list[Finding]:
    """The source lines of `findings` made by `check_module(path, ..., locate=False)`: a run of
    many modules locates only the findings that stay after the siblings resolved theirs (the
    DWARF reader and numpy cost more than checking a module)."""
    if findings:
        from .locate import locate_findings

        p = Path(path)
        elf = Elf(read_module_bytes(p), path)
        locate_findings(elf, elf.symbols(), findings)
        for f in findings:
            f.source = _local_source(p, f.source)
    return findings


def _local_source(module: Path, source: str) -> str:
    """A C file Kbuild compiled with KDIR as its working folder (`make -C KDIR M=...` leaves
    KDIR/NAME.c in DWARF) shown where it is: beside the module, or in rustko's Kbuild folder
    for it (build/.rustko/NAME/kbuild, beside the unpublished build/.rustko/NAME/NAME.ko)."""
    where, sep, line = source.rpartition(":")
    if not sep or not where.startswith("/") or not where.endswith(".c") or Path(where).exists():
        return source
    name = Path(where).name
    for folder in (module.parent, module.parent / "kbuild", *sorted(module.parent.glob(".rustko/*/kbuild"))):
        if (folder / name).is_file():
            return f"{folder / name}:{line}"
    return source


def _as_view(kernel: object) -> KernelView | None:
    if kernel is None or isinstance(kernel, KernelView):
        return kernel
    return kernel_view(str(kernel.kdir))  # a rustko.kernel.KernelInfo


# --- many modules: one run is one set ---------------------------------------------------------
Job = tuple[str, "str | None", "str | None", "Version | None", tuple[str, ...]]


@lru_cache(maxsize=4)
def _view(kdir: str, extra: tuple[str, ...]) -> KernelView:
    view = kernel_view(kdir)
    return view.with_siblings(read_extra_symbols(list(extra))) if extra else view


# The exports of the modules this process has read in `_check_one` (or why they could not be
# read), for `_exports_of`: a run checked in-process reads no file twice. Emptied per run.
_EXPORTS_SEEN: dict[str, "dict[str, Export] | RustkoError"] = {}


def _check_one(job: Job) -> tuple[str, list[Finding] | str]:
    path, kdir, arch, version, extra = job
    try:
        elf = Elf(read_module_bytes(Path(path)), path)
    except RustkoError as err:
        return path, str(err)
    if kdir:
        try:
            _EXPORTS_SEEN[path] = _own_exports(elf)
        except RustkoError as err:
            _EXPORTS_SEEN[path] = err
    try:
        return path, _check_read(elf, _view(kdir, extra) if kdir else None, arch, version, False)
    except RustkoError as err:
        return path, str(err)


def _own_exports(elf: Elf) -> dict[str, Export]:
    name = _module_name(elf.modinfo(), elf.path)
    return {e.name: Export(e.crc, name, e.gpl_only, e.namespace)
            for e in elf.exports(elf.symbols())}


def _exports_of(path: str) -> tuple[str, dict[str, Export]]:
    """The exports of one module, owned by its name (as Module.symvers would list them)."""
    seen = _EXPORTS_SEEN.pop(path, None)
    if isinstance(seen, RustkoError):
        raise seen
    if seen is not None:
        return path, seen
    try:
        elf = Elf(read_module_bytes(Path(path)), path)
    except RustkoError:
        return path, {}
    return path, _own_exports(elf)


# Module bytes one worker process must have to check before starting it pays: forking and
# collecting results cost about as much as checking this much in-process (measured: 92 DKMS
# modules, 6.9 MB, took 0.26 s in-process and 0.58 s on two workers).
BYTES_PER_WORKER = 32 << 20


def _workers(files: list[str], jobs: int | None) -> int:
    """Processes for checking `files`: one (in-process) unless there is enough to share; numpy
    imported first (once, before any worker starts) when the relocations to check are many."""
    total = 0
    for path in files:
        try:
            total += os.stat(path).st_size
        except OSError:
            pass
    if total > PURE_BYTES:
        import numpy  # noqa: F401 - `_pure_pass` sees it
    if jobs is not None:
        return max(1, jobs)
    return max(1, min(os.cpu_count() or 1, total // BYTES_PER_WORKER))


def _pool_map(function, work: list, workers: int) -> list:
    if workers <= 1:
        return [function(w) for w in work]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(function, work, chunksize=max(1, len(work) // (workers * 8))))


def check_paths(paths: Iterable[str | Path], kdir: str | None = None, arch: str | None = None,
                version: Version | None = None, jobs: int | None = None,
                extra_symbols: Iterable[str] = ()) -> list[tuple[str, list[Finding] | str]]:
    """Check every module under PATHS, in parallel for many files; errors stay per file.

    The modules of one run are one set, as one `M=` build is for modpost: a symbol one of them
    exports resolves another's (the kernel loads it once the exporter is loaded, as modprobe
    does), and `extra_symbols` (Module.symvers files, as KBUILD_EXTRA_SYMBOLS) add more."""
    files: list[str] = []
    missing: list[tuple[str, list[Finding] | str]] = []
    for raw in paths:
        try:
            files += [str(p) for p in iter_modules([raw])]
        except RustkoError as err:
            missing.append((str(raw), str(err)))
    extra = tuple(str(Path(p)) for p in extra_symbols)
    if extra and not kdir:
        raise RustkoError("--extra-symbols needs --kdir", "symbols are only checked against a KDIR")
    if kdir:
        _view(kdir, extra)  # fail early, once, on a bad KDIR or symbols file
    workers = _workers(files, jobs)
    _EXPORTS_SEEN.clear()
    results = _pool_map(_check_one, [(f, kdir, arch, version, extra) for f in files], workers)
    if kdir and len(files) > 1 and any(_unresolved(r) for _, r in results):
        results = _resolve_siblings(results, files, kdir, arch, version, extra, workers)
    return missing + [(p, r if isinstance(r, str) else _locate_or_error(p, r)) for p, r in results]


def _locate_or_error(path: str, findings: list[Finding]) -> list[Finding] | str:
    try:
        return locate_module(path, findings)
    except RustkoError as err:  # the file changed between the check and now
        return str(err)


def _unresolved(result: list[Finding] | str) -> set[str]:
    if isinstance(result, str):
        return set()
    return {f.symbol for f in result if f.kind in ("unknown-symbol", "gpl-only")}


def _resolve_siblings(results: list[tuple[str, list[Finding] | str]], files: list[str], kdir: str,
                      arch: str | None, version: Version | None, extra: tuple[str, ...],
                      workers: int) -> list[tuple[str, list[Finding] | str]]:
    """Re-check the modules that need a symbol another module of the run exports."""
    exported = dict(_pool_map(_exports_of, files, workers))
    everything: dict[str, Export] = {}
    for path in files:
        for symbol, export in exported[path].items():
            everything.setdefault(symbol, export)
    out = []
    for path, result in results:
        if _unresolved(result) & set(everything):
            own = exported[path]
            siblings = {s: e for s, e in everything.items() if s not in own}
            try:
                view = _view(kdir, extra).with_siblings(siblings)
                result = check_module(path, view, arch, version, locate=False)
            except RustkoError as err:
                result = str(err)
        out.append((path, result))
    return out


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
    results = check_paths(args.paths, args.kdir, args.arch, version,
                          extra_symbols=args.extra_symbols or ())
    if not results:
        raise RustkoError(f"no modules (.ko, .o) found in {' '.join(args.paths)}")
    bad_input = [(p, r) for p, r in results if isinstance(r, str)]
    refused = [(p, r) for p, r in results if not isinstance(r, str) and is_refused(r)]
    if args.json:
        import json

        print(json.dumps(results_json(results), indent=2))
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
        description="Check kernel modules the way the kernel's module loader would. The modules "
                    "given in one run are checked as a set: their exports resolve each other's "
                    "symbols. Exit 0: all loadable; 1: at least one would be refused; 2: bad input.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help=".ko/.o file or directory")
    parser.add_argument("--kdir", help="kernel build dir / headers: enables symbol and vermagic checks")
    parser.add_argument("--extra-symbols", action="append", metavar="FILE",
                        help="a Module.symvers of other modules whose exports this one uses "
                             "(as KBUILD_EXTRA_SYMBOLS; repeatable; needs --kdir)")
    parser.add_argument("--arch", help="x86_64, arm64, um, riscv64 (default: from the ELF header)")
    parser.add_argument("--kernel-version", help="X.Y[.Z] whose loader rules apply (default: latest)")
    parser.add_argument("--json", action="store_true", help="print findings as JSON")
    parser.set_defaults(run=run)
