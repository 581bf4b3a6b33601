"""Where a finding is in the sources: the function holding an offset (symbol table), its source
line with the chain of inlined calls (DWARF, through pyelftools), readable names (c++filt).

Only called for findings, never on the fast path; a run with one finding in a module without
DWARF (the usual refused module of a packaged build) imports nothing heavy: no numpy, pyelftools,
subprocess or re (0.3-0.4 s together, more than checking a hundred modules).
"""

from __future__ import annotations

import struct
from collections import deque
from itertools import compress, repeat
from operator import add, and_

from .elf import RELA64_SIZE, SHF_COMPRESSED, SHT_RELA, STT_FUNC, Elf, Symbols, columns
from .record import record

# Rust v0 crate disambiguators (`core[1eb95a942f2852f8]`) say nothing to a reader (a pattern
# for re's own cache: re is imported only where a name or path is matched).
CRATE_HASH = r"\[[0-9a-f]{8,16}\]"


def demangle(names: list[str]) -> dict[str, str]:
    """Readable names for Rust (v0, legacy) and C++ symbols, through binutils' c++filt, which
    knows Rust v0 since 2.36; names stay as they are when it is not installed."""
    mangled = sorted({n for n in names if n.startswith(("_R", "_ZN"))})
    if not mangled:
        return {}
    import re
    import shutil
    import subprocess

    tool = shutil.which("c++filt")
    if tool is None:
        return {}
    try:
        out = subprocess.run([tool], input="\n".join(mangled), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    lines = out.stdout.splitlines()
    if out.returncode != 0 or len(lines) != len(mangled):
        return {}
    return {name: re.sub(CRATE_HASH, "", line) for name, line in zip(mangled, lines)}


U64 = (1 << 64) - 1


def function_at(elf: Elf, syms: Symbols, section: str, offset: int) -> str:
    """The first function symbol of the section whose [value, value+size) holds the offset (the
    end taken modulo 2**64, as in the 64-bit fields: a corrupt size wraps, it holds nothing)."""
    index = elf.find(section)
    if index is None or not len(syms):
        return ""
    info, value, size = syms.column("info"), syms.column("value"), syms.column("size")
    for i in compress(range(len(syms)), map(index.__eq__, syms.column("shndx"))):
        if info[i] & 0xF == STT_FUNC and value[i] <= offset < (value[i] + size[i]) & U64:
            return syms.name(i)
    return ""


# Paths of code the user did not write: a frame there is shown as inlined into the user's.
LIBRARY_PATHS = (r"^/rustc/|/library/(core|alloc|std|compiler-builtins|portable-simd|"
                 r"stdarch)/|/\.cargo/registry/|/linux-headers-[^/]+/(include|arch)/|"
                 r"^(include|arch)/")

# Address relocation types DWARF uses in relocatable objects: R_X86_64_64, R_AARCH64_ABS64,
# R_RISCV_64.
ADDRESS_RELOCS = (1, 257, 2)


@record
class Location:
    """Where a place in a section is in the sources: the addr2line -f -i frames, innermost
    first, and the frame in the user's own code."""

    frames: list[tuple[str, str]]  # (function, "file:line")

    def user_frame(self) -> tuple[str, str]:
        import re

        for frame in self.frames:
            if not re.search(LIBRARY_PATHS, frame[1]):
                return frame
        return self.frames[-1]


def source_lines(elf: Elf, wanted: list[tuple[int, int]]) -> dict[tuple[int, int], Location]:
    """(section index, offset) -> Location, from the DWARF line program and the inlined-call
    tree in .debug_info, when there is DWARF.

    In a relocatable object every section starts at address 0: each line-program sequence starts
    with a DW_LNE_set_address relocated against its own section, so sequences are matched to
    sections through those relocations (.rela.debug_line), in order; functions are matched to
    sections through the relocation of their DW_AT_low_pc (.rela.debug_info).
    """
    if elf.find(".debug_line") is None or elf.find(".debug_info") is None:
        return {}
    # pyelftools (0.08 s to import) only when there is DWARF to read.
    from io import BytesIO

    from elftools.common.exceptions import DWARFError, ELFError
    from elftools.dwarf.dwarfinfo import DWARFInfo
    from elftools.elf.elffile import ELFFile

    lines: dict[tuple[int, int], str] = {}
    found: dict[tuple[int, int], Location] = {}
    try:
        relocated = _debug_relocated(elf)
        dwarf: DWARFInfo = ELFFile(BytesIO(elf.data if relocated is None else relocated)).get_dwarf_info(
            relocate_dwarf_sections=relocated is None)
        addr_sections = _address_sections(elf, ".debug_line", sort=True)
        addr_no = 0
        section = prev_section = -1
        programs = {}
        for cu in dwarf.iter_CUs():
            program = dwarf.line_program_for_CU(cu)
            if program is None:
                continue
            programs[cu.cu_offset] = program
            prev = None
            for entry in program.get_entries():
                state = entry.state
                if entry.command == 2 and entry.is_extended:  # DW_LNE_set_address
                    # A sequence may set its address more than once (GCC does): each one is
                    # relocated, and the rows after it belong to that relocation's section.
                    section = addr_sections[addr_no] if addr_no < len(addr_sections) else -1
                    addr_no += 1
                if state is None:
                    continue
                if prev is not None and prev_section == section:
                    for key in wanted:
                        if key not in lines and key[0] == section and prev.address <= key[1] < state.address:
                            lines[key] = f"{_file_name(program, prev.file)}:{prev.line or '?'}"
                prev, prev_section = state, section
                if state.end_sequence:
                    prev = None
        chains = _inline_chains(dwarf, programs, _address_map(elf), [k for k in wanted if k in lines])
        for key, where in lines.items():
            found[key] = Location(chains.get(key, lambda loc: [("", loc)])(where))
    except (ELFError, DWARFError, ValueError, KeyError, IndexError, AttributeError, TypeError, AssertionError,
            UnicodeDecodeError, OverflowError, MemoryError, RecursionError):
        # Source lines decorate a finding; corrupt DWARF must not hide the finding.
        return {k: Location([("", v)]) for k, v in lines.items()}
    return found


# Relocation types in debug sections, by how many bytes they write S+A: the absolute ones
# (R_X86_64_64/32/32S, R_AARCH64_ABS64/ABS32, R_RISCV_64/32, per e_machine).
DEBUG_RELOCS: dict[int, dict[int, int]] = {62: {1: 8, 10: 4, 11: 4}, 183: {257: 8, 258: 4},
                                           243: {2: 8, 1: 4}}


# Writers of a relocated field by its width in bytes (little-endian, as every DEBUG_RELOCS
# machine is).
PACK = {4: struct.Struct("<I").pack_into, 8: struct.Struct("<Q").pack_into}


def _rela(elf: Elf, index: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """The r_offset, type (low half of r_info), symbol (high half) and r_addend (as unsigned
    64-bit) columns of a SHT_RELA section."""
    section = elf.sections[index]
    count = section.size // RELA64_SIZE
    if section.offset + count * RELA64_SIZE > len(elf.data):
        elf.section_bytes(index)  # raises the truncated-section error
    blob = elf.data[section.offset:section.offset + count * RELA64_SIZE]
    offsets, addends = columns(blob, "Q", RELA64_SIZE, (0, 2))
    rtypes, symbols = columns(blob, "I", RELA64_SIZE, (2, 3))
    return offsets, rtypes, symbols, addends


def _rela_sections(elf: Elf, target: int | None) -> list[int]:
    """The SHT_RELA sections that relocate section `target`, in file order."""
    return [i for i, s in enumerate(elf.sections) if s.type == SHT_RELA and s.info == target]


def _debug_relocated(elf: Elf) -> bytes | None:
    """The file with the .rela.debug_* relocations applied (S+A, as pyelftools would, in bulk):
    pyelftools applies them one construct parse at a time, seconds for a Kbuild module. None when
    a debug section is compressed (SHF_COMPRESSED, e.g. UML's CONFIG_DEBUG_INFO_COMPRESSED):
    relocations apply to its decompressed bytes, which pyelftools' own path handles."""
    widths = DEBUG_RELOCS.get(elf.machine)
    if not widths:
        return elf.data
    if any(s.flags & SHF_COMPRESSED for s, name in zip(elf.sections, elf.names) if name.startswith(".debug_")):
        return None
    data = bytearray(elf.data)
    values = elf.symbols().column("value")
    for rsec, shdr in enumerate(elf.sections):
        target = shdr.info
        if shdr.type != SHT_RELA or target >= len(elf.names) or not elf.names[target].startswith(".debug_"):
            continue
        offsets, rtypes, idx, addends = _rela(elf, rsec)
        if idx and max(idx) >= len(values):
            continue
        base, size = elf.sections[target].offset, elf.sections[target].size
        for rt, width in widths.items():
            # The rows of this type that fit the section, written in file order at C speed (a
            # module has tens of thousands); all of them skipped if one lies past the file.
            rows = list(compress(range(len(rtypes)), map(rt.__eq__, rtypes)))
            at = list(map(offsets.__getitem__, rows))
            if at and max(at) + width > size:
                rows = [i for i, o in zip(rows, at) if o + width <= size]
                at = list(map(offsets.__getitem__, rows))
            if not at or max(at) + base + width > len(data):
                continue
            sums = map(add, map(values.__getitem__, map(idx.__getitem__, rows)), map(addends.__getitem__, rows))
            fields = map(and_, sums, repeat((1 << 8 * width) - 1))
            with memoryview(data) as view:
                deque(map(PACK[width], repeat(view[base:]), at, fields), maxlen=0)
    return bytes(data)


def _address_map(elf: Elf) -> dict[int, int]:
    """.debug_info offset of each address-sized relocated field -> the section it points into."""
    index = elf.find(".debug_info")
    out: dict[int, int] = {}
    shndx = elf.symbols().column("shndx")
    last = max(len(shndx) - 1, 0)
    for rsec in _rela_sections(elf, index):
        offsets, rtypes, symbols, _ = _rela(elf, rsec)
        keep = list(map(ADDRESS_RELOCS.__contains__, rtypes))
        idx = [min(i, last) for i in compress(symbols, keep)]
        out.update(zip(compress(offsets, keep), list(map(shndx.__getitem__, idx)) if shndx else idx))
    return out


def _die_name(die, linkage_only: bool = False) -> str:
    """A DIE's linkage name (mangled, demangled later) or name, through abstract origins;
    with `linkage_only`, "" where there is no linkage name."""
    attrs = ("DW_AT_linkage_name", "DW_AT_MIPS_linkage_name") + (() if linkage_only else ("DW_AT_name",))
    for _ in range(8):
        for attr in attrs:
            if attr in die.attributes:
                value = die.attributes[attr].value
                return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        for ref in ("DW_AT_abstract_origin", "DW_AT_specification"):
            if ref in die.attributes:
                die = die.get_DIE_from_attribute(ref)
                break
        else:
            return ""
    return ""


def _ranges(die, dwarf, base: int) -> list[tuple[int, int]]:
    """The [low, high) address ranges of a DIE (section-relative in a relocatable object)."""
    attrs = die.attributes
    if "DW_AT_low_pc" in attrs and "DW_AT_high_pc" in attrs:
        low = attrs["DW_AT_low_pc"].value
        high = attrs["DW_AT_high_pc"]
        return [(low, high.value if high.form == "DW_FORM_addr" else low + high.value)]
    if "DW_AT_ranges" in attrs and attrs["DW_AT_ranges"].form == "DW_FORM_sec_offset":
        lists = dwarf.range_lists()
        if lists is None:
            return []
        out = []
        for entry in lists.get_range_list_at_offset(attrs["DW_AT_ranges"].value, cu=die.cu):
            if hasattr(entry, "base_address"):
                base = entry.base_address
            elif entry.is_absolute:
                out.append((entry.begin_offset, entry.end_offset))
            else:
                out.append((base + entry.begin_offset, base + entry.end_offset))
        return out
    return []


def _children(die):
    """`die.iter_children()` while the children's offsets grow, as they do in valid DWARF:
    pyelftools finds each next child through the previous one's DW_AT_sibling, and a corrupt
    one pointing back (or at itself) had it yield the same DIEs forever."""
    last = die.offset
    for child in die.iter_children():
        if child.offset <= last:
            return
        last = child.offset
        yield child


def _inline_chains(dwarf, programs: dict, addresses: dict[int, int],
                   wanted: list[tuple[int, int]]):
    """For each wanted place inside a function, a maker of its addr2line -i frames from the
    line table's location: (innermost function, that location), then each caller with the
    call_file:call_line of the call inlined into it."""
    out = {}
    if not wanted:
        return out
    by_section: dict[int, list[int]] = {}
    for section, offset in wanted:
        by_section.setdefault(section, []).append(offset)
    for cu in dwarf.iter_CUs():
        top = cu.get_top_DIE()
        program = programs.get(cu.cu_offset)
        base = top.attributes["DW_AT_low_pc"].value if "DW_AT_low_pc" in top.attributes else 0
        stack = list(_children(top))
        while stack:
            die = stack.pop()
            if die.tag in ("DW_TAG_namespace", "DW_TAG_structure_type", "DW_TAG_module"):
                stack.extend(_children(die))
                continue
            if die.tag != "DW_TAG_subprogram" or "DW_AT_low_pc" not in die.attributes:
                continue
            section = addresses.get(die.attributes["DW_AT_low_pc"].offset)
            if section not in by_section:
                continue
            spans = _ranges(die, dwarf, base)
            for offset in by_section[section]:
                if (section, offset) in out or not any(lo <= offset < hi for lo, hi in spans):
                    continue
                chain = [die]
                node = die
                while True:
                    inner = next((c for c in _children(node)
                                  if c.tag in ("DW_TAG_inlined_subroutine", "DW_TAG_lexical_block")
                                  and any(lo <= offset < hi for lo, hi in _ranges(c, dwarf, base))),
                                 None)
                    if inner is None:
                        break
                    if inner.tag == "DW_TAG_inlined_subroutine":
                        chain.append(inner)
                    node = inner
                out[(section, offset)] = _frames_maker(chain, program)
    return out


def _frames_maker(chain: list, program):
    # binutils' bfd (dwarf2.c _bfd_dwarf2_find_nearest_line) names the innermost frame from the
    # symbol table (the function containing the place) when its DIE has no linkage name
    # (rustc's -Cdebuginfo=line-tables-only leaves some with a short name only), and its
    # callers by their DIE's name: "" asks locate_findings for the symbol table's.
    def name(die) -> str:
        return _die_name(die, linkage_only=die is chain[-1])

    def frames(innermost: str) -> list[tuple[str, str]]:
        result = [(name(chain[-1]), innermost)]
        for outer, inner in zip(reversed(chain[:-1]), reversed(chain[1:])):
            attrs = inner.attributes
            call = "?"
            if program is not None and "DW_AT_call_file" in attrs:
                line = attrs["DW_AT_call_line"].value if "DW_AT_call_line" in attrs else 0
                call = f"{_file_name(program, attrs['DW_AT_call_file'].value)}:{line or '?'}"
            result.append((name(outer), call))
        return result
    return frames


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


def _address_sections(elf: Elf, name: str, sort: bool) -> list[int]:
    """For each address-sized relocated field of section NAME (file order), its section:
    in .debug_line, the DW_LNE_set_address of each sequence."""
    target = elf.find(name)
    for rsec in _rela_sections(elf, target):
        offsets, rtypes, symbols, addends = _rela(elf, rsec)
        # Sorted as rows (r_offset, r_info, signed r_addend); r_info is (symbol, type).
        rows = zip(offsets, symbols, rtypes, [a - (1 << 64) if a >> 63 else a for a in addends])
        shndx = elf.symbols().column("shndx")
        rows = sorted(rows) if sort else rows
        return [shndx[i] for _, i, rtype, _ in rows if rtype in ADDRESS_RELOCS and i < len(shndx)]
    return []


def locate_findings(elf: Elf, syms: Symbols, findings: list) -> None:
    """Fill each finding's function and source line from the module's symbols and DWARF."""
    sites = [f for f in findings if f.section and f.offset is not None]
    for f in sites:
        f.function = function_at(elf, syms, f.section, f.offset)
    names = demangle([f.function for f in sites if f.function])
    for f in sites:
        f.function = names.get(f.function, f.function)
    keys: dict[tuple[int, int], list] = {}
    for f in sites:
        keys.setdefault((elf.find(f.section), f.offset), []).append(f)
    located = source_lines(elf, list(keys))
    mangled = [name for loc in located.values() for name, _ in loc.frames if name]
    readable = demangle(mangled)
    for key, location in located.items():
        frames = [(readable.get(n, n), where) for n, where in location.frames]
        if not frames[0][0]:  # the innermost frame, named from the symbol table as bfd does
            frames[0] = (keys[key][0].function, frames[0][1])
        function, where = Location(frames).user_frame()
        for f in keys[key]:
            f.source = where
            if function:
                f.function = function
            f.inlined = [f"{n or '?'} at {w}" for n, w in frames[:frames.index((function, where))]]
