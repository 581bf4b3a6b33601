"""The relocation pass without numpy: does the loader apply every RELA entry of a module cleanly?

`rustko.check` asks this first for runs too small to pay numpy's import (0.2 to 0.3 s of CPU);
a False sends the module to check.py's numpy pass, which makes the findings (and the errors of
corrupt tables), so a shortcut here can only cost time, never change a verdict. Every step runs
over whole tables inside C-implemented builtins: byte columns of the Elf64_Rela records and
`bytes.translate` for the types, the symbol indexes and the bytes each entry writes,
`memoryview` columns, `max`/`min` over them, `operator.itemgetter` gathering the
overflow-checked entries and byte k of every field of a section. Per
entry that costs a little less than the numpy pass on modules of the size Debian ships (0.5 to
0.7 microseconds of CPU at load 7.5, where the per-entry Python it replaced took 1.6 to 2.2) and
twice as much on the largest (check.py's PURE_* thresholds follow from that)."""

from __future__ import annotations

import operator
import sys
from array import array
from functools import lru_cache
from itertools import chain, compress, islice
from collections.abc import Sequence

from .elf import RELA64_SIZE, SHN_ABS, SHN_UNDEF, SHT_NOBITS, STB_WEAK, Elf, Shdr, Symbols
from .kernelview import KernelView
from .relocs import BY_ARCH, ArchRules, Version

MASK64 = (1 << 64) - 1
# Elf64_Rela (little-endian) as 32-bit words: r_offset lo/hi, r_info lo (the type) / hi (the
# symbol), r_addend; the type's lowest byte is byte 8.
WORDS = RELA64_SIZE // 4
SYMBOL_WORD = 3
TYPE_BYTE = 8


@lru_cache(maxsize=32)
def accepted(arch: str, version: Version) -> frozenset[int]:
    return BY_ARCH[arch].accepted_types(version)


@lru_cache(maxsize=8)
def _bytes_of(types: frozenset[int]) -> bytes:
    """The types below 256 as bytes: `bytes.translate` deletes them."""
    return bytes(t for t in types if t < 256)


@lru_cache(maxsize=8)
def _selector(types: frozenset[int]) -> bytes:
    """A `bytes.translate` table: 1 for the type bytes in `types`, 0 for the others."""
    return bytes(int(t in types) for t in range(256))


def _column(blob: bytes, code: str) -> memoryview | array:
    """The table as little-endian items (`code`: I, Q or q), in host order: a view of `blob`
    on a little-endian host (no copy), else a byte-swapped copy."""
    if sys.byteorder == "little":
        return memoryview(blob).cast(code)
    out = array(code, blob)
    out.byteswap()
    return out


def _symbols_below(blob: bytes, count: int, limit: int) -> bool:
    """Whether every entry's symbol index (r_info's high word, bytes 12-15) is below `limit`,
    from byte columns while `limit` fits 16 bits (every module of Debian's trees): the two high
    bytes 0, then byte 13 below `limit`'s high byte, or equal to it with byte 12 below its low
    byte."""
    if limit > 0xFFFF:
        return max(_column(blob, "I")[SYMBOL_WORD::WORDS]) < limit
    if (blob[14::RELA64_SIZE] + blob[15::RELA64_SIZE]).count(0) != 2 * count:
        return False
    high = blob[13::RELA64_SIZE].translate(_compared(limit >> 8))  # 0 below, 1 equal, 2 above
    if 2 in high:
        return False
    if 1 not in high:
        return True
    # no entry both equal in byte 13 and not below in byte 12: the 0/1 columns share no 1 bit
    low = blob[12::RELA64_SIZE].translate(_at_least(limit & 0xFF))
    return not int.from_bytes(high, "little") & int.from_bytes(low, "little")


# Entry indexes kept as one list of ints for every module of a run (a module of Debian's
# trees has fewer entries), which `compress` walks without making an int per entry as `range`
# does: 15 of the DKMS corpus's 205 million instructions in this pass.
INDEXES_KEPT = 1 << 17
_INDEXES: list[int] = []


def _indexes(count: int) -> list[int] | range:
    """0, 1, ..., at least `count` of them."""
    if count > INDEXES_KEPT:
        return range(count)
    if len(_INDEXES) < count:
        _INDEXES.extend(range(len(_INDEXES), count))
    return _INDEXES


