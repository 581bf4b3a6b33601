"""The Kbuild side: the generated C shim, the Kbuild file, and `make -C KDIR M=<build dir>`.

The shim is the ABI boundary: it is compiled by Kbuild against the real headers, so the kernel
macros that change between versions (module_init, printk levels, MODULE_*) never reach Rust.
Rust sees only the small C ABI of the runtime parts in c/ and the parameter table generated here.
"""

from __future__ import annotations

import hashlib
import os
import re
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from . import cache
from .errors import RustkoError
from .kernel import KBUILD_ARCH, KernelInfo

# Default CROSS_COMPILE when building for another architecture than the host's.
CROSS_COMPILE: dict[str, str] = {"arm64": "aarch64-linux-gnu-", "riscv64": "riscv64-linux-gnu-"}

RUNTIME_DIR = Path(__file__).parent / "c"
# A non-static function definition in a runtime part: what the part offers Rust.
RUNTIME_EXPORT = re.compile(r"^(?!static)[a-z][^\n(;]*?\b(rustko_\w+)\(", re.MULTILINE)


def runtime_parts(imports: frozenset[str]) -> list[Path]:
    """The parts of the C runtime (c/*.c) that define a function the Rust object calls: a module
    compiles only what it uses, and the smaller shim keeps Kbuild fast."""
    return [part for part in sorted(RUNTIME_DIR.glob("*.c"))
            if imports.intersection(RUNTIME_EXPORT.findall(part.read_text()))]


@dataclass(frozen=True)
class ParamType:
    """A `module_param` type: its C declaration and how Rust reads it (rust/rustko/param.rs)."""

    c_type: str
    kind: int           # the `kind` tag in the shim's parameter table
    numeric: bool


