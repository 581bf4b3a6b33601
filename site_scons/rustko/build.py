"""The build pipeline without SCons: resolve the target, compile the crate, link with Kbuild, check.

Each step is a plain function over paths so that the SCons tool, tests and scripts drive the same
code. Nothing here writes outside the build directory and the machine-wide cache.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from . import flags as flagset
from . import arch as arches
from . import kbuild, project, repro, sysroot, targetspec, toolchain
from .errors import RustkoError
from .kernel import KernelInfo, normalize_arch, probe

Log = Callable[[str], None]


@dataclass(frozen=True)
class Options:
    """What the user chose: the Kbuild-style command-line variables."""

    kdir: str | None = None
    arch: str | None = None
    cross_compile: str | None = None
    llvm: bool = False
    rustc: str | None = None
    rust_lib_src: str | None = None
    verbose: int = 0               # V=1: command lines; V=2: Kbuild also says why it rebuilds
    sign_key: str | None = None    # PEM private key: sign the .ko the way Kbuild's modules_sign does
    sign_cert: str | None = None   # its X.509 certificate (PEM or DER)


@dataclass
class Target:
    """Everything resolved once per build: kernel, compiler, flags; the sysroot on first use."""

    options: Options
    kernel: KernelInfo
    toolchain: toolchain.Toolchain
    flags: list[str]
    spec: targetspec.Choice

    @functools.cached_property
    def sysroot_key(self) -> str:
        """The flags name the kernel's target.json by a path; its text is hashed too."""
        text = [targetspec.render(self.spec.kernel)] if self.spec.custom and self.spec.kernel else []
        return sysroot.key(self.toolchain, [*self.flags, *text])

    def sysroot(self, log: Callable[[str, list[str]], None] | None = None,
                crates: Sequence[str] = sysroot.ALWAYS) -> sysroot.Sysroot:
        """The sysroot with at least `crates`: the missing ones built now (a few stats otherwise)."""
        return sysroot.ensure(self.toolchain, self.flags, targetspec.target_name(self.flags), log, self.sysroot_key,
                              crates)

    @property
    def linker(self) -> str:
        if self.options.llvm:
            return "ld.lld"
        cross = self.options.cross_compile
        if cross is None:
            cross = arches.default_cross_compile(self.kernel.arch)
        return f"{cross}ld"


def resolve_kernel(options: Options) -> KernelInfo:
    """The kernel alone (KDIR read, ARCH and the signing pair checked): enough to start Kbuild,
    whose compiler checks take longer than finding rustc (`start_kbuild`)."""
    kernel = probe(options.kdir)
    if options.arch:
        wanted = normalize_arch(options.arch)
        if wanted != kernel.arch:
            raise RustkoError(
                f"KDIR {kernel.kdir} is configured for {kernel.arch}, but ARCH={options.arch} asks for {wanted}",
                ("KDIR=$(rustko kdir --arch um) prepares one for Debian's user-mode-linux kernel"
                 if wanted == "um" else f"pass the headers of an {wanted} kernel as KDIR")
                + f", or drop ARCH= to build for {kernel.arch}")
    if bool(options.sign_key) != bool(options.sign_cert):
        raise RustkoError("SIGN_KEY and SIGN_CERT go together",
                          "pass both (a private key and its certificate), or neither for an unsigned module")
    for what, path in (("SIGN_KEY", options.sign_key), ("SIGN_CERT", options.sign_cert)):
        if path and not Path(path).is_file():
            raise RustkoError(f"{what}={path} does not exist",
                              "e.g. openssl req -new -x509 -newkey rsa:4096 -nodes -days 3650 -subj "
                              "'/CN=my modules/' -keyout signing_key.pem -out signing_key.x509 -outform DER")
    return kernel


def resolve(options: Options, kernel: KernelInfo | None = None) -> Target:
    """`kernel`: `resolve_kernel(options)`'s answer when the caller has it already."""
    kernel = kernel or resolve_kernel(options)
    tools = toolchain.find(options.rustc, options.rust_lib_src)
    spec = targetspec.choose(kernel, tools)
    target = Target(options=options, kernel=kernel, toolchain=tools,
                    flags=targetspec.apply(spec, flagset.codegen_flags(kernel, tools.version)), spec=spec)
    _require_c_tools(target)
    return target



