"""A module project's own description: its name, entry file and metadata from Cargo.toml."""

from __future__ import annotations

import re
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
from pathlib import Path
from typing import Any

from .errors import RustkoError
from .kbuild import ModuleInfo

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,54}$")  # a C identifier that fits MODULE_NAME_LEN


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise RustkoError(f"'{name}' cannot be a module name",
                          "use letters, digits and underscores, starting with a letter (max 55 characters); "
                          "the kernel uses it as a C identifier")
    return name


def read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RustkoError(f"{path} is not valid TOML: {err}", "fix the file or remove it") from None


def module_info(name: str, manifest: dict[str, Any], overrides: dict[str, str]) -> ModuleInfo:
    """Keyword arguments win over `[package.metadata.kernel]`, which wins over `[package]`."""
    package = manifest.get("package", {}) if isinstance(manifest.get("package"), dict) else {}
    kernel_meta = package.get("metadata", {}).get("kernel", {}) if isinstance(package.get("metadata"), dict) else {}
    authors = package.get("authors") or []
    base = {
        "license": package.get("license", "GPL"),
        "author": ", ".join(a for a in authors if isinstance(a, str)),
        "description": package.get("description", ""),
        "version": package.get("version", ""),
    }
    for key in base:
        if key in kernel_meta:
            base[key] = kernel_meta[key]
        if overrides.get(key):
            base[key] = overrides[key]
    for key, value in base.items():
        if not isinstance(value, str):
            raise RustkoError(f"module metadata '{key}' must be a string, not {type(value).__name__}",
                              "check [package.metadata.kernel] in Cargo.toml")
    return ModuleInfo(name=check_name(name), **base)


def edition(manifest: dict[str, Any]) -> str:
    package = manifest.get("package", {})
    value = package.get("edition", "2021") if isinstance(package, dict) else "2021"
    return str(value)