# include/linux/moduleparam.h: the standard parameter types (`param_ops_<type>`).
PARAM_TYPES: dict[str, ParamType] = {
    "int": ParamType("int", 0, True),
    "uint": ParamType("unsigned int", 1, True),
    "long": ParamType("long", 2, True),
    "ulong": ParamType("unsigned long", 3, True),
    "bool": ParamType("bool", 4, False),
    "charp": ParamType("char *", 5, False),
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
    has_exit: bool = False
    params: tuple[Param, ...] = ()
    imports: frozenset[str] = frozenset()   # what the Rust object calls (undefined symbols)


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


def shim_source(info: ModuleInfo) -> str:
    lines = [
        "// Generated by rustko: the C half of the module. Do not edit.",
        "#include <linux/module.h>",
        "#include <linux/init.h>",
        "#include <linux/moduleparam.h>",
        "#include <linux/printk.h>",
        "#include <linux/string.h>",
        "",
    ]
    for part in runtime_parts(info.imports):
        lines += [part.read_text(), ""]
    for param in info.params:
        lines.extend(_param_c(param))
    lines.extend(_param_table(info.params))
    lines += [
        "",
        "extern int rust_init(void);",
        "extern void rust_exit(void);" if info.has_exit else "",
        "",
        "static int __init rustko_module_init(void)",
        "{",
        "\treturn rust_init();",
        "}",
        "module_init(rustko_module_init);",
        "",
        "static void __exit rustko_module_exit(void)",
        "{",
        "\trust_exit();" if info.has_exit else "",
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


def kbuild_file(name: str, c_objects: Sequence[str] = ()) -> str:
    parts = " ".join([f"{name}_shim.o", f"{name}_rust.o", *c_objects])
    return f"# Generated by rustko.\nobj-m := {name}.o\n{name}-y := {parts}\n"


C_SOURCE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*\.[ch]")


def c_objects(name: str, c_sources: Sequence[Path]) -> list[str]:
    """The Kbuild objects of a project's own C files (`.h` files are copied, not compiled).

    They are copied flat into the Kbuild directory, so names must be unique and must not take
    the shim's, the Rust object's or the module's own name (Kbuild cannot link `NAME.o` into
    `NAME.o`).
    """
    taken = {f"{name}.c", f"{name}_shim.c", f"{name}_rust.c"}
    seen: set[str] = set()
    for source in c_sources:
        base = Path(source).name
        if not C_SOURCE_RE.fullmatch(base) or base in taken or base in seen:
            raise RustkoError(
                f"c_sources: {source} cannot be part of module {name}",
                f"use unique .c/.h file names of letters, digits, '_' and '-', other than "
                f"{', '.join(sorted(taken))}")
        seen.add(base)
    return [f"{Path(base).stem}.o" for base in sorted(seen) if base.endswith(".c")]


@dataclass
class KbuildJob:
    kernel: KernelInfo
    build_dir: Path              # M=; only rustko writes here
    cross_compile: str | None = None
    llvm: bool = False
    verbose: bool = False
    extra_make_args: list[str] = field(default_factory=list)

    def make_command(self) -> list[str]:
        arch = self.kernel.arch
        cmd = ["make", "-C", str(self.kernel.kdir), f"M={self.build_dir}",
               f"ARCH={KBUILD_ARCH[arch]}"]
        cross = self.cross_compile if self.cross_compile is not None else CROSS_COMPILE.get(arch, "")
        if cross and arch != _host():
            cmd.append(f"CROSS_COMPILE={cross}")
        if self.llvm:
            cmd.append("LLVM=1")
        # Reproducible: the build directory's absolute path must not reach the object files.
        cmd.append(f"KCFLAGS=-ffile-prefix-map={self.build_dir}/=")
        cmd.append(f"V={1 if self.verbose else 0}")
        cmd.extend(self.extra_make_args)
        cmd.append("modules")
        return cmd


def _host() -> str:
    from .kernel import host_arch
    return host_arch()


# Characters that make cannot carry in M= or in a target name, even quoted.
MAKE_UNSAFE = set(" \t\n:#$=;%*?[]\\'\"`|&<>(){}!")


def safe_dir(build_dir: Path) -> Path:
    """`build_dir`, or, when its path would break make, a stable private folder in the cache."""
    if not MAKE_UNSAFE.intersection(str(build_dir)):
        return build_dir
    digest = hashlib.sha256(str(build_dir).encode()).hexdigest()[:16]
    return cache.cache_root() / "kbuild" / digest


def prepare(build_dir: Path, info: ModuleInfo, rust_object: Path, c_sources: Sequence[Path] = ()) -> None:
    """Write Kbuild, the shim, the project's C files and the Rust object (as `_shipped`) into
    the Kbuild directory."""
    build_dir.mkdir(parents=True, exist_ok=True)
    _write_if_changed(build_dir / "Kbuild", kbuild_file(info.name, c_objects(info.name, c_sources)))
    for source in c_sources:
        data, copy = Path(source).read_bytes(), build_dir / Path(source).name
        if not copy.is_file() or copy.read_bytes() != data:  # unchanged files keep their mtime
            copy.write_bytes(data)
    _write_if_changed(build_dir / f"{info.name}_shim.c", shim_source(info))
    shipped = build_dir / f"{info.name}_rust.o_shipped"
    shutil.copyfile(rust_object, shipped)
    # An empty .cmd file tells Kbuild the object needs no command line check (FIELD-NOTES).
    (build_dir / f".{info.name}_rust.o.cmd").touch()


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def run(job: KbuildJob, name: str) -> Path:
    """Run Kbuild; return the .ko it made. Kbuild's output is shown only when it fails (or V=1)."""
    cmd = job.make_command()
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env["LC_ALL"] = "C"
    if job.verbose:
        print(" ".join(cmd), flush=True)
    try:
        result = subprocess.run(cmd, capture_output=not job.verbose, text=True, env=env)
    except OSError as err:
        raise RustkoError(f"cannot run make: {err.strerror}", "install make and gcc (`apt-get install make gcc`)") from None
    if result.returncode != 0:
        output = "" if job.verbose else (result.stdout + result.stderr).strip()
        tail = "\n".join(output.splitlines()[-25:])
        raise RustkoError(f"Kbuild failed for module {name} (`{' '.join(cmd)}`):\n{tail}",
                          "the last lines above are Kbuild's; V=1 shows everything", exit_code=1)
    ko = job.build_dir / f"{name}.ko"
    if not ko.is_file():
        raise RustkoError(f"Kbuild succeeded but made no {ko}", "run with V=1 to see Kbuild's output", exit_code=1)
    return ko
