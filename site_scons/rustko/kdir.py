"""`rustko kdir`: a KDIR for another architecture, made from Debian's own packages.

Debian's arm64 headers (`linux-headers-<release>:arm64` + `linux-headers-<ver>-common`) cross-build
modules on an amd64 host once two things are mended (FIELD-NOTES, arm64): their `scripts` and
`tools` symlinks lead to `linux-kbuild-<series>` of the *package's* architecture (arm64 programs
that cannot run here), so they are pointed at the host's own `/usr/lib/linux-kbuild-<series>/`;
and the flavour's Makefile includes `/usr/src/linux-headers-<ver>-common/Makefile` by absolute
path, so it is made to include the common tree unpacked beside it. Both packages are only
unpacked (`dpkg -x`), into the cache: nothing is installed and nothing is written into /usr/src.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from .cache import cache_root, cached_dir
from .errors import RustkoError
from .kernel import normalize_arch

# rustko's architecture -> Debian's name for it (`pkg:arch`, .deb file names).
DEBIAN_ARCH: dict[str, str] = {"x86_64": "amd64", "arm64": "arm64"}

# The kernel series whose newest headers `rustko kdir` picks when no --release is given.
DEFAULT_SERIES = "6.1"

# Debian's flavour-less release names: 6.1.0-56-arm64 (bookworm), 6.12.117+deb12-arm64 (backports).
RELEASE_RE = r"{series}\.\d+(?:-\d+|\+deb\d+)-{arch}"

# Where the host's Kbuild programs live (package linux-kbuild-<series>, host architecture).
HOST_KBUILD = Path("/usr/lib")


def _say(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


def _debian_arch(arch: str) -> str:
    name = normalize_arch(arch)
    if name not in DEBIAN_ARCH:
        raise RustkoError(f"Debian has no kernel headers for ARCH={arch} in this release",
                          f"use one of: {', '.join(DEBIAN_ARCH)}")
    return DEBIAN_ARCH[name]


def _run(cmd: list[str], hint: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except OSError as err:
        raise RustkoError(f"cannot run {cmd[0]}: {err.strerror}", hint) from None
    if proc.returncode != 0:
        detail = [line for line in proc.stderr.strip().splitlines() if not line.startswith("W: ")]
        raise RustkoError(f"`{' '.join(cmd)}` failed: {detail[-1] if detail else f'exit {proc.returncode}'}", hint)
    return proc.stdout


def _foreign_hint(debian_arch: str) -> str:
    """Why apt may not know a package of `debian_arch`: the architecture, or a stale package list."""
    native = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.split()
    foreign = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout.split()
    if debian_arch not in native + foreign + ["all"]:
        return f"run `dpkg --add-architecture {debian_arch} && apt-get update`, then try again"
    return (f"`apt-cache pkgnames linux-headers-6.1 | grep -- '-{debian_arch}$'` lists the releases apt "
            "knows (run `apt-get update` first if the one you want is missing)")


def newest_release(arch: str, series: str = DEFAULT_SERIES) -> str:
    """The newest plain-flavour release Debian offers for `series` (e.g. 6.1.0-56-arm64), via apt-cache."""
    debian_arch = _debian_arch(arch)
    names = _run(["apt-cache", "pkgnames", f"linux-headers-{series}."], _foreign_hint(debian_arch)).split()
    pattern = re.compile("linux-headers-(" + RELEASE_RE.format(series=re.escape(series), arch=debian_arch) + ")")
    releases = [m.group(1) for m in map(pattern.fullmatch, names) if m]
    if not releases:
        raise RustkoError(f"apt knows no linux-headers-{series}.*-{debian_arch} package", _foreign_hint(debian_arch))
    return max(releases, key=lambda r: [int(n) for n in re.findall(r"\d+", r)])


def _download(package: str, debian_arch: str, dest: Path) -> Path:
    """`apt-get download package:arch` into `dest`; the .deb it produced."""
    _run(["apt-get", "download", f"{package}:{debian_arch}"], _foreign_hint(debian_arch), cwd=dest)
    debs = sorted(dest.glob(f"{package}_*_{debian_arch}.deb"))
    if not debs:
        raise RustkoError(f"apt-get download {package}:{debian_arch} produced no .deb", _foreign_hint(debian_arch))
    return debs[-1]


def _depends(deb: Path) -> dict[str, str]:
    """The package's Depends: name -> required version ('' when unversioned)."""
    field = _run(["dpkg-deb", "-f", str(deb), "Depends"], "apt-get install dpkg")
    found: dict[str, str] = {}
    for item in field.split(","):
        match = re.match(r"\s*([^\s(]+)(?:\s*\([<>=]+\s*([^)\s]+)\))?", item)
        if match:
            found[match.group(1)] = match.group(2) or ""
    return found


def _installed_version(package: str) -> str | None:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Status} ${Version}", package], capture_output=True, text=True)
    status, _, version = proc.stdout.rpartition(" ")
    return version if proc.returncode == 0 and status.endswith("installed") and not status.startswith("deinstall") else None


