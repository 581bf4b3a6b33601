"""Finding a rustc whose standard library sources exist and match it.

Out-of-tree kernel Rust has to compile `core` itself (no distribution ships it for the kernel's
flags), so a rustc is only usable together with its exact library sources.

rustko supports rustc 1.78 (the kernel's own minimum since 6.11, and bullseye's rustc-web) to
the newest. A rustc installed in one of rustko's Debian roots (`roots.py`, e.g. bullseye's
rustc-web 1.78) is run on the host with that root's own dynamic loader and libraries, so its
binaries never mix with the host's C library.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import cache, roots
from .errors import RustkoError

Version = tuple[int, int, int]

# scripts/min-tool-version.sh (6.12): rustc) echo 1.78.0 -- and the newest rustc bullseye has
# with library sources. Older rustc lacks flags the rows of flags.py need (-Zfunction-return).
MIN_RUSTC = "1.78.0"

# Where a Debian root keeps its dynamic loader, per host machine (multiarch triplet/loader).
ROOT_LOADERS: dict[str, str] = {
    "x86_64": "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    "aarch64": "usr/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1",
}

INSTALL_HINT = ("on Debian 12: `apt-get install rustc-web rust-web-src` and use RUSTC=/usr/bin/rustc; "
                "with rustup: `rustup component add rust-src`; or point RUST_LIB_SRC at the `library` "
                "folder of the sources of exactly this rustc version")


# rustc_driver_impl install_ctrlc_handler: on SIGINT rustc waits 100 ms then exits 1, printing
# nothing, unless const evaluation notices first ("error[E0080]: compilation was interrupted").
INTERRUPTED_MESSAGE = "compilation was interrupted"
ERROR_LINE = re.compile(r"^error", re.M)


def rustc_version(text: str) -> Version:
    """(major, minor, patch) of a `rustc --version` line ("rustc 1.85.1 (4eb161250 2025-03-15)",
    Debian's "rustc 1.78.0", "rustc 1.97.0-nightly (...)"), of `-vV`'s release, or of "1.93"."""
    match = re.search(r"(?:^|\s)(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        raise RustkoError(f"cannot read a rustc version from {text.strip()!r}",
                          "RUSTC must be a rustc that answers `rustc --version` with `rustc X.Y.Z`")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def interrupted(returncode: int, stderr: str) -> bool:
    """Whether a failed rustc was stopped (Ctrl-C, a signal) rather than refused the code: a
    refusal always prints an `error` line, an interruption none or rustc's own word for it."""
    return returncode != 0 and (returncode < 0 or INTERRUPTED_MESSAGE in stderr
                                or not ERROR_LINE.search(stderr))


@dataclass(frozen=True)
class Toolchain:
    rustc: Path
    version: str       # e.g. "1.96.0"
    verbose_version: str  # `rustc -vV` output: part of every cache key
    lib_src: Path      # the `library` folder holding core/, alloc/


def _version(rustc: Path, binary: Path | None) -> tuple[str, str]:
    """(release, `rustc -vV` text). Every build asks, so the answer is kept in the cache per
    compiler binary (`binary`: the real rustc that answers; None: unknown, always ask), keyed on
    its version (cache.file_stamp): a reinstall, an upgrade or an edit changes it."""
    stamp = _binary_stamp(binary) if binary else None
    cached = cache.cache_root() / "probe" / f"rustc-{stamp}" if stamp else None
    if cached is not None:
        try:
            text = cached.read_text()
            return _release(text), text
        except (OSError, ValueError):
            pass
    try:
        out = subprocess.run([str(rustc), "-vV"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "RUSTC_BOOTSTRAP": "1"})
    except OSError as err:
        raise RustkoError(f"cannot run RUSTC={rustc}: {err.strerror}", INSTALL_HINT) from None
    try:
        release = _release(out.stdout) if out.returncode == 0 else None
    except ValueError:
        release = None
    if release is None:
        raise RustkoError(f"RUSTC={rustc} does not behave like rustc (`rustc -vV` failed)", INSTALL_HINT)
    if cached is not None:
        cache.store(cached, out.stdout.encode())
    return release, out.stdout


def _release(text: str) -> str:
    match = re.search(r"^release: (\S+)", text, re.M)
    if not match:
        raise ValueError("no release line in rustc -vV")
    return match.group(1)


def _binary_stamp(binary: Path) -> str | None:
    """A short name for the binary's version (cache.file_stamp); None when it cannot be read."""
    try:
        stamp = cache.file_stamp(binary)
    except OSError:
        return None
    return hashlib.sha256(stamp.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def _sysroot(rustc: Path) -> tuple[Path, Path | None]:
    """rustc's sysroot and the real rustc binary in it (None: not known). The sysroot is the
    folder above rustc's own `bin/` when that holds `lib/rustlib`: no process (this runs on
    every build). Otherwise (a rustup proxy, a wrapper, a Debian root's launcher) rustc is asked
    each time, as a proxy's answer follows the folder and the environment, and the binary that
    answers is `SYSROOT/bin/rustc`."""
    real = rustc.resolve()
    if (real.parent.parent / "lib" / "rustlib").is_dir():
        return real.parent.parent, real
    try:
        out = subprocess.run([str(rustc), "--print", "sysroot"], capture_output=True, text=True, timeout=60)
    except OSError:
        return Path(""), None
    sysroot = Path(out.stdout.strip())
    binary = sysroot / "bin" / "rustc"
    return sysroot, (binary if out.returncode == 0 and sysroot.is_absolute() and binary.is_file() else None)


def _sources_version(lib_src: Path) -> str | None:
    """The release the sources belong to, from RELEASES.md beside `library/`, when it is there."""
    releases = lib_src.parent / "RELEASES.md"
    if not releases.is_file():
        return None
    with open(releases, errors="replace") as handle:
        for line in handle:
            match = re.match(r"Version (\d+\.\d+\.\d+)", line)
            if match:
                return match.group(1)
    return None


def _has_sources(lib_src: Path) -> bool:
    return (lib_src / "core/src/lib.rs").is_file() and (lib_src / "alloc/src/lib.rs").is_file()


def _candidates() -> list[Path]:
    """Every rustc on PATH, then Debian's; /root/.cargo/bin often shadows the one with sources."""
    seen: list[Path] = []
    for folder in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin"]:
        path = Path(folder or ".") / "rustc"
        if path.is_file() and os.access(path, os.X_OK) and path.resolve() not in [p.resolve() for p in seen]:
            seen.append(path)
    return seen


def require_supported(version: str, rustc: Path) -> None:
    """Refuse a rustc older than MIN_RUSTC before it fails on a flag or on the support crate."""
    if rustc_version(version) < rustc_version(MIN_RUSTC):
        raise RustkoError(
            f"rustc {version} ({rustc}) is too old: rustko needs rustc {MIN_RUSTC} or newer "
            "(the kernel's own minimum, scripts/min-tool-version.sh)",
            "on Debian 11: `apt-get install rustc-web rust-web-src` (1.78 or newer; plain `rustc` is 1.48); "
            + INSTALL_HINT)


def _through_root(rustc: Path, root: Path) -> Path:
    """A launcher for a rustc installed in a Debian root: the root's loader and libraries run it
    on the host (rustc and the sysroot stay on the host, as for every other rustc). Cached by
    its text; `--print sysroot` then answers the root's /usr, whose library sources match."""
    loader = ROOT_LOADERS.get(platform.machine())
    if loader is None or not (root / loader).exists():
        raise RustkoError(f"RUSTC={rustc} lies in the Debian root {root}, whose loader for "
                          f"{platform.machine()} rustko does not know", INSTALL_HINT)
    libs = ":".join(str(root / lib) for lib in (Path(loader).parent, Path("lib") / Path(loader).parent.name))
    text = (f"#!/bin/sh\n# rustc of the Debian root {root}, run with that root's own libraries\n"
            f'exec {shlex.quote(str(root / loader))} --library-path {shlex.quote(libs)} '
            f'{shlex.quote(str(rustc.absolute()))} "$@"\n')
    folder = cache.cache_root() / "rustc" / hashlib.sha256(text.encode()).hexdigest()[:24]

    def fill(tmp: Path) -> None:
        launcher = tmp / "rustc"
        launcher.write_text(text)
        launcher.chmod(0o755)

    return cache.cached_dir(folder, fill) / "rustc"


def _check(rustc: Path, lib_src_override: str | None) -> Toolchain:
    root = roots.owning(rustc.absolute().parent)
    if root is not None:
        rustc = _through_root(rustc, root)
    sysroot, binary = _sysroot(rustc)
    version, verbose = _version(rustc, binary)
    require_supported(version, rustc)
    lib_src = Path(lib_src_override) if lib_src_override else sysroot / "lib/rustlib/src/rust/library"
    if not _has_sources(lib_src):
        origin = "RUST_LIB_SRC" if lib_src_override else f"`{rustc} --print sysroot`"
        raise RustkoError(
            f"rustc {version} ({rustc}) has no standard library sources: {lib_src} (from {origin}) "
            "has no core/src/lib.rs",
            INSTALL_HINT)
    found = _sources_version(lib_src)
    if found is not None and found != version:
        raise RustkoError(
            f"the library sources in {lib_src} are for Rust {found}, but {rustc} is {version}: "
            "core must be compiled by the rustc it belongs to",
            INSTALL_HINT)
    return Toolchain(rustc=rustc, version=version, verbose_version=verbose, lib_src=lib_src.resolve())


def find(rustc: str | None = None, lib_src: str | None = None) -> Toolchain:
    """RUSTC if given, else the first rustc whose library sources exist."""
    lib_src = lib_src or os.environ.get("RUST_LIB_SRC") or None
    if rustc:
        path = Path(rustc) if os.sep in rustc else Path(shutil.which(rustc) or rustc)
        if not path.is_file():
            raise RustkoError(f"RUSTC={rustc} does not exist", INSTALL_HINT)
        return _check(path, lib_src)
    candidates = _candidates()
    if not candidates:
        raise RustkoError("no rustc found on PATH or in /usr/bin", INSTALL_HINT)
    problems: list[str] = []
    for path in candidates:
        try:
            return _check(path, lib_src)
        except RustkoError as err:
            problems.append(err.message)
    raise RustkoError("no rustc with matching library sources: " + "; ".join(problems), INSTALL_HINT)
