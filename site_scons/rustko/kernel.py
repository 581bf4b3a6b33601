"""Kernel probing: what a KDIR (a configured kernel tree or a distribution headers package) says
about the kernel that will load our modules."""

from __future__ import annotations

import marshal
import os
import re
import zlib
from pathlib import Path

from . import arch
from .cache import cache_root, file_stamp, store
from .errors import RustkoError
from .record import record

def normalize_arch(name: str) -> str:
    """Map a user's ARCH spelling to rustko's name, or fail with the accepted spellings."""
    return arch.resolve(name).name


def host_arch() -> str:
    found = arch.host()
    return found.name if found else os.uname().machine.lower()


@record
class KernelInfo:
    """What the build needs to know about the target kernel; everything read from KDIR.

    A record (a named tuple, rustko.record), not a frozen dataclass: `rustko check --kdir` makes
    one at every start-up, and `dataclasses` (with the `inspect` it imports) costs more than the
    check of a small module."""

    kdir: Path
    release: str
    version: tuple[int, int, int]
    arch: str
    config: dict[str, str]
    compiler: str

    def __repr__(self) -> str:
        """Without `config` (9,000 entries)."""
        return (f"KernelInfo(kdir={self.kdir!r}, release={self.release!r}, version={self.version!r}, "
                f"arch={self.arch!r}, compiler={self.compiler!r})")

    def enabled(self, symbol: str) -> bool:
        """True when `CONFIG_<symbol>` is `y` (built in) in the kernel's .config."""
        return self.config.get(f"CONFIG_{symbol}") == "y"

    def value(self, symbol: str) -> str | None:
        raw = self.config.get(f"CONFIG_{symbol}")
        return raw.strip('"') if raw is not None else None

    @property
    def symvers(self) -> Path:
        return self.kdir / "Module.symvers"


def default_kdir() -> Path:
    return Path("/lib/modules") / os.uname().release / "build"


def installed_headers() -> list[Path]:
    """Headers trees under /usr/src that look usable as KDIR (for error messages)."""
    root = Path("/usr/src")
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / ".config").is_file() and (p / "Makefile").is_file())


def _missing_kdir_hint() -> str:
    found = installed_headers()
    if found:
        listing = ", ".join(f"KDIR={p}" for p in found)
        return f"headers installed on this machine: {listing}"
    return ("install the headers of the kernel you target, e.g. `apt-get install linux-headers-amd64`, "
            "then pass KDIR=/usr/src/linux-headers-<release>")


def read_config(path: Path) -> dict[str, str]:
    """The `CONFIG_*` lines of a .config, parsed once per file version and kept in the cache:
    every `rustko check --kdir` reads the same 9,000 lines, and loading the kept dict costs a
    quarter of parsing them. The entry is keyed on the file's version (cache.file_stamp)."""
    try:
        stamp = file_stamp(path)
    except OSError:
        return _parse_config(path)  # its error, as before the cache
    cached = cache_root() / "config" / f"{zlib.crc32(stamp.encode('utf-8', 'surrogateescape')):08x}"
    try:
        kept = marshal.loads(cached.read_bytes())
        if isinstance(kept, tuple) and len(kept) == 2 and kept[0] == stamp and isinstance(kept[1], dict):
            return kept[1]
    except (OSError, EOFError, ValueError, TypeError):
        pass
    config = _parse_config(path)
    store(cached, marshal.dumps((stamp, config)))
    return config


def _parse_config(path: Path) -> dict[str, str]:
    config: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, _, value = line.partition("=")
            config[key] = value
    return config


def _read_release(kdir: Path) -> str:
    header = kdir / "include/generated/utsrelease.h"
    if header.is_file():
        match = re.search(r'UTS_RELEASE\s+"([^"]+)"', header.read_text(errors="replace"))
        if match:
            return match.group(1)
    release_file = kdir / "include/config/kernel.release"
    if release_file.is_file():
        return release_file.read_text().strip()
    raise RustkoError(
        f"{kdir} has no include/generated/utsrelease.h: it is not a prepared kernel tree",
        "run `make modules_prepare` in a kernel source tree, or use a distribution headers package",
    )


def _read_version(kdir: Path) -> tuple[int, int, int]:
    header = kdir / "include/generated/uapi/linux/version.h"
    text = header.read_text(errors="replace") if header.is_file() else ""
    parts: dict[str, int] = {}
    for name, value in re.findall(r"LINUX_VERSION_(MAJOR|PATCHLEVEL|SUBLEVEL)\s+(\d+)", text):
        parts.setdefault(name, int(value))  # the first of each, as a search would find
    if len(parts) == 3:
        return (parts["MAJOR"], parts["PATCHLEVEL"], parts["SUBLEVEL"])
    code = re.search(r"LINUX_VERSION_CODE\s+(\d+)", text)
    if code:
        value = int(code.group(1))
        return (value >> 16, (value >> 8) & 0xFF, value & 0xFF)
    raise RustkoError(f"{kdir} has no include/generated/uapi/linux/version.h",
                      "KDIR must be a prepared kernel tree (`make modules_prepare`) or a headers package")


def probe(kdir: str | os.PathLike[str] | None = None) -> KernelInfo:
    """Read release, version, architecture, compiler and .config from KDIR."""
    path = Path(kdir) if kdir else default_kdir()
    if not path.is_dir():
        what = f"KDIR {path}" if kdir else f"the default KDIR {path} (the running kernel's headers)"
        raise RustkoError(f"{what} does not exist", _missing_kdir_hint())
    config_path = path / ".config"
    if not config_path.is_file() or not (path / "Makefile").is_file():
        raise RustkoError(
            f"{path} is not a kernel build directory (no .config or Makefile)",
            _missing_kdir_hint(),
        )
    config = read_config(config_path)
    if config.get("CONFIG_MODULES") != "y":
        raise RustkoError(f"the kernel configured in {path} has no module support (CONFIG_MODULES is not set)",
                          "build for a kernel with CONFIG_MODULES=y")
    found = arch.from_config(config)
    if found is None:
        raise RustkoError(f"{path}/.config is for an architecture rustko does not support",
                          f"supported: {', '.join(a.name for a in arch.ALL)}")
    return KernelInfo(
        kdir=path.resolve(),
        release=_read_release(path),
        version=_read_version(path),
        arch=found.name,
        config=config,
        compiler=config.get("CONFIG_CC_VERSION_TEXT", '""').strip('"'),
    )
