"""The Rust sysroot for one kernel flag set: core, compiler_builtins, alloc and rustko's support
crate, each built once, when a module first needs it.

Entries live under `<cache>/sysroot/<key>`, where the key hashes everything that changes the
bytes: rustc's `-vV`, the library sources (names and sizes, plus their release), the flags, and
rustko's own recipe. Every project and build on the machine shares them.

Four things keep the first build short (bench/build.py measures them):
- The crates are bitcode only (`-Clinker-plugin-lto`): a module's fat LTO generates machine code
  from their bitcode anyway, so rustc skips generating it here.
- rustc's parallel front end (`-Zthreads`, one thread per CPU) type-checks and borrow-checks
  `core`, most of its time, on every CPU; and their debug info is line tables only
  (`build_options`).
- Only the crates a module uses are built: a module that mentions neither `alloc` nor `rustko`
  needs core and compiler_builtins alone; the others join the entry when a module first needs them.
- Crates build in parallel where the graph allows: a crate starts as soon as its dependencies'
  metadata exists (rustc's `--emit=metadata` and `--json=artifacts`, as cargo pipelines), while
  they are still generating their bitcode.

Where a cold start is frequent, the sysroot is built ahead: `rustko sysroot` builds every crate for
the installed kernel headers (rustko's .deb runs it from its postinst, the container image while it
is built), into root's machine-wide cache; every user's build looks there first (`location`), read
only, before its own cache. The key holds no kernel release, so a kernel upgrade whose flags agree
(a new ABI of the same series) finds the same entry.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import selectors
import shutil
import subprocess
import tempfile
import time
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from . import cache
from .errors import RustkoError
from .toolchain import Toolchain, INSTALL_HINT, Version, interrupted, rustc_version

if TYPE_CHECKING:  # argparse only for `rustko sysroot`'s parser: not imported by every `scons`
    import argparse

RECIPE_VERSION = "5"  # 3: the build folder remapped (it leaked into debug info); 4: bitcode only;
# 5: line-tables-only debug info, -Zthreads
RUST_DIR = Path(__file__).parent / "rust"


@dataclass(frozen=True)
class Crate:
    """One sysroot crate. `source` starting with "library/" is in rustc's library sources; the
    others are rustko's own (rust/). `deps`: the sysroot crates it links (no_std crates other
    than core and compiler_builtins get `extern crate compiler_builtins` injected by rustc)."""

    name: str
    source: str
    deps: tuple[str, ...]
    extra: tuple[str, ...] = ()


# In build order (dependencies first).
CRATES: dict[str, Crate] = {crate.name: crate for crate in (
    Crate("core", "library/core/src/lib.rs", (), ("--cfg", "no_fp_fmt_parse")),  # rust/Makefile
    Crate("compiler_builtins", "compiler_builtins.rs", ("core",)),
    Crate("alloc", "library/alloc/src/lib.rs", ("core", "compiler_builtins")),
    Crate("rustko", "rustko/lib.rs", ("core", "compiler_builtins", "alloc")),  # the support crate
)}

# Every module links these; the others only when its sources name them (`uses`).
ALWAYS: tuple[str, ...] = ("core", "compiler_builtins")
OPTIONAL: tuple[str, ...] = ("alloc", "rustko")
COMMENT_RE = re.compile(r"//[^\n]*|/\*.*?\*/", re.DOTALL)
NAME_RE = re.compile(r"\b(alloc|rustko)\b")

Log = Callable[[str, list[str]], None]

# rustc's parallel front end is compiled into every rustc since the `parallel-compiler` build
# option was removed (rust-lang/rust#132282, 1.85); `-Zthreads` is untracked (it changes no output
# byte: core's rlib was the same with 1 and 2 threads here), so it is not part of the cache key.
THREADS_SINCE: Version = (1, 85, 0)
# The debug info levels of rustc's `-Cdebuginfo`, least first.
DEBUGINFO_LEVELS: tuple[str, ...] = ("0", "none", "line-directives-only", "line-tables-only", "1", "limited",
                                     "2", "full")
DEBUGINFO_RE = re.compile(r"^-Cdebuginfo=(.+)$")


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


def uses(sources: Iterable[Path]) -> tuple[str, ...]:
    """The sysroot crates that Rust files may link: core and compiler_builtins, plus `alloc` and
    `rustko` when a file names them outside comments (`extern crate alloc`, `use rustko::...`).
    A crate cannot reach either without naming it, so a word in a string only builds one too many."""
    named: set[str] = set()
    for source in sources:
        try:
            text = Path(source).read_text(errors="replace")
        except OSError:
            return (*ALWAYS, *OPTIONAL)  # unreadable here: rustc will say why; build everything
        named.update(NAME_RE.findall(COMMENT_RE.sub("", text)))
    return (*ALWAYS, *(name for name in OPTIONAL if name in named))


def _closure(names: Iterable[str]) -> list[str]:
    """`names` and every crate they depend on, in build order."""
    wanted = set(names)
    for name in list(wanted):
        wanted.update(CRATES[name].deps)
    return [name for name in CRATES if name in wanted]


def library_files(lib_src: Path) -> Iterator[str]:
    """Every file of the library sources rustko compiles (core, alloc), in a stable order."""
    for crate in ("core", "alloc"):
        for root, dirs, files in os.walk(lib_src / crate):
            dirs.sort()
            for name in sorted(files):
                yield os.path.join(root, name)


def _sources_fingerprint(lib_src: Path) -> str:
    """Names and sizes of every file rustko compiles: cheap enough for every build's start-up."""
    digest = hashlib.sha256()
    for path in library_files(lib_src):
        digest.update(f"{os.path.relpath(path, lib_src)}:{os.path.getsize(path)}\n".encode())
    for own in sorted(RUST_DIR.rglob("*.rs")):
        digest.update(own.relative_to(RUST_DIR).as_posix().encode() + b"\0" + own.read_bytes())
    return digest.hexdigest()