# The programs Kbuild runs with LLVM=1 (Documentation/kbuild/llvm.rst), from Debian's clang, lld, llvm.
LLVM_TOOLS: tuple[str, ...] = ("clang", "ld.lld", "llvm-ar", "llvm-nm", "llvm-objcopy", "llvm-readelf", "llvm-strip")


def _require_c_tools(target: Target) -> None:
    """Say which toolchain is missing before rustc and Kbuild run for minutes and fail on it."""
    if target.options.llvm:
        missing = [name for name in LLVM_TOOLS if shutil.which(name) is None]
        if missing:
            raise RustkoError(f"LLVM=1 needs {', '.join(missing)}, not installed on this machine",
                              "apt-get install clang lld llvm, or drop LLVM=1 to use the GNU toolchain")
    elif shutil.which(target.linker) is None:
        package = arches.toolchain_package(target.kernel.arch)
        raise RustkoError(f"the {target.kernel.arch} linker {target.linker} is not installed",
                          f"apt-get install {package}, set CROSS_COMPILE= to the prefix of your "
                          "toolchain, or use LLVM=1")


@dataclass(frozen=True)
class CrateOutput:
    obj: Path
    dep_file: Path
    undefined: frozenset[str] = frozenset()  # the symbols the object leaves to the kernel and the shim


def planned_sysroot(target: Target) -> sysroot.Sysroot:
    """Where `target.sysroot()` puts the sysroot: known before it is built, so that the rustc
    command line (part of each object's SCons signature) can be written down first."""
    return sysroot.Sysroot(path=sysroot.location(target.sysroot_key), target=targetspec.target_name(target.flags))


def scratch_dir(obj: Path) -> Path:
    """rustc's own output folder for `obj` (the archive and its intermediates), beside it."""
    return obj.parent / f".{obj.name}.rustc"


def crate_command(target: Target, name: str, source: Path, project_dir: Path, obj: Path,
                  dep_file: Path, edition: str, extra: list[str]) -> list[str]:
    """The rustc command that compiles the crate for `obj`: the same string before and after the
    sysroot exists, so it can stand in SCons's signature of `obj` (Kbuild's if_changed)."""
    root = planned_sysroot(target)
    scratch = scratch_dir(obj)
    return [str(target.toolchain.rustc), *target.flags, *extra,
            f"--edition={edition}", "--crate-type=staticlib", f"--crate-name={name}",
            "-Clto=fat", f"--sysroot={root.path}", f"--extern=rustko={root.support_crate}",
            f"--remap-path-prefix={project_dir}={name}", f"--remap-path-prefix={root.path}=/sysroot",
            # --out-dir: rustc's intermediate objects go there, not into the project (its cwd).
            f"--out-dir={scratch}", f"--emit=link={scratch / f'lib{name}.a'},dep-info={dep_file}",
            os.path.relpath(source, project_dir)]


def link_command(target: Target, name: str, obj: Path, entry: str | None) -> list[str]:
    """`ld -r` of the crate's archive into `obj`: with `entry`, only what that symbol needs (the
    module's rust_init); without, the crate's whole object (RustObject, linked by a C module)."""
    scratch = scratch_dir(obj)
    root = ["-u", entry] if entry else [str(scratch / f"{name}.o")]
    return [target.linker, "-m", arches.resolve(target.kernel.arch).ld_emulation, "-r", *root, "-o", str(obj),
            str(scratch / f"lib{name}.a")]


def with_rustflags(target: Target, extra: list[str]) -> Target:
    """`target`, or a copy whose sysroot also gets the module's own code-model, relocation-model
    and target-feature overrides: fat LTO cannot link core built with others."""
    shared = flagset.sysroot_shared(extra)
    return replace(target, flags=[*target.flags, *shared]) if shared else target


def _rustc(target: Target, cmd: list[str], cwd: Path, what: str, log: Log | None) -> None:
    """Run rustc, its messages going straight to the user (they are already cargo-style)."""
    if log and target.options.verbose:
        log(" ".join(cmd))
    result = subprocess.run(cmd, cwd=cwd, env={**os.environ, "RUSTC_BOOTSTRAP": "1"},
                            stderr=subprocess.PIPE, text=True)
    if result.stderr:
        print(result.stderr, end="", file=sys.stderr)
    if toolchain.interrupted(result.returncode, result.stderr):
        raise RustkoError(f"interrupted: rustc stopped while compiling {what} (Ctrl-C or a signal)", exit_code=130)
    if result.returncode != 0:
        raise RustkoError(f"{what} does not compile", "rustc's messages above say where and why", exit_code=1)


