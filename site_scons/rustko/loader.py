"""What the module loader checks besides relocations, as data, with the kernel source it came from.

`load_module` (kernel/module/main.c) runs its checks in a fixed order and stops at the first one
that fails; relocation types live in `rustko.relocs`. Each `Rule` names the function, the file, the
versions it holds for (read in Debian's 5.10.262, 6.1.192, 6.12.117 and 7.3.4 sources unless a
commit is cited; before the v5.19 split into kernel/module/, main.c, version.c and signing.c were
kernel/module.c and kernel/module_signing.c, with the same lines and the same order in 5.10.262) and
the lines the kernel prints. `order` is the rule's place in `load_module`, so findings sort into the
order the kernel would meet them and the first one is the line a real `insmod` leaves in the log.
`errno` is the error the loader returns to insmod (which prints its own words for it).

Message templates use `str.format` fields: `{name}` module name, `{symbol}`, `{ns}`, `{have}`,
`{want}`, `{err}`, `{size}`, `{align}`, `{license}`.
"""

from __future__ import annotations

from collections.abc import Callable

from .record import record
from .relocs import Version, Versioned

ENOENT, EINVAL = 2, 22

# include/linux/export.h EXPORT_SYMBOL_FOR_MODULES(sym, mods) (7.3.4): the export's namespace is
# "module:" + a comma-separated list of module names (a trailing `*` globs). kernel/module/main.c
# verify_module_namespace (7.3.4) lets exactly those modules use it, comparing names with `-`
# and `_` alike (mod_strncmp); setup_modinfo refuses an explicit import of such a namespace.
# Neither is in 6.12.117; upstream both came with EXPORT_SYMBOL_GPL_FOR_MODULES in v6.16 (the
# boundary is not pinned to a commit here).
MODULE_NS_PREFIX = "module:"
MODULE_NS_SINCE: Version = (6, 16)

# Module memory is allocated whole (kernel/module/main.c move_module -> module_alloc of
# core_layout.size, then init_layout.size: 6.1.192) or, since module_memory replaced
# module_layout (v6.4), one allocation per mod_mem_type (module_memory_alloc: MOD_TEXT,
# MOD_DATA, MOD_RODATA, MOD_RO_AFTER_INIT and their init twins; 6.12.117, 7.3.4).
PER_TYPE_ALLOCATION_SINCE: Version = (6, 4)
PAGE_SIZE = 4096
# The loader sums each allocation in an unsigned int (include/linux/module.h struct
# module_layout.size, kernel/module/main.c module_get_offset, 6.1.192; struct module_memory.size,
# module_get_offset_and_type, 6.12.117): from 4 GiB on the sum wraps and a smaller piece is
# allocated (seen: 4256 MiB of .bss loaded in Debian's arm64 6.1, tests/test_module_area.py),
# so the checker gives no module-area verdict there.
LAYOUT_SIZE_WRAP = 1 << 32


def _x86_64_modules_len(enabled: Callable[[str], bool]) -> int:
    """MODULES_LEN = MODULES_END - MODULES_VADDR (arch/x86/include/asm/pgtable_64_types.h,
    5.10.262, 6.1.192, 6.12.117, 7.3.4): MODULES_VADDR = __START_KERNEL_map (0xffffffff80000000)
    + KERNEL_IMAGE_SIZE (asm/page_64_types.h: 1 GiB with CONFIG_RANDOMIZE_BASE, else 512 MiB);
    MODULES_END 0xffffffffff000000, 0xfffffffffe000000 with CONFIG_DEBUG_KMAP_LOCAL_FORCE_MAP.
    Debian's x86_64 kernels (KASLR): 1008 MiB."""
    image = (1 << 30) if enabled("RANDOMIZE_BASE") else (512 << 20)
    end = 0xFFFFFFFFFE000000 if enabled("DEBUG_KMAP_LOCAL_FORCE_MAP") else 0xFFFFFFFFFF000000
    return end - (0xFFFFFFFF80000000 + image)


