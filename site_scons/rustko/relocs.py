"""What each architecture's module loader accepts, as data, with the kernel source it came from.

The loader applies only relocation sections whose target section is SHF_ALLOC
(kernel/module/main.c `apply_relocations`), processes them in section order and stops at
the first relocation it refuses, printing one of the messages below. Every row was read in
the Debian sources of 5.10.262 (`linux-source-5.10`, bullseye), 6.1.192 (`linux-source-6.1`),
6.12.117 (`linux-source-6.12`) and 7.3.4 (`linux-source-7.3`, trixie-backports); the version
where a row starts is the upstream commit cited beside it.

Message templates use `str.format` fields: `{name}` module name, `{type}` relocation number,
`{val}` S+A as the kernel prints it with %Lx, `{loc}` the %p-hashed target address (never
predictable, rendered as `<loc>`).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from . import arch as arches
from .record import record

Version = tuple[int, ...]
LATEST: Version = (99, 0)


# Rows and tables are records (named tuples, rustko.record): every `rustko check` builds them at
# start-up, and a frozen dataclass costs several times as much to create (and `dataclasses`,
# with the `inspect` it imports, more than the check of a small module).
@record
class Accepted:
    """A relocation type the loader applies, in kernels [since, until)."""

    since: Version = (0,)
    until: Version | None = None
    source: str = ""

    def covers(self, version: Version) -> bool:
        return self.since <= version and (self.until is None or version < self.until)


@record
class Versioned:
    """A message whose text changed over time: (first version, template), oldest first."""

    texts: tuple[tuple[Version, str], ...]

    def at(self, version: Version) -> str:
        chosen = self.texts[0][1]
        for since, text in self.texts:
            if since <= version:
                chosen = text
        return chosen


@record
class AddressRange:
    """Where the loader puts module memory (inclusive low, exclusive high), and why."""

    low: int
    high: int
    source: str


@record
class RangeCheck:
    """An arm64 overflow check: arch/arm64/kernel/module.c apply_relocate_add (6.1.192,
    6.12.117, 7.3.4), through reloc_data (`data`: ABS unsigned, PREL signed, `bits` wide),
    reloc_insn_movw (`movw`: (S+A) >> lsb must fit 16 bits, unsigned for MOVKZ; with MOVNZ
    (`signed`) a negative value is inverted first), reloc_insn_imm (`imm`: (S+A-P) >> lsb must fit
    `bits` signed bits) or reloc_insn_adrp (`page`: the page delta >> 12 in 21 signed bits)."""

    how: str  # "data" | "movw" | "imm" | "page"
    pc_relative: bool
    bits: int
    lsb: int = 0
    signed: bool = False
    source: str = ""

    def limits(self) -> tuple[int, int]:
        """The s64 values the loader accepts, inclusive."""
        if self.how == "data":
            if self.pc_relative:
                return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
            return 0, (1 << self.bits) - 1
        if self.how == "movw":
            top = 1 << (16 + self.lsb)
            return (-top if self.signed else 0), top - 1
        top = 1 << (self.bits - 1 + self.lsb)
        return -top, top - 1


# The default of ArchRules' per-type tables: one shared empty table, read-only.
NO_TYPES: Mapping[int, object] = MappingProxyType({})


@record
class ArchRules:
    """One architecture's loader: accepted types, refusal messages, fix hints."""

    arch: str
    e_machine: int
    loader: str
    names: dict[int, str]
    accepted: dict[int, Accepted]
    unknown: Versioned
    # type -> hint for a refused type; `default_hint` when a type has none of its own.
    hints: dict[int, str]
    default_hint: str
    # x86 only: how many bytes each applied type writes (the nonzero-target check reads them).
    sizes: Mapping[int, int] = NO_TYPES
    # x86 only: overflow-checked types -> "u32" (zero-extended) or "s32" (sign-extended).
    overflow_checked: Mapping[int, str] = NO_TYPES
    overflow: Versioned | None = None
    nonzero: Versioned | None = None
    # True when the overflow check runs before the nonzero-target check (x86 since v6.3).
    overflow_first_since: Version | None = None
    module_range: AddressRange | None = None
    kernel_range: AddressRange | None = None
    overflow_hint: str = ""
    # Where module per-CPU symbols (section .data..percpu) point, when that differs from
    # module_range; None: they live in the module range too.
    percpu_range: AddressRange | None = None
    # arm64: branch types that module_frob_arch_sections moves to the front of each executable
    # section's RELA table before apply_relocate_add runs, so refusals surface in that order.
    branch_partition: tuple[int, ...] = ()
    # Types whose printed `val` is S+A-P (the place is unknowable before loading).
    pc_relative: frozenset[int] = frozenset()
    # Said beside every overflow finding (UML: the verdict depends on the kernel's mem=).
    overflow_note: str = ""
    # UML: module memory starts at mem_base + mem= + mem_gap (for mem= a multiple of the gap),
    # so the mem= from which a module-local 32-bit absolute relocation overflows is computable.
    mem_base: int | None = None
    mem_gap: int = 0
    # arm64: overflow-checked types, bounded over every placement of the module
    # (arm64ranges.PLACEMENTS).
    range_checks: Mapping[int, RangeCheck] = NO_TYPES

    def name(self, rtype: int) -> str:
        prefix = arches.resolve(self.arch).reloc_prefix
        return prefix + self.names.get(rtype, f"UNKNOWN_{rtype}")

    def accepts(self, rtype: int, version: Version) -> bool:
        rule = self.accepted.get(rtype)
        return rule is not None and rule.covers(version)

    def accepted_types(self, version: Version) -> frozenset[int]:
        return frozenset(t for t, rule in self.accepted.items() if rule.covers(version))

    def hint(self, rtype: int) -> str:
        return self.hints.get(rtype, self.default_hint)