def dependency_commands(target: Target, deps: Sequence[project.Dependency], out_dir: Path,
                        extra: list[str]) -> tuple[list[tuple[project.Dependency, list[str]]], list[str]]:
    """Each path dependency's rustc command (an rlib with bitcode, so the module's fat LTO keeps
    only what it uses), dependencies first; and the rustc arguments that make them visible."""
    sysroot = planned_sysroot(target)
    built: dict[Path, Path] = {}
    commands: list[tuple[project.Dependency, list[str]]] = []

    def plan_one(dep: project.Dependency) -> Path:
        if dep.root in built:
            return built[dep.root]
        externs = [f"--extern={sub.extern}={plan_one(sub)}" for sub in dep.deps]
        rlib = out_dir / f"lib{dep.crate}.rlib"
        if rlib in built.values():
            raise RustkoError(f"two dependencies are both named `{dep.crate}`",
                              "rename one of the crates ([package] name in its Cargo.toml)")
        commands.append((dep, [
            str(target.toolchain.rustc), *target.flags, *extra, f"--edition={dep.edition}",
            "--crate-type=rlib", f"--crate-name={dep.crate}", "-Cembed-bitcode=yes",
            f"--sysroot={sysroot.path}", f"--extern=rustko={sysroot.support_crate}", *externs,
            f"-Ldependency={out_dir}", f"--remap-path-prefix={dep.folder}={dep.crate}",
            f"--remap-path-prefix={sysroot.path}=/sysroot", f"--out-dir={out_dir}",
            f"--emit=link={rlib},dep-info={out_dir / dep.crate}.d", os.path.relpath(dep.root, dep.folder)]))
        built[dep.root] = rlib
        return rlib

    externs = [f"--extern={dep.extern}={plan_one(dep)}" for dep in deps]
    return commands, ([f"-Ldependency={out_dir}", *externs] if deps else [])


