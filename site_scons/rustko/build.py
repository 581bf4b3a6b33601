"""The build pipeline without SCons: resolve the target, compile the crate, link with Kbuild, check.

Each step is a plain function over paths so that the SCons tool, tests and scripts drive the same
code. Nothing here writes outside the build directory and the machine-wide cache.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from . import flags as flagset
from . import kbuild, project, sysroot, toolchain
from .errors import RustkoError
from .kernel import KernelInfo, host_arch, normalize_arch, probe

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
    verbose: bool = False
    sign_key: str | None = None    # PEM private key: sign the .ko the way Kbuild's modules_sign does
    sign_cert: str | None = None   # its X.509 certificate (PEM or DER)


@dataclass
class Target:
    """Everything resolved once per build: kernel, compiler, flags; the sysroot on first use."""

    options: Options
    kernel: KernelInfo
    toolchain: toolchain.Toolchain
    flags: list[str]

    @functools.cached_property
    def sysroot_key(self) -> str:
        return sysroot.key(self.toolchain, self.flags)

    def sysroot(self, log: Callable[[str, list[str]], None] | None = None,
                crates: Sequence[str] = sysroot.ALWAYS) -> sysroot.Sysroot:
        """The sysroot with at least `crates`: the missing ones built now (a few stats otherwise)."""
        return sysroot.ensure(self.toolchain, self.flags, flagset.target(self.kernel), log, self.sysroot_key,
                              crates)

    @property
    def linker(self) -> str:
        if self.options.llvm:
            return "ld.lld"
        cross = self.options.cross_compile
        if cross is None:
            cross = "" if self.kernel.arch in (host_arch(), "um") else kbuild.CROSS_COMPILE.get(self.kernel.arch, "")
        return f"{cross}ld"


def resolve(options: Options) -> Target:
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
    tools = toolchain.find(options.rustc, options.rust_lib_src)
    target = Target(options=options, kernel=kernel, toolchain=tools, flags=flagset.codegen_flags(kernel))
    _require_c_tools(target)
    return target


# The linker emulation Kbuild links with (KBUILD_LDFLAGS; 6.1 and 6.12): ld.lld needs it to `ld -r`
# a lone archive, GNU ld takes it as a check.
LD_EMULATION: dict[str, str] = {
    "x86_64": "elf_x86_64",    # arch/x86/Makefile: KBUILD_LDFLAGS += -m elf_$(UTS_MACHINE)
    "um": "elf_x86_64",        # arch/x86/Makefile.um via arch/um/Makefile: the same x86_64 objects
    "arm64": "aarch64linux",   # arch/arm64/Makefile: -EL $(call ld-option, -maarch64elf, -maarch64linux)
    "riscv64": "elf64lriscv",  # arch/riscv/Makefile: KBUILD_LDFLAGS += -melf64lriscv
}

# The programs Kbuild runs with LLVM=1 (Documentation/kbuild/llvm.rst), from Debian's clang, lld, llvm.
LLVM_TOOLS: tuple[str, ...] = ("clang", "ld.lld", "llvm-ar", "llvm-nm", "llvm-objcopy", "llvm-readelf", "llvm-strip")
# The Debian package with the GNU cross toolchain for each CROSS_COMPILE default (kbuild.CROSS_COMPILE).
CROSS_PACKAGES: dict[str, str] = {"arm64": "gcc-aarch64-linux-gnu", "riscv64": "gcc-riscv64-linux-gnu"}


def _require_c_tools(target: Target) -> None:
    """Say which toolchain is missing before rustc and Kbuild run for minutes and fail on it."""
    if target.options.llvm:
        missing = [name for name in LLVM_TOOLS if shutil.which(name) is None]
        if missing:
            raise RustkoError(f"LLVM=1 needs {', '.join(missing)}, not installed on this machine",
                              "apt-get install clang lld llvm, or drop LLVM=1 to use the GNU toolchain")
    elif shutil.which(target.linker) is None:
        package = CROSS_PACKAGES.get(target.kernel.arch, "binutils gcc")
        raise RustkoError(f"the {target.kernel.arch} linker {target.linker} is not installed",
                          f"apt-get install {package}, set CROSS_COMPILE= to the prefix of your "
                          "toolchain, or use LLVM=1")


@dataclass(frozen=True)
class CrateOutput:
    obj: Path
    dep_file: Path


def crate_command(target: Target, name: str, source: Path, project_dir: Path, archive: Path,
                  dep_file: Path, edition: str, extra: list[str]) -> list[str]:
    sysroot = target.sysroot()
    root = sysroot.path
    return [str(target.toolchain.rustc), *target.flags, *extra,
            f"--edition={edition}", "--crate-type=staticlib", f"--crate-name={name}",
            "-Clto=fat", f"--sysroot={root}", f"--extern=rustko={sysroot.support_crate}",
            f"--remap-path-prefix={project_dir}={name}", f"--remap-path-prefix={root}=/sysroot",
            # --out-dir: rustc's intermediate objects go there, not into the project (its cwd).
            f"--out-dir={archive.parent}", f"--emit=link={archive},dep-info={dep_file}",
            os.path.relpath(source, project_dir)]


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
    if result.returncode != 0:
        raise RustkoError(f"{what} does not compile", "rustc's messages above say where and why", exit_code=1)


def compile_dependencies(target: Target, deps: Sequence[project.Dependency], out_dir: Path,
                         extra: list[str], log: Log | None = None) -> list[str]:
    """Each path dependency as an rlib (with bitcode, so the module's fat LTO keeps only what it
    uses), dependencies first; returns the rustc arguments that make them visible."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sysroot = target.sysroot()
    built: dict[Path, Path] = {}

    def build_one(dep: project.Dependency) -> Path:
        if dep.root in built:
            return built[dep.root]
        externs = [f"--extern={sub.extern}={build_one(sub)}" for sub in dep.deps]
        rlib = out_dir / f"lib{dep.crate}.rlib"
        if rlib in built.values():
            raise RustkoError(f"two dependencies are both named `{dep.crate}`",
                              "rename one of the crates ([package] name in its Cargo.toml)")
        cmd = [str(target.toolchain.rustc), *target.flags, *extra, f"--edition={dep.edition}",
               "--crate-type=rlib", f"--crate-name={dep.crate}", "-Cembed-bitcode=yes",
               f"--sysroot={sysroot.path}", f"--extern=rustko={sysroot.support_crate}", *externs,
               f"-Ldependency={out_dir}", f"--remap-path-prefix={dep.folder}={dep.crate}",
               f"--remap-path-prefix={sysroot.path}=/sysroot", f"--out-dir={out_dir}",
               f"--emit=link={rlib},dep-info={out_dir / dep.crate}.d", os.path.relpath(dep.root, dep.folder)]
        _rustc(target, cmd, dep.folder, f"dependency `{dep.extern}` ({dep.root})", log)
        built[dep.root] = rlib
        return rlib

    return [f"-Ldependency={out_dir}", *(f"--extern={dep.extern}={build_one(dep)}" for dep in deps)]


