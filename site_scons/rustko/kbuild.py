"""The Kbuild side: the generated C shim, the Kbuild file, and `make -C KDIR M=<build dir>`.

The shim is the ABI boundary: it is compiled by Kbuild against the real headers, so the kernel
macros that change between versions (module_init, printk levels, MODULE_*) never reach Rust.
Rust sees only the small C ABI of the runtime parts in c/ and the parameter table generated here.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import re
import signal
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import cache
from .errors import RustkoError
from . import arch as arches
from . import roots
from .kernel import KernelInfo


RUNTIME_DIR = Path(__file__).parent / "c"


@dataclass(frozen=True)
class ParamType:
    """A `module_param` type: its C declaration and how Rust reads it (rust/rustko/param.rs)."""

    c_type: str
    kind: int           # the `kind` tag in the shim's parameter table


# include/linux/moduleparam.h: the standard parameter types (`param_ops_<type>`).
PARAM_TYPES: dict[str, ParamType] = {
    "int": ParamType("int", 0),
    "uint": ParamType("unsigned int", 1),
    "long": ParamType("long", 2),
    "ulong": ParamType("unsigned long", 3),
    "bool": ParamType("bool", 4),
    "charp": ParamType("char *", 5),
}


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: int | bool | str
    description: str = ""
    perm: int = 0o444   # readable under /sys/module/NAME/parameters


@dataclass(frozen=True)
class ModuleInfo:
    """The `MODULE_*` metadata the shim declares."""

    name: str
    license: str = "GPL"
    author: str = ""
    description: str = ""
    version: str = ""
    params: tuple[Param, ...] = ()


def c_string(text: str) -> str:
    """A C string literal for any text: hostile metadata cannot break out of it."""
    out = []
    for byte in text.encode():
        char = chr(byte)
        if char in '"\\?':
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _param_c(param: Param) -> list[str]:
    kind = PARAM_TYPES[param.type]
    var = f"rustko_param_{param.name}"
    if param.type == "charp":
        value = c_string(str(param.default))
    elif param.type == "bool":
        value = "true" if param.default else "false"
    else:
        value = str(int(param.default))
    lines = [f"static {kind.c_type} {var} = {value};",
             f"module_param_named({param.name}, {var}, {param.type}, 0{param.perm:o});"]
    if param.description:
        lines.append(f"MODULE_PARM_DESC({param.name}, {c_string(param.description)});")
    return lines


def _param_table(params: tuple[Param, ...]) -> list[str]:
    """A table Rust searches by name (rustko::param), so Rust needs no per-module declarations."""
    rows = [f"\t{{ {c_string(p.name)}, {len(p.name)}, {PARAM_TYPES[p.type].kind}, &rustko_param_{p.name} }},"
            for p in params]
    return [
        "struct rustko_param { const char *name; unsigned long len; int kind; void *ptr; };",
        "static const struct rustko_param rustko_params[] = {",
        *rows,
        "\t{ NULL, 0, 0, NULL },",
        "};",
        "",
        "/* 0: found (*num or *str set by kind), -ENOENT: no such parameter. */",
        "int rustko_param(const char *name, unsigned long len, int *kind, long long *num,",
        "\t\t const char **str)",
        "{",
        "\tconst struct rustko_param *p;",
        "",
        "\tfor (p = rustko_params; p->name; p++) {",
        "\t\tif (p->len != len || memcmp(p->name, name, len))",
        "\t\t\tcontinue;",
        "\t\t*kind = p->kind;",
        "\t\tswitch (p->kind) {",
        "\t\tcase 0: *num = *(int *)p->ptr; break;",
        "\t\tcase 1: *num = *(unsigned int *)p->ptr; break;",
        "\t\tcase 2: *num = *(long *)p->ptr; break;",
        "\t\tcase 3: *num = (long long)*(unsigned long *)p->ptr; break;",
        "\t\tcase 4: *num = *(bool *)p->ptr; break;",
        "\t\tdefault: *str = *(char **)p->ptr; break;",
        "\t\t}",
        "\t\treturn 0;",
        "\t}",
        "\treturn -ENOENT;",
        "}",
    ]


RUNTIME_NAME_RE = re.compile(rb"\brustko_\w+")


@functools.lru_cache(maxsize=1)
def _runtime_names() -> dict[str, frozenset[str]]:
    """Each runtime part (c/NAME.c) and the `rustko_*` names it holds (functions it defines)."""
    return {part.name: frozenset(name.decode() for name in RUNTIME_NAME_RE.findall(part.read_bytes()))
            for part in sorted(RUNTIME_DIR.glob("*.c"))}


def runtime_parts(sources: Iterable[Path], support_crate: bool) -> tuple[str, ...]:
    """The runtime parts a module's shim carries: all of them when the module links the support
    crate (its `ffi` module declares every one), else those defining a `rustko_*` name that one
    of the module's own files names (its Rust, its C). Kbuild compiles the shim while rustc runs,
    so this is read from the sources (a name in a comment only adds a part); every part costs
    the shim's compilation its headers (all six: 0.7 s of CPU instead of 0.4 s for printk's)."""
    parts = _runtime_names()
    if support_crate:
        return tuple(parts)
    named: set[str] = set()
    for source in sources:
        try:
            named.update(name.decode() for name in RUNTIME_NAME_RE.findall(Path(source).read_bytes()))
        except OSError:
            return tuple(parts)  # unreadable here: the compilers will say why; carry everything
    return tuple(part for part, names in parts.items() if names & named)


def missing_runtime(parts: Sequence[str], undefined: Iterable[str]) -> list[str]:
    """The `rustko_*` functions the Rust object calls whose part the shim does not carry (a name
    put together by a macro, never written out in any file)."""
    carried = set().union(*(_runtime_names()[part] for part in parts))
    every = set().union(*_runtime_names().values())
    return sorted(name for name in undefined if name in every and name not in carried)


def shim_source(info: ModuleInfo, parts: Sequence[str] | None = None) -> str:
    """The shim's C: the runtime `parts` (default: all), the parameters, module_init/exit and
    the MODULE_* metadata."""
    lines = [
        "// Generated by rustko: the C half of the module. Do not edit.",
        "#include <linux/module.h>",
        "#include <linux/init.h>",
        "#include <linux/moduleparam.h>",
        "#include <linux/printk.h>",
        "#include <linux/string.h>",
        "",
    ]
    for part in sorted(_runtime_names() if parts is None else parts):
        lines += [(RUNTIME_DIR / part).read_text(), ""]
    for param in info.params:
        lines.extend(_param_c(param))
    lines.extend(_param_table(info.params))
    lines += [
        "",
        "extern int rust_init(void);",
        "",
        "/* An empty default: the shim is compiled while rustc runs, before anyone knows whether the",
        " * crate defines rust_exit; the crate's own (a strong symbol) wins when Kbuild links both.",
        " * A weak *reference* instead would be tested for NULL, which arm64 GCC does via the GOT. */",
        "void __weak rust_exit(void)",
        "{",
        "}",
        "",
        "static int __init rustko_module_init(void)",
        "{",
        "\treturn rust_init();",
        "}",
        "module_init(rustko_module_init);",
        "",
        "static void __exit rustko_module_exit(void)",
        "{",
        "\trust_exit();",
        "}",
        "module_exit(rustko_module_exit);",
        "",
        f"MODULE_LICENSE({c_string(info.license)});",
    ]
    for macro, value in (("MODULE_AUTHOR", info.author), ("MODULE_DESCRIPTION", info.description),
                         ("MODULE_VERSION", info.version)):
        if value:
            lines.append(f"{macro}({c_string(value)});")
    return "\n".join(lines) + "\n"


def kbuild_file(name: str, c_objects: Sequence[str] = (), ccflags: Sequence[str] = ()) -> str:
    """obj-m, plus the handshake: Kbuild starts at once (its start-up costs more than rustc), and
    the Rust object's `_shipped` file is a target that waits for rustko's lock (`Kbuild`).
    `ccflags`: the module's own `ccflags-y` (for its c_sources; `$` kept literal)."""
    parts = " ".join([f"{name}_shim.o", f"{name}_rust.o", *c_objects])
    flags = "".join(f"ccflags-y += {flag.replace('$', '$$')}\n" for flag in ccflags)
    return (f"# Generated by rustko.\nobj-m := {name}.o\n{name}-y := {parts}\n{flags}"
            f"$(src)/{name}_rust.o_shipped: FORCE\n"
            f"\t$(Q)flock $(obj)/{lock_name(name)} test -s $@\n"
            # Explicit, as Makefile.lib's `$(obj)/%: $(src)/%_shipped` matches no M= target since
            # 6.13 (obj is `.` there, and make strips the `./` of target names).
            f"$(obj)/{name}_rust.o: $(src)/{name}_rust.o_shipped\n"
            f"\t$(Q)cat $< > $@\n")


