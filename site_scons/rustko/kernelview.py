"""The kernel side of a check: what one KDIR offers a module (exports, vermagic, config), read
once per process, and extra export lists (KBUILD_EXTRA_SYMBOLS). The checks themselves only see
the resulting `KernelView`, never the host."""

from __future__ import annotations

import re
import zlib
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path

from .cache import cache_root, file_stamp, store
from .errors import RustkoError
from .loader import needs_plt_sections
from .record import Slotted, record
from .relocs import Version

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:
    from .kernel import KernelInfo


@record
class Export:
    """One Module.symvers row: who exports a symbol, with which CRC, licence and namespace."""

    crc: int
    owner: str
    gpl_only: bool
    namespace: str


class KernelView(Slotted):
    """What the checker needs from a KDIR: rules version, exports, expected vermagic, config.

    A plain class with slots, not a dataclass: `dataclasses` (and the `inspect` it imports)
    would cost every `rustko check` about a tenth of its start-up."""

    FIELDS = ("arch", "version", "exports", "vermagic", "force_load", "allow_missing_ns",
              "percpu_reserve", "module_struct_size", "sig_enforce", "module_area", "plt_sections",
              "siblings")
    __slots__ = FIELDS

    def __init__(self, arch: str, version: Version, exports: Mapping[str, Export] | None = None,
                 vermagic: str | None = None, force_load: bool = False,
                 allow_missing_ns: bool = False, percpu_reserve: int | None = None,
                 module_struct_size: int | None = None, sig_enforce: bool = False,
                 module_area: int | None = None, plt_sections: tuple[str, ...] | None = None,
                 siblings: dict[str, Export] | None = None) -> None:
        self.arch = arch
        self.version = version
        self.exports = exports
        self.vermagic = vermagic
        self.force_load = force_load
        self.allow_missing_ns = allow_missing_ns
        # include/linux/percpu.h PERCPU_MODULE_RESERVE for this .config (None: not known).
        self.percpu_reserve = percpu_reserve
        # sizeof(struct module) of the running kernel, when known (6.12 compares it, see loader.py).
        self.module_struct_size = module_struct_size
        self.sig_enforce = sig_enforce
        # Bytes of the module area for this .config (loader.module_area; None: not modelled).
        self.module_area = module_area
        # Sections this kernel's module_frob_arch_sections requires (loader.PLT_SECTIONS; None:
        # no .config was read).
        self.plt_sections = plt_sections
        # Exports from the modules checked together and from --extra-symbols files; the kernel's
        # own `exports` win over them, as the loader searches vmlinux first (kernel/module/main.c
        # find_symbol).
        self.siblings: dict[str, Export] = {} if siblings is None else siblings

    def export(self, name: str) -> Export | None:
        """The export that would resolve NAME: the kernel's, else a sibling module's."""
        if self.exports is not None:
            found = self.exports.get(name)
            if found is not None:
                return found
        return self.siblings.get(name)

    def with_siblings(self, siblings: dict[str, Export]) -> "KernelView":
        """A copy whose siblings are these besides its own."""
        values = dict(zip(self.FIELDS, self._values()))
        values["siblings"] = {**self.siblings, **siblings}
        return KernelView(**values)  # type: ignore[arg-type]


# Bytes between two lines an Exports samples: a lookup bisects the sampled lines (about 700 of
# Debian 6.1's 25,000 exports), then finds its own line in the 2 KiB after its sample. The 3,665
# lookups (1,126 names) of the DKMS corpus: 32 million instructions, against 71 million when
# each bisected the byte offsets (about 15 probes of a few searches each) and split the lines
# into a list after 512 names; windows of 1 to 4 KiB cost about the same.
SAMPLE_BYTES = 2048


