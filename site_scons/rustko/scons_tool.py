"""The SCons tool: Builders over `rustko.build`, the Kbuild-style variables, the aliases.

`env = Environment(tools=["default", "rustko"])` adds:
  env.RustObject(target, source)     the crate compiled to one relocatable object with the kernel's
                                     flags, for a project's own C Kbuild module to link
  env.KbuildModule(target, sources)  `make -C KDIR M=<target's folder> modules` for such a module
  env.RustkoCheck(target, source)    the loadability check; the target (a copy of the source .ko)
                                     exists only when the target kernel would load it
  env.RustKernelModule(name, source) the composition: the crate and the generated shim + Kbuild
                                     (run side by side), then RustkoCheck; returns build/NAME.ko
Each Builder's action is a function whose signature holds the commands it runs and the texts it
writes (as Kbuild's if_changed): a changed flag, shim or runtime C rebuilds, nothing else does;
`scons -n` prints them, `-s` silences them. Implicit dependencies come from a scanner (crate
files, path dependencies, C headers). `scons -h` lists the variables and targets.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import hashlib
import importlib
import os
import shlex
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import SCons.Action
import SCons.Builder
import SCons.Errors
import SCons.Node.FS
import SCons.Scanner
import SCons.Scanner.C
import SCons.Script
import SCons.SConsign

from . import __version__, build, cache, kbuild, project, repro
from . import arch as arches
from .errors import RustkoError, internal_error
from .kernel import KernelInfo, default_kdir

# The library package itself: a site_scons copy of the tool (site_tools/rustko) is imported by
# SCons under the library's name, and puts this back in its place (see that tool's __init__).
LIBRARY = sys.modules[__package__]

# (name, what it is, its default): `scons NAME=VALUE`, as Kbuild users expect.
VARIABLES: tuple[tuple[str, str, str], ...] = (
    ("KDIR", "kernel build directory", str(default_kdir())),
    ("ARCH", "target architecture: x86_64, arm64, um (aliases x86, amd64, aarch64); must match KDIR",
     "KDIR's own"),
    ("CROSS_COMPILE", "prefix of the C toolchain for Kbuild", "none for the host's arch; "
     + ", ".join(f"{a.cross_compile} for {a.name}" for a in arches.ALL if a.cross_compile)),
    ("LLVM", "1: build the C side with clang/ld.lld", "0"),
    ("RUSTC", "rustc to use", "the first rustc whose library sources exist (Debian's /usr/bin/rustc)"),
    ("RUST_LIB_SRC", "the `library` folder of that rustc's sources", "from its sysroot"),
    ("SIGN_KEY", "private key (PEM) to sign modules with, as Kbuild's modules_sign does", "unsigned"),
    ("SIGN_CERT", "the signing key's X.509 certificate (PEM or DER)", "unsigned"),
    ("V", "1: full command lines; 2: also Kbuild's reasons for rebuilding", "0"),
    ("INSTALL_MOD_PATH", "`scons install`: root to install under, as for make modules_install", "/"),
    ("INSTALL_MOD_DIR", "`scons install`: folder under /lib/modules/RELEASE",
     "KDIR's scripts/Makefile.modinst: extra (6.1), updates (6.12)"),
    ("INSTALL_MOD_STRIP", "`scons install`: 1 strips debug info (--strip-debug), else the strip options",
     "not stripped"),
)

_HELP_GIVEN = False


def _help() -> None:
    """The variables once per run (a second Environment adds nothing), the targets as they come."""
    global _HELP_GIVEN
    if _HELP_GIVEN:
        return
    _HELP_GIVEN = True
    lines = ["Variables (scons NAME=VALUE; the command line beats Environment(NAME=...)):"]
    for name, text, default in VARIABLES:
        lines += [f"{name}: {text}", f"    default: {default}"]
    lines += ["", "Targets:", "  install        install every module, as make modules_install",
              "  vmtest         boot each module's kernel in QEMU, load and unload the module"]
    _add_help("\n".join(lines) + "\n")


def _add_help(text: str) -> None:
    """`scons -h`'s text, through SCons's own function: the global `Help` would first make SCons's
    default environment (its tools' detection runs gcc and g++ five times) while the SConstruct
    is read, before Kbuild can start."""
    SCons.Script.HelpFunction(text, append=True)


def _setting(env: Any, name: str) -> Any:
    """A variable's value: the command line first, as in make, then the SConstruct's."""
    value = SCons.Script.ARGUMENTS.get(name)
    return env.get(name) if value is None else value


def _flag(value: Any) -> int:
    if isinstance(value, str):
        return {"": 0, "n": 0, "no": 0, "false": 0, "y": 1, "yes": 1, "true": 1}.get(
            value.lower(), int(value) if value.isdigit() else 1)
    return int(bool(value)) if isinstance(value, bool) or value is None else int(value)


def _options(env: Any) -> build.Options:
    def text(name: str) -> str | None:
        value = _setting(env, name)
        return None if value in (None, "") else str(value)

    return build.Options(kdir=text("KDIR"), arch=text("ARCH"), cross_compile=text("CROSS_COMPILE"),
                         llvm=bool(_flag(_setting(env, "LLVM"))), rustc=text("RUSTC"),
                         rust_lib_src=text("RUST_LIB_SRC"), verbose=_flag(_setting(env, "V")),
                         sign_key=text("SIGN_KEY"), sign_cert=text("SIGN_CERT"))


# One resolved kernel and target per distinct set of options: environments cloned with another
# KDIR or ARCH (one SConstruct building for several kernels) each get their own.
_KERNELS: dict[build.Options, KernelInfo] = {}
_TARGETS: dict[build.Options, build.Target] = {}


def _kernel(env: Any) -> KernelInfo:
    """The kernel alone, once per set of options: what an early Kbuild start needs."""
    options = _options(env)
    if options not in _KERNELS:
        _KERNELS[options] = _user(build.resolve_kernel, options)
    return _KERNELS[options]


def _target(env: Any) -> build.Target:
    """Resolve the kernel and compiler once per set of options; a bad KDIR stops SCons cleanly."""
    options = _options(env)
    if options not in _TARGETS:
        _TARGETS[options] = _user(build.resolve, options, _kernel(env))
    return _TARGETS[options]


def _user(call: Callable[..., Any], *args: Any) -> Any:
    """A problem found while reading the SConstruct: SCons's user error, the message cargo-style."""
    try:
        return call(*args)
    except RustkoError as err:
        raise SCons.Errors.UserError(str(err)) from None


def _reading_only(env: Any) -> bool:
    """`scons -c` and `scons -h` need the node graph, not a kernel or a compiler."""
    return bool(env.GetOption("clean") or env.GetOption("help"))


def _say(env: Any, line: str) -> None:
    if not env.GetOption("silent"):
        print(line, flush=True)


def _fail(err: BaseException) -> int:
    text = str(err) if isinstance(err, RustkoError) else internal_error(err)
    print(text, file=sys.stderr, flush=True)
    return 1


def _signature(*parts: str) -> str:
    """Text for an action's varlist: SCons substitutes it, so `$` is escaped."""
    return "\n".join([f"rustko {__version__}", *parts]).replace("$", "$$")


def _command_text(cmd: list[str]) -> str:
    """A command as its target's signature holds it: Kbuild's V= changes what is shown, not what
    is built, and the cache's place (under $HOME: another for `sudo scons install`) is not part
    of what the content-keyed sysroot in it holds."""
    cache_root = str(cache.cache_root())
    return shlex.join(arg.replace(cache_root, "$RUSTKO_CACHE") for arg in cmd if not arg.startswith("V="))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _quiet_or_full(env: Any, quiet: list[str], commands: list[list[str]]) -> str:
    """Kbuild's quiet_cmd_* lines, or under V=1 the full command lines (cmd_*)."""
    if _flag(_setting(env, "V")):
        return "\n".join(shlex.join(cmd) for cmd in commands)
    return "\n".join(quiet)


# --- the crate's implicit dependencies ---------------------------------------------------------

def _scan(node: Any, env: Any, path: tuple[Any, ...]) -> list[Any]:
    """What a source reads: a crate root its `mod` files and includes (and what rustc's dep-info
    named last time), Cargo.toml its path dependencies' files, a C file its headers."""
    name = node.name
    if name.endswith((".c", ".h")):
        return _C_SCANNER(node, env, path)
    if name.endswith(".rs") and env.get("RUSTKO_DEPFILE"):
        root = Path(node.srcnode().abspath)
        found = set(build.mod_files(root))
        found.update(build.dep_files(Path(env["RUSTKO_DEPFILE"]), Path(env["RUSTKO_PROJECT"])))
        found.discard(root)
        return [env.fs.File(str(p)) for p in sorted(found) if p.is_file()]
    if name == "Cargo.toml" and env.get("RUSTKO_PLAN") is not None:
        found = set()
        for dep, _cmd in env["RUSTKO_PLAN"].dependencies:
            found.update(build.mod_files(dep.root))
            found.update(build.dep_files(Path(env["RUSTKO_WORK"]) / "deps" / f"{dep.crate}.d", dep.folder))
            found.add(dep.folder / "Cargo.toml")
        return [env.fs.File(str(p)) for p in sorted(found) if p.is_file()]
    return []


_C_SCANNER = SCons.Scanner.C.CScanner()
SCANNER = SCons.Scanner.ScannerBase(
    _scan, name="rustko", path_function=SCons.Scanner.FindPathDirs("CPPPATH"),
    recursive=lambda nodes: [n for n in nodes if n.name.endswith((".c", ".h"))])


# --- the composed module: crate + Kbuild side by side ------------------------------------------

def _action_spec(env: Any) -> build.ModuleSpec:
    """The spec a build step works from: the one made while the SConstruct was read, whose walk
    of the Rust files serves the whole run. --interactive builds again and again without reading
    the SConstruct again: each of its builds walks the files afresh."""
    spec: build.ModuleSpec = env["RUSTKO_SPEC"]
    return dataclasses.replace(spec) if env.GetOption("interactive") else spec


def _module_action(target: list[Any], source: list[Any], env: Any) -> int:
    headers = [Path(n.srcnode().abspath) for n in target[0].implicit or () if n.name.endswith(".h")]
    spec = _action_spec(env).with_c_sources(headers)
    try:
        # The steps after rustc say themselves when they start (a crate that does not compile
        # never reaches Kbuild); under V=1 the strfunction has shown every command already.
        tgt = _target(env)
        build.build_module(tgt, spec, Path(target[0].abspath),
                           lambda line: _say(env, line) if line.startswith(_RUN_LINES) else None,
                           after_rust=lambda: _warm_checker(str(tgt.kernel.kdir)),
                           started=_STARTED.pop(spec.kbuild_dir, None))
    except Exception as err:  # noqa: BLE001 - every failure becomes a message, never a traceback
        # A failed build leaves no module behind: not even the last one that was checked.
        Path(env["RUSTKO_PUBLISHED"]).unlink(missing_ok=True)
        repro.record_path(Path(env["RUSTKO_PUBLISHED"])).unlink(missing_ok=True)
        return _fail(err)
    return 0


_RUN_LINES = ("  SYSROOT", "  KBUILD", "  SIGN")
_WARMING: dict[str, threading.Thread] = {}  # KDIR -> the thread loading the checker's view of it


def _warm_checker(kdir: str) -> None:
    """Load the checker (and numpy) and its view of KDIR (Module.symvers, .config) while Kbuild
    links the module (one make job: a CPU is free then, not while rustc and make's start-up run):
    the check right after the build finds them ready (`_check_action` waits)."""
    def warm() -> None:
        try:
            importlib.import_module("rustko.check").kernel_view(kdir)
        except Exception:  # noqa: BLE001 - the check itself reports whatever went wrong here
            pass

    if kdir not in _WARMING:
        _WARMING[kdir] = threading.Thread(target=warm, daemon=True)
        _WARMING[kdir].start()


def _module_string(target: list[Any], source: list[Any], env: Any) -> str:
    """`  RUSTC   NAME` (the later steps' lines come as they start), all of them under -n."""
    plan: build.Plan | None = env.get("RUSTKO_PLAN")
    name = env["RUSTKO_SPEC"].name
    quiet = [f"  RUSTC   {name}"]
    if env.GetOption("no_exec"):
        quiet.append(f"  KBUILD  {name}.ko")
        if _setting(env, "SIGN_KEY"):
            quiet.append(f"  SIGN    {name}.ko")
    return _quiet_or_full(env, quiet, plan.commands() if plan else [])


MODULE = SCons.Builder.Builder(
    action=SCons.Action.Action(_module_action, _module_string, varlist=["RUSTKO_SIGNATURE"]),
    source_scanner=SCANNER)


# --- RustObject --------------------------------------------------------------------------------

def _object_action(target: list[Any], source: list[Any], env: Any) -> int:
    spec = _action_spec(env)
    try:
        tgt = build.with_rustflags(_target(env), list(spec.rustflags))
        spec.work.mkdir(parents=True, exist_ok=True)
        build.ensure_sysroot(tgt, spec, lambda line: _say(env, line))
        flags = build.crate_flags(tgt, spec)
        linked = build.compile_dependencies(tgt, spec.deps, spec.work / "deps", flags) if spec.deps else []
        build.compile_crate(tgt, spec.crate, spec.source, Path(target[0].abspath), spec.dep_file,
                            spec.project_dir, spec.edition, [*flags, *linked], entry=None)
        for companion in target[1:]:  # Kbuild's .X.o.cmd: empty, so modpost asks nothing more
            Path(companion.abspath).write_text("")
    except Exception as err:  # noqa: BLE001 - every failure becomes a message, never a traceback
        return _fail(err)
    return 0


def _object_string(target: list[Any], source: list[Any], env: Any) -> str:
    plan: build.Plan | None = env.get("RUSTKO_PLAN")
    commands = [*(cmd for _dep, cmd in plan.dependencies), plan.rustc, plan.link] if plan else []
    return _quiet_or_full(env, [f"  RUSTC   {target[0].name}"], commands)


OBJECT = SCons.Builder.Builder(
    action=SCons.Action.Action(_object_action, _object_string, varlist=["RUSTKO_SIGNATURE"]),
    source_scanner=SCANNER)


# --- RustkoCheck ---------------------------------------------------------------------------------

def _check_action(target: list[Any], source: list[Any], env: Any) -> int:
    """Check the built .ko; only a module the kernel would load reaches the target path."""
    try:
        tgt = _target(env)
        if str(tgt.kernel.kdir) in _WARMING:
            _WARMING[str(tgt.kernel.kdir)].join()
        build.check(tgt, Path(source[0].abspath), env.get("RUSTKO_EXTRA_SYMBOLS") or ())
        shutil.copyfile(source[0].abspath, target[0].abspath)
        record = repro.record_path(Path(source[0].abspath))
        if record.is_file():  # a RustKernelModule's build record goes beside the module it describes
            shutil.copyfile(record, repro.record_path(Path(target[0].abspath)))
    except Exception as err:  # noqa: BLE001 - every failure becomes a message, never a traceback
        repro.record_path(Path(target[0].abspath)).unlink(missing_ok=True)  # it described the refused module
        status = _fail(err)
        print(f"  note: {source[0].get_path()} is the refused module, kept for inspection "
              f"(rustko check, rustko vmtest); {target[0].get_path()} is not written", file=sys.stderr)
        return status
    return 0


CHECK = SCons.Builder.Builder(
    action=SCons.Action.Action(_check_action, "  CHECK   ${TARGET.file}", varlist=["RUSTKO_CHECKER"]))


# --- KbuildModule --------------------------------------------------------------------------------

def _kbuild_action(target: list[Any], source: list[Any], env: Any) -> int:
    """`make -C KDIR M=<folder> modules` for a project's own Kbuild module."""
    import subprocess

    cmd = env["RUSTKO_MAKE"]
    result = subprocess.run(cmd, capture_output=not _flag(_setting(env, "V")), text=True,
                            env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")})
    if result.returncode != 0:
        tail = "\n".join(((result.stdout or "") + (result.stderr or "")).strip().splitlines()[-25:])
        return _fail(RustkoError(f"Kbuild failed for {target[0].name} (`{shlex.join(cmd)}`):\n{tail}",
                                 "the last lines above are Kbuild's; V=1 shows everything", exit_code=1))
    return 0


def _kbuild_string(target: list[Any], source: list[Any], env: Any) -> str:
    return _quiet_or_full(env, [f"  KBUILD  {target[0].name}"], [env["RUSTKO_MAKE"]] if env.get("RUSTKO_MAKE") else [])


KBUILD = SCons.Builder.Builder(
    action=SCons.Action.Action(_kbuild_action, _kbuild_string, varlist=["RUSTKO_SIGNATURE"]))


# What `make M=` writes beside a module (scripts/Makefile.build, Makefile.modpost, Makefile.modfinal of
# 5.10-7.3): `scons -c` removes these names and nothing else, so a user's own files stay.
_KBUILD_DIR_OUTPUTS = ("modules.order", ".modules.order.cmd", "Module.symvers", ".Module.symvers.cmd",
                       ".module-common.o", ".module-common.o.cmd")
_KBUILD_MODULE_OUTPUTS = ("{m}.o", ".{m}.o.cmd", "{m}.mod", ".{m}.mod.cmd", "{m}.mod.c", "{m}.mod.o",
                          ".{m}.mod.o.cmd", ".{m}.ko.cmd")


def kbuild_outputs(ko_name: str, sources: list[str]) -> list[str]:
    """File names Kbuild makes in a module's folder for these sources: each C file's or `_shipped`
    object's .o (and its .cmd), the module's intermediate files, and modpost's lists."""
    module = ko_name.removesuffix(".ko")
    names = [n.format(m=module) for n in _KBUILD_MODULE_OUTPUTS] + list(_KBUILD_DIR_OUTPUTS)
    for source in sources:
        base = Path(source).name
        for suffix in (".c", ".S", ".o_shipped"):
            if base.endswith(suffix):
                stem = base.removesuffix(suffix)
                names += [f"{stem}.o", f".{stem}.o.cmd"]
    return names


def KbuildModule(env: Any, target: str, source: list[Any] | str, extra_symbols: list[Any] | None = None) -> Any:
    """Build a project's own Kbuild module (its Kbuild file and sources in the target's folder,
    e.g. a C module linking a RustObject) with the KDIR's Kbuild; returns the .ko node."""
    ko = env.File(target)
    extra, waits = _symvers(env, extra_symbols)
    overrides: dict[str, Any] = {"RUSTKO_SIGNATURE": "", "RUSTKO_MAKE": None}
    if not _reading_only(env):
        tgt = _target(env)
        job = kbuild.KbuildJob(kernel=tgt.kernel, build_dir=Path(ko.dir.abspath),
                               cross_compile=tgt.options.cross_compile, llvm=tgt.options.llvm,
                               verbose=tgt.options.verbose, extra_symbols=extra)
        overrides = {"RUSTKO_SIGNATURE": _signature(_command_text(job.make_command())),
                     "RUSTKO_MAKE": job.make_command()}
        env.Depends(ko, [*_kernel_files(env, tgt), *waits])
    built = KBUILD(env, ko, source, **overrides)[0]
    _SYMVERS[built] = Path(ko.dir.abspath) / "Module.symvers"  # what modpost writes beside it
    env.Clean(built, [ko.dir.File(name) for name in kbuild_outputs(ko.name, [str(s) for s in env.Flatten([source])])])
    return built


# --- the pseudo-builders a user calls ------------------------------------------------------------

_PUBLISHED: dict[str, set[str]] = {}  # build folder -> the modules published there
_SYMVERS: dict[Any, Path] = {}   # a module's .ko node (RustKernelModule, KbuildModule) -> its Module.symvers


def _symvers(env: Any, entries: list[Any] | str | None) -> tuple[list[Path], list[Any]]:
    """KBUILD_EXTRA_SYMBOLS: a module built here (its .ko node) or any Module.symvers file;
    returns the files and the nodes to wait for."""
    if isinstance(entries, (str, SCons.Node.FS.Base)):
        entries = [entries]
    paths, nodes = [], []
    for entry in entries or ():
        node = entry[0] if isinstance(entry, list) and entry else entry
        node = env.File(node)
        paths.append(_SYMVERS.get(node) or Path(node.abspath))
        nodes.append(node)
    return paths, nodes


def _kernel_files(env: Any, tgt: build.Target) -> list[Any]:
    """KDIR's files a module is made from besides the headers: a changed CRC or config rebuilds."""
    files = [tgt.kernel.symvers, tgt.kernel.kdir / ".config"]
    files += [Path(path) for path in (tgt.options.sign_key, tgt.options.sign_cert) if path]
    return [env.fs.File(str(path)) for path in files if path.is_file()]


def _one_source(name: str, source: Any) -> Any:
    if isinstance(source, (list, tuple)):
        if len(source) != 1:
            raise SCons.Errors.UserError(
                f"error: module {name}: source must be the crate root, one file (got {len(source)})\n"
                "  help: pass e.g. \"src/lib.rs\"; the files it declares with `mod` are found from it")
        source = source[0]
    return source


def _crate(env: Any, name: str, source: Any, manifest: str, build_dir: Any, rustflags: list[str] | None,
           meta: dict[str, Any], c_sources: list[Any] | str | None, ccflags: list[str] | str | None,
           extra_symbols: list[Path]) -> tuple[build.ModuleSpec, Any, Any, list[Any]]:
    """The module spec (crate, metadata, C side), and the nodes it is made from."""
    root = env.File(_one_source(name, source)).srcnode()
    manifest_node = env.File(manifest).srcnode()
    project_dir = Path(manifest_node.dir.abspath)
    if isinstance(c_sources, (str, SCons.Node.FS.Base)):
        c_sources = [c_sources]
    if isinstance(ccflags, str):
        ccflags = ccflags.split()
    c_nodes = [env.File(path).srcnode() for path in c_sources or ()]
    out_dir = env.Dir(build_dir)
    work = out_dir.Dir(f".rustko/{name}")
    manifest_data = _user(project.read_manifest, Path(manifest_node.abspath))
    # A dashed name (my-mod.ko, as Kbuild allows) is checked as the kernel will see it (my_mod).
    info = dataclasses.replace(_user(project.module_info, name.replace("-", "_"), manifest_data, meta), name=name)
    spec = build.ModuleSpec(
        info=info, source=Path(root.abspath),
        project_dir=project_dir, work=Path(work.abspath), edition=project.edition(manifest_data),
        rustflags=tuple(rustflags or ()), c_sources=tuple(Path(n.abspath) for n in c_nodes),
        deps=_user(project.path_dependencies, manifest_data, project_dir), ccflags=tuple(ccflags or ()),
        extra_symbols=tuple(extra_symbols))
    _user(lambda: spec.layout)
    sources = [root, *([manifest_node] if manifest_node.exists() else []), *c_nodes]
    return spec, out_dir, work, sources


_CLEANED: set[Path] = set()


def _database(env: Any, out_dir: Any) -> None:
    """SCons's database in the (first) build folder unless the SConstruct chose a place: `sudo
    scons install` after a user's build finds it (as `sudo make modules_install` finds Kbuild's
    .cmd files). `scons -c` leaves no folder of rustko's that it emptied, database included."""
    folder = Path(out_dir.abspath)
    if SCons.SConsign.DB_Name is None:
        SCons.SConsign.File(str(folder / ".sconsign"))  # not env.SConsignFile: it substitutes `$`
        if not (env.GetOption("clean") or env.GetOption("no_exec") or env.GetOption("help")):
            folder.mkdir(parents=True, exist_ok=True)
    if env.GetOption("clean") and not _CLEANED:
        atexit.register(_tidy_after_clean)
    if env.GetOption("clean"):
        _CLEANED.add(folder)


def _tidy_after_clean() -> None:
    """After `scons -c`, once SCons has written its database: the database goes when nothing
    else is left beside it, then the empty folders rustko made (never a folder holding anything)."""
    database = Path(str(SCons.SConsign.DB_Name) + ".dblite")
    for out_dir in sorted(_CLEANED, reverse=True):
        for folder in (out_dir / ".rustko", out_dir):
            if folder.is_dir() and not [p for p in folder.iterdir() if p != database]:
                if database.parent == folder:
                    database.unlink(missing_ok=True)
                try:
                    folder.rmdir()
                except OSError:
                    pass


_STARTED: dict[Path, build.StartedKbuild] = {}  # Kbuild folder -> its make, started while reading


def _starts_early(env: Any, spec: build.ModuleSpec, unchecked: Path) -> bool:
    """Start the module's make while the SConstruct is read, before SCons decides (Kbuild's own
    compiler checks are the longest part of a clean build): when the module is as good as sure
    to be built (its .ko missing, or older than one of its Rust files or its Cargo.toml), as many
    modules as SCons runs jobs. Not for -n, -q or --interactive, nor under V=1 (Kbuild's output
    would come before the module's command lines), nor for a module with its own C files (the
    headers they include are known once SCons has scanned them). A run that does not build the
    module after all stops its make on exit (`_stop_started`)."""
    if (env.GetOption("no_exec") or env.GetOption("question") or env.GetOption("interactive")
            or spec.c_sources or _flag(_setting(env, "V")) or len(_STARTED) >= int(env.GetOption("num_jobs"))):
        return False
    try:
        built = unchecked.stat().st_mtime_ns
    except OSError:
        return True
    inputs = [*spec.rust_files, spec.project_dir / "Cargo.toml"]
    return any(path.stat().st_mtime_ns > built for path in inputs if path.is_file())


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (None: `path` exists)."""
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


def _undo_early_start(kbuild_dir: Path, made: Path | None) -> None:
    """A compiler or toolchain found wanting after Kbuild started early: stop that make and
    remove the folders the start created, so that bad input leaves nothing written."""
    started = _STARTED.pop(kbuild_dir, None)
    if started is not None:
        started.running.stop()
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)


def _stop_started() -> None:
    """At exit: the makes started early whose module was not built this run."""
    while _STARTED:
        _STARTED.popitem()[1].running.stop()


def RustObject(env: Any, target: str, source: Any = "src/lib.rs", *, rustflags: list[str] | None = None,
               manifest: str = "Cargo.toml", crate_name: str | None = None) -> Any:
    """The crate compiled to one relocatable object with the target kernel's flags (fat LTO: only
    what its exported functions need), ready for a C Kbuild module to link: name the target
    `X.o_shipped` in the module's folder and list `X.o` in its Kbuild file (the empty `.X.o.cmd`
    Kbuild's modpost wants comes with it)."""
    obj = env.File(target)
    name = crate_name or obj.name.split(".")[0]
    tgt = None if _reading_only(env) else _target(env)
    spec, out_dir, work, sources = _crate(env, name, source, manifest, obj.dir, rustflags,
                                          {"license": "GPL"}, None, None, [])
    spec = dataclasses.replace(spec, work=Path(obj.dir.abspath) / f".{obj.name}.rustko")
    _database(env, obj.dir)
    overrides: dict[str, Any] = {"RUSTKO_SPEC": spec, "RUSTKO_PLAN": None, "RUSTKO_SIGNATURE": "",
                                 "RUSTKO_DEPFILE": str(spec.dep_file), "RUSTKO_PROJECT": str(spec.project_dir),
                                 "RUSTKO_WORK": str(spec.work)}
    if tgt is not None:
        plan = _user(build.plan, tgt, spec, None, Path(obj.abspath))
        overrides.update(RUSTKO_PLAN=plan, RUSTKO_SIGNATURE=_signature(
            *(shlex.join(cmd) for _dep, cmd in plan.dependencies), shlex.join(plan.rustc), shlex.join(plan.link)))
    # Kbuild takes a prebuilt object as X.o_shipped, with an (empty) .X.o.cmd beside it.
    companions = [obj.dir.File(f".{obj.name[:-len('_shipped')]}.cmd")] if obj.name.endswith(".o_shipped") else []
    nodes = OBJECT(env, [obj, *companions], sources, **overrides)
    env.Clean(nodes, env.fs.Dir(str(spec.work)))
    return nodes[0]


def RustkoCheck(env: Any, target: str, source: Any, extra_symbols: list[Any] | None = None) -> Any:
    """The loadability check of any .ko for this environment's kernel; the target is the module
    itself, copied only when the kernel would load it. `extra_symbols`: as for Kbuild."""
    extra, waits = _symvers(env, extra_symbols)
    overrides: dict[str, Any] = {"RUSTKO_CHECKER": "", "RUSTKO_EXTRA_SYMBOLS": tuple(extra)}
    ko = env.File(target)
    if not _reading_only(env):
        tgt = _target(env)
        overrides["RUSTKO_CHECKER"] = _signature(tgt.kernel.release, str(tgt.kernel.kdir), *map(str, extra))
        env.Depends(ko, [*_kernel_files(env, tgt), *waits])
    return CHECK(env, ko, source, **overrides)[0]


def RustKernelModule(env: Any, name: str, source: Any = "src/lib.rs", *, license: str = "",
                     author: str = "", description: str = "", version: str = "",
                     params: dict[str, dict[str, Any]] | None = None,
                     rustflags: list[str] | None = None, build_dir: str | None = None,
                     manifest: str = "Cargo.toml", c_sources: list[Any] | str | None = None,
                     ccflags: list[str] | str | None = None, extra_symbols: list[Any] | None = None) -> Any:
    """Build `name`.ko from the crate rooted at `source`; returns the checked `.ko` node.

    Keyword metadata (and `params`, shaped like `[package.metadata.kernel.params]`) win over
    Cargo.toml's. `c_sources`: the project's own C files (headers they include are found),
    compiled by Kbuild against the kernel's headers with `ccflags` (ccflags-y: -I, -D, ...).
    `extra_symbols`: modules (their nodes) or Module.symvers files whose exports this one uses.
    `build_dir` is relative to the SConscript (so a variant_dir build writes under the variant);
    it defaults to `$RUSTKO_BUILD_DIR` (a read-only source tree builds elsewhere), else `build`.
    """
    _user(project.check_name, name.replace("-", "_"))
    build_dir = build_dir or os.environ.get("RUSTKO_BUILD_DIR") or "build"
    if f"{name}.ko" in _PUBLISHED.get(env.Dir(build_dir).abspath, ()):
        raise SCons.Errors.UserError(
            f"error: {env.Dir(build_dir).File(name + '.ko').get_path()} would be built twice (two "
            "environments, e.g. two Clone(KDIR=...), or two calls)\n  help: give each its own "
            'build_dir=, e.g. build_dir=f"build/{tag}"')
    _PUBLISHED.setdefault(env.Dir(build_dir).abspath, set()).add(f"{name}.ko")
    meta = {"license": license, "author": author, "description": description, "version": version,
            "params": params or {}}
    extra, waits = _symvers(env, extra_symbols)
    kernel = None if _reading_only(env) else _kernel(env)  # a bad KDIR stops SCons before anything is written
    spec, out_dir, work, sources = _crate(env, name, source, manifest, build_dir, rustflags, meta,
                                          c_sources, ccflags, extra)
    published = out_dir.File(f"{name}.ko")
    unchecked = work.File(f"{name}.ko")
    made = None  # the outermost folder an early start creates
    if kernel is not None and _starts_early(env, spec, Path(unchecked.abspath)):
        made = _first_missing(spec.kbuild_dir)
        _STARTED[spec.kbuild_dir] = _user(build.start_kbuild, _options(env), kernel, spec)
        if len(_STARTED) == 1:
            atexit.register(_stop_started)
    try:
        tgt = None if _reading_only(env) else _target(env)
    except SCons.Errors.UserError:
        _undo_early_start(spec.kbuild_dir, made)
        raise
    _database(env, out_dir)  # after the checks: bad input leaves no build folder
    overrides: dict[str, Any] = {
        "RUSTKO_SPEC": spec, "RUSTKO_PLAN": None, "RUSTKO_SIGNATURE": "", "RUSTKO_PUBLISHED": published.abspath,
        "RUSTKO_DEPFILE": str(spec.dep_file), "RUSTKO_PROJECT": str(spec.project_dir), "RUSTKO_WORK": work.abspath,
        "CPPPATH": [n.dir for n in sources[1:]] + [env.fs.Dir(str(spec.project_dir / f[2:]))
                                                   for f in spec.ccflags if f.startswith("-I") and "$" not in f]}
    if tgt is not None:
        plan = _user(build.plan, tgt, spec)
        overrides.update(RUSTKO_PLAN=plan, RUSTKO_SIGNATURE=_signature(
            *(_command_text(cmd) for cmd in plan.commands()), _digest(plan.side.kbuild_text),
            _digest(plan.side.shim_text)))
    nodes = MODULE(env, [unchecked, work.File(f"{name}_rust.o")], sources, **overrides)
    if tgt is not None:
        env.Depends(nodes, [*_kernel_files(env, tgt), *waits])
    _SYMVERS[published] = spec.kbuild_dir / "Module.symvers"
    ko = RustkoCheck(env, published, nodes[0], extra_symbols)
    env.Clean(ko, [work, repro.record_path(Path(published.abspath)).as_posix()])
    if not out_dir.is_under(env.Dir("#")):
        env.Default(ko)  # SCons's default target, ".", does not reach a build folder outside the project
    booted = env.Alias(f"vmtest-{name}", ko, SCons.Action.Action(_vmtest_action, f"  VMTEST  {name}.ko"))
    env.AlwaysBuild(booted)
    env.Alias("vmtest", booted)
    installed = env.Alias(f"install-{name}", ko, SCons.Action.Action(_install_action, None))
    env.AlwaysBuild(installed)
    env.Alias("install", installed)
    _add_help(f"  {published.get_path():<14} module {name} (also vmtest-{name}, install-{name})\n")
    return ko


def _install_action(target: list[Any], source: list[Any], env: Any) -> int:
    """`scons install`: what make modules_install does for each module (kbuild.install)."""
    try:
        tgt = _target(env)
        strip_tool = "llvm-strip" if tgt.options.llvm else tgt.linker[:-2] + "strip"
        signer = ((Path(tgt.options.sign_key), Path(tgt.options.sign_cert))
                  if tgt.options.sign_key and tgt.options.sign_cert else None)
        done = kbuild.install(tgt.kernel, Path(source[0].abspath), _setting(env, "INSTALL_MOD_PATH") or "",
                              _setting(env, "INSTALL_MOD_DIR") or None, str(_setting(env, "INSTALL_MOD_STRIP") or ""),
                              strip_tool, signer)
        _say(env, f"  INSTALL {done}")
    except Exception as err:  # noqa: BLE001 - every failure becomes a message, never a traceback
        return _fail(err)
    return 0


def _vmtest_action(target: list[Any], source: list[Any], env: Any) -> int:
    """`scons vmtest`: boot the kernel each module was built for and load it (rustko.vm)."""
    from . import vm

    try:
        ko = Path(source[0].abspath)
        result = vm.vmtest(ko, arch=vm.arch_of(ko))
        vm.report(result)
    except Exception as err:  # noqa: BLE001 - every failure becomes a message, never a traceback
        return _fail(err)
    return 0 if result.ok else 1


def _skip_final_collection() -> None:
    """At exit, once SCons has written its database: Python's finalisation would free every
    object of the run one by one (SCons's nodes, the checker's view of KDIR), which cost a clean
    build about 0.1 s after Kbuild finished (strace, load 6). Objects freed by their reference
    counts still are; those only reachable through reference cycles are left to the operating
    system (SCons has written and closed its database by then; streams are flushed as before)."""
    gc.freeze()


def generate(env: Any) -> None:
    if not _HELP_GIVEN:  # once per run, as the help text
        atexit.register(_skip_final_collection)
    _help()
    env.AddMethod(RustKernelModule, "RustKernelModule")
    env.AddMethod(RustObject, "RustObject")
    env.AddMethod(RustkoCheck, "RustkoCheck")
    env.AddMethod(KbuildModule, "KbuildModule")


def exists(env: Any) -> bool:
    return True