# arm64's module windows (arch/arm64/include/asm/memory.h MODULES_VSIZE, 5.10.262, 6.1.192;
# arch/arm64/mm/init.c module_init_limits, 6.12.117): a direct-branch window and, with module
# PLTs, a 2 GiB one. Both are placed around the kernel image (arch/arm64/kernel/kaslr.c
# kaslr_init sets module_alloc_base in [_etext - 128 MiB, _stext], or in [_end - 2 GiB, _stext]
# with CONFIG_RANDOMIZE_MODULE_REGION_FULL; module_init_limits bounds [_text, _end]), so the
# image itself takes part of either. arm64ranges.PLACEMENTS bounds relocation values by the same
# 2 GiB window.
ARM64_DIRECT_WINDOW = 128 << 20
ARM64_PLT_WINDOW = 2 << 30


def _arm64_module_window(enabled: Callable[[str], bool]) -> int:
    """The largest piece module memory can take on arm64: the window module_alloc (5.10.262,
    6.1.192: arch/arm64/kernel/module.c) or execmem (6.12.117: arch/arm64/mm/init.c
    execmem_arch_setup, fallback_start/fallback_end) finally tries, less the guard page every
    vmalloc area carries (mm/vmalloc.c __get_vm_area_node: size += PAGE_SIZE unless
    VM_NO_GUARD). An upper bound: the kernel image (tens of MiB) and other vmalloc users share
    the window, so a module somewhat smaller may still be refused; never a larger one loaded.

    6.1.192: the first try is [module_alloc_base, + MODULES_VSIZE (128 MiB)); with
    CONFIG_ARM64_MODULE_PLTS (Debian: y) a failed try is repeated in [module_alloc_base, + 2 GiB),
    except with KASAN_GENERIC/KASAN_SW_TAGS but not KASAN_VMALLOC (5.10.262: any KASAN).
    6.12.117 (kernel/module/Kconfig: MODULES selects EXECMEM; PLTs are always built): 128 MiB
    direct range with the 2 GiB PLT range as fallback, or the 2 GiB range alone."""
    kasan_static = (enabled("KASAN_GENERIC") or enabled("KASAN_SW_TAGS")) and not enabled("KASAN_VMALLOC")
    wide = enabled("EXECMEM") or (enabled("ARM64_MODULE_PLTS") and not kasan_static)
    return (ARM64_PLT_WINDOW if wide else ARM64_DIRECT_WINDOW) - PAGE_SIZE


@record
class ModuleArea:
    """Where one architecture's module memory comes from, as far as a KDIR can tell.

    `size`: the largest piece one allocation can get for a .config (None: not computable from
    the KDIR, `why` says what it depends on); `largest`: the same without a .config, the
    largest any config gives, so a refusal is only ever missed, never invented; `rule`: the
    loader rule whose lines a refusal prints; `note`: said beside the finding."""

    size: Callable[[Callable[[str], bool]], int] | None
    largest: int
    rule: str
    source: str
    note: str = ""
    why: str = ""


