"""The SCons tool: thin glue from SCons nodes to `rustko.build`.

`env = Environment(tools=["default", "rustko"])` adds `env.RustKernelModule()`, the Kbuild-style
command-line variables (`VARIABLES`, plus LLVM and V; `scons -h` lists them) and the `vmtest` and
`install` aliases.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

import SCons.Action
import SCons.Script
from SCons.Script import BoolVariable, Variables

from . import build, cache, kbuild, project
from .errors import RustkoError, internal_error

VARIABLES: tuple[tuple[str, str], ...] = (
    ("KDIR", "kernel build directory (default: /lib/modules/$(uname -r)/build)"),
    ("ARCH", "target architecture: x86_64, arm64, um (aliases x86, amd64, aarch64); must match KDIR"),
    ("CROSS_COMPILE", "prefix of the C toolchain for Kbuild (default per ARCH, e.g. aarch64-linux-gnu-)"),
    ("RUSTC", "rustc to use (default: the first rustc whose library sources exist)"),
    ("RUST_LIB_SRC", "the `library` folder of that rustc's sources (default: from its sysroot)"),
    ("SIGN_KEY", "private key (PEM) to sign modules with, as Kbuild's modules_sign does"),
    ("SIGN_CERT", "the signing key's X.509 certificate (PEM or DER)"),
    ("INSTALL_MOD_PATH", "`scons install`: root to install under (default /), as for make modules_install"),
    ("INSTALL_MOD_DIR", "`scons install`: folder under /lib/modules/RELEASE (default extra)"),
)


def _variables(env: Any) -> None:
    variables = Variables(None, SCons.Script.ARGUMENTS)
    for name, help_text in VARIABLES:
        variables.Add(name, help_text, None)
    variables.Add(BoolVariable("LLVM", "build the C side with clang/ld.lld (LLVM=1)", False))
    variables.Add(BoolVariable("V", "show full command lines (V=1)", False))
    variables.Update(env)
    SCons.Script.Help(variables.GenerateHelpText(env), append=True)


def _options(env: Any) -> build.Options:
    return build.Options(kdir=env.get("KDIR"), arch=env.get("ARCH"), cross_compile=env.get("CROSS_COMPILE"),
                         llvm=bool(env.get("LLVM")), rustc=env.get("RUSTC"),
                         rust_lib_src=env.get("RUST_LIB_SRC"), verbose=bool(env.get("V")),
                         sign_key=env.get("SIGN_KEY"), sign_cert=env.get("SIGN_CERT"))


# One resolved target per distinct set of options: environments cloned with another KDIR or
# ARCH (one SConstruct building for several kernels) each get their own.
_TARGETS: dict[build.Options, build.Target] = {}


def _target(env: Any) -> build.Target:
    """Resolve the kernel and compiler once per set of options; a bad KDIR stops SCons cleanly."""
    options = _options(env)
    if options not in _TARGETS:
        try:
            _TARGETS[options] = build.resolve(options)
        except RustkoError as err:
            _stop(err)
    return _TARGETS[options]


def _stop(err: RustkoError) -> NoReturn:
    """A problem found while reading the SConstruct: the message alone, cargo-style, exit 2."""
    print(str(err), file=sys.stderr, flush=True)
    sys.exit(2)


def _reading_only(env: Any) -> bool:
    """`scons -c` and `scons -h` need the node graph, not a kernel or a compiler."""
    return bool(env.GetOption("clean") or env.GetOption("help"))


def _log(line: str) -> None:
    print(line, flush=True)


def _fail(err: BaseException) -> int:
    text = str(err) if isinstance(err, RustkoError) else internal_error(err)
    print(text, file=sys.stderr, flush=True)
    return 1


def _meta(env: Any) -> dict[str, Any]:
    license, author, description, version, params = env["RUSTKO_META"]
    return {"license": license, "author": author, "description": description, "version": version,
            "params": json.loads(params)}


def _build_action(target: list[Any], source: list[Any], env: Any) -> int:
    tgt = _target(env)
    # The checker (and numpy) loads while rustc and Kbuild run: the build needs it right after.
    threading.Thread(target=importlib.import_module, args=("rustko.check",), daemon=True).start()
    try:
        manifest = project.read_manifest(Path(source[1].abspath))
        info = project.module_info(env["RUSTKO_MODULE"], manifest, _meta(env))
        ko = Path(target[0].abspath)
        project_dir = Path(env["RUSTKO_PROJECT"])
        build.build_module(tgt, info, Path(source[0].abspath), project_dir,
                           Path(env["RUSTKO_WORK"]), ko, project.edition(manifest),
                           list(env["RUSTKO_RUSTFLAGS"]), [Path(node.abspath) for node in source[2:]], _log,
                           project.path_dependencies(manifest, project_dir))
        _log(f"  CHECK   {ko.name}")
        build.check(tgt, ko)
    except Exception as err:  # noqa: BLE001 - every failure becomes a message, never a traceback
        return _fail(err)
    return 0


def _install_action(target: list[Any], source: list[Any], env: Any) -> int:
    """`scons install`: modules_install for each module (kbuild.install)."""
    try:
        done = kbuild.install(_target(env).kernel, Path(source[0].abspath), env.get("INSTALL_MOD_PATH") or "",
                              env.get("INSTALL_MOD_DIR") or "extra")
        _log(f"  INSTALL {done}")
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


BUILD = SCons.Action.Action(_build_action, "  RUSTC   $RUSTKO_MODULE",
                            varlist=["RUSTKO_MODULE", "RUSTKO_RUSTFLAGS", "RUSTKO_PROJECT", "RUSTKO_META",
                                     "RUSTKO_WORK"])


def RustKernelModule(env: Any, name: str, source: str = "src/lib.rs", *, license: str = "",
                     author: str = "", description: str = "", version: str = "",
                     params: dict[str, dict[str, Any]] | None = None,
                     rustflags: list[str] | None = None, build_dir: str | None = None,
                     manifest: str = "Cargo.toml", c_sources: list[str] | None = None) -> Any:
    """Build `name`.ko from the crate rooted at `source`; returns the checked `.ko` node.

    Keyword metadata (and `params`, shaped like `[package.metadata.kernel.params]`) win over
    Cargo.toml's. `c_sources`: the project's own C files (and the headers they include),
    compiled by Kbuild into the module against the kernel's headers. `build_dir` defaults to
    `$RUSTKO_BUILD_DIR` (a read-only source tree builds elsewhere), else `#build`.
    """
    c_nodes = [env.File(path) for path in c_sources or ()]
    try:
        project.check_name(name)
        kbuild.c_objects(name, [Path(node.abspath) for node in c_nodes])
    except RustkoError as err:
        _stop(err)
    project_dir = Path(env.Dir("#").abspath)
    out_dir = env.Dir(build_dir or os.environ.get("RUSTKO_BUILD_DIR") or "#build")
    work = out_dir.Dir(f".rustko/{name}")
    outside = not out_dir.is_under(env.Dir("#"))
    manifest_node = env.File(manifest)
    overrides = dict(RUSTKO_MODULE=name, RUSTKO_RUSTFLAGS=tuple(rustflags or ()),
                     RUSTKO_PROJECT=str(project_dir), RUSTKO_WORK=work.abspath,
                     RUSTKO_META=(license, author, description, version,
                                  json.dumps(params or {}, sort_keys=True)))
    # One action for the crate and Kbuild, which run side by side (build.build_module).
    nodes = env.Command([out_dir.File(f"{name}.ko"), work.File(f"{name}_rust.o"), work.File(f"{name}_rust.d")],
                        [env.File(source), manifest_node, *c_nodes], BUILD, **overrides)
    ko = nodes[0]
    # A build folder outside the project may hold other things: clean only what the build made,
    # and make the module a default target (SCons's default, ".", does not reach it).
    env.Clean(ko, [out_dir.Dir(".rustko"), out_dir.File(f"{name}.ko.buildinfo")] if outside else out_dir)
    if outside:
        env.Default(ko)
    booted = env.Alias(f"vmtest-{name}", ko, SCons.Action.Action(_vmtest_action, f"  VMTEST  {name}.ko"))
    env.AlwaysBuild(booted)
    env.Alias("vmtest", booted)
    installed = env.Alias(f"install-{name}", ko, SCons.Action.Action(_install_action, None))
    env.AlwaysBuild(installed)
    env.Alias("install", installed)

    if not _reading_only(env):
        tgt = _target(env)
        sources = _rust_sources(Path(env.File(source).abspath), Path(nodes[2].abspath), project_dir,
                                Path(manifest_node.abspath), Path(work.abspath))
        env.Depends(nodes, [env.File(str(p)) for p in sources if p.is_file()])
        env.Depends(nodes, env.Value(_signature(tgt, list(rustflags or ()))))
        env.Depends(nodes, env.Value(f"{tgt.kernel.kdir}|{tgt.kernel.release}|"
                                     f"{tgt.options.cross_compile}|{tgt.options.llvm}"))
        env.Depends(nodes, [env.File(path) for path in (tgt.options.sign_key, tgt.options.sign_cert) if path])
        env.Depends(nodes, [env.File(str(part)) for part in sorted(kbuild.RUNTIME_DIR.glob("*.c"))])
    return ko


def _rust_sources(root: Path, dep_file: Path, project_dir: Path, manifest: Path, work: Path) -> list[Path]:
    """Every file the Rust side reads: rustc's dep-info from the last build (or, before the first,
    the `mod` declarations), the same for each path dependency, and their Cargo.toml files."""
    sources = build.dep_files(dep_file, project_dir) or build.mod_files(root)
    try:
        crates = _all_dependencies(project.path_dependencies(project.read_manifest(manifest), project_dir))
    except RustkoError as err:
        _stop(err)
    for dep in crates:
        sources += build.dep_files(work / "deps" / f"{dep.crate}.d", dep.folder) or build.mod_files(dep.root)
        sources.append(dep.folder / "Cargo.toml")
    return sources


def _all_dependencies(deps: tuple[project.Dependency, ...]) -> list[project.Dependency]:
    """Every path dependency, transitively: their sources are the module's sources too."""
    found: list[project.Dependency] = []
    for dep in deps:
        found += [dep, *_all_dependencies(dep.deps)]
    return found


def _signature(tgt: build.Target, extra: list[str]) -> str:
    """What makes the Rust object differ besides its sources: compiler, sysroot, flags."""
    digest = hashlib.sha256("\0".join([tgt.sysroot_key, str(tgt.toolchain.rustc), *extra]).encode())
    return digest.hexdigest()


def _sconsign(env: Any) -> None:
    """Keep SCons's database out of the project, so that `scons -c` leaves the folder as it was."""
    project_dir = env.Dir("#").abspath
    folder = cache.cache_root() / "sconsign"
    folder.mkdir(parents=True, exist_ok=True)
    SCons.Script.SConsignFile(str(folder / hashlib.sha256(project_dir.encode()).hexdigest()[:16]))


def generate(env: Any) -> None:
    _variables(env)
    _sconsign(env)
    env.AddMethod(RustKernelModule, "RustKernelModule")


def exists(env: Any) -> bool:
    return True
