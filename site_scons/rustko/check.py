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
from itertools import compress
from pathlib import Path
from collections.abc import Iterable

from . import loader, relocs
from .elf import (RELA64_SIZE, SIGNATURE_INFO, SHF_ALLOC, SHF_EXECINSTR, SHF_RELA_LIVEPATCH, SHN_ABS,
                  SHN_COMMON, SHN_UNDEF, SHT_NOBITS, SHT_REL, SHT_RELA, SHT_SYMTAB, STB_GLOBAL, STB_WEAK,
                  STT_SECTION, Elf, Symbols, module_files, read_module_bytes)
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


def _check_this_module_present(elf: Elf, name: str, version: Version, path: str) -> list[Finding]:
    """The struct module modpost writes (its .mod.o linked in): without it there is no module."""
    if elf.find(".gnu.linkonce.this_module") is not None:
        return []
    kind = "this-module-count" if version >= RULES["this-module-count"].since else "no-this-module"
    return [_finding(path, "module", kind, version,
                     "the file has no .gnu.linkonce.this_module: link the module with Kbuild "
                     "(modpost's NAME.mod.o holds it), not with a bare `ld -r`", name=name)]


def _check_symtab(elf: Elf, name: str, version: Version, path: str) -> list[Finding]:
    """The symbol table the loader resolves with: none (or, since 6.12, more than one) refuses."""
    count = sum(1 for section in elf.sections if section.type == SHT_SYMTAB)
    if count == 1 or (count > 1 and version < loader.ONE_SYMTAB_SINCE):
        return []
    return [_finding(path, "module", "no-symbols", version,
                     "the module lost its symbol table (`strip`, `strip --strip-all`, `install -s` "
                     "or a packaging step): the loader needs it to resolve and relocate; strip "
                     "modules with `strip --strip-debug` only", name=name)]


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