# Per architecture (rustko.arch names). Architectures not listed are not modelled.
MODULE_AREA: dict[str, ModuleArea] = {
    "x86_64": ModuleArea(_x86_64_modules_len, _x86_64_modules_len(lambda option: False),
                         "module-area", "arch/x86/include/asm/pgtable_64_types.h MODULES_LEN"),
    "arm64": ModuleArea(
        _arm64_module_window, ARM64_PLT_WINDOW - PAGE_SIZE, "module-area-vmalloc",
        "arch/arm64/kernel/module.c module_alloc (5.10.262, 6.1.192), arch/arm64/mm/init.c "
        "execmem_arch_setup (6.12.117)",
        note="module memory comes from a window around the kernel image (2 GiB with module "
             "PLTs, else 128 MiB) that the image and earlier modules share; before execmem "
             "(v6.10) the kernel's line goes on `exceeds total pages` when the module is larger "
             "than the machine's RAM, else `vm_struct allocation failed`"),
    # arch/um/include/asm/pgtable.h (6.1.192, 6.12.117): MODULES_VADDR = VMALLOC_START just
    # above the UML's physical memory (0x60000000 + mem= + the host's brk gap, see relocs.UM),
    # MODULES_END = VMALLOC_END below FIXADDR_START, near TASK_SIZE, which is the host's
    # (arch/um/kernel/um_arch.c linux_main: task_size = host_task_size & PGDIR_MASK): tens of
    # TiB on an x86_64 host, far more than any module (and UML's MODULES_LEN is written
    # MODULES_VADDR - MODULES_END, which wraps to nearly 2^64, so module_alloc's own size test
    # never refuses). What refuses a large UML module is its RAM: module_alloc
    # (arch/x86/kernel/module.c, linked into UML as `subarch`, 6.1.192) asks vmalloc with
    # GFP_KERNEL, and mm/vmalloc.c __vmalloc_node_range refuses more pages than totalram_pages()
    # (`vmalloc error: size N, exceeds total pages`, a warn_alloc line); 6.12.117's default
    # execmem range (mm/execmem.c) asks with __GFP_NOWARN and prints `execmem: unable to
    # allocate memory`. Below that, free pages decide.
    "um": ModuleArea(None, 0, "module-area-vmalloc", "arch/um/include/asm/pgtable.h VMALLOC_START",
                     why="a UML module's memory is bounded by the UML's RAM (mem=), which no KDIR "
                         "says: it is refused when it needs more pages than mem= gives "
                         "(tests/test_module_area.py shows it both ways)"),
}


# elf_validity_cache_index_sym (6.12.117, 7.3.4) refuses a second SHT_SYMTAB as it refuses none;
# 6.1.192's setup_load_info takes the first. Read in those two; the change between them is not
# pinned to a commit here.
ONE_SYMTAB_SINCE: Version = (6, 12)


@record
class PltSections:
    """Sections an architecture's module_frob_arch_sections refuses a module without, and when
    its kernel has that code: with `option` in .config, or from `always_since` on."""

    names: tuple[str, ...]
    option: str
    always_since: Version
    source: str


PLT_SECTIONS: dict[str, PltSections] = {
    # module-plts.o is built with CONFIG_ARM64_MODULE_PLTS (arch/arm64/kernel/Makefile, 5.10.262,
    # 6.1.192; Debian: y, RANDOMIZE_BASE selects it) and with CONFIG_MODULES alone in 6.12.117
    # and 7.3.4, where the option is gone (the version it went in is not pinned here: between
    # them a kernel without the option in its .config gets no verdict).
    "arm64": PltSections((".plt", ".init.plt"), "ARM64_MODULE_PLTS", (6, 12),
                         "arch/arm64/kernel/module-plts.c module_frob_arch_sections"),
}


def needs_plt_sections(arch: str, version: Version, enabled: Callable[[str], bool] | None
                       ) -> tuple[str, ...]:
    """The sections `arch`'s loader requires of a module (none where it has no such code or the
    .config is unknown before `always_since`: a refusal is missed, never invented)."""
    row = PLT_SECTIONS.get(arch)
    if row is None:
        return ()
    if version >= row.always_since or (enabled is not None and enabled(row.option)):
        return row.names
    return ()


@record
class Rule:
    """One loader check: where it is, when it holds, what it prints, what it returns."""

    kind: str
    order: int
    source: str
    lines: Versioned
    errno: str
    since: Version = (0,)
    severity: str = "error"

    def text(self, version: Version, **fields: object) -> list[str]:
        """The kernel's lines for this rule at `version` (empty: the loader prints nothing)."""
        template = self.lines.at(version)
        return template.format(**fields).split("\n") if template else []


def _v(*texts: tuple[Version, str]) -> Versioned:
    return Versioned(tuple(texts))