def _ensure_kbuild(package: str, minimum: str) -> None:
    """The host's linux-kbuild-<series> (its programs run Kbuild for every architecture), new enough."""
    installed = _installed_version(package)
    if installed and (not minimum or subprocess.run(
            ["dpkg", "--compare-versions", installed, "ge", minimum]).returncode == 0):
        return
    want = f"{package} (>= {minimum})" if minimum else package
    if os.geteuid() != 0:
        raise RustkoError(f"the host's {want} is needed to run Kbuild for these headers "
                          f"(installed: {installed or 'none'})", f"as root: apt-get install {package}")
    _say(f"apt-get install {package}")
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", package],
         f"as root: apt-get update && apt-get install {package}")


def _kbuild_package(headers: Path) -> str:
    """`linux-kbuild-6.1` from the headers' `scripts -> ../../lib/linux-kbuild-6.1/scripts`."""
    link = headers / "scripts"
    if not link.is_symlink():
        raise RustkoError(f"{headers} has no scripts symlink: not a Debian headers package layout")
    return Path(os.readlink(link)).parent.name


def _mend(src: Path, release: str, common: str, kbuild: str) -> None:
    """Point both trees at the host's Kbuild programs and the flavour at the common tree beside it."""
    for tree in (src / f"linux-headers-{release}", src / common):
        for name in ("scripts", "tools"):
            link = tree / name
            if link.is_symlink():
                link.unlink()
                link.symlink_to(HOST_KBUILD / kbuild / name)
    makefile = src / f"linux-headers-{release}" / "Makefile"
    text = makefile.read_text()
    absolute = f"/usr/src/{common}/Makefile"
    if absolute not in text:
        raise RustkoError(f"{makefile} does not include {absolute}: Debian changed the headers layout",
                          "report this to rustko with the package version")
    makefile.write_text(text.replace(absolute, f"../{common}/Makefile"))


def prepare(arch: str, release: str | None = None) -> Path:
    """The KDIR for Debian's `release` headers of `arch`, unpacked into the cache once."""
    if normalize_arch(arch) == "um":  # no headers package: prepared from source (rustko/uml.py)
        from .uml import prepare_uml_kdir
        return prepare_uml_kdir()
    debian_arch = _debian_arch(arch)
    release = release or newest_release(arch)
    if not re.fullmatch(r"[0-9][A-Za-z0-9.+~_-]*", release):
        raise RustkoError(f"{release!r} is not a kernel release", "e.g. --release 6.1.0-56-arm64")
    package = f"linux-headers-{release}"
    entry = cache_root() / "kdir" / debian_arch / release
    kdir = entry / "usr" / "src" / package

    def fill(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="rustko-deb-") as download:
            _say(f"apt-get download {package}:{debian_arch}")
            deb = _download(package, debian_arch, Path(download))
            depends = _depends(deb)
            common = next((name for name in depends if re.fullmatch(r"linux-headers-.*-common", name)), None)
            if common is None:
                raise RustkoError(f"{package} depends on no linux-headers-*-common package",
                                  "pass the --release of a Debian kernel flavour, e.g. 6.1.0-56-arm64")
            _say(f"apt-get download {common}:all")
            common_deb = _download(common, "all", Path(download))
            for each in (deb, common_deb):
                _run(["dpkg-deb", "-x", str(each), str(tmp)], "apt-get install dpkg")
        src = tmp / "usr" / "src"
        kbuild = _kbuild_package(src / package)
        _ensure_kbuild(kbuild, depends.get(kbuild, ""))
        _mend(src, release, common, kbuild)

    cached_dir(entry, fill)
    kbuild = Path(os.readlink(kdir / "scripts")).parent.name
    if not (kdir / "scripts").is_dir():  # the host's linux-kbuild was removed since
        _ensure_kbuild(kbuild, "")
    return kdir


def _main(args: argparse.Namespace) -> int:
    print(prepare(args.arch, args.release))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `rustko kdir`."""
    parser = subparsers.add_parser(
        "kdir",
        help="prepare a KDIR for another architecture from Debian's headers packages",
        description=(
            "Download Debian's linux-headers-RELEASE (for --arch) and its -common headers, unpack "
            "them into rustko's cache with the host's Kbuild programs, and print the KDIR path, "
            "so that `scons ARCH=arm64 KDIR=$(rustko kdir --arch arm64)` cross-builds. "
            "The second call is instant and prints the same path."
        ),
    )
    parser.add_argument("--arch", required=True, help=f"target architecture: {', '.join(DEBIAN_ARCH)} (or aarch64), or um "
                        "(User-Mode Linux: matches the installed user-mode-linux package)")
    parser.add_argument("--release", help=f"e.g. 6.1.0-56-arm64 (default: the newest {DEFAULT_SERIES} Debian offers)")
    parser.set_defaults(run=_main)
