"""Roots of other Debian releases, in which Kbuild runs with the kernel's own compiler and tools.

A kernel's headers name the compiler that built it (`.kernelvariables`: gcc-10 for bullseye's
5.10, gcc-14 for trixie's 6.12 and 7.3) and link to host programs (`linux-kbuild-*`: fixdep,
modpost, objtool) built for that release's C library; trixie's do not run on bookworm's glibc,
and bookworm has neither gcc-10 nor gcc-14. So for a kernel of another release, rustko makes a
minimal root of that release once (`debootstrap --variant=minbase`, then `apt-get install` of
the headers, which pull the kernel's gcc and its linux-kbuild), and runs only `make` in it:
`unshare --mount` + `chroot`, with the build directory bind-mounted at the same path, so the
`.ko` lands where the host expects it and the mounts vanish with the process. rustc, the
sysroot and the checker stay on the host. A root is shared by every kernel of its release.

Chosen over podman: debootstrap and chroot are in every Debian, need no image registry and no
container runtime set-up (FIELD-NOTES: crun fails here); the price is that root is needed.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from . import arch as arches
from . import debian
from .cache import locked, cached_dir
from .errors import RustkoError

# A file every rustko root has: which release it is (and that it is rustko's to run make in).
MARKER = "etc/rustko-root"

# Packages every root gets besides its base system and the headers (which bring gcc and
# linux-kbuild): make, and binutils for the plain `as`/`ld` the kernel's gcc runs.
BASE_PACKAGES: tuple[str, ...] = ("make", "binutils")

# debootstrap lines shown as progress while a root is made (the rest are per-package noise).
PROGRESS_EVERY = 20.0


def _say(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


def root_path(release: str) -> Path:
    return debian.state_dir() / "roots" / release


def owning(path: Path) -> Path | None:
    """The rustko root that `path` (a KDIR) lies in, if any."""
    for parent in (path, *path.parents):
        if (parent / MARKER).is_file():
            return parent
    return None


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise RustkoError(f"{what} needs root (debootstrap, chroot and mount run as root)",
                          "run as root, or use headers of the host's own Debian release")


def ensure(release: str) -> Path:
    """The root of Debian `release`, made once with debootstrap (a few minutes)."""
    path = root_path(release)
    if (path / MARKER).is_file():
        if not all(installed(path, p) for p in BASE_PACKAGES):
            with locked(path / "var" / "rustko-packages"):
                install(path, BASE_PACKAGES)
        return path
    _require_root(f"a Debian {release} root for Kbuild")
    if release not in debian.RELEASES:
        raise RustkoError(f"unknown Debian release '{release}'", f"use one of: {', '.join(debian.RELEASES)}")

    def fill(tmp: Path) -> None:
        started = time.monotonic()
        _say(f"preparing a Debian {release} root for Kbuild at {path} (once; a few minutes)")
        _debootstrap(release, tmp)
        (tmp / "etc/apt/sources.list").write_text(
            "".join(f"deb {uri} {suite} main\n" for uri, suite in debian.RELEASES[release]))
        _in_root(tmp, ["apt-get", "update", "-q"], "apt-get update in the root")
        install(tmp, list(BASE_PACKAGES))
        (tmp / MARKER).write_text(f"release {release}\nprepared in {time.monotonic() - started:.0f} s\n")
        _say(f"Debian {release} root ready in {time.monotonic() - started:.0f} s")

    return cached_dir(path, fill)


def _debootstrap(release: str, target: Path) -> None:
    tool = "/usr/sbin/debootstrap"
    if not os.access(tool, os.X_OK):
        raise RustkoError("debootstrap is not installed", "apt-get install debootstrap")
    cmd = [tool, "--variant=minbase", release, str(target), debian.ARCHIVE]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "LC_ALL": "C"})
    assert proc.stdout is not None
    last, tail = 0.0, []
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-10:]
        if line.startswith("I: ") and time.monotonic() - last > PROGRESS_EVERY:
            last = time.monotonic()
            _say(f"debootstrap {release}: {line[3:].strip()}")
    if proc.wait() != 0:
        raise RustkoError(f"debootstrap {release} failed:\n" + "\n".join(tail),
                          f"check the network ({debian.ARCHIVE} must be reachable)")


def _in_root(root: Path, cmd: Sequence[str], what: str) -> str:
    """Run `cmd` inside `root` (apt-get, dpkg): /proc and /dev mounted for it alone."""
    proc = subprocess.run(wrap(list(cmd), root, ()), capture_output=True, text=True,
                          env={**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"})
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
        raise RustkoError(f"{what} failed in {root}:\n{tail}", "check the network and the package names")
    return proc.stdout


def installed(root: Path, package: str) -> bool:
    """Whether the root has `package` (`name=version`: that version) installed."""
    name, _, version = package.partition("=")
    proc = subprocess.run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f=${Status}|${Version}", name],
                          capture_output=True, text=True)
    status, _, have = proc.stdout.partition("|")
    return proc.returncode == 0 and status.endswith(" installed") and (not version or have == version)


def install(root: Path, packages: Sequence[str]) -> None:
    """`apt-get install` into the root whatever of `packages` it lacks."""
    missing = [p for p in packages if not installed(root, p)]
    if missing:
        _say(f"apt-get install {' '.join(missing)} (in {root})")
        _in_root(root, ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                 f"apt-get install {' '.join(missing)}")


def headers(release: str, kernel: str, debian_arch: str) -> Path:
    """KDIR of `linux-headers-KERNEL` (Debian `release`) inside that release's root.

    The root's own architecture (the host's) is installed with apt, which brings the kernel's
    compiler and linux-kbuild. Another architecture's headers are unpacked beside them; the root
    gets the host-architecture linux-kbuild they link to and the cross gcc their
    `.kernelvariables` names.
    """
    package = f"linux-headers-{kernel}"
    root = ensure(release)
    kdir = root / "usr" / "src" / package
    if (kdir / ".config").is_file() and (kdir / "Makefile").is_file():
        return kdir
    with locked(root / "var" / "rustko-headers"):
        if (kdir / ".config").is_file():
            return kdir
        if debian_arch == debian.host_arch():
            install(root, [package])
        else:
            _foreign_headers(root, release, package, debian_arch)
    if not (kdir / ".config").is_file():
        raise RustkoError(f"{package} did not give {kdir}/.config", "report this to rustko with the release")
    return kdir


def _foreign_headers(root: Path, release: str, package: str, debian_arch: str) -> None:
    target = next(a for a in arches.ALL if a.debian == debian_arch and a.name != "um")
    with tempfile.TemporaryDirectory(prefix="rustko-deb-") as download:
        deb = debian.download(package, debian_arch, Path(download), release)
        depends = debian.depends(deb)
        common = next((n for n in depends if re.fullmatch(r"linux-headers-.*-common", n)), None)
        kbuild = next((n for n in depends if n.startswith("linux-kbuild-")), None)
        if common is None or kbuild is None:
            raise RustkoError(f"{package} depends on no -common headers or linux-kbuild package",
                              "pass the --release of a Debian kernel flavour, e.g. 7.3.4+deb13-arm64")
        with tempfile.TemporaryDirectory(prefix="rustko-hdr-") as unpacked:
            debian.extract(deb, Path(unpacked))
            variables = (Path(unpacked) / "usr/src" / package / ".kernelvariables").read_text()
            gcc = re.search(r"\$\(CROSS_COMPILE\)(gcc-\d+)", variables)
            compiler = f"{gcc.group(1) if gcc else 'gcc'}-{target.cross_compile.rstrip('-')}"
            install(root, [kbuild, common, compiler])
            subprocess.run(["cp", "-a", f"{unpacked}/usr/.", f"{root}/usr/"], check=True)


def wrap(cmd: list[str], root: Path, binds: Sequence[Path]) -> list[str]:
    """`cmd` run inside `root`: in a private mount namespace with /proc, /dev and each of `binds`
    (bind-mounted at its own path) visible, then chroot. Paths in `cmd` under `root` are
    rewritten to the root's view."""
    inside = [("/" + os.path.relpath(a, root)) if a.startswith(f"{root}/") else a for a in cmd]
    inside = [a.replace(f"{root}/", "/") if "=" in a and f"{root}/" in a else a for a in inside]
    steps = [f"mount -t proc proc {shlex.quote(str(root / 'proc'))}",
             f"mount --rbind /dev {shlex.quote(str(root / 'dev'))}"]
    for path in binds:
        mountpoint = shlex.quote(f"{root}{path}")
        steps += [f"mkdir -p {mountpoint}", f"mount --bind {shlex.quote(str(path))} {mountpoint}"]
    script = " && ".join(steps) + f' && exec chroot {shlex.quote(str(root))} "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", *inside]


def kbuild_command(cmd: list[str], kdir: Path, build_dir: Path, also: Sequence[Path] = ()) -> list[str]:
    """The make command for `kdir`: unchanged on the host, wrapped when KDIR lies in a root, with
    the build folder and the folders of `also` (files Kbuild reads, e.g. KBUILD_EXTRA_SYMBOLS) visible."""
    root = owning(kdir)
    binds = list(dict.fromkeys([build_dir, *(path.parent for path in also)]))
    return cmd if root is None else wrap(cmd, root, binds)
