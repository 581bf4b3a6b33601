"""User-Mode Linux: a KDIR that matches Debian's packaged UML kernel, and that kernel itself.

Debian has no UML headers package, but `user-mode-linux` ships everything needed to make one: the
kernel (`/usr/bin/linux.uml`), its `.config` (`config.gz`), its modules, and (in `Built-Using`)
the exact `linux` source version it was built from. Preparing a KDIR is therefore: that version's
`linux-source` tarball, the package's own config, `make ARCH=um modules_prepare`, and a
Module.symvers rebuilt from the exports of the kernel binary and its modules (the packaged config
has no CONFIG_MODVERSIONS, so every CRC is 0 and the vermagic is just `RELEASE mod_unload`).
Modules built against it load into the packaged kernel. Prepared once into the cache (23 s on
an idle 2-core machine here, 40 s under load), reused afterwards.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import cache, debian
from .errors import RustkoError

PACKAGE = "user-mode-linux"
INSTALL_HINT = f"apt-get install {PACKAGE}   (Debian's UML kernel, its modules and its config)"
KERNEL = Path("/usr/bin/linux.uml")
MODULES = Path("/usr/lib/uml/modules")
CONFIG = Path("/usr/share/doc/user-mode-linux/config.gz")

# Bumped when the preparation recipe changes what lands in the cached KDIR.
RECIPE_VERSION = "1"

# What an out-of-tree `make -C KDIR M=... ARCH=um` reads after modules_prepare: the top-level
# files, include/, scripts/ and the two arch folders (arch/um/Makefile includes
# arch/x86/Makefile.um and arch/x86/um headers). The rest of the 1.5 GB tree is removed.
KEEP_DIRS: tuple[str, ...] = ("include", "scripts", "arch/um", "arch/x86")


@dataclass(frozen=True)
class UmlPackage:
    """The installed user-mode-linux package: kernel, release, config and source version."""

    kernel: Path
    release: str
    config: bytes
    source_version: str  # Debian version of the `linux` source it was built from, e.g. 6.1.176-1

    @property
    def series(self) -> str:
        return ".".join(self.source_version.split(".")[:2])


def uml_kernel() -> Path:
    """The packaged UML kernel binary (`linux.uml`), run as an ordinary process by vmtest."""
    if not (KERNEL.is_file() and os.access(KERNEL, os.X_OK)):
        raise RustkoError(f"no User-Mode Linux kernel at {KERNEL}", INSTALL_HINT)
    return KERNEL


def package() -> UmlPackage:
    kernel = uml_kernel()
    releases = sorted(p.name for p in MODULES.iterdir() if p.is_dir()) if MODULES.is_dir() else []
    if len(releases) != 1:
        raise RustkoError(f"expected one kernel release under {MODULES}, found {releases or 'none'}",
                          f"reinstall the package: apt-get install --reinstall {PACKAGE}")
    if not CONFIG.is_file():
        raise RustkoError(f"{CONFIG} is missing: the UML kernel's .config comes from there",
                          f"apt-get install --reinstall {PACKAGE}")
    built_using = _dpkg_field(PACKAGE, "Built-Using")
    match = re.search(r"\blinux \(= ([0-9][^)\s]*)\)", built_using)
    if match is None:
        raise RustkoError(f"{PACKAGE} does not say which linux source built it (Built-Using: {built_using!r})",
                          f"apt-get install --reinstall {PACKAGE}")
    return UmlPackage(kernel=kernel, release=releases[0], config=gzip.decompress(CONFIG.read_bytes()),
                      source_version=match.group(1))


def uml_releases() -> set[str]:
    """Kernel releases that are UML kernels on this machine: how vmtest and check tell a UML
    module from an x86_64 one (same ELF machine, and UML's vermagic has no arch marker)."""
    return {p.name for p in MODULES.iterdir() if p.is_dir()} if MODULES.is_dir() else set()


def _dpkg_field(pkg: str, name: str) -> str:
    value = debian.installed(pkg, name)
    if value is None:
        raise RustkoError(f"{pkg} is not installed", INSTALL_HINT)
    return value


def kdir_path(pkg: UmlPackage) -> Path:
    digest = hashlib.sha256()
    for part in (RECIPE_VERSION, pkg.source_version, pkg.release):
        digest.update(part.encode() + b"\0")
    digest.update(pkg.config)
    return cache.cache_root() / "kdir" / f"um-{pkg.release}-{digest.hexdigest()[:12]}"


def prepare_uml_kdir(log: Callable[[str], None] | None = None) -> Path:
    """A KDIR for the packaged UML kernel, prepared once into the cache and reused."""
    pkg = package()
    path = kdir_path(pkg)
    if path.is_dir():
        return path
    log = log or _default_log

    def fill(tmp: Path) -> None:
        started = time.monotonic()
        log(f"preparing a UML KDIR for {pkg.kernel} ({pkg.release}) from linux-source-{pkg.series} "
            f"{pkg.source_version} (once; about 30 s)")
        with tempfile.TemporaryDirectory(prefix="rustko-src-") as download:
            tarball = _source_tarball(pkg, Path(download))
            _untar(tarball, tmp)
        (tmp / ".config").write_bytes(pkg.config)
        _make(tmp, "olddefconfig")
        _make(tmp, "modules_prepare")
        release = (tmp / "include/config/kernel.release").read_text().strip()
        if release != pkg.release:
            raise RustkoError(f"linux-source {pkg.source_version} with {PACKAGE}'s config prepares release "
                              f"{release}, but the packaged kernel is {pkg.release}",
                              "the package and its Built-Using source disagree; pass KDIR= a UML tree")
        _prune(tmp)
        (tmp / "Module.symvers").write_text(module_symvers(pkg.kernel, MODULES / pkg.release))
        (tmp / "rustko-uml.txt").write_text(
            f"kernel {pkg.kernel}\nrelease {pkg.release}\nsource linux-source-{pkg.series} "
            f"{pkg.source_version}\nconfig {CONFIG}\nprepared in {time.monotonic() - started:.1f} s\n")

    return cache.cached_dir(path, fill)


def _default_log(message: str) -> None:
    print(f"  UML {message}", file=sys.stderr, flush=True)


def _source_tarball(pkg: UmlPackage, download: Path) -> Path:
    """`linux-source-SERIES.tar.xz` of exactly the version that built the packaged kernel."""
    name = f"linux-source-{pkg.series}"
    installed = Path("/usr/src") / f"{name}.tar.xz"
    if installed.is_file() and debian.installed(name) == pkg.source_version:
        return installed
    hint = ("run `apt-get update`; the UML kernel's exact source version must be in the archive "
            "(or pass KDIR= a prepared UML tree)")
    deb = debian.download(name, "all", download, hint=hint, version=pkg.source_version)
    out = download / f"{name}.tar.xz"
    debian.extract_file(deb, f"./usr/src/{name}.tar.xz", out)
    return out


def _untar(tarball: Path, dest: Path) -> None:
    """Unpack the tree's top folder into `dest` (xz decoded with both cores: about 10 s)."""
    xz = subprocess.Popen(["xz", "-dc", "-T0", str(tarball)], stdout=subprocess.PIPE)
    tar = subprocess.run(["tar", "-x", "--strip-components=1", "-C", str(dest)], stdin=xz.stdout,
                         stderr=subprocess.PIPE)
    xz.wait()
    if xz.returncode != 0 or tar.returncode != 0:
        raise RustkoError(f"cannot unpack {tarball}: {tar.stderr.decode(errors='replace').strip()}",
                          "apt-get install xz-utils")


def _make(tree: Path, target: str) -> None:
    cmd = ["make", "-C", str(tree), "ARCH=um", f"-j{os.cpu_count() or 1}", target]
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    result = subprocess.run(cmd, capture_output=True, text=True, env={**env, "LC_ALL": "C"})
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
        raise RustkoError(f"`make ARCH=um {target}` failed in the UML source tree:\n{tail}",
                          "install Kbuild's tools: apt-get install make gcc flex bison bc libelf-dev")


def _prune(tree: Path) -> None:
    """Drop what external module builds never read (sources of the kernel itself, docs)."""
    keep = {tree / k for k in KEEP_DIRS}
    parents = {p for k in keep for p in k.parents}
    for entry in list(tree.iterdir()):
        _prune_entry(entry, keep, parents)


def _prune_entry(entry: Path, keep: set[Path], parents: set[Path]) -> None:
    if entry in keep or not entry.is_dir() or entry.is_symlink():
        return
    if entry in parents:
        for child in list(entry.iterdir()):
            _prune_entry(child, keep, parents)
    else:
        shutil.rmtree(entry)


# --- Module.symvers from the binaries ---------------------------------------------------------


def module_symvers(kernel: Path, modules: Path) -> str:
    """Module.symvers (scripts/mod/modpost.c write_dump format: crc, symbol, owner, export,
    namespace) for the exports of the kernel binary and of its shipped modules; CRCs are 0
    because the packaged config has no CONFIG_MODVERSIONS."""
    rows = [(name, "vmlinux", gpl, ns) for name, gpl, ns in kernel_exports(kernel)]
    for ko in sorted(modules.rglob("*.ko")):
        owner = str(ko.relative_to(modules / "kernel") if (modules / "kernel") in ko.parents else ko.name)
        owner = owner[: -len(".ko")]
        rows.extend((name, owner, gpl, ns) for name, gpl, ns in module_exports(ko))
    return "".join(f"0x00000000\t{name}\t{owner}\tEXPORT_SYMBOL{'_GPL' if gpl else ''}\t{ns}\n"
                   for name, owner, gpl, ns in rows)


def kernel_exports(kernel: Path) -> list[tuple[str, bool, str]]:
    """(name, gpl_only, namespace) from `__ksymtab`/`__ksymtab_gpl` of a linked, stripped kernel.

    Entries are `struct kernel_symbol` (include/linux/export.h): three absolute pointers
    (value, name, namespace) without CONFIG_HAVE_ARCH_PREL32_RELOCATIONS, which UML never selects.
    """
    from elftools.elf.elffile import ELFFile

    with open(kernel, "rb") as handle:
        elf = ELFFile(handle)
        sections = {section.name: section for section in elf.iter_sections()}
        strings = sections.get("__ksymtab_strings")
        if strings is None:
            raise RustkoError(f"{kernel} has no __ksymtab_strings section: not a kernel with modules")
        base, blob = strings["sh_addr"], strings.data()
        out: list[tuple[str, bool, str]] = []
        for table, gpl in (("__ksymtab", False), ("__ksymtab_gpl", True)):
            section = sections.get(table)
            if section is None:
                continue
            data = section.data()
            for _value, name, ns in struct.iter_unpack("<QQQ", data[: len(data) // 24 * 24]):
                out.append((_cstr(blob, name - base), gpl, _cstr(blob, ns - base) if ns else ""))
    if not out or not all(name for name, _, _ in out):
        raise RustkoError(f"cannot read the export table of {kernel}: its __ksymtab entries do not "
                          "point into __ksymtab_strings", "pass KDIR= a UML tree with its own Module.symvers")
    return out


def module_exports(ko: Path) -> list[tuple[str, bool, str]]:
    """(name, gpl_only, namespace) of a module: its `__ksymtab_NAME` symbols say which table."""
    from elftools.elf.elffile import ELFFile

    with open(ko, "rb") as handle:
        elf = ELFFile(handle)
        symtab = elf.get_section_by_name(".symtab")
        if symtab is None:
            return []
        names = [s.name for s in elf.iter_sections()]
        strings = elf.get_section_by_name("__ksymtab_strings")
        blob = strings.data() if strings is not None else b""
        namespaces: dict[str, str] = {}
        found: list[tuple[str, bool]] = []
        for sym in symtab.iter_symbols():
            shndx = sym["st_shndx"]
            if not isinstance(shndx, int):
                continue
            if sym.name.startswith("__ksymtab_"):
                found.append((sym.name[len("__ksymtab_"):], names[shndx] == "__ksymtab_gpl"))
            elif sym.name.startswith("__kstrtabns_") and names[shndx] == "__ksymtab_strings":
                namespaces[sym.name[len("__kstrtabns_"):]] = _cstr(blob, sym["st_value"])
    return [(name, gpl, namespaces.get(name, "")) for name, gpl in found]


def _cstr(blob: bytes, offset: int) -> str:
    if not 0 <= offset < len(blob):
        return ""
    end = blob.find(b"\0", offset)
    return blob[offset: end if end >= 0 else len(blob)].decode("utf-8", "replace")