def compile_dependencies(target: Target, deps: Sequence[project.Dependency], out_dir: Path,
                         extra: list[str], log: Log | None = None) -> list[str]:
    """Run `dependency_commands`; returns the rustc arguments that make the dependencies visible."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target.sysroot()
    commands, linked = dependency_commands(target, deps, out_dir, extra)
    for dep, cmd in commands:
        _rustc(target, cmd, dep.folder, f"dependency `{dep.extern}` ({dep.root})", log)
    return linked


def compile_crate(target: Target, name: str, source: Path, obj: Path, dep_file: Path,
                  project_dir: Path, edition: str = "2021", extra: list[str] | None = None,
                  log: Log | None = None, entry: str | None = "rust_init", gaps: bool = True) -> CrateOutput:
    """rustc (fat LTO, one codegen unit) then `ld -r`: one object with only the code it uses.
    `target` must already carry the sysroot flags `extra` needs (`with_rustflags`); `extra`
    also carries the dependencies' --extern arguments. `entry`: see `link_command`. `gaps`:
    refuse symbols no kernel provides here (False: the caller does, `refuse_runtime_gaps`)."""
    obj.parent.mkdir(parents=True, exist_ok=True)
    scratch = scratch_dir(obj)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        target.sysroot()
        cmd = crate_command(target, name, source, project_dir, obj, dep_file, edition, extra or [])
        _rustc(target, cmd, project_dir, f"the crate of module {name} ({source})", log)
        if entry is None:
            _extract_member(scratch / f"lib{name}.a", name, scratch / f"{name}.o")
        # Pull from the archive only what is needed: the crate's object, plus the
        # compiler_builtins object when (and only when) it is referenced.
        link = link_command(target, name, obj, entry)
        if log and target.options.verbose:
            log(" ".join(link))
        try:
            linked = subprocess.run(link, capture_output=True, text=True)
        except OSError as err:
            raise RustkoError(f"cannot run the linker {target.linker}: {err.strerror}",
                              "install binutils for the target (CROSS_COMPILE), or set LLVM=1") from None
        if linked.returncode != 0:
            raise RustkoError(f"`{' '.join(link)}` failed: {linked.stderr.strip()}", exit_code=1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    symbols, undefined = object_symbols(obj)
    if gaps:
        refuse_runtime_gaps(name, undefined)
    if entry and entry not in symbols:
        raise RustkoError(f"the crate of module {name} defines no `{entry}`",
                          'add `#[no_mangle] pub extern "C" fn rust_init() -> i32` '
                          "(`#[unsafe(no_mangle)]` in edition 2024; return 0 or a negative errno)", exit_code=1)
    return CrateOutput(obj=obj, dep_file=dep_file, undefined=frozenset(undefined))


def _extract_member(archive: Path, crate: str, out: Path) -> None:
    """The crate's own object out of rustc's staticlib (a GNU `ar` archive: after fat LTO, one
    member named `<crate>.<crate>.<hash>-cgu.0.rcgu.o` beside `libcompiler_builtins.*`, seen
    with rustc 1.96)."""
    data = archive.read_bytes()
    names = b""
    offset = 8  # b"!<arch>\n"
    while offset + 60 <= len(data):
        header = data[offset:offset + 60]
        name, size = header[:16].decode().rstrip(), int(header[48:58].decode())
        body = data[offset + 60:offset + 60 + size]
        if name == "//":
            names = body
        elif name.startswith("/") and name[1:].isdigit():
            start = int(name[1:])
            name = names[start:names.index(b"\n", start)].decode().rstrip("/")
        else:
            name = name.rstrip("/")
        if name.split(".")[0] == crate and name.endswith(".o"):
            out.write_bytes(body)
            return
        offset += 60 + size + (size & 1)
    raise RustkoError(f"rustc's archive {archive} holds no object of crate {crate}", exit_code=1)


# Elf64_Shdr and Elf64_Sym (include/uapi/linux/elf.h), little-endian: every target rustko builds for.
SHDR = struct.Struct("<IIQQQQIIQQ")
SYM = struct.Struct("<IBBHQQ")
SHT_SYMTAB, SHN_UNDEF, STB_GLOBAL = 2, 0, 1


def object_symbols(obj: Path) -> tuple[set[str], set[str]]:
    """(global symbols the object defines, symbols it leaves undefined). Read with `struct`: it
    runs between rustc and Kbuild on every build, where pyelftools took 0.2 s for hello's."""
    data = obj.read_bytes()
    try:
        return _symbols(data)
    except (struct.error, IndexError, ValueError):
        raise RustkoError(f"{obj} is not a 64-bit little-endian ELF object (or it is truncated)",
                          "the linker wrote it: run with V=1 to see its command", exit_code=1) from None


def _symbols(data: bytes) -> tuple[set[str], set[str]]:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not ELF64 little-endian")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shnum, = struct.unpack_from("<H", data, 0x3C)
    sections = [SHDR.unpack_from(data, shoff + index * SHDR.size) for index in range(shnum)]
    defined: set[str] = set()
    undefined: set[str] = set()
    for _name, kind, _flags, _addr, offset, size, link, _info, _align, _entsize in sections:
        if kind != SHT_SYMTAB:
            continue
        strtab = sections[link]
        names = data[strtab[4]:strtab[4] + strtab[5]]
        for name_at, info, _other, shndx, _value, _size in SYM.iter_unpack(data[offset:offset + size]):
            name = names[name_at:names.index(b"\0", name_at)].decode(errors="replace")
            if shndx == SHN_UNDEF:
                if name:
                    undefined.add(name)
            elif info >> 4 == STB_GLOBAL:
                defined.add(name)
        break
    return defined, undefined


def refuse_runtime_gaps(name: str, undefined: Iterable[str]) -> None:
    """Symbols no kernel exports (float helpers, allocator shim, core itself) would only fail
    later, in modpost or insmod, with a bare name: say what they mean now."""
    from .check import explain_undefined

    gaps = {symbol: explain_undefined(symbol) for symbol in sorted(undefined)}
    gaps = {symbol: why_fix for symbol, why_fix in gaps.items() if why_fix[0]}
    if gaps:
        by_reason: dict[tuple[str, str], list[str]] = {}
        for symbol, reason in gaps.items():
            by_reason.setdefault(reason, []).append(symbol)
        lines = [f"  {why} ({', '.join(symbols)})" for (why, _fix), symbols in by_reason.items()]
        raise RustkoError(f"the crate of module {name} needs symbols no kernel provides:\n" + "\n".join(lines),
                          "; ".join(fix for _why, fix in by_reason), exit_code=1)


