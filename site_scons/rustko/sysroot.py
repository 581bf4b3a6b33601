"""The Rust sysroot for one kernel flag set: core, compiler_builtins and alloc, built once.

Entries live under `<cache>/sysroot/<key>`, where the key hashes everything that changes the
bytes: rustc's `-vV`, the library sources (names and sizes, plus their release), the flags, and
rustko's own recipe. Every project and build on the machine shares them.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
from dataclasses import dataclass
from pathlib import Path

from . import cache
from .errors import RustkoError
from .toolchain import Toolchain, INSTALL_HINT, interrupted

RECIPE_VERSION = "3"  # 3: the build folder remapped (it leaked into debug info)
RUST_DIR = Path(__file__).parent / "rust"

# (crate, source, extra rustc arguments), in build order. Sources starting with "library/" are
# in rustc's library sources; the others are rustko's own (rust/).
CRATES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("core", "library/core/src/lib.rs", ("--cfg", "no_fp_fmt_parse")),  # rust/Makefile
    ("compiler_builtins", "compiler_builtins.rs", ()),
    ("alloc", "library/alloc/src/lib.rs", ()),
    ("rustko", "rustko/lib.rs", ()),   # the support crate: modules opt in with `use rustko`
)


@dataclass(frozen=True)
class Sysroot:
    path: Path
    target: str

    @property
    def libdir(self) -> Path:
        return self.path / "lib" / "rustlib" / self.target / "lib"

    @property
    def support_crate(self) -> Path:
        return self.libdir / "librustko.rlib"


def _sources_fingerprint(lib_src: Path) -> str:
    """Names and sizes of every file rustko compiles: cheap enough for every build's start-up."""
    digest = hashlib.sha256()
    for crate in ("core", "alloc"):
        for root, dirs, files in os.walk(lib_src / crate):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                digest.update(f"{os.path.relpath(path, lib_src)}:{os.path.getsize(path)}\n".encode())
    for own in sorted(RUST_DIR.rglob("*.rs")):
        digest.update(own.relative_to(RUST_DIR).as_posix().encode() + b"\0" + own.read_bytes())
    return digest.hexdigest()


def key(toolchain: Toolchain, flags: list[str]) -> str:
    digest = hashlib.sha256()
    for part in (RECIPE_VERSION, toolchain.verbose_version, _sources_fingerprint(toolchain.lib_src), *flags):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:24]


def _edition(lib_src: Path, crate: str) -> str:
    manifest = lib_src / crate / "Cargo.toml"
    try:
        return tomllib.loads(manifest.read_text())["package"]["edition"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "2021"


def _compile(toolchain: Toolchain, flags: list[str], root: Path, target: str, crate: str,
             source: str, extra: tuple[str, ...], log) -> None:
    libdir = root / "lib" / "rustlib" / target / "lib"
    if source.startswith("library/"):
        src = toolchain.lib_src / source.removeprefix("library/")
        edition = _edition(toolchain.lib_src, crate)
    else:
        src, edition = RUST_DIR / source, "2024"
    # -Cembed-bitcode=yes: the module's fat LTO then keeps only the parts of these crates it uses.
    cmd = [str(toolchain.rustc), *flags, "-Cembed-bitcode=yes", *extra,
           f"--edition={edition}", "--crate-type=rlib", f"--crate-name={crate}",
           # `root` is a temporary folder renamed into the cache afterwards: remapped to the name the
           # module build remaps the cache entry to, so no random path reaches the .ko's debug info.
           f"--sysroot={root}", f"--remap-path-prefix={root}=/sysroot",
           f"--remap-path-prefix={toolchain.lib_src}=/rustc/library",
           f"--remap-path-prefix={RUST_DIR}=/rustko",
           "-Awarnings", "-o", str(libdir / f"lib{crate}.rlib"), str(src)]
    log(crate, cmd)
    env = {**os.environ, "RUSTC_BOOTSTRAP": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    if interrupted(result.returncode, result.stderr):
        raise RustkoError(f"interrupted: building `{crate}` was stopped (Ctrl-C or a signal)",
                          "nothing was cached; the next build starts it again")
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        raise RustkoError(
            f"building `{crate}` for the kernel target failed (rustc {toolchain.version}, sources "
            f"{toolchain.lib_src}):\n{tail}",
            "the library sources must be those of this exact rustc; " + INSTALL_HINT)


def ensure(toolchain: Toolchain, flags: list[str], target: str, log=None, digest: str | None = None) -> Sysroot:
    """The sysroot for `flags`, built now if no build on this machine has made it yet.
    `digest`: `key(toolchain, flags)` when the caller has it already."""
    log = log or (lambda crate, cmd: None)
    path = cache.cache_root() / "sysroot" / (digest or key(toolchain, flags))

    def fill(tmp: Path) -> None:
        (tmp / "lib" / "rustlib" / target / "lib").mkdir(parents=True)
        for crate, source, extra in CRATES:
            _compile(toolchain, flags, tmp, target, crate, source, extra, log)
        (tmp / "flags.txt").write_text("\n".join([toolchain.verbose_version, *flags]) + "\n")

    return Sysroot(path=cache.cached_dir(path, fill), target=target)

