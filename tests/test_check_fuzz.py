"""Hostile input: mutated real modules never crash, hang or leak an exception other than RustkoError."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rustko import check
from rustko.errors import RustkoError

# A hang guard, not a speed claim (the machines are shared): a mutated header must not make the
# checker loop or allocate without bound. Speed is measured in bench/check_tree.py.
SECONDS_PER_CHECK = 60.0

SOURCE = r"""
#include <linux/module.h>
static int table[4];
static int __init f_init(void) { pr_info("f %p\n", &table[1]); return 0; }
module_init(f_init);
MODULE_LICENSE("GPL");
"""


class Seed(bytes):
    """The seed module's bytes, with a short repr for Hypothesis' failure reports."""

    def __repr__(self) -> str:
        return f"<seed module, {len(self)} bytes>"


@pytest.fixture(scope="module")
def module_bytes(tmp_path_factory, kdir61: Path) -> bytes:
    """A real Kbuild module: headers, symbols, RELA sections, .modinfo, DWARF."""
    tmp = tmp_path_factory.mktemp("fuzzmod")
    (tmp / "f.c").write_text(SOURCE)
    (tmp / "Kbuild").write_text("obj-m += f.o\nccflags-y += -fPIC -mcmodel=small\n")
    done = subprocess.run(["make", "-s", "-C", str(kdir61), f"M={tmp}", "modules"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    data = (tmp / "f.ko").read_bytes()
    assert check.check_bytes(data, "f.ko"), "the seed must exercise the finding paths"
    return Seed(data)


def run_check(data: bytes) -> None:
    start = time.monotonic()
    try:
        check.check_bytes(data, "fuzz.ko", version=(6, 1))
    except RustkoError:
        pass
    assert time.monotonic() - start < SECONDS_PER_CHECK


def section_header_field(data: bytes, index: int, field: int) -> int:
    """File offset of one field of section header `index` (ELF64 layout)."""
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    offsets = {0: 0, 1: 4, 2: 8, 3: 16, 4: 24, 5: 32, 6: 40, 7: 44, 8: 48, 9: 56}
    return shoff + 64 * index + offsets[field]


FIELD_SIZE = {0: 4, 1: 4, 2: 8, 3: 8, 4: 8, 5: 8, 6: 4, 7: 4, 8: 8, 9: 8}
COMMON = settings(max_examples=150, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture,
                                         HealthCheck.too_slow])


@COMMON
@given(cut=st.integers(min_value=0, max_value=1 << 20))
def test_truncated(module_bytes: bytes, cut: int) -> None:
    run_check(module_bytes[:cut % (len(module_bytes) + 1)])


@COMMON
@given(at=st.integers(min_value=0, max_value=127), value=st.integers(0, 255))
def test_elf_header_bytes(module_bytes: bytes, at: int, value: int) -> None:
    data = bytearray(module_bytes)
    data[at] = value
    run_check(bytes(data))


@COMMON
@given(section=st.integers(min_value=0, max_value=60), field=st.integers(0, 9),
       value=st.one_of(st.integers(0, 64), st.sampled_from([0xFFFF, 0xFFFFFFFF, 1 << 40,
                                                             (1 << 64) - 1, (1 << 63)])))
def test_section_header_fields(module_bytes: bytes, section: int, field: int, value: int) -> None:
    shnum = struct.unpack_from("<H", module_bytes, 0x3C)[0]
    at = section_header_field(module_bytes, section % shnum, field)
    size = FIELD_SIZE[field]
    data = bytearray(module_bytes)
    data[at:at + size] = (value % (1 << (8 * size))).to_bytes(size, "little")
    run_check(bytes(data))


@COMMON
@given(shstrndx=st.integers(0, 0xFFFF), shnum=st.integers(0, 0xFFFF))
def test_header_counts(module_bytes: bytes, shstrndx: int, shnum: int) -> None:
    data = bytearray(module_bytes)
    struct.pack_into("<HH", data, 0x3C, shnum, shstrndx)
    run_check(bytes(data))


@COMMON
@given(flips=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(1, 255)), max_size=64))
def test_random_byte_flips(module_bytes: bytes, flips: list[tuple[int, int]]) -> None:
    data = bytearray(module_bytes)
    for at, mask in flips:
        data[at % len(data)] ^= mask
    run_check(bytes(data))


def test_every_section_moved_or_emptied(module_bytes: bytes) -> None:
    """Every section's offset and size set to 0 and to 2**32-1, deterministically: the corner the
    random search above once found (.symtab at offset 0 made pyelftools raise DWARFError)."""
    shnum = struct.unpack_from("<H", module_bytes, 0x3C)[0]
    for section in range(shnum):
        for field in (4, 5):  # sh_offset, sh_size
            for value in (0, 0xFFFFFFFF):
                at = section_header_field(module_bytes, section, field)
                data = bytearray(module_bytes)
                data[at:at + 8] = value.to_bytes(8, "little")
                run_check(bytes(data))


def test_a_sibling_pointing_back_ends(module_bytes: bytes, tmp_path: Path) -> None:
    """A DW_AT_sibling pointing at its own DIE (a hang the random flips above found: pyelftools
    walked the same DIEs forever while a finding's source line was looked up): the check ends.
    Run in a process of its own, so that a regression fails the test instead of hanging it."""
    from io import BytesIO

    from elftools.elf.elffile import ELFFile

    data = bytearray(module_bytes)
    elf = ELFFile(BytesIO(bytes(module_bytes)))
    base = elf.get_section_by_name(".debug_info")["sh_offset"]
    for cu in elf.get_dwarf_info(relocate_dwarf_sections=False).iter_CUs():
        sibling = next((die for die in cu.get_top_DIE().iter_children()
                        if die.tag == "DW_TAG_subprogram"
                        and die.attributes.get("DW_AT_sibling", None) is not None
                        and die.attributes["DW_AT_sibling"].form == "DW_FORM_ref4"), None)
        if sibling is not None:
            struct.pack_into("<I", data, base + sibling.attributes["DW_AT_sibling"].offset,
                             sibling.offset - cu.cu_offset)
            break
    else:
        pytest.fail("the seed has no function with a DW_AT_sibling to point back")
    ko = tmp_path / "loop.ko"
    ko.write_bytes(data)
    code = ("import sys\nfrom rustko import check\n"
            "findings = check.check_bytes(open(sys.argv[1], 'rb').read(), 'loop.ko', version=(6, 1))\n"
            "print(len(findings))")
    env = {**os.environ, "PYTHONPATH": str(Path(check.__file__).parent.parent)}
    done = subprocess.run([sys.executable, "-c", code, str(ko)], capture_output=True, text=True,
                          env=env, timeout=SECONDS_PER_CHECK)
    assert done.returncode == 0 and int(done.stdout) > 0, done.stderr