# --- x86_64 (also UML on x86_64: arch/x86/um/Makefile links ../kernel/module.o) -------------
X86_LOADER = "arch/x86/kernel/module.c (__apply_relocate_add / __write_relocate_add)"
X86_NAMES: dict[int, str] = {
    0: "NONE", 1: "64", 2: "PC32", 3: "GOT32", 4: "PLT32", 5: "COPY", 6: "GLOB_DAT",
    7: "JUMP_SLOT", 8: "RELATIVE", 9: "GOTPCREL", 10: "32", 11: "32S", 12: "16", 13: "PC16",
    14: "8", 15: "PC8", 16: "DTPMOD64", 17: "DTPOFF64", 18: "TPOFF64", 19: "TLSGD", 20: "TLSLD",
    21: "DTPOFF32", 22: "GOTTPOFF", 23: "TPOFF32", 24: "PC64", 25: "GOTOFF64", 26: "GOTPC32",
    27: "GOT64", 28: "GOTPCREL64", 29: "GOTPC64", 30: "GOTPLT64", 31: "PLTOFF64", 32: "SIZE32",
    33: "SIZE64", 34: "GOTPC32_TLSDESC", 35: "TLSDESC_CALL", 36: "TLSDESC", 37: "IRELATIVE",
    38: "RELATIVE64", 41: "GOTPCRELX", 42: "REX_GOTPCRELX",
}
X86_ACCEPTED: dict[int, Accepted] = {
    0: Accepted(source="x86_64 module loader since 2.6"),
    1: Accepted(source="x86_64 module loader since 2.6"),
    2: Accepted(source="x86_64 module loader since 2.6"),
    10: Accepted(source="x86_64 module loader since 2.6"),
    11: Accepted(source="x86_64 module loader since 2.6"),
    4: Accepted(since=(4, 16), source="commit b21ebf2fb4cd 'x86: Treat R_X86_64_PLT32 as R_X86_64_PC32' (v4.16)"),
    24: Accepted(since=(4, 20), source="upstream about v4.20 (boundary not pinned to a commit); present in 6.1.192 and 6.12.117"),
}
X86_GOT_HINT = (
    "the code was compiled position-independent: build Rust with `-Crelocation-model=static` "
    "(C: drop -fPIC/-fPIE); if the symbol is a compiler-emitted helper such as memset/memcpy, "
    "also pass `-Zplt=yes` to both core and the crate (without it rustc marks the LLVM module "
    "RtLibUseGOT and calls helpers through the GOT even with the static model)"
)
X86_TLS_HINT = (
    "thread-local storage does not exist in kernel modules: replace #[thread_local]/__thread "
    "data by per-CPU data or explicit state"
)
X86_HINTS: dict[int, str] = {
    **{t: X86_GOT_HINT for t in (3, 9, 25, 26, 27, 28, 29, 30, 31, 41, 42)},
    **{t: X86_TLS_HINT for t in (16, 17, 18, 19, 20, 21, 22, 23, 34, 35, 36)},
    **{t: "8/16-bit absolute or PC-relative fields cannot hold a kernel address: use "
          "`-Ccode-model=kernel` (C: -mcmodel=kernel) and no hand-written 16/8-bit address fixups"
       for t in (12, 13, 14, 15)},
    **{t: "a dynamic-linking relocation in a relocatable object: the object was linked as a "
          "shared library or PIE; emit a plain relocatable object (`--emit obj`, no `-shared`)"
       for t in (5, 6, 7, 8, 37, 38)},
}
X86_UNKNOWN = Versioned((((0,), "module: {name}: Unknown rela relocation: {type}"),))
# Patch 'x86/module: Improve relocation error messages' (Josh Poimboeuf, with the klp-build
# series, v6.19; the exact first release is not pinned here) adds "sec N idx N" to the overflow
# line and "sec N, idx N" to the nonzero line, and prints loc unhashed (%lx): N are the RELA
# section's index and the entry's index in it. Text of 7.3.4's __write_relocate_add, and seen
# in Debian's real 7.3 kernel (tests/test_check_loader.py).
KLP_MESSAGES: Version = (6, 19)
X86_OVERFLOW = Versioned((
    ((0,), "module: overflow in relocation type {type} val {val}\n"
           "module: `{name}' likely not compiled with -mcmodel=kernel"),
    (KLP_MESSAGES, "module: overflow in relocation type {type} val {val} sec {sec} idx {idx}\n"
                   "module: `{name}' likely not compiled with -mcmodel=kernel"),
))
X86_NONZERO = Versioned((
    # commit eda9cec4c9a1 'x86/module: Detect and skip invalid relocations' (v5.8); 5.10.262 and
    # 6.1.192 text (both check the bytes before the overflow, each type in its own case).
    ((5, 8), "module: x86/modules: Skipping invalid relocation target, existing value is nonzero "
             "for type {type}, loc {loc}, val {val}"),
    # commit 0c05e7bd2d01 'livepatch,x86: Clear relocation targets on a module removal' (v6.3);
    # 6.12.117 text.
    ((6, 3), "module: x86/modules: Invalid relocation target, existing value is nonzero "
             "for type {type}, loc {loc}, val {val}"),
    (KLP_MESSAGES, "module: x86/modules: Invalid relocation target, existing value is nonzero "
                   "for sec {sec}, idx {idx}, type {type}, loc {loc}, val {val}"),
))
X86_SIZES: dict[int, int] = {1: 8, 10: 4, 11: 4, 2: 4, 4: 4, 24: 8}