def tracked_options(flags: list[str]) -> list[str]:
    """What the sysroot crates get beyond the kernel's `flags`, all of it in the cache key.

    Debug info: line tables at most. A module's fat LTO carries every core function it uses into
    the .ko together with that function's debug info, and reading core's full DWARF took most of
    a small module's LTO (measured here, rustc 1.96, 6.1's flags: examples/hello's Rust 0.83 s
    with core at -Cdebuginfo=2, 0.53 s with line tables, 0.36 s without). Its machine code stays
    (hello's .text the same size; in a larger test crate, registers chosen otherwise in one
    function, 2 bytes less). What a .ko loses: the variables and types of core's functions in a
    debugger; file and line of every core frame stay (addr2line, scripts/decode_stacktrace.sh).
    Flags asking for less (a kernel without DEBUG_INFO) keep it."""
    levels = [match.group(1) for flag in flags if (match := DEBUGINFO_RE.match(flag))]
    if levels and levels[-1] in DEBUGINFO_LEVELS and \
            DEBUGINFO_LEVELS.index(levels[-1]) > DEBUGINFO_LEVELS.index("line-tables-only"):
        return ["-Cdebuginfo=line-tables-only"]
    return []


def build_options(toolchain: Toolchain, flags: list[str]) -> list[str]:
    """`tracked_options`, plus one front-end thread per CPU where rustc has the parallel front
    end: it checks core's items on every CPU, most of core's time (one run at load 7, this
    process's priority raised: 43 s on one thread, 36 s on two, the rlib the same bytes). It
    spends about 15% more CPU, so it gains where CPUs are idle, a first build's usual case."""
    options = tracked_options(flags)
    if rustc_version(toolchain.version) >= THREADS_SINCE:
        options.append(f"-Zthreads={_cpus()}")
    return options


def _cpus() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def key(toolchain: Toolchain, flags: list[str]) -> str:
    digest = hashlib.sha256()
    for part in (RECIPE_VERSION, toolchain.verbose_version, _sources_fingerprint(toolchain.lib_src), *flags,
                 *tracked_options(flags)):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:24]


def _edition(lib_src: Path, crate: str) -> str:
    manifest = lib_src / crate / "Cargo.toml"
    try:
        return tomllib.loads(manifest.read_text())["package"]["edition"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "2021"


def _command(toolchain: Toolchain, flags: list[str], crate: Crate, stage: Path, published: Path,
             target: str) -> list[str]:
    """rustc for one crate: its metadata into the stage's libdir, where the crates built after it
    look (beside links to the crates published before), its bitcode-only rlib into stage/out
    (published once all succeeded)."""
    if crate.source.startswith("library/"):
        src = toolchain.lib_src / crate.source.removeprefix("library/")
        edition = _edition(toolchain.lib_src, crate.name)
    else:
        src, edition = RUST_DIR / crate.source, "2021"  # 2021: rustc 1.78 has no 2024
    libdir = stage / "lib" / "rustlib" / target / "lib"
    return [str(toolchain.rustc), *flags, *build_options(toolchain, flags), "-Clinker-plugin-lto", *crate.extra,
            f"--edition={edition}", "--crate-type=rlib", f"--crate-name={crate.name}", f"--sysroot={stage}",
            f"--remap-path-prefix={toolchain.lib_src}=/rustc/library", f"--remap-path-prefix={RUST_DIR}=/rustko",
            f"--remap-path-prefix={stage}=/sysroot", f"--remap-path-prefix={published}=/sysroot",
            "--error-format=json", "--json=artifacts", "-Awarnings", f"--out-dir={stage / 'out'}",
            f"--emit=metadata={libdir / f'lib{crate.name}.rmeta'},link={stage / 'out' / f'lib{crate.name}.rlib'}",
            str(src)]


class _Job:
    """One running rustc: its JSON messages read as they come, its metadata noticed when written."""

    def __init__(self, crate: str, cmd: list[str], cwd: Path) -> None:
        self.crate = crate
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env={**os.environ, "RUSTC_BOOTSTRAP": "1"})
        self.buffer = b""
        self.errors: list[str] = []
        self.metadata = False

    def read(self) -> bool:
        """Take what rustc wrote; False at end of output."""
        assert self.proc.stderr is not None
        chunk = os.read(self.proc.stderr.fileno(), 65536)
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        if not chunk and self.buffer:
            lines, self.buffer = [*lines, self.buffer], b""
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                self.errors.append(line.decode(errors="replace"))
                continue
            if message.get("emit") == "metadata":
                self.metadata = True
            elif message.get("rendered"):
                self.errors.append(message["rendered"])
        return bool(chunk)