class Exports(Mapping[str, Export]):
    """Module.symvers rows as the cache keeps them: one line per symbol ("name\tcrc\towner\tgpl\t
    namespace\n"), sorted by name; an Export is made only for the names a check looks up. One
    module needs a few hundred of 25,000, a run over a tree thousands: they are searched in the
    bytes as read, from a sample of the lines (`_sample`), and the lines are split only to
    iterate. Unpickling a dict of them took 20 ms, parsing the text more."""

    def __init__(self, blob: bytes, start: int = 0) -> None:
        self.blob = blob  # the sorted lines from offset `start` on (the cache's stamp line before)
        self.start = start
        self.samples: tuple[list[bytes], list[int]] | None = None  # made on the first lookup
        self.looked_up: dict[str, Export | None] = {}  # the modules of a run share most names

    @staticmethod
    def encode(exports: Mapping[str, Export]) -> bytes:
        """The cache's bytes for `exports` (tab sorts below every character of a symbol name,
        so the lines sort by name)."""
        return b"".join(sorted(f"{name}\t{e.crc:x}\t{e.owner}\t{int(e.gpl_only)}\t{e.namespace}\n"
                               .encode("utf-8", "surrogateescape") for name, e in exports.items()))

    def _sample(self) -> tuple[list[bytes], list[int]]:
        """The first line at or after every SAMPLE_BYTES-th byte, and where each starts."""
        if self.samples is None:
            blob, end = self.blob, len(self.blob)
            starts = [self.start] if self.start < end else []
            for at in range(self.start + SAMPLE_BYTES, end, SAMPLE_BYTES):
                at = blob.find(b"\n", at - 1) + 1
                if 0 < at < end and at > starts[-1]:
                    starts.append(at)
            self.samples = ([blob[at:blob.index(b"\n", at)] for at in starts], starts)
        return self.samples

    def _line(self, name: str) -> bytes | None:
        """The line of NAME, without its newline (None: not exported). A sampled line sorts
        below `key` exactly when its name sorts below NAME, so the line, when there is one, is
        the sample `bisect_left` finds or lies after the sample before it, newline first."""
        key = name.encode("utf-8", "surrogateescape") + b"\t"
        lines, starts = self._sample()
        blob = self.blob
        i = bisect_left(lines, key)
        if i < len(lines) and lines[i].startswith(key):
            at = starts[i]
        elif i == 0:
            return None
        else:
            at = blob.find(b"\n" + key, starts[i - 1], starts[i] if i < len(starts) else len(blob)) + 1
            if not at:
                return None
        return blob[at:blob.index(b"\n", at)]

    def get(self, name: str, default: Export | None = None) -> Export | None:
        """Mapping.get without the KeyError: most names a module looks up are there, but a
        sibling's or a weak symbol's are not, and raising costs more than the search."""
        if name not in self.looked_up:
            line = self._line(name)
            if line is None:
                self.looked_up[name] = None
            else:
                _, crc, owner, gpl, namespace = line.decode("utf-8", "surrogateescape").split("\t")
                self.looked_up[name] = Export(int(crc, 16), owner, gpl == "1", namespace)
        found = self.looked_up[name]
        return default if found is None else found

    def __getitem__(self, name: str) -> Export:
        found = self.get(name)
        if found is None:
            raise KeyError(name)
        return found

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[str]:
        return (line.split(b"\t", 1)[0].decode("utf-8", "surrogateescape")
                for line in self.blob[self.start:].split(b"\n")[:-1])

    def __len__(self) -> int:
        return self.blob.count(b"\n", self.start)


def read_symvers(path: Path) -> Mapping[str, Export]:
    """Parse Module.symvers (scripts/mod/modpost.c write_dump: crc, symbol, owner, export, ns).

    Parsed once per file version and kept in the cache as sorted lines (`Exports`, which
    searches them as read): every build checks its module against the same 25,000 exports, and
    parsing them costs more than the check itself.
    """
    try:
        version = file_stamp(path)
    except OSError as err:
        raise RustkoError(f"cannot read {path}: {err.strerror}",
                          "KDIR must contain Module.symvers (a headers package or a built tree)")
    # The first line names the file version (cache.file_stamp); the name only spreads versions
    # over files (zlib, not hashlib, whose OpenSSL start-up costs more than reading the cache).
    stamp = f"{version}\n".encode("utf-8", "surrogateescape")
    cached = cache_root() / "symvers" / f"{zlib.crc32(stamp):08x}.sorted"
    try:
        blob = cached.read_bytes()
        if blob.startswith(stamp):
            return Exports(blob, len(stamp))
    except OSError:
        pass
    blob = Exports.encode(_parse_symvers(path))
    store(cached, stamp + blob)
    return Exports(blob)


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
    on = kernel.enabled  # the few symbols looked up, not the 9,000 entries scanned
    preempt = ("preempt " if on("PREEMPT_BUILD") or (
        on("PREEMPT") and "CONFIG_PREEMPT_BUILD" not in kernel.config)
        else "preempt_rt " if on("PREEMPT_RT") else "")
    arch_magic = {"arm64": "aarch64", "riscv64": "riscv"}.get(kernel.arch, "")
    randstruct = ""
    hash_file = kernel.kdir / "include/generated/randstruct_hash.h"
    if on("RANDSTRUCT") and hash_file.is_file():
        match = re.search(r'RANDSTRUCT_HASHED_SEED\s+"([0-9a-f]+)"', hash_file.read_text())
        if match:
            randstruct = "RANDSTRUCT_" + match.group(1)
    return (kernel.release + " " + ("SMP " if on("SMP") else "") + preempt
            + ("mod_unload " if on("MODULE_UNLOAD") else "")
            + ("modversions " if on("MODVERSIONS") else "") + arch_magic + randstruct)


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
        plt_sections=needs_plt_sections(info.arch, tuple(info.version), info.enabled),
    )


# kernel/module/main.c elf_validity_cache_index_mod compares the size of the module's
# .gnu.linkonce.this_module with sizeof(struct module) (6.12.117; not in 6.1.192).
THIS_MODULE_SINCE: Version = (6, 12)
STRUCT_MODULE_PROBE = ("#include <linux/module.h>\n"
                       "const char rustko_struct_module_size[sizeof(struct module)] = { 1 };\n")


def struct_module_size(info: "KernelInfo") -> int | None:
    """sizeof(struct module) for KDIR's .config: one object compiled by its own Kbuild (the
    headers do not say it), cached per KDIR and .config. None when it cannot be compiled."""
    import hashlib
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
    store(cached, str(sizes[0]).encode())
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