X86_64 = ArchRules(
    arch="x86_64", e_machine=arches.X86_64.elf_machine, loader=X86_LOADER, names=X86_NAMES, accepted=X86_ACCEPTED,
    unknown=X86_UNKNOWN, hints=X86_HINTS,
    default_hint="this relocation type is never produced by `-Crelocation-model=static "
                 "-Ccode-model=kernel` (C: -mcmodel=kernel, no -fPIC): rebuild with those flags",
    sizes=X86_SIZES, overflow_checked={10: "u32", 11: "s32"}, overflow=X86_OVERFLOW,
    nonzero=X86_NONZERO, overflow_first_since=(6, 3), pc_relative=frozenset({2, 4, 24}),
    # arch/x86/include/asm/pgtable_64_types.h: MODULES_VADDR = __START_KERNEL_map +
    # KERNEL_IMAGE_SIZE (0xffffffff80000000 + 512 MiB), MODULES_END 0xffffffffff000000.
    module_range=AddressRange(0xFFFFFFFFA0000000, 0xFFFFFFFFFF000000,
                              "arch/x86/include/asm/pgtable_64_types.h MODULES_VADDR..MODULES_END"),
    # The kernel image (where exports live) is linked at __START_KERNEL_map and spans at most
    # KERNEL_IMAGE_SIZE (1 GiB with KASLR): always inside the sign-extended 32-bit range, never
    # inside the zero-extended one.
    kernel_range=AddressRange(0xFFFFFFFF80000000, 0xFFFFFFFFC0000000,
                              "arch/x86/include/asm/page_64_types.h __START_KERNEL_map, KERNEL_IMAGE_SIZE"),
    # x86_64 SMP per-CPU addresses are zero-based offsets (arch/x86/kernel/vmlinux.lds.S
    # PERCPU_VADDR(..., 0, ...)); module per-CPU data is carved from the first chunk's reserved
    # region (mm/percpu.c, PERCPU_MODULE_RESERVE) right after the static per-CPU area: far
    # below 256 MiB, so 32S against a module's .data..percpu symbol fits.
    percpu_range=AddressRange(0, 0x10000000, "arch/x86/kernel/vmlinux.lds.S, mm/percpu.c"),
    overflow_hint="build Rust with `-Ccode-model=kernel` (C: -mcmodel=kernel): the small code model "
                  "assumes addresses below 2 GiB, modules live at 0xffffffffa0000000 and up",
)

