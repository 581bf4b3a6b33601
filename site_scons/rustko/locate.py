"""Where a finding is in the sources: the function holding an offset (symbol table), its source
line with the chain of inlined calls (DWARF, through pyelftools), readable names (c++filt).

Only called for findings, never on the fast path.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np

from .elf import RELA64, SHT_RELA, STT_FUNC, Elf, Symbols

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


def function_at(elf: Elf, syms: Symbols, section: str, offset: int) -> str:
    index = elf.find(section)
    table = syms.table
    if index is None or not len(table):
        return ""
    hit = np.flatnonzero((table["shndx"] == index) & ((table["info"] & 0xF) == STT_FUNC)
                         & (table["value"] <= np.uint64(offset))
                         & (table["value"] + table["size"] > np.uint64(offset)))
    return syms.name(int(hit[0])) if len(hit) else ""


def source_lines(elf: Elf, wanted: list[tuple[int, int]]) -> dict[tuple[int, int], str]:
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




def locate_findings(elf: Elf, syms: Symbols, findings: list) -> None:
    """Fill each finding's function and source line from the module's symbols and DWARF."""
    sites = [f for f in findings if f.section and f.offset is not None]
    for f in sites:
        f.function = function_at(elf, syms, f.section, f.offset)
    names = demangle([f.function for f in sites if f.function])
    for f in sites:
        f.function = names.get(f.function, f.function)
    keys = {(elf.find(f.section), f.offset): f for f in sites}
    for key, where in source_lines(elf, list(keys)).items():
        keys[key].source = where