_MAIN = "kernel/module/main.c"
RULES: dict[str, Rule] = {r.kind: r for r in (
    # module_sig_check -> mod_verify_sig -> mod_check_sig (kernel/module/signing.c,
    # kernel/module_signature.c): a trailer that cannot be parsed is fatal even when signatures
    # are not enforced; only -ENODATA/-ENOPKG/-ENOKEY are forgiven.
    Rule("signature-truncated", 10, "kernel/module/signing.c mod_verify_sig, "
         "kernel/module_signature.c mod_check_sig", _v(((0,), "")), "EBADMSG"),
    Rule("signature-params", 10, "kernel/module_signature.c mod_check_sig",
         _v(((0,), "module: PKCS#7 signature info has unexpected non-zero params")), "EBADMSG"),
    Rule("signature-pkcs7", 10, "kernel/module/signing.c mod_verify_sig -> "
         "verify_pkcs7_signature (crypto/asymmetric_keys/pkcs7_parser.c): unparsable PKCS#7",
         _v(((0,), "")), "EBADMSG"),
    Rule("signature-not-pkcs7", 10, "kernel/module_signature.c mod_check_sig (-ENOPKG: taints "
         "unless CONFIG_MODULE_SIG_FORCE)",
         _v(((0,), "module: not signed with expected PKCS#7 message")), "", severity="warning"),
    # elf_validity_cache_index_mod (6.12.117): the section modpost fills with struct module.
    Rule("this-module-size", 20, f"{_MAIN} elf_validity_cache_index_mod (6.12.117; not in 6.1.192); "
         "sizeof(struct module) from kernelview.struct_module_size",
         _v(((0,), "module {name}: .gnu.linkonce.this_module section size must match the "
                   "kernel's built struct module size at run time")),
         "ENOEXEC", since=(6, 12)),
    # The section modpost fills with struct module: 6.12.117 and 7.3.4 elf_validity_cache_index_mod
    # want exactly one (find_any_unique_sec), before they look at the symbol table;
    # 5.10.262 and 6.1.192 setup_load_info look for it after the symbol table.
    Rule("this-module-count", 20, f"{_MAIN} elf_validity_cache_index_mod (6.12.117, 7.3.4)",
         _v(((0,), "module {name}: Exactly one .gnu.linkonce.this_module section must exist.")),
         "ENOEXEC", since=(6, 12)),
    Rule("no-this-module", 22, f"{_MAIN} setup_load_info (5.10.262: kernel/module.c, 6.1.192)",
         _v(((0,), "{name}: No module found in object")), "ENOEXEC"),
    # The symbol table the loader resolves and relocates with: 5.10.262 kernel/module.c and
    # 6.1.192 setup_load_info take the first SHT_SYMTAB and refuse a module with none (after
    # the signature and the ELF header checks); 6.12.117 and 7.3.4 elf_validity_cache_index_sym
    # want exactly one (ONE_SYMTAB_SINCE), checked right after .gnu.linkonce.this_module's size.
    Rule("no-symbols", 21, f"{_MAIN} setup_load_info (5.10.262: kernel/module.c, 6.1.192) / "
         "elf_validity_cache_index_sym (6.12.117, 7.3.4)",
         _v(((0,), "{name}: module has no symbols (stripped?)")), "ENOEXEC"),
    # check_modstruct_version (kernel/module/version.c, 6.1 and 6.12): the CRC of module_layout
    # is the first one checked, before vermagic.
    Rule("module-layout", 30, "kernel/module/version.c check_modstruct_version -> check_version",
         _v(((0,), "{name}: {first} module_layout")), "ENOEXEC"),
    Rule("vermagic", 40, f"{_MAIN} check_modinfo",
         _v(((0,), "{name}: version magic '{have}' should be '{want}'")), "ENOEXEC"),
    Rule("no-vermagic", 40, f"{_MAIN} check_modinfo -> try_to_force_load (no vermagic, no "
         "CONFIG_MODULE_FORCE_LOAD: -ENOEXEC, nothing printed)", _v(((0,), "")),
         "ENOEXEC"),
    Rule("license-taint", 41, f"{_MAIN} check_modinfo -> module_license_taint_check; "
         "include/linux/license.h license_is_gpl_compatible",
         _v(((0,), "{name}: module license '{license}' taints kernel.")), "",
         severity="warning"),
    # layout_and_allocate -> module_frob_arch_sections, after check_modinfo: arm64's
    # (arch/arm64/kernel/module-plts.c, 5.10.262, 6.1.192, 6.12.117, 7.3.4) finds the empty
    # .plt and .init.plt that Kbuild's arch/arm64/include/asm/module.lds.h adds and sizes them
    # for the module's branches; without either the module is refused (PLT_SECTIONS).
    Rule("plt-missing", 45, "arch/arm64/kernel/module-plts.c module_frob_arch_sections (via "
         f"{_MAIN} layout_and_allocate)",
         _v(((0,), "{name}: module PLT section(s) missing")), "ENOEXEC"),
    # percpu_modalloc -> __alloc_reserved_percpu (mm/percpu.c pcpu_alloc): larger than
    # PCPU_MIN_UNIT_SIZE (32 KiB) is "illegal" (a WARN with a backtrace); larger than the
    # reserved chunk (PERCPU_MODULE_RESERVE) simply does not fit.
    # A WARN: a backtrace follows the line, then "NAME: Could not allocate N bytes percpu data".
    Rule("percpu-illegal", 60, "mm/percpu.c pcpu_alloc, kernel/module/main.c percpu_modalloc",
         _v(((0,), "illegal size ({size}) or align ({align}) for percpu allocation")), "ENOMEM"),
    Rule("percpu-reserve", 60, "kernel/module/main.c percpu_modalloc; include/linux/percpu.h "
         "PERCPU_MODULE_RESERVE",
         _v(((0,), "{name}: Could not allocate {raw} bytes percpu data")), "ENOMEM"),
    # layout_and_allocate -> move_module: module memory larger than the module area. 5.10.262
    # and 6.1.192: module_alloc (arch/x86/kernel/module.c) returns NULL without a word when
    # PAGE_ALIGN(size) > MODULES_LEN, and move_module -ENOMEM; since execmem (v6.10; 6.12.117,
    # 7.3.4) vmalloc fails quietly (__GFP_NOWARN) and execmem_vmalloc prints one line (pr_fmt
    # "execmem: ").
    Rule("module-area", 50, f"{_MAIN} layout_and_allocate -> move_module -> module_alloc "
         "(arch/x86/kernel/module.c, 5.10.262, 6.1.192) / module_memory_alloc -> execmem_alloc "
         "(mm/execmem.c execmem_vmalloc, 6.12.117, 7.3.4)",
         _v(((0,), ""), ((6, 10), "execmem: unable to allocate memory")), "ENOMEM"),
    # The same on arm64 (arch/arm64/kernel/module.c module_alloc, 5.10.262, 6.1.192): the
    # last try asks vmalloc without __GFP_NOWARN, so mm/vmalloc.c __vmalloc_node_range's
    # warn_alloc (mm/page_alloc.c, prefixed with the loading task's name, then a backtrace)
    # says why; 5.10.262 words it `vmalloc: allocation failure: N bytes`, 6.1.192 `vmalloc
    # error: size N, exceeds total pages` (more than the RAM) or `..., vm_struct allocation
    # failed` (no room in the window); the change between them is not pinned to a version here.
    # warn_alloc is rate-limited to one line per 10 s. Since execmem (v6.10) as x86.
    Rule("module-area-vmalloc", 50, f"{_MAIN} move_module -> module_alloc (arch/arm64/kernel/"
         "module.c, 5.10.262, 6.1.192) -> mm/vmalloc.c __vmalloc_node_range warn_alloc / "
         "module_memory_alloc -> execmem_alloc (mm/execmem.c __execmem_alloc, 6.12.117)",
         _v(((0,), "vmalloc: allocation failure: <val> bytes"),
            ((6, 1), "vmalloc error: size <val>"),
            ((6, 10), "execmem: unable to allocate memory")), "ENOMEM"),
    # setup_modinfo (7.3.4): a "module:" namespace cannot be imported (MODULE_NS_SINCE).
    Rule("import-module-ns", 65, f"{_MAIN} setup_modinfo (7.3.4; not in 6.12.117)",
         _v(((0,), "{name}: module tries to import module namespace: {ns}")), "EPERM",
         since=MODULE_NS_SINCE),
    # simplify_symbols -> resolve_symbol_wait -> resolve_symbol (main.c), check_version
    # (version.c), verify_namespace_is_imported (main.c).
    Rule("common", 70, f"{_MAIN} simplify_symbols (SHN_COMMON)",
         _v(((0,), "{name}: please compile with -fno-common")), "ENOEXEC"),
    Rule("unknown-symbol", 70, f"{_MAIN} simplify_symbols (not found, not weak)",
         _v(((0,), "{name}: Unknown symbol {symbol} (err {err})")), "ENOENT"),
    Rule("gpl-only", 70, f"{_MAIN} find_symbol (gplok false: a GPL-only export is not found)",
         _v(((0,), "{name}: Unknown symbol {symbol} (err {err})")), "ENOENT"),
    Rule("symbol-version", 70, "kernel/module/version.c check_version via resolve_symbol",
         _v(((0,), "{name}: {first} {symbol}\n{name}: Unknown symbol {symbol} (err {err})")),
         "EINVAL"),
    # 7.3.4: also for a "module:" namespace the module's name is not in (verify_module_namespace).
    Rule("namespace", 70, f"{_MAIN} verify_namespace_is_imported",
         _v(((0,), "{name}: module uses symbol ({symbol}) from namespace {ns}, but does not "
                   "import it.\n{name}: Unknown symbol {symbol} (err {err})")), "EINVAL"),
    # apply_relocations: the per-arch lines are in rustko.relocs; this row orders them.
    Rule("relocation", 80, f"{_MAIN} apply_relocations", _v(((0,), "")), "ENOEXEC"),
    Rule("rel-section", 80, "include/linux/moduleloader.h apply_relocate (weak default)",
         _v(((0,), "module {name}: REL relocation unsupported")), "ENOEXEC"),
    # complete_formation -> verify_exported_symbols (main.c, 6.1 and 6.12).
    Rule("duplicate-export", 90, f"{_MAIN} verify_exported_symbols",
         _v(((0,), "{name}: exports duplicate symbol {symbol} (owned by {owner})")),
         "ENOEXEC"),
)}