def _build(toolchain: Toolchain, flags: list[str], names: list[str], stage: Path, published: Path,
           target: str, log: Log) -> None:
    """Compile `names` (in build order; their other dependencies already in `published`) into
    `stage`, each crate starting once its dependencies' metadata exists, one rustc per CPU."""
    waiting = list(names)
    ready = {name for name in CRATES if name not in names}
    running: dict[int, _Job] = {}
    slots = _cpus()
    selector = selectors.DefaultSelector()
    try:
        while waiting or running:
            for name in list(waiting):
                if len(running) >= slots or not all(dep in ready for dep in CRATES[name].deps):
                    continue
                waiting.remove(name)
                cmd = _command(toolchain, flags, CRATES[name], stage, published, target)
                log(name, cmd)
                job = _Job(name, cmd, stage)
                assert job.proc.stderr is not None
                running[job.proc.stderr.fileno()] = job
                selector.register(job.proc.stderr, selectors.EVENT_READ, job)
            if not running:
                raise RustkoError(f"cannot order the sysroot crates {waiting}")  # a bug in CRATES
            for event, _ in selector.select():
                job = event.data
                if job.read():
                    if job.metadata:
                        ready.add(job.crate)
                    continue
                selector.unregister(event.fileobj)
                del running[event.fd]
                _finish(toolchain, job)
                ready.add(job.crate)
    finally:
        for job in running.values():
            job.proc.kill()
            job.proc.wait()
        selector.close()


def _finish(toolchain: Toolchain, job: _Job) -> None:
    code = job.proc.wait()
    if job.proc.stderr is not None:
        job.proc.stderr.close()
    if interrupted(code, "\n".join(job.errors)):
        raise RustkoError(f"interrupted: building `{job.crate}` was stopped (Ctrl-C or a signal)",
                          "nothing was cached; the next build starts it again")
    if code != 0:
        tail = "\n".join("\n".join(job.errors).strip().splitlines()[-15:])
        raise RustkoError(
            f"building `{job.crate}` for the kernel target failed (rustc {toolchain.version}, sources "
            f"{toolchain.lib_src}):\n{tail}",
            "the library sources must be those of this exact rustc; " + INSTALL_HINT)


def location(digest: str) -> Path:
    """Where the sysroot `digest` is read from: the machine-wide prebuilt entry when it holds every
    crate (then nothing is ever added to it, so it may be read only), else the user's cache."""
    prebuilt = cache.system_root() / "sysroot" / digest
    try:
        if (prebuilt / "complete").is_file():
            return prebuilt
    except PermissionError:  # another user's private entry (made before entries were 0755)
        pass
    return cache.cache_root() / "sysroot" / digest


