"""The kernel side of a check: what one KDIR offers a module (exports, vermagic, config), read
once per process, and extra export lists (KBUILD_EXTRA_SYMBOLS). The checks themselves only see
the resulting `KernelView`, never the host."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Iterator, Mapping
from dataclasses import astuple, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from .cache import cache_root
from .errors import RustkoError
from .relocs import Version

if TYPE_CHECKING:
    from .kernel import KernelInfo


@dataclass(frozen=True)
class Export:
    """One Module.symvers row: who exports a symbol, with which CRC, licence and namespace."""

    crc: int
    owner: str
    gpl_only: bool
    namespace: str


@dataclass
class KernelView:
    """What the checker needs from a KDIR: rules version, exports, expected vermagic, config."""

    arch: str
    version: Version
    exports: Mapping[str, Export] | None = None
    vermagic: str | None = None
    force_load: bool = False
    allow_missing_ns: bool = False
    # include/linux/percpu.h PERCPU_MODULE_RESERVE for this .config (None: not known).
    percpu_reserve: int | None = None
    # sizeof(struct module) of the running kernel, when known (6.12 compares it, see loader.py).
    module_struct_size: int | None = None
    sig_enforce: bool = False
    # Bytes of the module area for this .config (loader.module_area; None: not modelled).
    module_area: int | None = None
    # Exports from the modules checked together and from --extra-symbols files; the kernel's own
    # `exports` win over them, as the loader searches vmlinux first (kernel/module/main.c
    # find_symbol).
    siblings: dict[str, Export] = field(default_factory=dict)

    def export(self, name: str) -> Export | None:
        """The export that would resolve NAME: the kernel's, else a sibling module's."""
        if self.exports is not None:
            found = self.exports.get(name)
            if found is not None:
                return found
        return self.siblings.get(name)

    def with_siblings(self, siblings: dict[str, Export]) -> "KernelView":
        return replace(self, siblings={**self.siblings, **siblings})


class Exports(Mapping[str, Export]):
    """Module.symvers rows as the cache keeps them (tuples), an Export made only for the names a
    check looks up: one module needs a few dozen of 25,000, and making them all took longer than
    checking it."""

    def __init__(self, rows: dict[str, tuple[int, str, bool, str]]) -> None:
        self.rows = rows

    def __getitem__(self, name: str) -> Export:
        return Export(*self.rows[name])

    def __contains__(self, name: object) -> bool:
        return name in self.rows

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def read_symvers(path: Path) -> Mapping[str, Export]:
    """Parse Module.symvers (scripts/mod/modpost.c write_dump: crc, symbol, owner, export, ns).

    Parsed once per file version and kept in the cache: every build checks its module against
    the same 25,000 exports, and parsing them costs more than the check itself.
    """
    try:
        info = path.stat()
    except OSError as err:
        raise RustkoError(f"cannot read {path}: {err.strerror}",
                          "KDIR must contain Module.symvers (a headers package or a built tree)")
    key = hashlib.sha256(f"{path.resolve()}|{info.st_size}|{info.st_mtime_ns}".encode()).hexdigest()[:24]
    cached = cache_root() / "symvers" / f"{key}.pickle"
    try:
        with open(cached, "rb") as handle:
            return Exports(pickle.load(handle))
    except (OSError, pickle.UnpicklingError, EOFError, TypeError, ValueError):
        pass
    exports = _parse_symvers(path)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
        with open(tmp, "wb") as handle:
            pickle.dump({name: astuple(e) for name, e in exports.items()}, handle, pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only cache only costs speed
    return exports


def _parse_symvers(path: Path) -> dict[str, Export]:
    exports: dict[str, Export] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        raise RustkoError(f"cannot read {path}: {err.strerror}",
                          "KDIR must contain Module.symvers (a headers package or a built tree)")
    for line in text.splitlines():
        cols = line.split("\t")
        if len(cols) < 4:
            continue
        try:
            crc = int(cols[0], 16)
        except ValueError:
            continue
        exports[cols[1]] = Export(crc, cols[2], cols[3].endswith("_GPL"),
                                  cols[4] if len(cols) > 4 else "")
    return exports


def expected_vermagic(kernel: "KernelInfo") -> str:
    """VERMAGIC_STRING as include/linux/vermagic.h builds it for this .config (6.1/6.12 text)."""
    cfg = kernel.config
    on = {key for key, value in cfg.items() if value == "y"}
    preempt = ("preempt " if "CONFIG_PREEMPT_BUILD" in on or (
        "CONFIG_PREEMPT" in on and "CONFIG_PREEMPT_BUILD" not in cfg)
        else "preempt_rt " if "CONFIG_PREEMPT_RT" in on else "")
    arch_magic = {"arm64": "aarch64", "riscv64": "riscv"}.get(kernel.arch, "")
    randstruct = ""
    hash_file = kernel.kdir / "include/generated/randstruct_hash.h"
    if "CONFIG_RANDSTRUCT" in on and hash_file.is_file():
        match = re.search(r'RANDSTRUCT_HASHED_SEED\s+"([0-9a-f]+)"', hash_file.read_text())
        if match:
            randstruct = "RANDSTRUCT_" + match.group(1)
    return (kernel.release + " " + ("SMP " if "CONFIG_SMP" in on else "") + preempt
            + ("mod_unload " if "CONFIG_MODULE_UNLOAD" in on else "")
            + ("modversions " if "CONFIG_MODVERSIONS" in on else "") + arch_magic + randstruct)


@lru_cache(maxsize=4)
def kernel_view(kdir: str) -> KernelView:
    """Probe KDIR once per process (workers call this too)."""
    from .kernel import probe

    info = probe(kdir)
    return KernelView(
        arch=info.arch, version=tuple(info.version), exports=read_symvers(info.symvers),
        vermagic=expected_vermagic(info), force_load=info.enabled("MODULE_FORCE_LOAD"),
        allow_missing_ns=info.enabled("MODULE_ALLOW_MISSING_NAMESPACE_IMPORTS"),
        percpu_reserve=percpu_reserve(info.enabled, tuple(info.version)),
        module_struct_size=(struct_module_size(info) if tuple(info.version) >= THIS_MODULE_SINCE
                            else None),
        sig_enforce=info.enabled("MODULE_SIG_FORCE"),
        module_area=module_area(info.arch, info.enabled),
    )


# kernel/module/main.c elf_validity_cache_index_mod compares the size of the module's
# .gnu.linkonce.this_module with sizeof(struct module) (6.12.117; not in 6.1.192).
THIS_MODULE_SINCE: Version = (6, 12)
STRUCT_MODULE_PROBE = ("#include <linux/module.h>\n"
                       "const char rustko_struct_module_size[sizeof(struct module)] = { 1 };\n")


def struct_module_size(info: "KernelInfo") -> int | None:
    """sizeof(struct module) for KDIR's .config: one object compiled by its own Kbuild (the
    headers do not say it), cached per KDIR and .config. None when it cannot be compiled."""
    import subprocess
    import tempfile

    from .elf import Elf
    from .kbuild import KbuildJob

    config = info.kdir / ".config"
    try:
        stamp = config.stat()
    except OSError:
        return None
    key = hashlib.sha256(f"{info.kdir.resolve()}|{stamp.st_size}|{stamp.st_mtime_ns}|"
                         f"{STRUCT_MODULE_PROBE}".encode()).hexdigest()[:24]
    cached = cache_root() / "struct-module" / key
    try:
        return int(cached.read_text())
    except (OSError, ValueError):
        pass
    with tempfile.TemporaryDirectory(prefix="rustko-struct-module-") as tmp:
        folder = Path(tmp)
        (folder / "rustko_struct_module.c").write_text(STRUCT_MODULE_PROBE)
        (folder / "Kbuild").write_text("obj-m := rustko_struct_module.o\n")
        command = KbuildJob(info, folder).make_command()[:-1] + ["rustko_struct_module.o"]
        done = subprocess.run(command, capture_output=True, text=True)
        obj = folder / "rustko_struct_module.o"
        if done.returncode != 0 or not obj.is_file():
            return None
        elf = Elf(obj.read_bytes(), str(obj))
        syms = elf.symbols()
        sizes = [int(syms.table["size"][i]) for i in range(len(syms.table))
                 if syms.name(i) == "rustko_struct_module_size"]
    if not sizes:
        return None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(str(sizes[0]))
    except OSError:
        pass
    return sizes[0]


def percpu_reserve(enabled, version: Version) -> int | None:
    """PERCPU_MODULE_RESERVE: include/linux/percpu.h; 8 KiB (6.1.192), 64 KiB with
    CONFIG_MEM_ALLOC_PROFILING (6.12.117, commit 'lib: add allocation tagging support', v6.10).
    None without CONFIG_SMP (UML): the UP find_pcpusec (kernel/module/main.c, 6.1.192, 6.12.117)
    returns 0, so .data..percpu is ordinary module data and no per-CPU rule applies."""
    if not enabled("SMP"):
        return None
    if version >= (6, 10) and enabled("MEM_ALLOC_PROFILING"):
        return 8 << 13
    return 8 << 10


def module_area(arch: str, enabled) -> int | None:
    """The largest piece of module memory for this .config (the table and its sources:
    loader.MODULE_AREA; None: not modelled, or not computable from a KDIR)."""
    from .loader import MODULE_AREA

    area = MODULE_AREA.get(arch)
    return area.size(enabled) if area and area.size else None


def read_extra_symbols(paths: list[str]) -> dict[str, Export]:
    """Module.symvers files a user names (`--extra-symbols`, as KBUILD_EXTRA_SYMBOLS): their
    exports resolve a module's symbols the way modpost lets them for one build."""
    out: dict[str, Export] = {}
    for path in paths:
        out.update(_parse_symvers(Path(path)))
    return out


