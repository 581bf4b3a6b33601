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

from . import arch, debian
from .cache import cache_root, cached_dir
from .errors import RustkoError

# The kernel series whose newest headers `rustko kdir` picks when no --release is given.
DEFAULT_SERIES = "6.1"

# Debian's flavour-less release names: 6.1.0-56-arm64 (bookworm), 6.12.117+deb12-arm64 (backports).
RELEASE_RE = r"{series}\.\d+(?:-\d+|\+deb\d+)-{arch}"

# Where the host's Kbuild programs live (package linux-kbuild-<series>, host architecture).
HOST_KBUILD = Path("/usr/lib")


def _say(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


# Architectures Debian builds kernel headers for, in rustko's names.
HEADER_ARCHES: tuple[str, ...] = ("x86_64", "arm64")


def _debian_arch(name: str) -> str:
    found = arch.resolve(name)
    if found.name not in HEADER_ARCHES:
        raise RustkoError(f"Debian has no kernel headers for ARCH={name} in this release",
                          f"use one of: {', '.join(HEADER_ARCHES)}")
    return found.debian


def _foreign_hint(debian_arch: str) -> str:
    """Why apt may not know a package of `debian_arch`: the architecture, or a stale package list."""
    native = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.split()
    foreign = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout.split()
    if debian_arch not in native + foreign + ["all"]:
        return f"run `dpkg --add-architecture {debian_arch} && apt-get update`, then try again"
    return (f"`apt-cache pkgnames linux-headers-6.1 | grep -- '-{debian_arch}$'` lists the releases apt "
            "knows (run `apt-get update` first if the one you want is missing)")


def newest_release(arch_name: str, series: str = DEFAULT_SERIES) -> str:
    """The newest plain-flavour release Debian offers for `series` (e.g. 6.1.0-56-arm64), via apt-cache."""
    debian_arch = _debian_arch(arch_name)
    names = debian.pkgnames(f"linux-headers-{series}.")
    pattern = re.compile("linux-headers-(" + RELEASE_RE.format(series=re.escape(series), arch=debian_arch) + ")")
    releases = [m.group(1) for m in map(pattern.fullmatch, names) if m]
    if not releases:
        raise RustkoError(f"apt knows no linux-headers-{series}.*-{debian_arch} package", _foreign_hint(debian_arch))
    return max(releases, key=lambda r: [int(n) for n in re.findall(r"\d+", r)])


def _ensure_kbuild(package: str, minimum: str) -> None:
    """The host's linux-kbuild-<series> (its programs run Kbuild for every architecture), new enough."""
    installed = debian.installed(package)
    if installed and (not minimum or debian.version_ge(installed, minimum)):
        return
    want = f"{package} (>= {minimum})" if minimum else package
    if os.geteuid() != 0:
        raise RustkoError(f"the host's {want} is needed to run Kbuild for these headers "
                          f"(installed: {installed or 'none'})", f"as root: apt-get install {package}")
    _say(f"apt-get install {package}")
    debian.apt(None, ["apt-get", "install", "-y", "-q", "--no-install-recommends", package],
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


def release_arch(release: str) -> str:
    """Debian's architecture named by a kernel release's suffix (`...-amd64`, `...-cloud-arm64`)."""
    suffix = release.rsplit("-", 1)[-1]
    if not any(a.debian == suffix for a in arch.ALL if a.name in HEADER_ARCHES):
        raise RustkoError(f"kernel release {release!r} does not end in an architecture Debian builds "
                          f"headers for ({', '.join(sorted({arch.resolve(a).debian for a in HEADER_ARCHES}))})",
                          "e.g. --release 6.1.0-56-amd64 or --release 7.3.4+deb13-arm64")
    return suffix


def _cached(package: str, debian_arch: str, release: str) -> Path | None:
    """A KDIR prepared before for `release`: in the cache (host release) or in a root."""
    found = [cache_root() / "kdir" / debian_arch / release / "usr" / "src" / package]
    found += [root / "usr" / "src" / package for root in sorted((debian.state_dir() / "roots").glob("*"))]
    return next((kdir for kdir in found if (kdir / ".config").is_file() and (kdir / "Makefile").is_file()), None)


def prepare(arch_name: str | None, release: str | None = None) -> Path:
    """The KDIR for Debian's `release` headers (of `arch_name`, or the release's own suffix):
    unpacked into the cache when the host's release has them, else inside a root of the
    release that has them (rustko/roots.py); once, reused afterwards."""
    if arch_name is None and release is None:
        raise RustkoError("rustko kdir needs --release or --arch",
                          "e.g. rustko kdir --release 7.3.4+deb13-amd64, or --arch arm64 for the newest "
                          f"{DEFAULT_SERIES} headers")
    if arch_name is not None and arch.resolve(arch_name).name == "um":
        from .uml import prepare_uml_kdir  # no headers package: prepared from source
        return prepare_uml_kdir()
    if release is not None and not re.fullmatch(r"[0-9][A-Za-z0-9.+~_-]*", release):
        raise RustkoError(f"{release!r} is not a kernel release", "e.g. --release 6.1.0-56-arm64")
    debian_arch = _debian_arch(arch_name) if arch_name else release_arch(release or "")
    release = release or newest_release(arch_name or "")
    if release.rsplit("-", 1)[-1] in {arch.resolve(a).debian for a in HEADER_ARCHES} and \
            release_arch(release) != debian_arch:
        raise RustkoError(f"--release {release} is for {release_arch(release)}, but --arch {arch_name} "
                          f"asks for {debian_arch}", "drop --arch: the release's suffix decides")
    package = f"linux-headers-{release}"
    cached = _cached(package, debian_arch, release)
    if cached is not None:
        return cached
    suite = debian.host_release()
    if not debian.has(package, debian_arch, None):
        try:
            suite, _ = debian.find(package, debian_arch, debian.release_hint(release))
        except RustkoError:
            suite = debian.host_release()  # the download below names the package apt does not know
    if suite != debian.host_release():
        from . import roots
        return roots.headers(suite, release, debian_arch)
    entry = cache_root() / "kdir" / debian_arch / release
    kdir = entry / "usr" / "src" / package

    def fill(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="rustko-deb-") as download:
            _say(f"apt-get download {package}:{debian_arch}")
            deb = debian.download(package, debian_arch, Path(download), hint=_foreign_hint(debian_arch))
            depends = debian.depends(deb)
            common = next((name for name in depends if re.fullmatch(r"linux-headers-.*-common", name)), None)
            if common is None:
                raise RustkoError(f"{package} depends on no linux-headers-*-common package",
                                  "pass the --release of a Debian kernel flavour, e.g. 6.1.0-56-arm64")
            _say(f"apt-get download {common}:all")
            common_deb = debian.download(common, "all", Path(download), hint=_foreign_hint(debian_arch))
            for each in (deb, common_deb):
                debian.extract(each, tmp)
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
        help="prepare a KDIR for any Debian kernel release (amd64, arm64) or for UML",
        description=(
            "Print a KDIR for Debian's linux-headers-RELEASE, from whichever Debian release has it "
            "(bullseye, bookworm, trixie and their backports, sid). Headers of the host's own "
            "release are unpacked into rustko's cache with the host's Kbuild programs; others are "
            "installed into a minimal root of their release (debootstrap, once; needs root), where "
            "Kbuild then runs with the kernel's own compiler. `scons KDIR=$(rustko kdir --release "
            "7.3.4+deb13-amd64)` builds for it. The second call is instant and prints the same path."
        ),
    )
    parser.add_argument("--arch", help=f"target architecture: {', '.join(HEADER_ARCHES)} (or aarch64), or um "
                        "(User-Mode Linux: matches the installed user-mode-linux package)")
    parser.add_argument("--release", help="e.g. 5.10.0-32-amd64, 6.1.0-56-arm64, 7.3.4+deb13-amd64 (the suffix "
                        f"says the architecture; default with --arch: the newest {DEFAULT_SERIES} Debian offers)")
    parser.set_defaults(run=_main)