def dep_files(dep_file: Path, project_dir: Path) -> list[Path]:
    """The source files rustc read: its dep-info has one empty rule (`path:`) per file."""
    if not dep_file.is_file():
        return []
    deps = set()
    for line in dep_file.read_text(errors="replace").splitlines():
        if line.endswith(":") and not line.startswith("#"):
            path = Path(line[:-1].replace("\\ ", " "))
            deps.add(path if path.is_absolute() else project_dir / path)
    return sorted(deps)


MOD_RE = re.compile(r'^[ \t]*(?:#\[path\s*=\s*"([^"]+)"\]\s*)?(?:pub(?:\([^)]*\))?\s+)?mod\s+(r#)?(\w+)\s*;',
                    re.MULTILINE)


INCLUDE_RE = re.compile(r'\binclude_(?:str|bytes)!\s*\(\s*"([^"]+)"\s*\)')


def mod_files(root: Path) -> list[Path]:
    """The files a crate reads, found before rustc runs (so SCons knows a new `mod x;` at once,
    not one build late): `mod name;` declarations with rustc's rules (`name.rs` or `name/mod.rs`,
    beside a mod.rs/lib.rs or in a folder named after a non-mod.rs file; `#[path]` relative to
    the declaring file's folder), and `include_str!`/`include_bytes!` relative to the file."""
    found: set[Path] = set()
    todo = [root]
    while todo:
        current = todo.pop()
        if current in found or not current.is_file():
            continue
        found.add(current)
        text = re.sub(r"//[^\n]*", "", current.read_text(errors="replace"))
        owns_dir = current.name in ("mod.rs", "lib.rs", "main.rs") or current == root
        base = current.parent if owns_dir else current.parent / current.stem
        found.update(current.parent / path for path in INCLUDE_RE.findall(text)
                     if (current.parent / path).is_file())
        for path_attr, _raw, name in MOD_RE.findall(text):
            if path_attr:
                todo.append(current.parent / path_attr)
            else:
                todo.extend([base / f"{name}.rs", base / name / "mod.rs"])
    return sorted(found)


@dataclass(frozen=True)
class ModuleSpec:
    """One module to build: the crate, its metadata and its C side."""

    info: kbuild.ModuleInfo
    source: Path                          # the crate root (src/lib.rs)
    project_dir: Path                     # the crate's folder (its Cargo.toml's)
    work: Path                            # rustko's own folder for this module: build/.rustko/NAME
    edition: str = "2021"
    rustflags: tuple[str, ...] = ()
    c_sources: tuple[Path, ...] = ()      # the project's .c files and the headers they include
    deps: tuple[project.Dependency, ...] = ()
    ccflags: tuple[str, ...] = ()         # ccflags-y for the C files
    extra_symbols: tuple[Path, ...] = ()  # other modules' Module.symvers (KBUILD_EXTRA_SYMBOLS)

    @property
    def name(self) -> str:
        """The .ko's file name (may hold dashes, as Kbuild's; the kernel sees `_`: KBUILD_MODNAME)."""
        return self.info.name

    @property
    def crate(self) -> str:
        return self.name.replace("-", "_")

    @property
    def obj(self) -> Path:
        return self.work / f"{self.name}_rust.o"

    @property
    def dep_file(self) -> Path:
        return self.work / f"{self.name}_rust.d"

    @property
    def kbuild_dir(self) -> Path:
        return kbuild.safe_dir(self.work.absolute() / "kbuild")

    @property
    def layout(self) -> dict[str, Path]:
        return kbuild.c_layout(self.name, self.c_sources, self.project_dir)

    @functools.cached_property
    def rust_files(self) -> tuple[Path, ...]:
        """The Rust files the module and its path dependencies may compile. Walked once per spec,
        which one `scons` run makes while reading the SConstruct: its start of Kbuild, plan and
        build step share the walk, and the next run walks again (an edit, a new or deleted file)."""
        found, todo = {*mod_files(self.source), *self.source.parent.rglob("*.rs")}, list(self.deps)
        while todo:  # the path dependencies, transitively: what they link, the module links
            dep = todo.pop()
            found.update([*mod_files(dep.root), *dep.root.parent.rglob("*.rs")])
            todo.extend(dep.deps)
        return tuple(sorted(found))

    @functools.cached_property
    def crates(self) -> tuple[str, ...]:
        """The sysroot crates the Rust files name, so the sysroot must hold (`sysroot.uses`)."""
        return sysroot.uses(self.rust_files)

    def with_c_sources(self, more: Iterable[Path]) -> "ModuleSpec":
        """This spec with more C files (the headers SCons found its C files include), keeping
        the walk of the Rust files, which the C files do not change."""
        wider = replace(self, c_sources=tuple(dict.fromkeys([*self.c_sources, *more])))
        wider.__dict__.update({name: self.__dict__[name] for name in _WALKED if name in self.__dict__})
        return wider


