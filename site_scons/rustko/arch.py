"""Every per-architecture fact rustko uses, in one record per architecture.

Kbuild's name, the user's spellings, the Rust target, the linker emulation, the cross toolchain,
Debian's name, the ELF machine and how to boot a guest all used to live in a dozen tables across
the code base; each module now reads them from here through `resolve()`.
"""

from __future__ import annotations

import os
from .errors import RustkoError
from .record import record


# Records (named tuples, rustko.record), not frozen dataclasses: `rustko check` builds them at
# every start-up, and `dataclasses` (with the `inspect` it imports) costs more than the check of
# a small module.
@record
class Vm:
    """How `rustko vmtest` boots a guest of this architecture."""

    command: tuple[str, ...]  # QEMU binary and machine arguments; UML: the kernel's own arguments
    package: str              # the Debian package providing the QEMU binary (UML: the kernel)
    console: str
    uml: bool = False         # the kernel is a host program (User-Mode Linux), not a QEMU guest


@record
class Arch:
    """One architecture as Kbuild, rustc, binutils, Debian, ELF and QEMU each name it."""

    name: str                      # rustko's name (what KernelInfo.arch holds)
    aliases: tuple[str, ...]       # other spellings users type (ARCH=, --arch)
    kbuild: str                    # `make ARCH=` and the folder under KDIR/arch/
    config: str                    # the .config symbol that marks a tree of this architecture
    rust_target: str               # rustc's builtin target the kernel uses (or matches)
    rust_target_source: str        # where the kernel says so
    ld_emulation: str              # `ld -m`, as Kbuild's KBUILD_LDFLAGS
    ld_emulation_source: str
    cross_compile: str             # default CROSS_COMPILE when the host is another architecture
    cross_package: str             # the Debian package with that toolchain
    debian: str                    # Debian's architecture name (`pkg:arch`, .deb file names)
    elf_machine: int               # e_machine of its modules (include/uapi/linux/elf-em.h)
    elf_machine_name: str          # pyelftools' spelling of it
    reloc_prefix: str              # relocation type names (R_X86_64_PC32, ...)
    host_machines: tuple[str, ...]  # `uname -m` values that run its programs natively
    vm: Vm | None = None


# UML comes first: a UML kernel on x86_64 also sets CONFIG_X86_64, so its marker is tested first.
UM = Arch(
    name="um", aliases=(), kbuild="um", config="CONFIG_UML",
    rust_target="x86_64-unknown-none",
    rust_target_source="arch/x86/Makefile.um: target.json from scripts/generate_rust_target.rs (x86_64, no SSE)",
    ld_emulation="elf_x86_64",
    ld_emulation_source="arch/x86/Makefile.um via arch/um/Makefile: the same x86_64 objects",
    cross_compile="", cross_package="binutils gcc", debian="amd64",
    elf_machine=62, elf_machine_name="EM_X86_64", reloc_prefix="R_X86_64_",
    host_machines=("x86_64", "amd64"),
    # mem=3G: physical memory starts at 0x60000000 (where linux.uml is linked) and modules are
    # vmalloc'ed above it (arch/um/include/asm/pgtable.h), so they land above 4 GiB, where a
    # module built without -mcmodel=large overflows as it would on any big UML guest.
    # con0=fd:0,fd:1 con=null: the console on stdio, no xterms for the other consoles.
    vm=Vm(command=("mem=3G", "con=null", "con0=fd:0,fd:1"), package="user-mode-linux", console="tty0", uml=True),
)

X86_64 = Arch(
    name="x86_64", aliases=("x86", "amd64", "x86-64"), kbuild="x86", config="CONFIG_X86_64",
    rust_target="x86_64-unknown-none",
    rust_target_source="arch/x86/Makefile: KBUILD_RUSTFLAGS_OPTION_CHKS += --target=x86_64-unknown-none "
                       "(target.json from scripts/generate_rust_target.rs has the same soft-float ABI)",
    ld_emulation="elf_x86_64",
    ld_emulation_source="arch/x86/Makefile: KBUILD_LDFLAGS += -m elf_$(UTS_MACHINE)",
    cross_compile="x86_64-linux-gnu-", cross_package="gcc-x86-64-linux-gnu", debian="amd64",
    elf_machine=62, elf_machine_name="EM_X86_64", reloc_prefix="R_X86_64_",
    host_machines=("x86_64", "amd64"),
    vm=Vm(command=("qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", "512"),
          package="qemu-system-x86", console="ttyS0"),
)

