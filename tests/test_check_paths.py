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
from rustko.elf import SHF_ALLOC, SHT_RELA, Elf
from rustko.errors import RustkoError
from rustko.kernel import probe
from test_check import VARIANTS, _build_c

MUTANTS_PER_MODULE = 120


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
    offset, or 4 bytes into an 8-byte field), nonzero bytes under a field, a cut table."""
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
        how = rng.randrange(9)
        if how == 0:
            info = (info & ~0xFFFFFFFF) | rng.choice([3, 9, 10, 11, 12, 24, 41, 42, 300])
        elif how == 1:
            info = (rng.choice([0, 1, 2, len(elf.symbols()) - 1, len(elf.symbols()), 1 << 31]) << 32) | (info & 0xFFFFFFFF)
        elif how == 2:
            offset = target.size - rng.choice([0, 1, 3, 4, 7, 8]) if target.size >= 8 else 1 << 63
        elif how == 3:
            offset = struct.unpack_from("<Q", data, at + 24)[0] + rng.choice([0, 4])
        elif how == 4 and target.type != 8 and offset + 4 <= target.size:
            buf[target.offset + offset + rng.randrange(4)] = rng.randrange(1, 256)
        elif how == 5:
            addend = rng.choice([0, -4, 1 << 31, -(1 << 31) - 1, (1 << 63) - 1, -(1 << 63)])
        elif how == 6:
            info = (info & ~0xFFFFFFFF) | rng.choice([10, 11])  # 32-bit fields: the overflow check
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