def _compared(value: int) -> bytes:
    """A `bytes.translate` table: 0 for the bytes below `value`, 1 for it, 2 above."""
    return bytes(value) + b"\1" + b"\2" * (255 - value)


def _at_least(value: int) -> bytes:
    """A `bytes.translate` table: 1 for the bytes `value` and above, 0 below."""
    return bytes(value) + b"\1" * (256 - value)


def clean(elf: Elf, syms: Symbols, rules: ArchRules, version: Version, parts: list[bytes],
          owners: list[int], view: KernelView | None) -> bool:
    """True when the loader applies every entry of `parts` (the RELA tables of sections
    `owners`) without a finding; False when one may have a finding (numpy decides).

    All tables at once where the check is per entry (the types and symbol indexes, once per
    distinct value; the 32-bit overflow); the tables of one target section together where the
    numpy pass compares entries (x86's fields inside the section, zero in the file and written
    once: sorted offsets). Architectures with range checks or branch reordering (arm64) always
    return False: that logic lives in the numpy pass."""
    if rules.range_checks or rules.branch_partition:
        return False
    blob = parts[0] if len(parts) == 1 else b"".join(parts)
    count = len(blob) // RELA64_SIZE
    # r_info's low byte is the type when its three other bytes are 0; a type above 255 goes to
    # the numpy pass (never accepted where this pass runs: x86, UML)
    types = blob[TYPE_BYTE::RELA64_SIZE]
    if (blob[TYPE_BYTE + 1::RELA64_SIZE] + blob[TYPE_BYTE + 2::RELA64_SIZE]
            + blob[TYPE_BYTE + 3::RELA64_SIZE]).count(0) != 3 * count:
        return False
    if types.translate(None, _bytes_of(accepted(rules.arch, version))) or not _symbols_below(
            blob, count, len(syms)):
        return False  # a type not accepted, or a symbol index out of range
    if not rules.sizes:
        return True
    quads = _column(blob, "Q")
    sections = elf.sections
    spans: dict[int, list[tuple[int, int]]] = {}  # target section -> entry ranges of its tables
    start = 0
    for rsec, part in zip(owners, parts):
        spans.setdefault(sections[rsec].info, []).append((start, start + len(part) // RELA64_SIZE))
        start += len(part) // RELA64_SIZE
    widths = types.translate(_width_table(rules.arch))
    for target, ranges in spans.items():
        if len(ranges) == 1:
            ((first, end),) = ranges
            mine, wide = quads[3 * first:3 * end:3].tolist(), widths[first:end]
        else:
            mine = list(chain.from_iterable(quads[3 * first:3 * end:3].tolist() for first, end in ranges))
            wide = b"".join(widths[first:end] for first, end in ranges)
        if not _fields_clean(mine, wide, sections[target], elf.data):
            return False
    checked = frozenset(t for t in rules.overflow_checked if t < 256 and t in types)
    if not checked:
        return True
    if not types.translate(None, _bytes_of(checked)):  # every entry is checked
        infos, addends = quads[1::3].tolist(), _column(blob, "q")[2::3].tolist()
    else:  # the few overflow-checked entries, gathered at C speed
        picked = list(compress(_indexes(count), types.translate(_selector(checked))))
        gather = operator.itemgetter(*picked)  # a tuple of the items, or the one item alone
        infos, addends = gather(quads[1::3]), gather(_column(blob, "q")[2::3])
        if len(picked) == 1:
            infos, addends = (infos,), (addends,)
    return _fit(infos, addends, syms, rules, elf.find(".data..percpu"), view)


def _fields_clean(offsets: list[int], widths: bytes, section: Shdr, data: bytes) -> bool:
    """x86: every field the entries (at `offsets`, writing `widths` bytes) write lies inside
    `section`, is zero in the file (unless SHT_NOBITS) and no other entry writes any of its
    bytes. An empty write (R_X86_64_NONE) inside a field or past the end is left to numpy."""
    width = widths[0]
    if widths.count(width) == len(widths):  # one width: the gaps between offsets suffice
        if not width:
            return True  # R_X86_64_NONE alone: nothing is written
        if len(offsets) > 1 and min(map(operator.sub, islice(offsets, 1, None), offsets)) < width:
            offsets = sorted(offsets)  # out of order, or two entries write the same bytes
            if min(map(operator.sub, islice(offsets, 1, None), offsets)) < width:
                return False
        last = offsets[-1] + width
    else:
        ends = list(map(operator.add, offsets, widths))
        if len(offsets) > 1 and min(map(operator.sub, islice(offsets, 1, None), ends)) < 0:
            pairs = sorted(zip(offsets, widths))  # as above, empty writes first at one offset
            offsets, widths = [o for o, _ in pairs], bytes(w for _, w in pairs)
            ends = list(map(operator.add, offsets, widths))
            if min(map(operator.sub, islice(offsets, 1, None), ends)) < 0:
                return False
        last = ends[-1]
    if last > section.size:  # in order and apart, the last field ends last
        return False  # outside the section
    if section.type == SHT_NOBITS:
        return True
    if section.offset + section.size > len(data):
        return False  # the numpy pass words this error
    body = data[section.offset:section.offset + section.size]
    if body == bytes(len(body)):
        return True  # a zero section (.orc_unwind_ip, __mcount_loc, ...): every field is zero
    # Byte k of every field that has one at once: the k-th shifted copy of the section, the
    # fields gathered by one itemgetter (small ints, no object per entry).
    chosen, gather = b"", None
    for k in range(max(widths)):
        wider = widths.translate(_wider(k))
        if wider != chosen:
            chosen = wider
            starts = offsets if wider.count(1) == len(wider) else list(compress(offsets, wider))
            gather = operator.itemgetter(*starts) if len(starts) > 1 else None
        if gather is not None:
            if gather(body[k:]).count(0) != len(starts):
                return False
        elif starts and body[starts[0] + k]:
            return False
    return True


@lru_cache(maxsize=8)
def _wider(k: int) -> bytes:
    """A `bytes.translate` table: 1 for the widths above `k`, 0 for the others."""
    return bytes(int(width > k) for width in range(256))


@lru_cache(maxsize=8)
def _width_table(arch: str) -> bytes:
    """A `bytes.translate` table from a type to the bytes x86's loader writes for it."""
    return bytes(BY_ARCH[arch].sizes.get(t, 0) for t in range(256))


def _fit(infos: Sequence[int], addends: Sequence[int], syms: Symbols, rules: ArchRules,
         pcpu: int | None, view: KernelView | None) -> bool:
    """Whether S+A fits the 32-bit field of every overflow-checked entry wherever the module
    lands. With the lowest and highest bases of a symbol (`overflow_bases`) lo and hi = lo + d,
    d < 2**32, both fit exactly when ((lo + A) mod 2**64) + d < 2**32; first tried at once for
    the lowest lo and addend and the highest hi and addend of the module (every value between
    fits when those do without wrapping), then entry by entry."""
    if rules.module_range is None or rules.kernel_range is None:
        return True  # no address ranges: the overflow is not checked
    low: dict[int, int] = {}
    span: dict[int, int] = {}
    for info in set(infos):
        lo, hi = overflow_bases(syms, rules, pcpu, view, info)
        if hi - lo >= 1 << 32:
            return False  # no S+A fits both
        low[info], span[info] = lo, hi - lo
    least, most = min(low.values()), max(map(operator.add, low.values(), span.values()))
    smallest, largest = min(addends), max(addends)
    if ((least + smallest) & MASK64) + (most + largest) - (least + smallest) < 1 << 32:
        return True
    sums = map(operator.add, map(low.__getitem__, infos), addends)
    return max(map(operator.add, map(MASK64.__and__, sums), map(span.__getitem__, infos))) < 1 << 32


def overflow_bases(syms: Symbols, rules: ArchRules, pcpu: int | None, view: KernelView | None,
                   info: int) -> tuple[int, int]:
    """check.py's `_overflows` for one r_info: the lowest and highest S the symbol can have,
    plus 2**31 for a sign-extended field, so that S+A fits exactly when
    (base + A) mod 2**64 < 2**32. The rules have both address ranges."""
    index = info >> 32
    _, sinfo, _, shndx, value, _ = syms.sym(index)
    zero = sibling = False
    if shndx == SHN_UNDEF and (sinfo >> 4 == STB_WEAK or (view is not None and view.siblings)):
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