ARM64 = Arch(
    name="arm64", aliases=("aarch64",), kbuild="arm64", config="CONFIG_ARM64",
    rust_target="aarch64-unknown-none-softfloat",
    rust_target_source="arch/arm64/Makefile: KBUILD_RUSTFLAGS += --target=aarch64-unknown-none-softfloat",
    ld_emulation="aarch64linux",
    ld_emulation_source="arch/arm64/Makefile: -EL $(call ld-option, -maarch64elf, -maarch64linux)",
    cross_compile="aarch64-linux-gnu-", cross_package="gcc-aarch64-linux-gnu", debian="arm64",
    elf_machine=183, elf_machine_name="EM_AARCH64", reloc_prefix="R_AARCH64_",
    host_machines=("aarch64", "arm64"),
    vm=Vm(command=("qemu-system-aarch64", "-M", "virt", "-accel", "tcg", "-cpu", "max", "-m", "1024"),
          package="qemu-system-arm", console="ttyAMA0"),
)

RISCV64 = Arch(
    name="riscv64", aliases=("riscv",), kbuild="riscv", config="CONFIG_RISCV",
    rust_target="riscv64imac-unknown-none-elf",
    rust_target_source="arch/riscv/Makefile: --target=riscv64imac-unknown-none-elf",
    ld_emulation="elf64lriscv",
    ld_emulation_source="arch/riscv/Makefile: KBUILD_LDFLAGS += -melf64lriscv",
    cross_compile="riscv64-linux-gnu-", cross_package="gcc-riscv64-linux-gnu", debian="riscv64",
    elf_machine=243, elf_machine_name="EM_RISCV", reloc_prefix="R_RISCV_",
    host_machines=("riscv64",),
)

ALL: tuple[Arch, ...] = (UM, X86_64, ARM64, RISCV64)

# Every accepted spelling -> rustko's name.
ALIASES: dict[str, str] = {alias: a.name for a in ALL for alias in (a.name, *a.aliases)}

# ELF machine -> rustko's name; x86-64 objects are x86_64 unless their release says UML.
BY_MACHINE: dict[int, str] = {a.elf_machine: a.name for a in ALL if a is not UM}


def resolve(name: str) -> Arch:
    """The record for a user's spelling (`x86`, `amd64`, `aarch64`, ...), or a clear error."""
    found = ALIASES.get(name.lower())
    if found is None:
        raise RustkoError(f"unknown ARCH '{name}'", f"use one of: {', '.join(sorted(ALIASES))}")
    return next(a for a in ALL if a.name == found)


def from_config(config: dict[str, str]) -> Arch | None:
    """The architecture a kernel's .config is for (UML before x86_64, see ALL)."""
    return next((a for a in ALL if config.get(a.config) == "y"), None)


def host() -> Arch | None:
    """The architecture of this machine, when rustko knows it (`os.uname()`, which is what
    `platform.machine()` returns on Linux, without platform's import at every start-up)."""
    machine = os.uname().machine.lower()
    return next((a for a in ALL if a.name != "um" and machine in a.host_machines), None)


def runs_natively(arch: Arch) -> bool:
    """True when the host's own compiler builds for `arch` (UML is a host program)."""
    return os.uname().machine.lower() in arch.host_machines


def default_cross_compile(name: str) -> str:
    """CROSS_COMPILE when the user sets none: empty for the host (and UML), else Debian's GNU prefix."""
    arch = resolve(name)
    return "" if runs_natively(arch) else arch.cross_compile


def toolchain_package(name: str) -> str:
    """The Debian package(s) with the C toolchain Kbuild runs for `name` from this host."""
    arch = resolve(name)
    return "binutils gcc" if runs_natively(arch) else arch.cross_package