# UML links arch/x86/kernel/module.o into arch/x86/um's composite object `subarch`, so its
# pr_fmt (KBUILD_MODNAME ": ") prints "subarch: " where x86_64 prints "module: " (6.1 and 6.12;
# seen in seeds/001 and in Debian's UML 6.1.176 kernel).
UM_UNKNOWN = Versioned((((0,), "subarch: {name}: Unknown rela relocation: {type}"),))
UM_OVERFLOW = Versioned(tuple((since, text.replace("module: ", "subarch: "))
                              for since, text in X86_OVERFLOW.texts))
UM_NONZERO = Versioned(tuple((since, text.replace("module: ", "subarch: ", 1))
                             for since, text in X86_NONZERO.texts))

UM = ArchRules(
    arch="um", e_machine=arches.UM.elf_machine, loader=X86_LOADER + " via arch/x86/um/Makefile "
    "(subarch-$(CONFIG_MODULES) += ../kernel/module.o)", names=X86_NAMES, accepted=X86_ACCEPTED,
    unknown=UM_UNKNOWN, hints=X86_HINTS,
    default_hint="this relocation type is never produced by `-Crelocation-model=static "
                 "-Ccode-model=large` (C: -mcmodel=large, no -fPIC): rebuild with those flags",
    sizes=X86_SIZES, overflow_checked={10: "u32", 11: "s32"}, overflow=UM_OVERFLOW,
    nonzero=UM_NONZERO, overflow_first_since=(6, 3), pc_relative=frozenset({2, 4, 24}),
    # arch/um/include/asm/pgtable.h: MODULES_VADDR = VMALLOC_START = end_iomem + VMALLOC_OFFSET
    # (8 MiB, asm/page.h __va_space) rounded, MODULES_END = VMALLOC_END just below FIXADDR_START
    # (TASK_SIZE - ..., asm/fixmap.h). Physical memory starts where the binary is linked,
    # 0x60000000 (arch/um/kernel/um_arch.c uml_physmem = __binary_start), so modules land at
    # 0x60800000 + mem= + earlier vmalloc users, up to the top of user space: above 2 GiB from
    # mem=504M, above 4 GiB with mem=3G (tests/test_uml.py, with the host's brk randomization off:
    # with it on, mem=256M already put a module at 0x859aa575 in Debian's 6.1.176). No 32-bit
    # absolute form reaches module-local symbols everywhere: arch/um/Makefile builds all 64-bit
    # UML code with -mcmodel=large.
    module_range=AddressRange(0x60800000, 0x800000000000,
                              "arch/um/include/asm/pgtable.h VMALLOC_START..VMALLOC_END"),
    # The UML kernel binary is linked at START = 0x60000000 (arch/x86/Makefile.um), its exports
    # within its first 512 MiB (the Debian binary ends below 0x60a90000).
    kernel_range=AddressRange(0x60000000, 0x80000000, "arch/x86/Makefile.um START"),
    overflow_hint="UML modules live at user-space addresses: build Rust with `-Ccode-model=large` "
                  "(C: -mcmodel=large, as arch/um/Makefile does for CONFIG_64BIT)",
    overflow_note="where a UML module lands depends on the UML kernel's memory size (mem=): "
                  "module memory starts after it, so a 32-bit absolute relocation that fits with a "
                  "small mem= overflows with a larger one; no mem= makes every address fit",
    # arch/um/kernel/um_arch.c linux_main (6.1, 6.12): uml_physmem = __binary_start (0x60000000),
    # high_physmem = uml_physmem + physmem_size (mem=, plus the host's brk randomization gap
    # when it exceeds 1 MiB: "exec-shield gap"), end_iomem = high_physmem + iomem= (0 unless
    # given); arch/um/include/asm/pgtable.h VMALLOC_START = (end_iomem + 8 MiB) & ~(8 MiB - 1)
    # = MODULES_VADDR; kernel/module/main.c module_alloc takes the lowest free vmalloc range.
    mem_base=0x60000000, mem_gap=8 << 20,
)