def lock_name(name: str) -> str:
    return f".{name}_rust.lock"


PART_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def c_layout(name: str, c_sources: Sequence[Path], project_dir: Path) -> dict[str, Path]:
    """Where each of a project's own C files (and headers) goes in the Kbuild directory: its path
    relative to the project, so `#include "inc/x.h"` finds what it finds in the sources (a file
    outside the project goes to the top). Names must be ones make can carry and must not take the
    shim's, the Rust object's or the module's own name (Kbuild cannot link `NAME.o` into `NAME.o`)."""
    taken = {f"{name}.c", f"{name}_shim.c", f"{name}_rust.c"}
    layout: dict[str, Path] = {}
    for source in c_sources:
        source = Path(source)
        try:
            rel = source.relative_to(project_dir).as_posix()
        except ValueError:
            rel = source.name
        parts = rel.split("/")
        if (source.suffix not in (".c", ".h") or rel in taken or rel in layout
                or not all(PART_RE.fullmatch(part) for part in parts)):
            raise RustkoError(
                f"c_sources: {source} cannot be part of module {name}",
                f"use .c/.h files under the project whose folders and names are letters, digits, '_', "
                f"'-' and '.', each listed once, other than {', '.join(sorted(taken))}")
        layout[rel] = source
    return layout