def _check_plt_sections(elf: Elf, name: str, view: KernelView, version: Version,
                        path: str) -> list[Finding]:
    """The empty PLT sections Kbuild's module.lds.h adds, which arm64's loader fills."""
    wanted = view.plt_sections
    if wanted is None:
        wanted = loader.needs_plt_sections(view.arch, version, None)
    missing = [section for section in wanted if elf.find(section) is None]
    if not missing:
        return []
    return [_finding(path, "module", "plt-missing", version,
                     f"the module has no {' or '.join(missing)} section: link it with Kbuild (its "
                     "module.lds adds them), and do not remove sections with objcopy afterwards",
                     name=name)]


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
    # All sections together bound every allocation: one sum settles nearly every module.
    total = sum(map(operator.attrgetter("size"), elf.sections))
    if -(-total // loader.PAGE_SIZE) * loader.PAGE_SIZE <= area:
        return []
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
    infos = syms.column("info")
    # the undefined symbols (SHN_UNDEF is 0) picked at C speed, then the global and weak ones
    undefined = [i for i in compress(range(len(shndxs)), map(operator.not_, shndxs))
                 if infos[i] >> 4 in (STB_GLOBAL, STB_WEAK)]
    license = modinfo.get("license", ["unspecified"])[0]
    gpl_ok = license in GPL_COMPATIBLE
    imports = set(modinfo.get("import_ns", []))
    for index, symbol in zip(undefined, syms.names(undefined)):
        if not symbol:
            continue
        export = view.export(symbol)
        weak = infos[index] >> 4 == STB_WEAK
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


# When the pure-Python pass (`rustko.purepass`) decides a module. Measured per RELA entry, CPU
# (2026-11-26, 2-core machine at load 7.5, medians of 7 interleaved runs): on the DKMS corpus
# (89,000 entries) 0.73 microseconds against the numpy pass's 0.91, on every 20th module of
# Debian's 6.1 tree (197,000) 0.53 against 0.65, on its 12 largest modules (1 million) 0.52
# against 0.23; importing numpy costs 0.2-0.3 s. So Python up to PURE_BUDGET entries in one
# module (about 0.15 s more than numpy's marginal cost at worst, less than its import), once
# numpy is imported always numpy, and a run whose modules add up to more than PURE_BYTES (1 entry
# per 75 bytes of module in Debian's tree and in the DKMS corpus: about 450,000 entries) imports
# numpy before it starts (`_workers`), as the whole tree does.
PURE_BUDGET = 500_000
PURE_BYTES = 32 << 20


def _pure_pass(entries: int) -> bool:
    """Whether a module with `entries` RELA entries goes through `_clean_small` first."""
    return "numpy" not in sys.modules and entries <= PURE_BUDGET


def _clean_small(elf: Elf, syms: Symbols, rules: ArchRules, version: Version, parts: list[bytes],
                 owners: list[int], view: KernelView | None) -> bool:
    """`rustko.purepass.clean`: True when no entry of `parts` has a finding; False sends the
    module to the numpy pass, which makes the findings."""
    from .purepass import clean

    return clean(elf, syms, rules, version, parts, owners, view)


def _applied_tables(elf: Elf) -> tuple[list[int], list[tuple[int, int]], list[int]]:
    """What apply_relocations applies: sections SHT_RELA/SHT_REL whose target is SHF_ALLOC (and
    not .modinfo/__versions, whose SHF_ALLOC the loader clears). Returns the SHT_REL sections
    with entries (refused), and the RELA tables' (file offset, entries) with their section
    indices."""
    rels: list[int] = []
    spans: list[tuple[int, int]] = []
    owners: list[int] = []
    sections, names, data = elf.sections, elf.names, elf.data
    relocating = map({SHT_RELA, SHT_REL}.__contains__, map(operator.attrgetter("type"), sections))
    for rsec in compress(range(len(sections)), relocating):  # the rest skipped at C speed
        _, kind, flags, _, offset, size, _, target, _, _ = sections[rsec]
        if flags & SHF_RELA_LIVEPATCH:
            continue
        if target >= len(sections) or not sections[target].flags & SHF_ALLOC:
            continue
        if names[target] in (".modinfo", "__versions"):
            continue
        if kind == SHT_REL:
            if size:
                rels.append(rsec)
            continue
        count = size // RELA64_SIZE
        if count:
            if offset + count * RELA64_SIZE > len(data):
                raise RustkoError(f"{elf.path}: section {names[rsec]!r} extends past the end of "
                                  "the file (truncated or corrupt)")
            spans.append((offset, count))
            owners.append(rsec)
    return rels, spans, owners


def _check_relocations(elf: Elf, syms: Symbols, rules: ArchRules, version: Version, name: str,
                       path: str, view: KernelView | None = None,
                       screened: list[int] | None = None) -> list[Finding]:
    """apply_relocations: every SHT_RELA/SHT_REL section whose target section is SHF_ALLOC.

    A small table is first decided in pure Python (`_clean_small`): most modules have no
    finding, and numpy costs more than such a check. `screened` (the SHT_REL sections):
    `_screen` found the RELA tables clean already. Otherwise all applied RELA sections of the
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

    rels, spans, owners = _applied_tables(elf) if screened is None else (screened, [], [])
    parts = [elf.data[offset:offset + count * RELA64_SIZE] for offset, count in spans]
    for rsec in rels:
        add(("rel", rsec), 0, lambda off, rsec=rsec: _finding(
            path, "relocation", "rel-section", version,
            "the loader only applies RELA sections on this architecture: emit RELA "
            "relocations (the default for x86_64/aarch64/riscv64 toolchains)",
            name=name, section=elf.names[rsec], offset=off))
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


def _screen(elfs: list[Elf], rules: ArchRules, version: Version, view: KernelView | None
            ) -> list[list[int] | None]:
    """Per module: its SHT_REL sections (`_applied_tables`) when `_check_relocations`' numpy
    pass surely finds nothing in its RELA tables (else None), decided for many modules in one
    vectorised pass (a module column), so numpy's fixed cost per call is paid per batch, not
    per module (most of the cost in a tree of small ones).

    Never says clean where the numpy pass would find or raise something; it may say None where
    the pass finds nothing, and that module just takes the pass. So it needs no symbol names:
    an undefined symbol is checked at every place the loader may put it (a kernel export; 0
    when weak; in module memory when a sibling may export it), and any two writes to the same
    bytes count (a module's tables are in offset order, so neighbours tell; two tables for one
    section, a table off 8-byte alignment, or a target past the file's end, go to the pass).
    Architectures with range checks or branch reordering (arm64) always take the pass."""
    import numpy as np

    clean: list[list[int] | None] = [None] * len(elfs)
    if rules.range_checks or rules.branch_partition:
        return clean
    rels: list[list[int]] = [[]] * len(elfs)
    # The screened modules' bytes one after another, each padded to 8 bytes so that every
    # RELA entry is three aligned little-endian words of the whole; their symbol tables too.
    bodies: list[bytes] = []
    symtabs: list[bytes] = []
    # Per screened module: its place in `elfs`, its symbol count and first symbol in the
    # batch's symbol table, its .data..percpu (-1: none). Per RELA table: entries, first word
    # in the batch's bytes, and its target's size, start in the batch's bytes and whether it
    # is SHT_NOBITS.
    modules: list[tuple[int, int, int, int]] = []
    tables: list[tuple[int, int, int, int, bool]] = []
    counts: list[int] = []  # RELA tables per screened module
    base = symbase = 0
    for m, elf in enumerate(elfs):
        try:
            rel, spans, owners = _applied_tables(elf)
            syms = elf.symbols()
        except RustkoError:
            continue  # the pass raises it
        rels[m] = rel
        if not spans:
            clean[m] = rel
            continue
        sections = elf.sections
        targets = [sections[rsec].info for rsec in owners]
        if len(set(targets)) != len(targets) or any(offset % 8 for offset, _ in spans):
            continue
        size = len(elf.data)
        mine = [(count, (base + offset) // 8, sections[target].type, sections[target].offset,
                 sections[target].size) for (offset, count), target in zip(spans, targets)]
        if any(kind != SHT_NOBITS and start + length > size for _, _, kind, start, length in mine):
            continue
        tables += [(count, word, length, base + start, kind == SHT_NOBITS)
                   for count, word, kind, start, length in mine]
        pcpu = elf.find(".data..percpu")
        modules.append((m, len(syms), symbase, -1 if pcpu is None else pcpu))
        counts.append(len(spans))
        bodies += (elf.data, bytes(-size % 8))
        symtabs.append(syms.raw)
        base += size + -size % 8
        symbase += len(syms)
    if not tables:
        return clean
    place, nsyms, first_sym, pcpu = map(np.array, zip(*modules))
    count, first_word, sec_size, sec_start, nobits = map(np.array, zip(*tables))
    words = np.frombuffer(b"".join([*bodies, bytes(8)]), dtype="<u8")  # one word past the end
    owner = np.repeat(np.arange(len(modules)), counts)  # per table
    mod, part = np.repeat(owner, count), np.repeat(np.arange(len(tables)), count)
    at = np.repeat(first_word - 3 * (np.cumsum(count) - count), count) + 3 * np.arange(len(mod))
    offset, info = words[at], words[at + 1].view("<u4")
    rtype, symidx = info[::2], info[1::2]
    lut, widths = _tables(rules.arch, version)
    clipped = np.minimum(rtype, len(lut) - 1)
    bad = ~lut[clipped] | (symidx >= np.repeat(nsyms[owner], count))
    if rules.sizes:
        width = widths.astype(np.uint64)[clipped]
        end = offset + width
        live = width > 0
        bad |= live & ((end > np.repeat(sec_size.astype(np.uint64), count)) | (end < offset))
        # Inside its section, which is inside the file: a field's place in the batch's bytes.
        sel = np.flatnonzero(live & ~np.repeat(nobits, count) & ~bad)
        start = np.repeat(sec_start, count)[sel] + offset[sel].view(np.int64)
        # A field's 8 bytes from its start, made of the two aligned words it straddles, its
        # width's bytes masked: nonzero when any of them is.
        shift = (start % 8 * 8).astype(np.uint64)
        field = ((words[start // 8] >> shift)
                 | ((words[start // 8 + 1] << np.uint64(1)) << (np.uint64(63) - shift)))
        masks = np.array([(1 << 8 * k) - 1 for k in range(9)], dtype=np.uint64)
        bad[sel[(field & masks[width[sel]]) != 0]] = True
        at_live = np.flatnonzero(live)
        overlap = ((part[at_live][1:] == part[at_live][:-1])
                   & (offset[at_live][1:] < end[at_live][:-1]))
        bad[at_live[1:][overlap]] = True
        if rules.overflow_checked and rules.module_range and rules.kernel_range:
            symbols = np.frombuffer(b"".join(symtabs), dtype="<u8")
            bad[_maybe_overflowing(words, at, clipped, symidx, mod, bad, first_sym, pcpu, symbols,
                                   rules, view is not None and bool(view.siblings))] = True
    dirty = np.zeros(len(modules), dtype=bool)
    dirty[mod[bad]] = True
    for m in place[~dirty].tolist():
        clean[m] = rels[m]
    return clean


def _maybe_overflowing(words: np.ndarray, at: np.ndarray, rtype: np.ndarray, symidx: np.ndarray,
                       mod: np.ndarray, bad: np.ndarray, first_sym: np.ndarray, pcpu: np.ndarray,
                       symbols: np.ndarray, rules: ArchRules, siblings: bool) -> np.ndarray:
    """`_screen`'s `_overflows`: the rows (not yet bad) whose S+A may not fit, S at each place
    the loader may put the symbol. A field fits when (S + A + bias) mod 2**64 < 2**32, bias 0
    zero-extended and 2**31 sign-extended (as `_overflow_bases`). Row i's entry is words
    at[i]..at[i]+2; `symbols`: the Elf64_Sym records as words (name, info, other and shndx in
    the first; value in the second)."""
    import numpy as np

    bias = np.full(int(rtype.max()) + 1, -1, dtype=np.int64)  # rtype: clipped to the type table
    for t, kind in rules.overflow_checked.items():
        if t < len(bias):
            bias[t] = 0 if kind == "u32" else 1 << 31
    sel = np.flatnonzero(~bad & (bias[rtype] >= 0))
    if not len(sel):
        return sel
    record = 3 * (first_sym[mod[sel]] + symidx[sel])
    head, value = symbols[record], symbols[record + 1]
    shndx = (head >> np.uint64(48)).astype(np.int64)
    weak = ((head >> np.uint64(36)) & np.uint64(0xF)) == STB_WEAK
    undef = shndx == SHN_UNDEF
    absolute = (shndx == SHN_ABS) | (symidx[sel] == 0)
    kernel = undef & ~absolute
    percpu = shndx == pcpu[mod[sel]]
    with np.errstate(over="ignore"):
        base = (np.where(undef, np.uint64(0), value) + words[at[sel] + 2]
                + bias[rtype[sel]].astype(np.uint64))
        places = [(rules.kernel_range, kernel)]
        if rules.percpu_range is not None:
            places += [(rules.module_range, ~undef & ~absolute & ~percpu),
                       (rules.percpu_range, percpu)]
        else:
            places.append((rules.module_range, ~undef & ~absolute))
        if siblings:
            places.append((rules.module_range, kernel))
        limit = np.uint64(1 << 32)
        over = (absolute | kernel & weak) & (base >= limit)
        for where, mine in places:
            over |= mine & ((np.uint64(where.low) + base >= limit)
                            | (np.uint64(where.high - 1) + base >= limit))
    return sel[over]


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
              version: Version | None = None, locate: bool = True,
              screened: list[int] | None = None) -> list[Finding]:
    """Every reason the loader would refuse (or taint on) the decoded module, in its order.
    `screened` (its SHT_REL sections): `_screen` found its RELA tables clean.

    Pure: reads nothing but `elf` and `kernel`."""
    path = elf.path
    rules, version = _target(elf, kernel, arch, version)
    syms = elf.symbols()
    modinfo = elf.modinfo()
    name = _module_name(modinfo, path)
    findings: list[Finding] = []
    is_module = elf.find(".gnu.linkonce.this_module") is not None or bool(modinfo)
    if is_module:
        findings += _check_signature(elf, name, version, path)
        findings += _check_symtab(elf, name, version, path)
        findings += _check_this_module_present(elf, name, version, path)
    versions = elf.versions() if is_module and kernel is not None else None
    if kernel is not None and is_module:
        findings += _check_this_module(elf, name, kernel, version, path)
        findings += _check_module_layout(versions, name, kernel, version, path)
        findings += _check_vermagic(elf, modinfo, name, kernel, version, path)
    if is_module:
        findings += _check_license(modinfo, name, version, path)
        view = kernel or KernelView(rules.arch, version)
        findings += _check_plt_sections(elf, name, view, version, path)
        findings += _check_module_area(elf, name, rules.arch, view, version, path)
        findings += _check_percpu(elf, name, view, version, path)
        findings += _check_imports(modinfo, name, version, path)
        findings += _check_symbols(elf, syms, modinfo, versions, name, view, version, path)
    findings += _check_relocations(elf, syms, rules, version, name, path, kernel, screened)
    if kernel is not None and is_module:
        findings += _check_exports(elf, syms, name, kernel, version, path)
    findings.sort(key=_order)
    if locate and findings:
        from .locate import locate_findings
        locate_findings(elf, syms, findings)
    return findings


def _target(elf: Elf, kernel: KernelView | None, arch: str | None, version: Version | None
            ) -> tuple[ArchRules, Version]:
    """The loader rules and kernel version `check_elf` applies to the module."""
    return (_rules(arch or (kernel.arch if kernel else None), elf.machine, elf.path),
            version or (kernel.version if kernel else relocs.LATEST))


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
                locate: bool, screened: list[int] | None = None) -> list[Finding]:
    """`check_module` once the file is read."""
    findings = check_elf(elf, view, _arch(elf, view, arch), version, locate, screened)
    module = None  # made for the first located finding (most have no source line)
    for f in findings:
        if f.source:
            module = module or Path(elf.path)
            f.source = _local_source(module, f.source)
    return findings


def _arch(elf: Elf, view: KernelView | None, arch: str | None) -> str | None:
    """The architecture asked for; without one or a KDIR, "um" for a module of the installed UML
    kernel's release (else e_machine decides)."""
    return _uml_by_release(elf) if arch is None and view is None else arch


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
# A run of modules checked together in one process: paths, the view of KDIR (None: no KDIR, so no
# symbols checked) with the run's sibling exports, arch, version.
Batch = tuple[list[str], "KernelView | None", "str | None", "Version | None"]


@lru_cache(maxsize=4)
def _view(kdir: str, extra: tuple[str, ...]) -> KernelView:
    view = kernel_view(kdir)
    return view.with_siblings(read_extra_symbols(list(extra))) if extra else view


# The modules this process read for their exports (`_exports_of`) and checks next: a run
# checked in-process reads each file once. Emptied per run.
_READ: dict[str, "Elf | str"] = {}


def _read_elf(path: str) -> Elf | str:
    """The module at `path` (kept from `_exports_of` or read now), or why it cannot be read."""
    kept = _READ.pop(path, None)
    if kept is not None:
        return kept
    try:
        return Elf(read_module_bytes(path), path)
    except RustkoError as err:
        return str(err)


def _check_batch(batch: Batch) -> list[tuple[str, list[Finding] | str]]:
    """Check a run of modules: read them, screen their RELA tables together (`_screened`),
    then check each in full; errors stay per file."""
    paths, view, arch, version = batch
    read = [_read_elf(path) for path in paths]
    elfs = [elf for elf in read if isinstance(elf, Elf)]
    screened = dict(zip(map(id, elfs), _screened(elfs, view, arch, version)))
    out: list[tuple[str, list[Finding] | str]] = []
    for path, elf in zip(paths, read):
        if isinstance(elf, str):
            out.append((path, elf))
            continue
        try:
            out.append((path, _check_read(elf, view, arch, version, False, screened[id(elf)])))
        except RustkoError as err:
            out.append((path, str(err)))
    return out


def _screened(elfs: list[Elf], view: KernelView | None, arch: str | None,
              version: Version | None) -> list[list[int] | None]:
    """`_screen`'s verdict per module, the modules grouped by the rules they are checked with.
    Only once numpy is imported (a big run, `_workers`): before, the pure-Python pass decides
    a clean module for less than numpy's import."""
    out: list[list[int] | None] = [None] * len(elfs)
    if "numpy" not in sys.modules:
        return out
    groups: dict[tuple[str, Version], tuple[ArchRules, list[int]]] = {}
    for i, elf in enumerate(elfs):
        try:
            rules, wanted = _target(elf, view, _arch(elf, view, arch), version)
        except RustkoError:
            continue  # the check raises it
        groups.setdefault((rules.arch, wanted), (rules, []))[1].append(i)
    for (_, wanted), (rules, members) in groups.items():
        for i, clean in zip(members, _screen([elfs[i] for i in members], rules, wanted, view)):
            out[i] = clean
    return out


def _exports_of(work: tuple[str, bool]) -> dict[str, Export]:
    """The exports of one module (path, and whether this process checks it next and so keeps
    what it read), owned by its name as Module.symvers would list them. A module that cannot
    be read or whose export tables are broken exports nothing: its own check says why."""
    path, keep = work
    elf = _read_elf(path)
    if keep:
        _READ[path] = elf
    if isinstance(elf, str):
        return {}
    try:
        name = _module_name(elf.modinfo(), elf.path)
        return {e.name: Export(e.crc, name, e.gpl_only, e.namespace)
                for e in elf.exports(elf.symbols())}
    except RustkoError:
        return {}


def _run_exports(files: list[str], workers: int) -> dict[str, Export]:
    """Every export of a run's modules, the first module's where two export one name: the
    siblings each module of the run may resolve its symbols against."""
    everything: dict[str, Export] = {}
    for own in _pool_map(_exports_of, [(path, workers == 1) for path in files], workers):
        for symbol, export in own.items():
            everything.setdefault(symbol, export)
    return everything


# Module bytes one worker process must have to check before starting it pays: forking and
# collecting results cost about as much as checking this much in-process (measured: 92 DKMS
# modules, 6.9 MB, took 0.26 s in-process and 0.58 s on two workers).
BYTES_PER_WORKER = 32 << 20
# Module bytes per `_check_batch`: enough that `_screen`'s fixed numpy cost (about 0.5 ms) is
# small beside the modules' check, few enough that workers share the end of a run evenly.
BATCH_BYTES = 4 << 20


def _sizes(files: list[str]) -> list[int]:
    sizes = []
    for path in files:
        try:
            sizes.append(os.stat(path).st_size)
        except OSError:
            sizes.append(0)  # reading it makes the error
    return sizes


def _workers(total: int, jobs: int | None) -> int:
    """Processes for checking `total` bytes of modules: one (in-process) unless there is enough
    to share; numpy imported first (once, before any worker starts) when the relocations to
    check are many."""
    if total > PURE_BYTES:
        import numpy  # noqa: F401 - `_pure_pass` and `_screened` see it
    if jobs is not None:
        return max(1, jobs)
    return max(1, min(os.cpu_count() or 1, total // BYTES_PER_WORKER))


def _batches(files: list[str], sizes: list[int]) -> list[tuple[int, list[str]]]:
    """`files` in runs of about BATCH_BYTES (bytes, paths), in their order."""
    batches: list[tuple[int, list[str]]] = []
    paths: list[str] = []
    filled = 0
    for path, size in zip(files, sizes):
        if paths and filled + size > BATCH_BYTES:
            batches.append((filled, paths))
            paths, filled = [], 0
        paths.append(path)
        filled += size
    if paths:
        batches.append((filled, paths))
    return batches


def _pool_map(function, work: list, workers: int) -> list:
    """`[function(w) for w in work]` over `workers` forked processes, each taking the next item
    when it is free (the items' numbers wait in one pipe, 4 bytes each: a read that small is
    atomic) and sending its results back pickled at the end. Forking directly spares
    concurrent.futures' imports and pool (about 0.1 s of a big run's start-up). The first
    exception a worker raised is raised here."""
    if workers <= 1 or len(work) <= 1:
        return [function(w) for w in work]
    import pickle

    tasks, feed = os.pipe()
    children: list[tuple[int, int]] = []
    for _ in range(min(workers, len(work))):
        back, send = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: never returns, whatever happens (a parent gone after Ctrl-C)
            try:
                os.close(feed)
                os.close(back)
                try:
                    done = []
                    while item := os.read(tasks, 4):
                        index = int.from_bytes(item, "little")
                        done.append((index, function(work[index])))
                    payload = pickle.dumps((None, done))
                except BaseException as err:  # raised in the parent
                    try:
                        payload = pickle.dumps((err, []))
                    except Exception:
                        payload = pickle.dumps((RuntimeError(repr(err)), []))
                with os.fdopen(send, "wb") as out:
                    out.write(payload)
            finally:
                os._exit(0)
        os.close(send)
        children.append((pid, back))
    os.close(tasks)
    numbers = b"".join(i.to_bytes(4, "little") for i in range(len(work)))
    for start in range(0, len(numbers), 4096):  # whole numbers per atomic pipe write
        os.write(feed, numbers[start:start + 4096])
    os.close(feed)
    results: list = [None] * len(work)
    error: BaseException | None = None
    for pid, back in children:
        with os.fdopen(back, "rb") as pipe:
            payload = pipe.read()
        os.waitpid(pid, 0)
        raised, done = pickle.loads(payload) if payload else (RuntimeError("a worker died"), [])
        error = error or raised
        for index, result in done:
            results[index] = result
    if error is not None:
        raise error
    return results


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
            files += module_files(raw)
        except RustkoError as err:
            missing.append((str(raw), str(err)))
    extra = tuple(str(Path(p)) for p in extra_symbols)
    if extra and not kdir:
        raise RustkoError("--extra-symbols needs --kdir", "symbols are only checked against a KDIR")
    # A bad KDIR or symbols file fails here, once.
    view = _view(kdir, extra) if kdir else None
    sizes = _sizes(files)
    workers = _workers(sum(sizes), jobs)
    _READ.clear()
    if view is not None and len(files) > 1:
        view = view.with_siblings(_run_exports(files, workers))
    batches = _batches(files, sizes)
    # The biggest batches first (one large module is a batch of its own), so that no worker
    # is left alone with one at the end; the results go back in the files' order.
    order = sorted(range(len(batches)), key=lambda i: -batches[i][0])
    try:
        done = _pool_map(_check_batch, [(batches[i][1], view, arch, version) for i in order],
                         workers)
    finally:
        _READ.clear()
    by_batch = dict(zip(order, done))
    results = [result for i in range(len(batches)) for result in by_batch[i]]
    return missing + [(p, r if isinstance(r, str) else _locate_or_error(p, r)) for p, r in results]


def _locate_or_error(path: str, findings: list[Finding]) -> list[Finding] | str:
    try:
        return locate_module(path, findings)
    except RustkoError as err:  # the file changed between the check and now
        return str(err)


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
