"""The checker's two relocation passes give the same verdicts, and one module is checked without numpy.

`check._clean_small` decides in pure Python that a module's relocation tables have no finding;
anything else goes to the numpy pass, which makes the findings. Both are run here on the same
modules, real and broken, and every result (findings, or the error for a corrupt file) must be
identical; the pure pass must really decide most clean modules, or the comparison says nothing.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import rustko
from rustko import check, vm
from rustko.elf import SHF_ALLOC, SHT_RELA, SHT_SYMTAB, STB_WEAK, Elf
from rustko.errors import RustkoError
from rustko.kernel import probe
from test_check import VARIANTS, _build_c

MUTANTS_PER_MODULE = 160
# Addends around the edges where S+A stops fitting a 32-bit field on x86_64 (relocs.X86: module
# area 0xffffffffa0000000-0xffffffffff000000, kernel image from 0xffffffff80000000, per-CPU
# offsets below 0x10000000; 32S fits from -2**31, 32 up to 2**32 - 1) for a symbol of value 0.
EDGE_ADDENDS = (0, 0x81000000, 0xC0000000, 0x7FFFFFFF, -(1 << 31), 0xFFFFFFFF, 0x60000000,
                0x5F000000, -0x10000000, 0xF0000000, 0x70000000)


def outcome(data: bytes, path: str, **kwargs: object) -> object:
    try:
        return [f.as_dict() for f in check.check_bytes(data, path, locate=False, **kwargs)]
    except RustkoError as err:
        return str(err)


def both_passes(monkeypatch: pytest.MonkeyPatch, data: bytes, path: str, **kwargs: object
                ) -> tuple[object, object, bool]:
    """(result with the pure pass first, result of the numpy pass alone, pure pass said clean)."""
    said: list[bool] = []
    real = check._clean_small

    def spy(*args: object) -> bool:
        said.append(real(*args))
        return said[-1]

    monkeypatch.setattr(check, "_clean_small", spy)
    monkeypatch.setattr(check, "_pure_pass", lambda entries: True)
    pure = outcome(data, path, **kwargs)
    monkeypatch.setattr(check, "_pure_pass", lambda entries: False)
    numpy = outcome(data, path, **kwargs)
    monkeypatch.undo()
    return pure, numpy, bool(said) and said[0]


def mutants(data: bytes, seed: int) -> list[bytes]:
    """Copies of a module with its applied RELA tables or the fields they write broken: another
    type or symbol, an offset at or past the section's end, an entry written twice (the same
    offset, or 1 to 7 bytes into the next field), nonzero bytes under a field, a cut table, addends
    at the edges of the 32-bit overflow (weak symbols too), entries out of order, two tables for
    one section."""
    elf = Elf(data, "seed")
    tables = [(i, s) for i, s in enumerate(elf.sections) if s.type == SHT_RELA and s.size >= 48
              and s.info < len(elf.sections) and elf.sections[s.info].flags & SHF_ALLOC]
    rng = random.Random(seed)
    out: list[bytes] = []
    for _ in range(MUTANTS_PER_MODULE):
        index, table = rng.choice(tables)
        target = elf.sections[table.info]
        count = table.size // 24
        i = rng.randrange(count - 1)
        at = table.offset + 24 * i
        offset, info, addend = struct.unpack_from("<QQq", data, at)
        buf = bytearray(data)
        how = rng.randrange(12)
        if how == 0:
            info = (info & ~0xFFFFFFFF) | rng.choice([3, 9, 10, 11, 12, 24, 41, 42, 300])
        elif how == 1:
            info = (rng.choice([0, 1, 2, len(elf.symbols()) - 1, len(elf.symbols()), 1 << 31]) << 32) | (info & 0xFFFFFFFF)
        elif how == 2:
            offset = target.size - rng.choice([0, 1, 3, 4, 7, 8]) if target.size >= 8 else 1 << 63
        elif how == 3:
            offset = struct.unpack_from("<Q", data, at + 24)[0] + rng.choice([0, 1, 3, 4, 7])
        elif how == 4 and target.type != 8 and offset + 4 <= target.size:
            buf[target.offset + offset + rng.randrange(4)] = rng.randrange(1, 256)
        elif how == 5:
            addend = rng.choice([0, -4, 1 << 31, -(1 << 31) - 1, (1 << 63) - 1, -(1 << 63)])
        elif how == 6:
            info = (info & ~0xFFFFFFFF) | rng.choice([10, 11])  # 32-bit fields: the overflow check
        elif how == 9:  # the x86 32-bit overflow at its edges (module, kernel, weak, per-CPU)
            info = (info & ~0xFFFFFFFF) | rng.choice([10, 11])
            addend = rng.choice(EDGE_ADDENDS) + rng.choice([-1, 0, 1])
            if rng.randrange(2):  # against an undefined weak symbol (0 where nothing exports it)
                _make_weak(buf, elf, info >> 32)
        elif how == 10:  # the table's entries out of order (no finding by itself)
            j = rng.randrange(count)
            buf[at:at + 24], buf[table.offset + 24 * j:table.offset + 24 * j + 24] = (
                data[table.offset + 24 * j:table.offset + 24 * j + 24], data[at:at + 24])
            out.append(bytes(buf))
            continue
        elif how == 11:  # two tables for one section: their fields compared together
            other = rng.choice(tables)[1]
            shoff = struct.unpack_from("<Q", data, 0x28)[0]
            struct.pack_into("<I", buf, shoff + 64 * index + 44, other.info)  # sh_info
            out.append(bytes(buf))
            continue
        elif how == 7:
            shoff = struct.unpack_from("<Q", data, 0x28)[0]
            struct.pack_into("<Q", buf, shoff + 64 * index + 32,  # sh_size
                             table.size + rng.choice([-1, 24, 1 << 40]))
            out.append(bytes(buf))
            continue
        else:
            buf[at:at + 24] = data[at + 24:at + 48]  # the next entry twice
            out.append(bytes(buf))
            continue
        struct.pack_into("<QQq", buf, at, offset & ((1 << 64) - 1), info & ((1 << 64) - 1), addend)
        out.append(bytes(buf))
    return out


def _make_weak(buf: bytearray, elf: Elf, index: int) -> None:
    """Symbol `index` of the copy becomes undefined and weak (STB_WEAK, SHN_UNDEF)."""
    symtab = next((s for s in elf.sections if s.type == SHT_SYMTAB), None)
    if symtab is None or not 0 < index < symtab.size // 24:
        return
    at = symtab.offset + 24 * index
    buf[at + 4] = (STB_WEAK << 4) | (buf[at + 4] & 0xF)
    struct.pack_into("<H", buf, at + 6, 0)


@pytest.fixture(scope="module")
def debian_sample(kdir61: Path) -> list[Path]:
    """Every 40th module Debian ships for 6.1, in tree order: small to large ones."""
    tree = vm.debian_modules(probe(kdir61).release)
    return sorted(tree.rglob("*.ko"))[::40]


def test_passes_agree_on_debian_modules(monkeypatch, debian_sample, kdir61) -> None:
    view = check.kernel_view(str(kdir61))
    decided = 0
    for ko in debian_sample:
        data = ko.read_bytes()
        for kwargs in ({}, {"kernel": view}, {"arch": "um", "version": (6, 1)},
                       {"version": (4, 15)}, {"version": (6, 12)}):
            pure, numpy, clean = both_passes(monkeypatch, data, str(ko), **kwargs)
            assert pure == numpy, (ko, kwargs)
            decided += clean
    # The comparison above means something only if the pure pass decided most of them.
    assert decided > len(debian_sample) * 2


def test_passes_agree_on_broken_relocations(monkeypatch, debian_sample) -> None:
    c_modules = [_build_c(variant) for variant in VARIANTS]
    seeds = [c_modules[0], debian_sample[0], debian_sample[len(debian_sample) // 2]]
    clean = refused = errors = 0
    for n, ko in enumerate(seeds):
        for data in mutants(ko.read_bytes(), n):
            pure, numpy, said_clean = both_passes(monkeypatch, data, "mutant.ko", version=(6, 1))
            assert pure == numpy
            clean += said_clean
            refused += isinstance(numpy, list) and bool(numpy)
            errors += isinstance(numpy, str)
    assert refused > 100 and errors > 5 and clean > 5, (refused, errors, clean)


def test_pure_pass_decides_tables_out_of_order(monkeypatch, debian_sample) -> None:
    """A table the loader applies cleanly in any order (each RELA table reversed) is still
    decided by the pure pass, not left to numpy: its order check sorts before it gives up."""
    seeds = [_build_c("good"), debian_sample[0], debian_sample[len(debian_sample) // 2]]
    for ko in seeds:
        data = ko.read_bytes()
        elf = Elf(data, str(ko))
        buf = bytearray(data)
        for table in elf.sections:
            if table.type == SHT_RELA and table.size >= 48:
                rows = [data[at:at + 24] for at in range(table.offset, table.offset + table.size, 24)]
                buf[table.offset:table.offset + 24 * len(rows)] = b"".join(reversed(rows))
        pure, numpy, clean = both_passes(monkeypatch, bytes(buf), str(ko), version=(6, 1))
        assert pure == numpy == [] and clean, (ko, numpy)


def test_passes_agree_at_the_overflow_edges(monkeypatch, kdir61) -> None:
    """The pure pass decides the 32-bit overflow from bounds: each edge, one past it and one
    before, for R_X86_64_32 and 32S against a section, a defined, an undefined and (each made)
    a weak undefined symbol, must give the numpy pass's verdict."""
    data = _build_c("good").read_bytes()
    elf = Elf(data, "edges")
    syms = elf.symbols()
    picks: dict[str, int] = {}  # symbol class -> file offset of one applied RELA entry
    for index, table in enumerate(elf.sections):
        if table.type != SHT_RELA or not elf.sections[table.info].flags & SHF_ALLOC:
            continue
        if elf.names[table.info] in (".modinfo", "__versions"):
            continue
        for at in range(table.offset, table.offset + table.size, 24):
            _, sinfo, _, shndx, _, _ = syms.sym(struct.unpack_from("<Q", data, at + 8)[0] >> 32)
            kind = "undefined" if shndx == 0 else "section" if sinfo & 0xF == 3 else "defined"
            picks.setdefault(kind, at)
    assert set(picks) == {"undefined", "section", "defined"}, picks
    verdicts = set()
    for kind, at in picks.items():
        symbol = struct.unpack_from("<Q", data, at + 8)[0] >> 32
        for rtype in (10, 11):
            for edge in EDGE_ADDENDS:
                for addend in (edge - 1, edge, edge + 1):
                    for weak in (False, True) if kind != "section" else (False,):
                        buf = bytearray(data)
                        struct.pack_into("<Qq", buf, at + 8, symbol << 32 | rtype, addend)
                        if weak:
                            _make_weak(buf, elf, symbol)
                        pure, numpy, clean = both_passes(monkeypatch, bytes(buf), "edge.ko",
                                                         version=(6, 1))
                        assert pure == numpy, (kind, rtype, hex(addend), weak)
                        verdicts.add(clean)
    assert verdicts == {True, False}  # both sides of the edges were reached


def test_passes_agree_on_the_c_variants(monkeypatch, kdir61) -> None:
    view = check.kernel_view(str(kdir61))
    for variant in VARIANTS:
        ko = _build_c(variant)
        for kwargs in ({"kernel": view}, {"arch": "um", "version": (6, 1)}, {"version": (6, 12)}):
            pure, numpy, _ = both_passes(monkeypatch, ko.read_bytes(), str(ko), **kwargs)
            assert pure == numpy, (variant, kwargs)


def test_one_module_check_does_not_import_numpy(debian_sample, kdir61) -> None:
    """`rustko check --kdir K one.ko`: numpy's import alone costs more than the whole check."""
    module = max(debian_sample, key=lambda p: p.stat().st_size if p.stat().st_size < 400_000 else 0)
    code = ("import sys\nfrom rustko.cli import main\n"
            f"code = main(['check', '--kdir', {str(kdir61)!r}, {str(module)!r}])\n"
            "print(code, 'numpy' in sys.modules)\n")
    site = str(Path(rustko.__file__).resolve().parent.parent)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": site})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "0 False", done.stdout
    assert len(Elf(module.read_bytes(), str(module)).sections) > 20  # a real, sizeable module