def c_objects(layout: dict[str, Path]) -> list[str]:
    """The Kbuild objects of the project's C files (headers are copied, not compiled)."""
    return [f"{rel[:-2]}.o" for rel in sorted(layout) if rel.endswith(".c")]


def ccflags_for_kbuild(ccflags: Sequence[str], project_dir: Path) -> list[str]:
    """A relative `-Idir` means the project's folder, which sits at the Kbuild directory's
    `$(src)` (c_layout): rewrite it so, as Kbuild users write `-I$(src)/include`."""
    out = []
    for flag in ccflags:
        if flag.startswith("-I") and not Path(flag[2:]).is_absolute() and not flag.startswith("-I$"):
            out.append(f"-I$(src)/{flag[2:]}")
        else:
            out.append(flag)
    return out


@dataclass
class KbuildJob:
    kernel: KernelInfo
    build_dir: Path              # M=; only rustko writes here
    cross_compile: str | None = None
    llvm: bool = False
    verbose: int = 0             # Kbuild's V: 1 command lines, 2 also why each target is rebuilt
    extra_symbols: Sequence[Path] = ()   # other modules' Module.symvers (KBUILD_EXTRA_SYMBOLS)
    extra_make_args: list[str] = field(default_factory=list)

    def make_command(self) -> list[str]:
        arch = self.kernel.arch
        cmd = ["make", "-C", str(self.kernel.kdir), f"M={self.build_dir}",
               f"ARCH={arches.resolve(arch).kbuild}"]
        cross = self.cross_compile if self.cross_compile is not None else arches.default_cross_compile(arch)
        if cross and not arches.runs_natively(arches.resolve(arch)):
            cmd.append(f"CROSS_COMPILE={cross}")
        if self.llvm:
            cmd.append("LLVM=1")
        if self.extra_symbols:
            cmd.append("KBUILD_EXTRA_SYMBOLS=" + " ".join(str(path) for path in self.extra_symbols))
        # Reproducible: the build directory's absolute path must not reach the object files.
        cmd.append(f"KCFLAGS=-ffile-prefix-map={self.build_dir}/=")
        cmd.append(f"V={int(self.verbose)}")
        cmd.extend(self.extra_make_args)
        cmd.append("modules")
        return roots.kbuild_command(cmd, self.kernel.kdir, self.build_dir, [Path(p) for p in self.extra_symbols])


# Characters that make cannot carry in M= or in a target name, even quoted.
MAKE_UNSAFE = set(" \t\n:#$=;%*?[]\\'\"`|&<>(){}!")


def safe_dir(build_dir: Path) -> Path:
    """`build_dir`, or, when its path would break make, a stable private folder in the cache."""
    if not MAKE_UNSAFE.intersection(str(build_dir)):
        return build_dir
    digest = hashlib.sha256(str(build_dir).encode()).hexdigest()[:16]
    return cache.cache_root() / "kbuild" / digest