def ensure(toolchain: Toolchain, flags: list[str], target: str, log: Log | None = None,
           digest: str | None = None, crates: Iterable[str] = tuple(CRATES)) -> Sysroot:
    """The sysroot for `flags` with at least `crates` (and what they depend on), the missing ones
    built now. `digest`: `key(toolchain, flags)` when the caller has it already.

    The entry appears with one atomic rename of a complete folder the first time; crates added
    later are renamed into it one file at a time, dependencies first. Either way, under the
    entry's lock, so parallel builds never compile a crate twice or see half a file."""
    log = log or (lambda crate, cmd: None)
    path = location(digest or key(toolchain, flags))
    sysroot = Sysroot(path=path, target=target)
    wanted = _closure(crates)

    def missing() -> list[str]:
        return [name for name in wanted if not (sysroot.libdir / f"lib{name}.rlib").is_file()]

    if not missing():
        return sysroot
    with cache.locked(path):
        todo = missing()
        if not todo:
            return sysroot
        for stale in path.parent.glob(f".{path.name}.*"):  # a killed build's leftovers
            shutil.rmtree(stale, ignore_errors=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        stage.chmod(0o755)  # mkdtemp's 0700 would hide root's prebuilt entry from every other user
        try:
            staged = Sysroot(path=stage, target=target).libdir
            staged.mkdir(parents=True)
            for name in wanted:
                if name not in todo:  # published by an earlier build: linked, not copied
                    os.link(sysroot.libdir / f"lib{name}.rlib", staged / f"lib{name}.rlib")
            _build(toolchain, flags, todo, stage, path, target, log)
            for rmeta in staged.glob("*.rmeta"):
                rmeta.unlink()
            if path.is_dir():
                for name in todo:
                    os.replace(stage / "out" / f"lib{name}.rlib", sysroot.libdir / f"lib{name}.rlib")
            else:
                for name in todo:
                    os.replace(stage / "out" / f"lib{name}.rlib", staged / f"lib{name}.rlib")
                shutil.rmtree(stage / "out")
                recipe = [toolchain.verbose_version, *flags, *tracked_options(flags)]
                (stage / "flags.txt").write_text("\n".join(recipe) + "\n")
                os.rename(stage, path)
            mark_complete(sysroot)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return sysroot


def missing_any(sysroot: Sysroot) -> bool:
    """Whether a crate of CRATES is not in `sysroot` yet."""
    return any(not (sysroot.libdir / f"lib{name}.rlib").is_file() for name in CRATES)


def mark_complete(sysroot: Sysroot) -> None:
    """The `complete` file `location` looks for, once every crate is there (one stat per build);
    the entry made readable by every user (older entries kept mkdtemp's 0700)."""
    marker = sysroot.path / "complete"
    if not marker.exists() and not missing_any(sysroot):
        try:
            sysroot.path.chmod(0o755)
        except PermissionError:  # another user's entry in a shared cache: theirs to open
            pass
        marker.touch()


# --- `rustko sysroot`: build ahead what a first build would ---------------------------------------

def installed_kdirs() -> list[Path]:
    """The build folders of the kernels whose headers are installed, as DKMS finds them
    (`/lib/modules/RELEASE/build`, a link the headers package makes)."""
    return sorted(Path(path).resolve() for path in glob.glob("/lib/modules/*/build") if Path(path, "Makefile").is_file())


def prebuild(kdirs: list[Path], rustc: str | None = None, rust_lib_src: str | None = None,
             skip_unusable: bool = False) -> None:
    """Every crate of CRATES for each KDIR's flags, into the cache. KDIRs whose flags agree share
    one entry. `skip_unusable`: a KDIR rustko cannot build for is named and skipped (a package's
    postinst must not fail on it)."""
    from .build import Options, planned_sysroot, resolve  # build uses this module

    for kdir in kdirs:
        try:
            target = resolve(Options(kdir=str(kdir), rustc=rustc, rust_lib_src=rust_lib_src))
        except RustkoError as err:
            if not skip_unusable:
                raise
            print(f"rustko sysroot: skipped {kdir}: {err.message}")
            continue
        started = time.monotonic()
        ready = not missing_any(planned_sysroot(target))
        built = target.sysroot(crates=tuple(CRATES))
        mark_complete(built)
        state = "already there" if ready else f"built in {time.monotonic() - started:.1f} s"
        print(f"sysroot for {target.kernel.release} ({target.kernel.arch}): {built.path} ({state})")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sysroot", help="build the Rust sysroot for installed kernel headers ahead of the first build",
        description="Build every sysroot crate (core, compiler_builtins, alloc, rustko) for each KDIR's "
                    "flags into the cache, so that the first module build does not. Run as root it fills "
                    "the machine-wide cache that every user's build reads first (rustko's .deb runs "
                    "`rustko sysroot --installed` from its postinst, the container image when it is built).")
    parser.add_argument("kdirs", nargs="*", type=Path, metavar="KDIR", help="kernel build directories")
    parser.add_argument("--installed", action="store_true",
                        help="every /lib/modules/*/build; one rustko cannot build for is skipped, not an error")
    parser.add_argument("--rustc", help="rustc to use (default: the first with library sources)")
    parser.add_argument("--rust-lib-src", help="that rustc's `library` sources")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    kdirs = list(args.kdirs) + (installed_kdirs() if args.installed else [])
    if not kdirs:
        if args.installed:
            print("rustko sysroot: no kernel headers installed (/lib/modules/*/build): nothing to build")
            return 0
        raise RustkoError("no KDIR given", "name kernel build directories, or pass --installed for "
                          "every installed kernel's headers")
    prebuild(kdirs, args.rustc, args.rust_lib_src, skip_unusable=args.installed)
    return 0