def compile_crate(target: Target, name: str, source: Path, obj: Path, dep_file: Path,
                  project_dir: Path, edition: str = "2021", extra: list[str] | None = None,
                  log: Log | None = None) -> CrateOutput:
    """rustc (fat LTO, one codegen unit) then `ld -r`: one object with only the code it uses.
    `target` must already carry the sysroot flags `extra` needs (`with_rustflags`); `extra`
    also carries the dependencies' --extern arguments."""
    obj.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".rustko-", dir=obj.parent) as tmp:
        archive = Path(tmp) / f"lib{name}.a"
        cmd = crate_command(target, name, source, project_dir, archive, dep_file, edition, extra or [])
        _rustc(target, cmd, project_dir, f"the crate of module {name} ({source})", log)
        # Pull from the archive only what rust_init needs: the crate's object, plus the
        # compiler_builtins object when (and only when) it is referenced.
        link = [target.linker, "-m", LD_EMULATION[target.kernel.arch], "-r", "-u", "rust_init", "-o", str(obj),
                str(archive)]
        if log and target.options.verbose:
            log(" ".join(link))
        try:
            linked = subprocess.run(link, capture_output=True, text=True)
        except OSError as err:
            raise RustkoError(f"cannot run the linker {target.linker}: {err.strerror}",
                              "install binutils for the target (CROSS_COMPILE), or set LLVM=1") from None
        if linked.returncode != 0:
            raise RustkoError(f"`{' '.join(link)}` failed: {linked.stderr.strip()}", exit_code=1)
    symbols, undefined = object_symbols(obj)
    _refuse_runtime_gaps(name, undefined)
    if "rust_init" not in symbols:
        raise RustkoError(f"the crate of module {name} defines no `rust_init`",
                          'add `#[unsafe(no_mangle)] pub extern "C" fn rust_init() -> i32` '
                          "(return 0 or a negative errno)", exit_code=1)
    return CrateOutput(obj=obj, dep_file=dep_file)