def prepare(build_dir: Path, info: ModuleInfo, layout: dict[str, Path], kbuild_text: str, shim_text: str) -> None:
    """Write Kbuild, the shim and the project's C files and headers (at `layout`'s places) into
    the Kbuild directory; the Rust object arrives later, through `Kbuild.hand_over`."""
    build_dir.mkdir(parents=True, exist_ok=True)
    _write_if_changed(build_dir / "Kbuild", kbuild_text)
    for rel, source in layout.items():
        data, copy = Path(source).read_bytes(), build_dir / rel
        if not copy.is_file() or copy.read_bytes() != data:  # unchanged files keep their mtime
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(data)
    _write_if_changed(build_dir / f"{info.name}_shim.c", shim_text)
    (build_dir / f"{info.name}_rust.o_shipped").unlink(missing_ok=True)
    # An empty .cmd file tells Kbuild the object needs no command line check (FIELD-NOTES).
    (build_dir / f".{info.name}_rust.o.cmd").touch()


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def sign(kernel: KernelInfo, ko: Path, key: Path, cert: Path) -> None:
    """Append a module signature with the KDIR's own `scripts/sign-file`, the tool Kbuild's
    modules_sign uses, and the hash the kernel was configured with (CONFIG_MODULE_SIG_HASH)."""
    tool = kernel.kdir / "scripts" / "sign-file"
    if not os.access(tool, os.X_OK):
        raise RustkoError(f"{kernel.kdir} has no scripts/sign-file",
                          "use headers that ship it (Debian's linux-kbuild-* do), or drop SIGN_KEY/SIGN_CERT")
    digest = kernel.value("MODULE_SIG_HASH") or "sha256"
    result = subprocess.run([str(tool), digest, str(key), str(cert), str(ko)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RustkoError(f"signing {ko.name} failed: {result.stderr.strip() or f'sign-file exited {result.returncode}'}",
                          "SIGN_KEY must be the PEM private key of the certificate in SIGN_CERT", exit_code=1)


@dataclass(frozen=True)
class Compression:
    """One CONFIG_MODULE_COMPRESS_* choice of scripts/Makefile.modinst (6.1 and 6.12 alike)."""

    suffix: str
    command: tuple[str, ...]     # run on the installed .ko; each leaves only the compressed file


# scripts/Makefile.modinst: suffix-$(CONFIG_MODULE_COMPRESS_*) and cmd_gzip/cmd_xz/cmd_zstd
# (6.1's zstd also gets -T0; the output is the same). 6.1's file always applies the suffix,
# 6.12's only under `ifdef CONFIG_MODULE_COMPRESS_ALL`: `install_settings` reads which rule the
# KDIR's own file has.
COMPRESSIONS: dict[str, Compression] = {
    "MODULE_COMPRESS_GZIP": Compression(".gz", ("gzip", "-n", "-f")),
    "MODULE_COMPRESS_XZ": Compression(".xz", ("xz", "--check=crc32", "--lzma2=dict=1MiB", "-f")),
    "MODULE_COMPRESS_ZSTD": Compression(".zst", ("zstd", "--rm", "-f", "-q")),
}


@dataclass(frozen=True)
class InstallSettings:
    """What the KDIR's scripts/Makefile.modinst does with an external module."""

    subdir: str                          # INSTALL_MOD_DIR's default: extra (6.1), updates (6.12)
    compression: Compression | None


def install_settings(kernel: KernelInfo) -> InstallSettings:
    """Read the rules from the KDIR's own Makefile.modinst, as `make modules_install` would run them."""
    rules = kernel.kdir / "scripts" / "Makefile.modinst"
    text = rules.read_text(errors="replace") if rules.is_file() else ""
    found = re.search(r"^\s*INSTALL_MOD_DIR\s*\?=\s*(\S+)", text, re.MULTILINE)
    compression = None
    if "CONFIG_MODULE_COMPRESS_ALL" not in text or kernel.value("MODULE_COMPRESS_ALL") == "y":
        compression = next((c for symbol, c in COMPRESSIONS.items() if kernel.value(symbol) == "y"), None)
    return InstallSettings(subdir=found.group(1) if found else "extra", compression=compression)


def install(kernel: KernelInfo, ko: Path, root: str = "", subdir: str | None = None, strip: str = "",
            strip_tool: str = "strip", sign_with: tuple[Path, Path] | None = None) -> Path:
    """What `make M=... modules_install` does (scripts/Makefile.modinst): copy the module under
    `root`/lib/modules/RELEASE/`subdir` (the KDIR's INSTALL_MOD_DIR default), strip it
    (INSTALL_MOD_STRIP: 1 means --strip-debug, else the strip options), sign it again when it was
    signed (stripping drops the appended signature), compress it per CONFIG_MODULE_COMPRESS_*,
    and refresh depmod's index."""
    settings = install_settings(kernel)
    folder = Path(root or "/") / "lib" / "modules" / kernel.release / (subdir or settings.subdir)
    dest = folder / ko.name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in [dest, *(dest.with_name(dest.name + c.suffix) for c in COMPRESSIONS.values())]:
            stale.unlink(missing_ok=True)
        shutil.copyfile(ko, dest)
    except OSError as err:
        raise RustkoError(f"cannot install {ko.name} into {folder}: {err.strerror}",
                          "run as root, or stage it elsewhere with INSTALL_MOD_PATH=DIR") from None
    if strip:
        options = ["--strip-debug"] if strip == "1" else strip.split()
        _run_install_step([strip_tool, *options, str(dest)], f"stripping {dest.name}", "binutils")
        if sign_with:
            sign(kernel, dest, *sign_with)
    if settings.compression:
        _run_install_step([*settings.compression.command, str(dest)], f"compressing {dest.name}",
                          settings.compression.command[0])
        dest = dest.with_name(dest.name + settings.compression.suffix)
    depmod = shutil.which("depmod") or "/sbin/depmod"
    _run_install_step([depmod, "-b", str(root or "/"), kernel.release], "depmod", "kmod")
    return dest


def _run_install_step(cmd: list[str], what: str, package: str) -> None:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:
        raise RustkoError(f"{what}: cannot run {cmd[0]}: {err.strerror}", f"apt-get install {package}") from None
    if result.returncode != 0:
        raise RustkoError(f"{what} failed (`{' '.join(cmd)}`): {result.stderr.strip()}", exit_code=1)


# make in a process group of its own (stopped as one, never by the terminal's Ctrl-C, which goes to
# the foreground group) but in the user's session: with the scheduler's autogroups (Debian's default)
# a session of its own would take make, the longest part of a build, out of the share and the
# priority of the session that runs `scons`. Python < 3.11 has no process_group: a new session.
OWN_GROUP: dict[str, Any] = ({"process_group": 0} if sys.version_info >= (3, 11)
                             else {"start_new_session": True})


class Kbuild:
    """One `make modules` run that starts before the Rust object exists.

    rustko holds an flock on the Kbuild directory's lock file; Kbuild's rule for the Rust
    object's `_shipped` file waits on that lock (`flock LOCK test -s FILE`). `hand_over` puts the
    object in place and releases the lock, `finish` waits for the .ko; leaving without handing
    over releases it with no object, so the rule fails at once and make stops.
    """

    def __init__(self, job: KbuildJob, name: str) -> None:
        self.job, self.name = job, name
        self.shipped = job.build_dir / f"{name}_rust.o_shipped"
        self._handed_over = False
        self._lock = open(job.build_dir / lock_name(name), "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self._output = tempfile.TemporaryFile(mode="w+")
        self.cmd = job.make_command()
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        env["LC_ALL"] = "C"
        sink = None if job.verbose else self._output
        try:
            self._make = subprocess.Popen(self.cmd, stdout=sink, stderr=sink, text=True, env=env, **OWN_GROUP)
        except OSError as err:
            self._release()
            raise RustkoError(f"cannot run make: {err.strerror}",
                              "install make and gcc (`apt-get install make gcc`)") from None

    def __enter__(self) -> "Kbuild":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        """Whatever happened, make does not outlive us (an interrupted build leaves no job). A
        build that failed after handing the object over stops make at once (it would link a
        refused object); before, the released lock fails make's rule for the object."""
        self._release()
        try:
            if exc_type is not None and self._handed_over:
                self._terminate()
            self._make.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._terminate()
            self._make.wait()
        finally:
            self._output.close()

    def stop(self) -> None:
        """Stop make now (a run started early that the build did not take over)."""
        self._release()
        self._terminate()
        self._make.wait()
        self._output.close()

    def _terminate(self) -> None:
        """SIGTERM to make's process group (its compilers too), unless make has ended."""
        if self._make.poll() is None:
            try:
                os.killpg(self._make.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass  # make ended in between

    def _release(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def hand_over(self, rust_object: Path) -> None:
        """Put the Rust object in place and let Kbuild go on linking while the caller works."""
        shutil.copyfile(rust_object, self.shipped)
        self._handed_over = True
        self._release()

    def finish(self) -> Path:
        """Wait for make; return the .ko it made."""
        if self._make.wait() != 0:
            self._output.seek(0)
            tail = "\n".join(self._output.read().strip().splitlines()[-25:])
            raise RustkoError(f"Kbuild failed for module {self.name} (`{' '.join(self.cmd)}`):\n{tail}",
                              "the last lines above are Kbuild's; V=1 shows everything", exit_code=1)
        ko = self.job.build_dir / f"{self.name}.ko"
        if not ko.is_file():
            raise RustkoError(f"Kbuild succeeded but made no {ko}", "run with V=1 to see Kbuild's output",
                              exit_code=1)
        return ko
