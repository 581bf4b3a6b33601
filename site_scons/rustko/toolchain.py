"""Finding a rustc whose standard library sources exist and match it.

Out-of-tree kernel Rust has to compile `core` itself (no distribution ships it for the kernel's
flags), so a rustc is only usable together with its exact library sources.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import RustkoError

INSTALL_HINT = ("on Debian 12: `apt-get install rustc-web rust-web-src` and use RUSTC=/usr/bin/rustc; "
                "with rustup: `rustup component add rust-src`; or point RUST_LIB_SRC at the `library` "
                "folder of the sources of exactly this rustc version")


# rustc_driver_impl install_ctrlc_handler: on SIGINT rustc waits 100 ms then exits 1, printing
# nothing, unless const evaluation notices first ("error[E0080]: compilation was interrupted").
INTERRUPTED_MESSAGE = "compilation was interrupted"
ERROR_LINE = re.compile(r"^error", re.M)


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


def _version(rustc: Path) -> tuple[str, str]:
    try:
        out = subprocess.run([str(rustc), "-vV"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "RUSTC_BOOTSTRAP": "1"})
    except OSError as err:
        raise RustkoError(f"cannot run RUSTC={rustc}: {err.strerror}", INSTALL_HINT) from None
    match = re.search(r"^release: (\S+)", out.stdout, re.M)
    if out.returncode != 0 or not match:
        raise RustkoError(f"RUSTC={rustc} does not behave like rustc (`rustc -vV` failed)", INSTALL_HINT)
    return match.group(1), out.stdout


def _sysroot_src(rustc: Path) -> Path:
    """`$(rustc --print sysroot)/lib/rustlib/src/rust/library`. rustc's sysroot is the folder
    above its own `bin/`; when that holds `lib/rustlib` the answer needs no process (this runs on
    every build), otherwise (a rustup proxy, a wrapper script) rustc is asked."""
    layout = rustc.resolve().parent.parent
    if (layout / "lib" / "rustlib").is_dir():
        sysroot = layout
    else:
        out = subprocess.run([str(rustc), "--print", "sysroot"], capture_output=True, text=True, timeout=60)
        sysroot = Path(out.stdout.strip())
    return sysroot / "lib/rustlib/src/rust/library"


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


def _check(rustc: Path, lib_src_override: str | None) -> Toolchain:
    version, verbose = _version(rustc)
    lib_src = Path(lib_src_override) if lib_src_override else _sysroot_src(rustc)
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