_WALKED = ("rust_files", "crates")  # ModuleSpec's cached walk and what was read from it


@dataclass(frozen=True)
class Plan:
    """Every command a module build runs and every text it writes, decided before anything runs:
    SCons keeps them in each target's signature, as Kbuild's if_changed keeps command lines."""

    target: Target                        # with the module's own sysroot flags (with_rustflags)
    dependencies: list[tuple[project.Dependency, list[str]]]
    rustc: list[str]
    link: list[str]
    side: KbuildSide                      # Kbuild's make and texts, as `start_kbuild` decides them

    def commands(self) -> list[list[str]]:
        return [*(cmd for _dep, cmd in self.dependencies), self.rustc, self.link, self.side.make]


def crate_flags(target: Target, spec: ModuleSpec) -> list[str]:
    """What the module's own crates get beyond the kernel's flags: the kernel's CONFIG_* as
    `--cfg` (as Kbuild gives in-tree Rust), then the module's rustflags."""
    return [*flagset.config_cfgs(target.kernel), *spec.rustflags]


@dataclass(frozen=True)
class KbuildSide:
    """What Kbuild gets for a module: its make command and the texts written for it. It needs
    the kernel, not the compiler, so Kbuild can start before rustc is found (`start_kbuild`)."""

    make: list[str]
    kbuild_text: str
    shim_text: str
    runtime: tuple[str, ...]              # the runtime parts (c/*.c) the shim carries
    layout: tuple[tuple[str, Path], ...]  # the project's C files and headers, where they go

    @classmethod
    def of(cls, options: Options, kernel: KernelInfo, spec: ModuleSpec) -> "KbuildSide":
        runtime = kbuild.runtime_parts([*spec.rust_files, *spec.c_sources], "rustko" in spec.crates)
        text = kbuild.kbuild_file(spec.name, kbuild.c_objects(spec.layout),
                                  kbuild.ccflags_for_kbuild(spec.ccflags, spec.project_dir))
        return cls(make=kbuild_job(options, kernel, spec).make_command(), kbuild_text=text,
                   shim_text=kbuild.shim_source(spec.info, runtime), runtime=runtime,
                   layout=tuple(spec.layout.items()))

    def prepare(self, spec: ModuleSpec) -> None:
        """Write the Kbuild folder's files: the project's C files, the Kbuild file, the shim."""
        kbuild.prepare(spec.kbuild_dir, spec.info, dict(self.layout), self.kbuild_text, self.shim_text)


def plan(target: Target, spec: ModuleSpec, entry: str | None = "rust_init", obj: Path | None = None) -> Plan:
    """`obj`: where the Rust object goes (default: the module's work folder)."""
    target = with_rustflags(target, list(spec.rustflags))
    obj = obj or spec.obj
    deps, linked = dependency_commands(target, spec.deps, spec.work / "deps", crate_flags(target, spec))
    rustc = crate_command(target, spec.crate, spec.source, spec.project_dir, obj, spec.dep_file,
                          spec.edition, [*crate_flags(target, spec), *linked])
    return Plan(target=target, dependencies=deps, rustc=rustc, link=link_command(target, spec.crate, obj, entry),
                side=KbuildSide.of(target.options, target.kernel, spec))


def kbuild_job(options: Options, kernel: KernelInfo, spec: ModuleSpec) -> kbuild.KbuildJob:
    return kbuild.KbuildJob(kernel=kernel, build_dir=spec.kbuild_dir, cross_compile=options.cross_compile,
                            llvm=options.llvm, verbose=options.verbose, extra_symbols=spec.extra_symbols)