RELOCATION_ORDER = RULES["relocation"].order

# include/linux/license.h license_is_gpl_compatible (6.1.192, 6.12.117).
GPL_COMPATIBLE: frozenset[str] = frozenset({
    "GPL", "GPL v2", "GPL and additional rights", "Dual BSD/GPL", "Dual MIT/GPL", "Dual MPL/GPL",
})

# kernel/module/main.c ignore_undef_symbol (6.1.192, 6.12.117): unresolved names the loader
# forgives, per e_machine (GNU as before 2.37 leaves an unreferenced _GLOBAL_OFFSET_TABLE_).
IGNORED_UNDEFINED: dict[int, frozenset[str]] = {3: frozenset({"_GLOBAL_OFFSET_TABLE_"}),
                                                62: frozenset({"_GLOBAL_OFFSET_TABLE_"})}

# mm/percpu.c: PCPU_MIN_UNIT_SIZE (include/linux/percpu.h, PFN_ALIGN(32 << 10)) is the largest
# allocation; sizes round up to PCPU_MIN_ALLOC_SIZE (4) and alignments below it are raised.
PCPU_MIN_UNIT_SIZE = 32 << 10
PCPU_MIN_ALLOC_SIZE = 4

# include/linux/module_signature.h: enum pkey_id_type PKEY_ID_PKCS7.
PKEY_ID_PKCS7 = 2
# The DER of OID 1.2.840.113549.1.7.2 (pkcs7-signedData), which crypto/asymmetric_keys/
# pkcs7.asn1 requires as PKCS7ContentInfo's contentType.
PKCS7_SIGNED_DATA = bytes.fromhex("06092a864886f70d010702")