# --- arm64 ----------------------------------------------------------------------------------
ARM64_NAMES: dict[int, str] = {
    0: "NONE", 257: "ABS64", 258: "ABS32", 259: "ABS16", 260: "PREL64", 261: "PREL32",
    262: "PREL16", 263: "MOVW_UABS_G0", 264: "MOVW_UABS_G0_NC", 265: "MOVW_UABS_G1",
    266: "MOVW_UABS_G1_NC", 267: "MOVW_UABS_G2", 268: "MOVW_UABS_G2_NC", 269: "MOVW_UABS_G3",
    270: "MOVW_SABS_G0", 271: "MOVW_SABS_G1", 272: "MOVW_SABS_G2", 273: "LD_PREL_LO19",
    274: "ADR_PREL_LO21", 275: "ADR_PREL_PG_HI21", 276: "ADR_PREL_PG_HI21_NC",
    277: "ADD_ABS_LO12_NC", 278: "LDST8_ABS_LO12_NC", 279: "TSTBR14", 280: "CONDBR19",
    282: "JUMP26", 283: "CALL26", 284: "LDST16_ABS_LO12_NC", 285: "LDST32_ABS_LO12_NC",
    286: "LDST64_ABS_LO12_NC", 287: "MOVW_PREL_G0", 288: "MOVW_PREL_G0_NC", 289: "MOVW_PREL_G1",
    290: "MOVW_PREL_G1_NC", 291: "MOVW_PREL_G2", 292: "MOVW_PREL_G2_NC", 293: "MOVW_PREL_G3",
    299: "LDST128_ABS_LO12_NC", 300: "MOVW_GOTOFF_G0", 301: "MOVW_GOTOFF_G0_NC",
    302: "MOVW_GOTOFF_G1", 303: "MOVW_GOTOFF_G1_NC", 304: "MOVW_GOTOFF_G2",
    305: "MOVW_GOTOFF_G2_NC", 306: "MOVW_GOTOFF_G3", 307: "GOTREL64", 308: "GOTREL32",
    309: "GOT_LD_PREL19", 310: "LD64_GOTOFF_LO15", 311: "ADR_GOT_PAGE", 312: "LD64_GOT_LO12_NC",
    313: "LD64_GOTPAGE_LO15", 512: "TLSGD_ADR_PREL21", 513: "TLSGD_ADR_PAGE21",
    514: "TLSGD_ADD_LO12_NC", 541: "TLSIE_ADR_GOTTPREL_PAGE21",
    542: "TLSIE_LD64_GOTTPREL_LO12_NC", 549: "TLSLE_ADD_TPREL_HI12", 551: "TLSLE_ADD_TPREL_LO12_NC",
    560: "TLSDESC_LD_PREL19", 561: "TLSDESC_ADR_PREL21", 562: "TLSDESC_ADR_PAGE21",
    563: "TLSDESC_LD64_LO12", 564: "TLSDESC_ADD_LO12", 569: "TLSDESC_CALL", 1024: "COPY",
    1025: "GLOB_DAT", 1026: "JUMP_SLOT", 1027: "RELATIVE", 1031: "TLSDESC", 1032: "IRELATIVE",
}
_ARM64_SRC = "arch/arm64/kernel/module.c apply_relocate_add, since v3.7 (commit 257cb2519)"
ARM64_ACCEPTED: dict[int, Accepted] = {
    t: Accepted(source=_ARM64_SRC)
    for t in (0, 257, 258, 259, 260, 261, 262, 263, 264, 265, 266, 267, 268, 269, 270, 271,
              272, 273, 274, 275, 276, 277, 278, 279, 280, 282, 283, 284, 285, 286, 287, 288,
              289, 290, 291, 292, 293, 299)
}
ARM64_GOT_HINT = (
    "GOT-based addressing comes from position-independent code: build Rust with "
    "`-Crelocation-model=static`; to read a C global from Rust, call a small C accessor "
    "function from the C shim (e.g. `int mymod_get_counter(void)`) instead of declaring "
    "`extern \"C\" { static ... }`"
)
# Each row: the helper apply_relocate_add calls, read in 6.1.192, 6.12.117 and 7.3.4 (the same
# code in all three; 7.3 only routes the writes through WRITE_PLACE). Not here, as the loader
# does not check them: ABS64/PREL64, the *_NC groups, MOVW_UABS_G3/MOVW_PREL_G3 (top bits),
# ADR_PREL_PG_HI21_NC and the LO12 types. JUMP26/CALL26 are not here either: out of direct range
# apply_relocate_add asks module_emit_plt_entry (arch/arm64/kernel/module-plts.c) for a PLT and
# branches there (6.1: with CONFIG_ARM64_MODULE_PLTS, as Debian's config has; 6.12, 7.3:
# always); module_frob_arch_sections sized .plt/.init.plt for every such branch beforehand
# (count_plts), and refuses a module without them ("module PLT section(s) missing", 6.1.192
# module-plts.c; Kbuild's arch/arm64/include/asm/module.lds.h always provides them).
_DATA = "reloc_data"
_MOVW = "reloc_insn_movw"
_IMM = "reloc_insn_imm"
ARM64_RANGE_CHECKS: dict[int, RangeCheck] = {
    258: RangeCheck("data", False, 32, source=_DATA + "(RELOC_OP_ABS, 32)"),
    259: RangeCheck("data", False, 16, source=_DATA + "(RELOC_OP_ABS, 16)"),
    261: RangeCheck("data", True, 32, source=_DATA + "(RELOC_OP_PREL, 32)"),
    262: RangeCheck("data", True, 16, source=_DATA + "(RELOC_OP_PREL, 16)"),
    263: RangeCheck("movw", False, 16, 0, source=_MOVW + "(RELOC_OP_ABS, 0, MOVKZ)"),
    265: RangeCheck("movw", False, 16, 16, source=_MOVW + "(RELOC_OP_ABS, 16, MOVKZ)"),
    267: RangeCheck("movw", False, 16, 32, source=_MOVW + "(RELOC_OP_ABS, 32, MOVKZ)"),
    270: RangeCheck("movw", False, 16, 0, True, _MOVW + "(RELOC_OP_ABS, 0, MOVNZ)"),
    271: RangeCheck("movw", False, 16, 16, True, _MOVW + "(RELOC_OP_ABS, 16, MOVNZ)"),
    272: RangeCheck("movw", False, 16, 32, True, _MOVW + "(RELOC_OP_ABS, 32, MOVNZ)"),
    273: RangeCheck("imm", True, 19, 2, source=_IMM + "(RELOC_OP_PREL, 2, 19)"),
    274: RangeCheck("imm", True, 21, 0, source=_IMM + "(RELOC_OP_PREL, 0, 21)"),
    275: RangeCheck("page", True, 21, 12, source="reloc_insn_adrp: " + _IMM + "(RELOC_OP_PAGE, 12, 21)"),
    279: RangeCheck("imm", True, 14, 2, source=_IMM + "(RELOC_OP_PREL, 2, 14)"),
    280: RangeCheck("imm", True, 19, 2, source=_IMM + "(RELOC_OP_PREL, 2, 19)"),
    287: RangeCheck("movw", True, 16, 0, True, _MOVW + "(RELOC_OP_PREL, 0, MOVNZ)"),
    289: RangeCheck("movw", True, 16, 16, True, _MOVW + "(RELOC_OP_PREL, 16, MOVNZ)"),
    291: RangeCheck("movw", True, 16, 32, True, _MOVW + "(RELOC_OP_PREL, 32, MOVNZ)"),
}
ARM64 = ArchRules(
    arch="arm64", e_machine=arches.ARM64.elf_machine, loader="arch/arm64/kernel/module.c apply_relocate_add",
    names=ARM64_NAMES, accepted=ARM64_ACCEPTED,
    unknown=Versioned((
        ((0,), "module {name}: unsupported RELA relocation: {type}"),
        # 6.12.117 defines pr_fmt "Modules: " (added with the module VA-range rework, v6.5).
        ((6, 5), "Modules: module {name}: unsupported RELA relocation: {type}"),
    )),
    hints={**{t: ARM64_GOT_HINT for t in range(300, 314)},
           **{t: X86_TLS_HINT for t in range(512, 574)}},
    default_hint="this relocation type is never produced by `-Crelocation-model=static` for "
                 "aarch64-unknown-none-softfloat: rebuild with that flag",
    # arch/arm64/kernel/module-plts.c partition_branch_plt_relas: JUMP26/CALL26 to another
    # section are swapped to the front (6.1: with CONFIG_ARM64_MODULE_PLTS and
    # CONFIG_RANDOMIZE_BASE, as every distribution config has; 6.12: always). Seen here: a PIC
    # module with ADR_GOT_PAGE (311) before LD64_GOT_LO12_NC (312) is refused with "312".
    branch_partition=(282, 283),
    range_checks=ARM64_RANGE_CHECKS,
    overflow=Versioned((
        ((0,), "module {name}: overflow in relocation type {type} val {val}"),
        ((6, 5), "Modules: module {name}: overflow in relocation type {type} val {val}"),
    )),
    overflow_hint="a 16/32-bit field cannot hold a kernel address on arm64 (kernel and modules "
                  "live at 0xffff...): use 64-bit fields (`.quad`/ABS64) or PC-relative ones "
                  "(PREL32), and keep short branches within their range",
)

