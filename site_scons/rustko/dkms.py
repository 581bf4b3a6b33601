"""`rustko dkms`: a `dkms.conf` so that Debian's own DKMS rebuilds a rustko module for every kernel.

DKMS copies the project to `/var/lib/dkms/NAME/VERSION/build`, sources `dkms.conf` with
`$kernelver` and `$kernel_source_dir` set (dkms 3.0.10 `read_conf`), runs `MAKE[0]` there with its
output appended to `make.log`, and installs `BUILT_MODULE_LOCATION/BUILT_MODULE_NAME.ko` only when
that command exited 0 and the file exists (dkms 3.0.10 `actual_build`). DKMS rewrites a MAKE line
only when it starts with `make` (`${make_command/#make/...}`), so a `scons` line runs as written.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import RustkoError
from .project import check_name, read_manifest

# `env.RustKernelModule("NAME", ...)` in an SConstruct, with an optional build_dir="...".
MODULE_CALL = re.compile(r"""RustKernelModule\(\s*["']([A-Za-z_][A-Za-z0-9_-]*)["']([^)]*)\)""")
BUILD_DIR_ARG = re.compile(r"""build_dir\s*=\s*["']#?([^"']*)["']""")
# A DKMS name or version becomes a folder under /var/lib/dkms and part of `NAME/VERSION`.
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]*$")

# $kernel_source_dir is /lib/modules/$kernelver/build on Linux (dkms 3.0.10 `_get_kernel_dir`);
# `scons -c` reads no kernel (rustko.scons_tool._reading_only), so CLEAN needs no headers.
TEMPLATE = """\
# Written by `rustko dkms`: Debian's DKMS rebuilds this Rust kernel module for every kernel.
#   dkms add PROJECT_DIR && dkms install {name}/{version} -k RELEASE
PACKAGE_NAME="{name}"
PACKAGE_VERSION="{version}"
{modules}AUTOINSTALL="yes"
MAKE[0]="scons -Q KDIR=${{kernel_source_dir}}"
CLEAN="scons -Q -c"
"""

MODULE_LINES = """\
BUILT_MODULE_NAME[{i}]="{module}"
BUILT_MODULE_LOCATION[{i}]="{location}/"
DEST_MODULE_LOCATION[{i}]="/updates/dkms"
"""


@dataclass(frozen=True)
class Module:
    name: str
    build_dir: str   # relative to the project, where scons writes NAME.ko


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    modules: tuple[Module, ...]


def sconstruct_modules(sconstruct: Path) -> tuple[Module, ...]:
    """The modules an SConstruct builds, read from its `RustKernelModule("NAME", ...)` calls."""
    try:
        text = sconstruct.read_text()
    except OSError as err:
        raise RustkoError(f"cannot read {sconstruct}: {err.strerror}",
                          "run `rustko dkms` on a module project (one made by `rustko new`)") from None
    modules = []
    for match in MODULE_CALL.finditer(text):
        build_dir = BUILD_DIR_ARG.search(match.group(2))
        folder = build_dir.group(1).strip("/") if build_dir else "build"
        modules.append(Module(match.group(1), folder or "."))
    if not modules:
        raise RustkoError(f"{sconstruct} has no `RustKernelModule(\"NAME\", ...)` call",
                          "the module name must be a string literal for DKMS to know the .ko it installs")
    return tuple(modules)


def package(project: Path, version: str | None = None) -> Package:
    """Name and version from Cargo.toml's [package] (else the SConstruct's first module and
    `version`), and the modules the SConstruct builds."""
    modules = sconstruct_modules(project / "SConstruct")
    cargo = read_manifest(project / "Cargo.toml").get("package", {})
    cargo = cargo if isinstance(cargo, dict) else {}
    name = str(cargo.get("name") or modules[0].name)
    if not VERSION_RE.match(name):
        raise RustkoError(f"package name '{name}' cannot be a DKMS package name",
                          "use letters, digits, '.', '+', '~' and '-' in Cargo.toml's [package] name")
    version = version or str(cargo.get("version") or "")
    if not version:
        raise RustkoError(f"{project} has no version: no Cargo.toml with [package] version",
                          "add `version = \"0.1.0\"` under [package] in Cargo.toml, or pass --version")
    if not VERSION_RE.match(version):
        raise RustkoError(f"version '{version}' cannot be a DKMS version",
                          "use letters, digits, '.', '+', '~' and '-' (e.g. 0.1.0)")
    for module in modules:
        check_name(module.name.replace("-", "_"))  # a dashed file name is the kernel's underscored one
    return Package(name, version, modules)


def render(pkg: Package) -> str:
    modules = "".join(MODULE_LINES.format(i=i, module=m.name, location=m.build_dir)
                      for i, m in enumerate(pkg.modules))
    return TEMPLATE.format(name=pkg.name, version=pkg.version, modules=modules)


def write(project: Path, version: str | None = None) -> tuple[Path, Package]:
    pkg = package(project, version)
    out = project / "dkms.conf"
    try:
        out.write_text(render(pkg))
    except OSError as err:
        raise RustkoError(f"cannot write {out}: {err.strerror}") from None
    return out, pkg


def _run(args: argparse.Namespace) -> int:
    project = Path(args.dir)
    out, pkg = write(project, args.version)
    print(f"wrote {out}: `dkms add {project.resolve()}`, then `dkms install {pkg.name}/{pkg.version} "
          "-k RELEASE` (or let the kernel's hooks run `dkms autoinstall`)", file=sys.stderr)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("dkms", help="write dkms.conf so DKMS rebuilds the module for every kernel",
                                   description="Write DIR/dkms.conf for the module project in DIR, for "
                                               "Debian's own `dkms add/build/install/autoinstall`.")
    parser.add_argument("dir", nargs="?", default=".", help="the module project (default: .)")
    parser.add_argument("--version", help="the DKMS package version (default: Cargo.toml's [package] version)")
    parser.set_defaults(run=_run)