def object_symbols(obj: Path) -> tuple[set[str], set[str]]:
    """(global symbols the object defines, symbols it leaves undefined)."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    with open(obj, "rb") as handle:
        table = ELFFile(handle).get_section_by_name(".symtab")
        if not isinstance(table, SymbolTableSection):
            return set(), set()
        defined, undefined = set(), set()
        for sym in table.iter_symbols():
            if sym["st_shndx"] == "SHN_UNDEF":
                if sym.name:
                    undefined.add(sym.name)
            elif sym["st_info"]["bind"] == "STB_GLOBAL":
                defined.add(sym.name)
        return defined, undefined


def _refuse_runtime_gaps(name: str, undefined: set[str]) -> None:
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


def mod_files(root: Path) -> list[Path]:
    """Before the first build there is no dep-info: follow `mod name;` declarations instead,
    with rustc's rules (`name.rs` or `name/mod.rs`, beside a mod.rs/lib.rs or in a folder named
    after a non-mod.rs file; `#[path]` relative to the declaring file's folder)."""
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
        for path_attr, _raw, name in MOD_RE.findall(text):
            if path_attr:
                todo.append(current.parent / path_attr)
            else:
                todo.extend([base / f"{name}.rs", base / name / "mod.rs"])
    return sorted(found)


def build_module(target: Target, info: kbuild.ModuleInfo, source: Path, project_dir: Path, work: Path,
                 out_ko: Path, edition: str = "2021", extra: list[str] | None = None,
                 c_sources: Sequence[Path] = (), log: Log | None = None,
                 deps: Sequence[project.Dependency] = ()) -> CrateOutput:
    """The crate and Kbuild, run side by side: make's own start-up (half a second) and the shim's
    compilation overlap rustc; Kbuild links the Rust object in as soon as it exists."""
    log = log or (lambda line: None)
    target = with_rustflags(target, extra or [])
    rust_files, todo = {*mod_files(source), *source.parent.rglob("*.rs")}, list(deps)
    while todo:  # the path dependencies, transitively: what they link, the module links
        dep = todo.pop()
        rust_files.update([*mod_files(dep.root), *dep.root.parent.rglob("*.rs")])
        todo.extend(dep.deps)
    target.sysroot(log=lambda crate, cmd: log(f"  SYSROOT {crate} (once per rustc and flag set)"),
                   crates=sysroot.uses(sorted(rust_files)))
    kbuild_dir = kbuild.safe_dir((work / "kbuild").resolve())
    kbuild.prepare(kbuild_dir, info, c_sources)
    job = kbuild.KbuildJob(kernel=target.kernel, build_dir=kbuild_dir,
                           cross_compile=target.options.cross_compile, llvm=target.options.llvm,
                           verbose=target.options.verbose)
    with kbuild.Kbuild(job, info.name) as running:
        linked = compile_dependencies(target, deps, work / "deps", extra or [], log) if deps else []
        crate = compile_crate(target, info.name, source, work / f"{info.name}_rust.o",
                              work / f"{info.name}_rust.d", project_dir, edition, [*(extra or []), *linked], log)
        log(f"  KBUILD  {info.name}.ko")
        shutil.copyfile(running.deliver(crate.obj), out_ko)
    if target.options.sign_key and target.options.sign_cert:
        log(f"  SIGN    {info.name}.ko")
        kbuild.sign(target.kernel, out_ko, Path(target.options.sign_key), Path(target.options.sign_cert))
    return crate


def check(target: Target, ko: Path) -> None:
    """Fail the build, with the checker's report, when the target kernel would refuse `ko`."""
    from .check import check_module, format_report

    findings = check_module(ko, kernel=target.kernel)
    if findings:
        print(format_report(findings, ko).rstrip(), file=sys.stderr)
        raise RustkoError(f"{ko.name} would be refused by kernel {target.kernel.release}: "
                          f"{len(findings)} finding(s) above", exit_code=1)