# --- riscv64 ----------------------------------------------------------------------------------
RISCV_NAMES: dict[int, str] = {
    0: "NONE", 1: "32", 2: "64", 3: "RELATIVE", 4: "COPY", 5: "JUMP_SLOT", 6: "TLS_DTPMOD32",
    7: "TLS_DTPMOD64", 8: "TLS_DTPREL32", 9: "TLS_DTPREL64", 10: "TLS_TPREL32", 11: "TLS_TPREL64",
    16: "BRANCH", 17: "JAL", 18: "CALL", 19: "CALL_PLT", 20: "GOT_HI20", 21: "TLS_GOT_HI20",
    22: "TLS_GD_HI20", 23: "PCREL_HI20", 24: "PCREL_LO12_I", 25: "PCREL_LO12_S", 26: "HI20",
    27: "LO12_I", 28: "LO12_S", 29: "TPREL_HI20", 30: "TPREL_LO12_I", 31: "TPREL_LO12_S",
    32: "TPREL_ADD", 33: "ADD8", 34: "ADD16", 35: "ADD32", 36: "ADD64", 37: "SUB8", 38: "SUB16",
    39: "SUB32", 40: "SUB64", 43: "ALIGN", 44: "RVC_BRANCH", 45: "RVC_JUMP", 51: "RELAX",
    52: "SUB6", 53: "SET6", 54: "SET8", 55: "SET16", 56: "SET32", 57: "32_PCREL",
}
_RISCV_SRC = "arch/riscv/kernel/module.c reloc_handlers_rela (6.1.192)"
_RISCV_NEW = ("arch/riscv/kernel/module.c reloc_handlers (6.12.117); commit 8fd6c5142395 "
              "'riscv: Add remaining module relocations' (v6.8)")