@dataclass
class StartedKbuild:
    """A module's `make modules`, started before SCons decided to build the module (while the
    SConstruct is read): `build_module` takes it over when what it was started with is still
    what the module needs, else stops it and starts its own."""

    running: kbuild.Kbuild
    side: KbuildSide


def start_kbuild(options: Options, kernel: KernelInfo, spec: ModuleSpec) -> StartedKbuild:
    """Write the Kbuild directory's files and start make: its ~30 compiler checks (Kbuild's
    try-run, on every invocation) then overlap finding rustc, the rest of SCons's start and rustc."""
    side = KbuildSide.of(options, kernel, spec)
    side.prepare(spec)
    return StartedKbuild(kbuild.Kbuild(kbuild_job(options, kernel, spec), spec.name), side)


def ensure_sysroot(target: Target, spec: ModuleSpec, log: Log) -> None:
    """The sysroot crates this module's files name, built now if the cache lacks them."""
    target.sysroot(log=lambda crate, cmd: log(f"  SYSROOT {crate} (once per rustc and flag set)"),
                   crates=spec.crates)


def build_module(target: Target, spec: ModuleSpec, out_ko: Path, log: Log | None = None,
                 after_rust: Callable[[], None] | None = None, started: StartedKbuild | None = None) -> CrateOutput:
    """The crate and Kbuild, run side by side: make's own start-up (its compiler checks) and the
    shim's compilation overlap rustc; Kbuild links the Rust object in as soon as it exists, while
    the object's undefined symbols are checked (a refusal stops make) and `after_rust` runs (work
    that would only compete with rustc and make for the CPUs before). `started`: a make already
    running for this module (`start_kbuild`), taken over when it was started for the same texts."""
    log = log or (lambda line: None)
    planned = plan(target, spec)
    target = planned.target
    if started is not None and started.side != planned.side:
        started.running.stop()
        started = None
    try:
        ensure_sysroot(target, spec, log)
    except BaseException:
        if started is not None:
            started.running.stop()
        raise
    if started is None:
        planned.side.prepare(spec)
    running_make = started.running if started else kbuild.Kbuild(kbuild_job(target.options, target.kernel, spec),
                                                                  spec.name)
    with running_make as running:
        linked = (compile_dependencies(target, spec.deps, spec.work / "deps", crate_flags(target, spec), log)
                  if spec.deps else [])
        crate = compile_crate(target, spec.crate, spec.source, spec.obj, spec.dep_file, spec.project_dir,
                              spec.edition, [*crate_flags(target, spec), *linked], log, gaps=False)
        running.hand_over(crate.obj)
        if after_rust:
            after_rust()
        refuse_runtime_gaps(spec.crate, crate.undefined)
        missing = kbuild.missing_runtime(planned.side.runtime, crate.undefined)
        if missing:
            raise RustkoError(f"the crate of module {spec.name} calls {', '.join(missing)}, which no file of "
                              "the module names (a macro put the name together)",
                              "declare the function by its name in an `extern \"C\"` block of the crate",
                              exit_code=1)
        log(f"  KBUILD  {spec.name}.ko")
        out_ko.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(running.finish(), out_ko)
    if target.options.sign_key and target.options.sign_cert:
        log(f"  SIGN    {spec.name}.ko")
        kbuild.sign(target.kernel, out_ko, Path(target.options.sign_key), Path(target.options.sign_cert))
    repro.write_record(repro.make_record(target, spec, out_ko), out_ko)
    return crate


def check(target: Target, ko: Path, extra_symbols: Sequence[Path] = ()) -> None:
    """Fail the build, with the checker's report, when the target kernel would refuse `ko`;
    `extra_symbols` (KBUILD_EXTRA_SYMBOLS) are exports of modules loaded before it."""
    from .check import check_module, format_report, kernel_view, read_extra_symbols

    view = kernel_view(str(target.kernel.kdir))
    if extra_symbols:  # as siblings: the kernel's own exports win, as when the modules are loaded
        view = view.with_siblings(read_extra_symbols([str(path) for path in extra_symbols]))
    findings = check_module(ko, kernel=view)
    if findings:
        print(format_report(findings, ko).rstrip(), file=sys.stderr)
    if any(f.severity == "error" for f in findings):
        raise RustkoError(f"{ko.name} would be refused by kernel {target.kernel.release}: "
                          f"{len(findings)} finding(s) above", exit_code=1)
