"""arm64's relocation overflow checks against where the loader can place a module.

arch/arm64/kernel/module.c apply_relocate_add computes each value as s64 (reloc_data,
reloc_insn_movw, reloc_insn_imm, reloc_insn_adrp) and refuses it outside a range
(`relocs.RangeCheck.limits`). Whether a value is inside depends on addresses the checker cannot
know, so each relocation's value is bounded over every placement the kernel allows
(`PLACEMENTS`): inside the range for all of them, no finding; outside for all, the loader's line;
across the edge, a finding whose note says it depends on placement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .elf import SHN_ABS
from .loader import ARM64_PLT_WINDOW
from .relocs import ArchRules, RangeCheck, Version

if TYPE_CHECKING:  # numpy is imported where the arrays are made: not on a check that needs none
    import numpy as np

PAGE = 4096


@dataclass(frozen=True)
class Placement:
    """Where module memory and the kernel image can be, in kernels [since, until) (None: on)."""

    since: Version
    until: Version | None
    # Every module allocation and the whole kernel image lie in one window of this many bytes.
    window: int
    # Every kernel or module address, as the loader's s64: [low, high).
    low: int
    high: int
    short: str
    source: str


# Addresses: arch/arm64/include/asm/memory.h MODULES_VADDR = _PAGE_END(VA_BITS_MIN) =
# -(1 << 47) for VA_BITS_MIN 48 (4K pages, Debian's CONFIG_ARM64_VA_BITS=48, and 52-bit VA
# with 4K pages); the kernel image (KASLR: arch/arm64/kernel/kaslr.c, pi/kaslr_early.c) and the
# module windows stay below arch/arm64/include/asm/pgtable.h VMALLOC_END = VMEMMAP_START - 256 MiB,
# below -(1 << 42). So every such address is negative and at least 2^42 away from 0.
_LOW, _HIGH = -(1 << 47), -(1 << 42)
PLACEMENTS: tuple[Placement, ...] = (
    Placement((0,), (6, 5), ARM64_PLT_WINDOW, _LOW, _HIGH,
              "arch/arm64/kernel/kaslr.c kaslr_init, module.c module_alloc",
              "5.10.262 (kaslr_early_init) and 6.1.192 (kaslr_init) arch/arm64/kernel/kaslr.c: "
              "module_alloc_base is drawn so that "
              "[module_alloc_base, +MODULES_VSIZE=128 MiB) covers [_stext, _etext), or with "
              "CONFIG_RANDOMIZE_MODULE_REGION_FULL (Debian) a 2 GiB window covering [_stext, _end); "
              "arch/arm64/kernel/module.c module_alloc allocates in [base, base+128 MiB), else "
              "(CONFIG_ARM64_MODULE_PLTS) in [base, base+2 GiB), which still holds the kernel image. "
              "Not modelled: 5.10 with CONFIG_KASAN keeps modules in the static 128 MiB region and "
              "the kernel within 2 GiB above it (no Debian config has KASAN)"),
    Placement((6, 5), None, ARM64_PLT_WINDOW, _LOW, _HIGH, "arch/arm64/mm/init.c module_init_limits",
              "6.12.117 and 7.3.4 arch/arm64/mm/init.c module_init_limits (the v6.5 module VA-range "
              "rework): a 128 MiB direct-branch window and a 2 GiB PLT window, both "
              "random_bounding_box()es around the kernel image [_text, _end), the 128 MiB one inside "
              "the 2 GiB one; execmem_arch_setup allocates modules in the first, else the second"),
)


def placement(version: Version) -> Placement:
    return next(p for p in PLACEMENTS if p.since <= version and (p.until is None or version < p.until))


def _size(count: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift:
            return f"{-(-count >> shift)} {unit}"  # rounded up: 2 GiB - 1 byte is "2 GiB"
    return f"{count} bytes"


def _note(name: str, rc: RangeCheck, place: Placement, far: int) -> str:
    reach = rc.limits()[1] + 1
    return (f"whether {name} fits depends on where the loader puts the module: it reaches "
            f"+-{_size(reach)}, its target can be up to {_size(far)} away (module memory and the "
            f"kernel image share a {_size(place.window)} window: {place.short}; two sections of one "
            f"allocation are at most its size apart); the kernel refuses it unless the module "
            f"lands close enough")


_ADRP_NOTE = ("refused wherever the module lands, except on a CPU with erratum 843419 (Cortex-A53), "
              "where an ADRP at page offset 0xff8/0xffc becomes an ADR or a veneer instead "
              "(arch/arm64/kernel/module.c reloc_insn_adrp)")


@dataclass(frozen=True)
class _Tables:
    """`ArchRules.range_checks` as arrays indexed by type number: one pass over all rows."""

    checked: np.ndarray
    low: np.ndarray
    high: np.ndarray
    pc_relative: np.ndarray
    page: np.ndarray


_TABLES: dict[str, _Tables] = {}


def _tables(rules: ArchRules) -> _Tables:
    import numpy as np

    if rules.arch not in _TABLES:
        size = max(rules.range_checks) + 1
        tables = _Tables(np.zeros(size, dtype=bool), np.zeros(size, dtype=np.int64),
                         np.zeros(size, dtype=np.int64), np.zeros(size, dtype=bool),
                         np.zeros(size, dtype=bool))
        for t, rc in rules.range_checks.items():
            tables.checked[t] = True
            tables.low[t], tables.high[t] = rc.limits()
            tables.pc_relative[t] = rc.pc_relative
            tables.page[t] = rc.how == "page"
        _TABLES[rules.arch] = tables
    return _TABLES[rules.arch]


def overflowing(rows: np.ndarray, rtype: np.ndarray, symidx: np.ndarray, table: np.ndarray,
                shdrs: np.ndarray, names: list[str], targets: np.ndarray, zero: np.ndarray,
                ok: np.ndarray, rules: ArchRules,
                version: Version) -> tuple[np.ndarray, dict[int, str]]:
    """Rows that overflow for some placement, and the note of those that fit for others.

    `table` is the symbol table, `shdrs`/`names` the section headers and names, `targets` each
    row's relocated section, `zero` the symbols that resolve to 0 (weak, unexported).
    """
    import numpy as np

    tables = _tables(rules)
    last = len(tables.checked) - 1
    sel = np.flatnonzero(ok & (rtype <= last) & tables.checked[np.minimum(rtype, last)])
    if not len(sel):
        return sel, {}
    place = placement(version)
    t = rtype[sel]
    s = symidx[sel]
    shndx = table["shndx"][s].astype(np.int64)
    addend = rows["addend"][sel].astype(np.int64)
    value = table["value"][s].astype(np.int64)
    known = zero[s] | (shndx == SHN_ABS) | (s == 0)
    with np.errstate(over="ignore"):
        exact = np.where(zero[s], 0, value) + addend
        # S+A: exact where known, else a kernel or module address (negative as s64).
        lo = np.where(known, exact, place.low + np.minimum(addend, 0))
        hi = np.where(known, exact, place.high + np.maximum(addend, 0))
        pc = tables.pc_relative[t]
        if pc.any():
            spans = _allocation_spans(shdrs, names, version, int(np.isin(rtype, BRANCHES).sum()))
            plo, phi = _pc_bounds(exact, known, shndx, value + addend, shdrs["size"], *spans,
                                  targets[sel], rows["offset"][sel].astype(np.int64), place)
            page = tables.page[t]
            # ADRP: (S & ~0xfff) - (P & ~0xfff), a whole page either way of S-P.
            plo = np.where(page, plo >> 12 << 12, plo)
            phi = np.where(page, -((-phi) >> 12 << 12), phi)
            lo, hi = np.where(pc, plo, lo), np.where(pc, phi, hi)
    low, high = tables.low[t], tables.high[t]
    bad = (lo < low) | (hi > high)
    sure = (hi < low) | (lo > high)
    notes: dict[int, str] = {}
    for i in np.flatnonzero(bad).tolist():
        rtype_i = int(t[i])
        if not sure[i]:
            far = max(abs(int(lo[i])), abs(int(hi[i])))
            notes[int(sel[i])] = _note(rules.name(rtype_i), rules.range_checks[rtype_i], place, far)
        elif rtype_i == 275:
            notes[int(sel[i])] = _ADRP_NOTE
    return sel[bad], notes


# kernel/module/main.c layout_sections: before v6.4 (commit ac3b43283923 'module: replace
# module_layout with module_memory') every non-init SHF_ALLOC section lies in one allocation
# (core_layout) and the `.init*` ones in another (init_layout, module_init_layout_section); from
# v6.4 (6.12.117, 7.3.4) each kind is an allocation of its own (mod->mem[MOD_TEXT, MOD_RODATA,
# ..., MOD_INIT_TEXT, ...]). Two sections of one allocation are at most its size apart.
MEMORY_SPLIT: Version = (6, 4)
# An allocation's size beyond its sections' sizes and alignments: CONFIG_STRICT_MODULE_RWX
# page-aligns each kind inside core_layout (6.1 debug_align), and module_frob_arch_sections
# (arch/arm64/kernel/module-plts.c) grows .plt/.init.plt by one struct plt_entry (12 bytes, 16
# with the erratum 843419 skip) per JUMP26/CALL26 and ADRP, and .text.ftrace_trampoline by two.
PAGES_PAD = 4 * PAGE
PLT_ENTRY = 16
BRANCHES = (282, 283, 275)


def _allocation_spans(shdrs: np.ndarray, names: list[str], version: Version,
                      branches: int) -> tuple[np.ndarray, np.ndarray]:
    """Per section: which allocation holds it (-1: unknown or not loaded) and how many bytes
    apart two places in that allocation can be at most."""
    import numpy as np

    flags = shdrs["flags"].astype(np.int64)
    keys: list[tuple] = []
    for index, name in enumerate(names):
        flag = int(flags[index])
        if not flag & 0x2 or index == 0:  # SHF_ALLOC
            keys.append(("none", index))
            continue
        init = name.startswith(".init")
        if version < MEMORY_SPLIT:
            keys.append((init,))
        elif flag & 0x4:  # SHF_EXECINSTR
            keys.append((init, "text"))
        elif not flag & 0x1:  # SHF_WRITE
            keys.append((init, "rodata"))
        else:  # data or ro_after_init (which the loader decides by name): no shared bound
            keys.append(("data", index))
    sizes = shdrs["size"].astype(np.int64) + shdrs["addralign"].astype(np.int64)
    total: dict[tuple, int] = {}
    for key, size in zip(keys, sizes.tolist()):
        total[key] = total.get(key, 0) + size
    pad = PAGES_PAD + PLT_ENTRY * (branches + 2)
    ids = {key: number for number, key in enumerate(total)}
    group = np.array([ids[key] if key[0] not in ("none", "data") else -1 for key in keys],
                     dtype=np.int64)
    return group, np.array([total[key] + pad for key in keys], dtype=np.int64)


def _pc_bounds(exact: np.ndarray, known: np.ndarray, shndx: np.ndarray, inside: np.ndarray,
               sizes: np.ndarray, group: np.ndarray, spans: np.ndarray, target: np.ndarray,
               offset: np.ndarray,
               place: Placement) -> tuple[np.ndarray, np.ndarray]:
    """The smallest and largest S+A-P the loader can compute for each row (do_reloc).

    Same section: exact. Known S+A: P anywhere kernel or module memory can be. Otherwise both
    ends lie in the placement window (kernel exports, sibling modules' and this module's other
    sections, per-CPU symbols, whose addresses are inside the image's .data..percpu), or, for
    two sections of one allocation, in that allocation (`spans`); widened by how far the target
    (`inside`: its offset in the symbol's section) lies outside its section.
    """
    import numpy as np

    same = (shndx == target) & ~known
    local = (shndx > 0) & (shndx < len(sizes))
    size = np.where(local, sizes[np.clip(shndx, 0, len(sizes) - 1)].astype(np.int64), 0)
    inside = np.where(local, inside, 0)
    below = np.minimum(inside, 0)
    above = np.maximum(inside - size, 0)
    index = np.clip(shndx, 0, len(group) - 1)
    shared = local & (group[index] >= 0) & (group[index] == group[target])
    span = np.where(shared, spans[index], place.window - 1)
    lo = np.where(same, exact - offset, np.where(known, exact - place.high + 1, -span + below))
    hi = np.where(same, exact - offset, np.where(known, exact - place.low, span + above))
    return lo, hi
