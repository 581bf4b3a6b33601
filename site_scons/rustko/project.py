"""A module project's own description: its name, entry file and metadata from Cargo.toml."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from . import licenses
from .errors import RustkoError
from .kbuild import PARAM_TYPES, ModuleInfo, Param
from .sysroot import CRATES

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,54}$")  # a C identifier that fits MODULE_NAME_LEN


# The module's name is also its crate's name (rustc --crate-name), which must not be one the
# sysroot already has (sysroot.CRATES): rustc then finds two crates of that name (E0519, E0463).
RESERVED_NAMES: dict[str, str] = {
    **{crate: "a crate of the sysroot rustko builds for the kernel (core, compiler_builtins, alloc, "
              "and rustko's support crate)" for crate in CRATES},
    "std": "the name of Rust's standard library, which kernel code cannot use",
}


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise RustkoError(f"'{name}' cannot be a module name",
                          "use letters, digits and underscores, starting with a letter (max 55 characters); "
                          "the kernel uses it as a C identifier")
    if name in RESERVED_NAMES:
        raise RustkoError(f"'{name}' cannot be a module name: the module's crate is named after it, and "
                          f"`{name}` is {RESERVED_NAMES[name]}", f"choose another name, e.g. 'my_{name}'")
    return name


def read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RustkoError(f"{path} is not valid TOML: {err}", "fix the file or remove it") from None


# The range of each numeric parameter type (LP64: long is 64-bit on every supported arch).
PARAM_RANGES: dict[str, tuple[int, int]] = {
    "int": (-2**31, 2**31 - 1), "uint": (0, 2**32 - 1),
    "long": (-2**63, 2**63 - 1), "ulong": (0, 2**64 - 1),
}
PARAM_KEYS = {"type", "default", "description", "perm"}


def parse_param(name: str, spec: Any) -> Param:
    """One `[package.metadata.kernel.params.NAME]` table (or `params={NAME: {...}}`), checked."""
    where = f"module parameter '{name}'"
    if not NAME_RE.match(name) or not isinstance(spec, dict):
        raise RustkoError(f"{where}: needs a C identifier as name and a table of settings",
                          'e.g. [package.metadata.kernel.params.count] type = "int", default = 1')
    unknown = set(spec) - PARAM_KEYS
    kind = spec.get("type", "int")
    if unknown or kind not in PARAM_TYPES:
        raise RustkoError(f"{where}: unknown setting(s) {sorted(unknown)} or type {kind!r}",
                          f"settings: {sorted(PARAM_KEYS)}; types: {', '.join(PARAM_TYPES)}")
    default = spec.get("default", "" if kind == "charp" else (False if kind == "bool" else 0))
    if kind in PARAM_RANGES:
        low, high = PARAM_RANGES[kind]
        if isinstance(default, bool) or not isinstance(default, int) or not low <= default <= high:
            raise RustkoError(f"{where}: default {default!r} is not a {kind} ({low}..{high})")
    elif kind == "bool" and not isinstance(default, bool):
        raise RustkoError(f"{where}: default {default!r} is not true or false")
    elif kind == "charp" and not isinstance(default, str):
        raise RustkoError(f"{where}: default {default!r} is not a string")
    perm = spec.get("perm", 0o444)
    if isinstance(perm, str):
        try:
            perm = int(perm, 8)
        except ValueError:
            perm = -1
    if not isinstance(perm, int) or not 0 <= perm <= 0o664 or perm & 0o002:
        raise RustkoError(f"{where}: perm {spec.get('perm')!r} is not a valid sysfs mode",
                          'use an octal string such as "0444" (read-only) or "0644"; the kernel '
                          "refuses world-writable parameters")
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise RustkoError(f"{where}: description must be a string")
    return Param(name=name, type=kind, default=default, description=description, perm=perm)


def module_info(name: str, manifest: dict[str, Any], overrides: dict[str, Any]) -> ModuleInfo:
    """Keyword arguments win over `[package.metadata.kernel]`, which wins over `[package]`."""
    package = manifest.get("package", {}) if isinstance(manifest.get("package"), dict) else {}
    kernel_meta = package.get("metadata", {}).get("kernel", {}) if isinstance(package.get("metadata"), dict) else {}
    authors = package.get("authors") or []
    base = {
        "license": package.get("license", ""),
        "author": ", ".join(a for a in authors if isinstance(a, str)),
        "description": package.get("description", ""),
        "version": package.get("version", ""),
    }
    where = {key: "[package] in Cargo.toml" for key in base}
    for key in base:
        if key in kernel_meta:
            base[key], where[key] = kernel_meta[key], "[package.metadata.kernel] in Cargo.toml"
        if overrides.get(key):
            base[key], where[key] = overrides[key], f"RustKernelModule({key}=...)"
    for key, value in base.items():
        if not isinstance(value, str):
            raise RustkoError(f"module metadata '{key}' must be a string, not {type(value).__name__}",
                              "check [package.metadata.kernel] in Cargo.toml")
    base["license"] = licenses.module_license(base["license"], where["license"])
    specs = dict(kernel_meta.get("params", {}) or {})
    specs.update(overrides.get("params") or {})
    params = tuple(parse_param(pname, spec) for pname, spec in sorted(specs.items()))
    return ModuleInfo(name=check_name(name), params=params, **base)


def edition(manifest: dict[str, Any]) -> str:
    package = manifest.get("package", {})
    value = package.get("edition", "2021") if isinstance(package, dict) else "2021"
    return str(value)


@dataclass(frozen=True)
class Dependency:
    """A `path = "..."` dependency: the only kind a kernel build can take (no registry, no
    build scripts)."""

    extern: str                       # the name the code uses: `use <extern>::...`
    crate: str                        # its crate name
    folder: Path                      # the folder of its Cargo.toml
    root: Path                        # its lib.rs
    edition: str
    deps: tuple["Dependency", ...]


def path_dependencies(manifest: dict[str, Any], project_dir: Path,
                      within: frozenset[Path] = frozenset()) -> tuple[Dependency, ...]:
    """The `[dependencies]` of a Cargo.toml, resolved recursively; anything but a local path
    is refused with what to do instead."""
    table = manifest.get("dependencies", {}) or {}
    if not isinstance(table, dict):
        raise RustkoError("[dependencies] in Cargo.toml must be a table")
    found: list[Dependency] = []
    for key, spec in sorted(table.items()):
        if not isinstance(spec, dict) or "path" not in spec:
            raise RustkoError(
                f"dependency '{key}' is not a path dependency: kernel modules are built without a "
                "registry (rustko runs rustc itself, not cargo)",
                f"vendor the crate (copy its sources, e.g. from `cargo vendor`) and write "
                f'`{key} = {{ path = "vendor/{key}" }}`; it must be #![no_std]')
        folder = (project_dir / str(spec["path"])).resolve()
        if folder in within:
            raise RustkoError(f"dependency '{key}' ({folder}) depends on itself through its dependencies")
        if not (folder / "Cargo.toml").is_file():
            what = "has no Cargo.toml" if folder.is_dir() else "does not exist"
            raise RustkoError(f"dependency '{key}': {folder} {what}",
                              f"fix `path` of `{key}` in [dependencies]: it is relative to {project_dir}, "
                              "and names the folder of the crate's Cargo.toml")
        dep_manifest = read_manifest(folder / "Cargo.toml")
        package = dep_manifest.get("package")
        if not isinstance(package, dict) or "name" not in package:
            raise RustkoError(f"dependency '{key}': {folder}/Cargo.toml has no [package] name",
                              "point `path` at the crate's folder (the one with its Cargo.toml)")
        if package.get("build") or (folder / "build.rs").is_file():
            raise RustkoError(f"dependency '{key}' has a build script, which a kernel build cannot run",
                              "vendor a copy without build.rs (set the cfgs it would set in code)")
        lib = dep_manifest.get("lib", {}) if isinstance(dep_manifest.get("lib"), dict) else {}
        root = folder / str(lib.get("path", "src/lib.rs"))
        if not root.is_file():
            raise RustkoError(f"dependency '{key}': {root} does not exist",
                              "only library crates can be dependencies ([lib] path in its Cargo.toml)")
        found.append(Dependency(
            extern=key.replace("-", "_"), crate=str(package["name"]).replace("-", "_"), folder=folder, root=root,
            edition=edition(dep_manifest),
            deps=path_dependencies(dep_manifest, folder, within | {folder})))
    return tuple(found)