RISCV64 = ArchRules(
    arch="riscv64", e_machine=arches.RISCV64.elf_machine, loader="arch/riscv/kernel/module.c apply_relocate_add",
    names=RISCV_NAMES,
    accepted={
        **{t: Accepted(source=_RISCV_SRC)
           for t in (1, 2, 16, 17, 18, 19, 20, 23, 24, 25, 26, 27, 28, 35, 36, 39, 40, 44, 45, 51)},
        **{t: Accepted(since=(6, 8), source=_RISCV_NEW)
           for t in (33, 34, 37, 38, 52, 53, 54, 55, 56, 57)},
    },
    unknown=Versioned((((0,), "{name}: Unknown relocation type {type}"),)),
    hints={43: "linker relaxation left R_RISCV_ALIGN, which the loader refuses ('The unexpected "
               "relocation type R_RISCV_ALIGN'): build with `-Ctarget-feature=-relax` (C: -mno-relax)",
           **{t: X86_TLS_HINT for t in (6, 7, 8, 9, 10, 11, 21, 22, 29, 30, 31, 32)}},
    default_hint="rebuild with `-Crelocation-model=static -Ctarget-feature=-relax` for "
                 "riscv64imac-unknown-none-elf",
)

BY_ARCH: dict[str, ArchRules] = {r.arch: r for r in (X86_64, UM, ARM64, RISCV64)}
BY_MACHINE: dict[int, str] = arches.BY_MACHINE
ARCH_ALIASES: dict[str, str] = arches.ALIASES


def rules_for(arch: str) -> ArchRules:
    """The loader rules for an architecture name or alias (KeyError if unknown)."""
    return BY_ARCH[ARCH_ALIASES[arch]]
