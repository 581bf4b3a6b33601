"""Debian packages: find, download, unpack and query them, for any Debian release.

The host's own apt set-up is used as it is for the host's release. Other releases (bullseye,
trixie, sid, their -updates, -security and -backports suites) get a private apt configuration
in the cache: its own sources list, package lists and status file, selected with `APT_CONFIG`,
so the host's sources, lists and installed packages are never touched. Packages are only
downloaded (`apt-get download`) and unpacked (`dpkg-deb -x`), never installed into the host.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from .cache import locked, cache_root
from .errors import RustkoError

ARCHIVE = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

# Debian releases and the suites of each (dists/ names); `None` is the URI of the main archive.
# bullseye-backports has left deb.debian.org (archive.debian.org), so it is not listed.
RELEASES: dict[str, tuple[tuple[str, str], ...]] = {
    "bullseye": ((ARCHIVE, "bullseye"), (ARCHIVE, "bullseye-updates"), (SECURITY, "bullseye-security")),
    "bookworm": ((ARCHIVE, "bookworm"), (ARCHIVE, "bookworm-updates"), (ARCHIVE, "bookworm-backports"),
                 (SECURITY, "bookworm-security")),
    "trixie": ((ARCHIVE, "trixie"), (ARCHIVE, "trixie-updates"), (ARCHIVE, "trixie-backports"),
               (SECURITY, "trixie-security")),
    "sid": ((ARCHIVE, "sid"),),
}

# `+debNN` in a package version or kernel release names the release it was built for.
DEB_NUMBER: dict[str, str] = {"11": "bullseye", "12": "bookworm", "13": "trixie"}

# Architectures the private configurations know (rustko's Debian architectures).
ARCHITECTURES: tuple[str, ...] = ("amd64", "arm64")

# Package lists older than this are refreshed before a search that finds nothing.
LISTS_MAX_AGE = 24 * 3600

# Where a .deb may already sit (apt's own archive), so a fetch can reuse it.
DEB_DIRS: tuple[Path, ...] = (Path("/var/cache/apt/archives"),)


def _say(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


def host_release() -> str | None:
    """The Debian release this machine runs (`VERSION_CODENAME` of /etc/os-release)."""
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return None
    match = re.search(r"^VERSION_CODENAME=\"?(\w+)", text, re.M)
    return match.group(1) if match else None


def host_arch() -> str:
    out = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True)
    return out.stdout.strip() or "amd64"


def state_dir() -> Path:
    """Where other Debian releases live on this machine (their apt lists, their roots):
    machine-wide like /var/lib/apt, so every RUSTKO_CACHE (tests use throw-away ones) shares one
    copy, and outside any clone; `$RUSTKO_DEBIAN` moves it."""
    return Path(os.environ.get("RUSTKO_DEBIAN") or "/var/tmp/rustko-debian")


def _apt_dir(release: str) -> Path:
    return state_dir() / "apt" / release


def _private_config(release: str) -> Path:
    """Write (once) the private apt configuration of `release`; its path, for APT_CONFIG."""
    if release not in RELEASES:
        raise RustkoError(f"unknown Debian release '{release}'", f"use one of: {', '.join(RELEASES)}")
    base = _apt_dir(release)
    conf = base / "apt.conf"
    for sub in ("etc/apt.conf.d", "etc/preferences.d", "etc/sources.list.d", "lists/partial",
                "archives/partial", "dpkg"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "dpkg" / "status").touch()
    (base / "etc" / "sources.list").write_text("".join(
        f"deb [signed-by={KEYRING}] {uri} {suite} main\n" for uri, suite in RELEASES[release]))
    text = f'''Dir::Etc::Main "/dev/null";
Dir::Etc::Parts "{base}/etc/apt.conf.d";
Dir::Etc::SourceList "{base}/etc/sources.list";
Dir::Etc::SourceParts "{base}/etc/sources.list.d";
Dir::Etc::Preferences "/dev/null";
Dir::Etc::PreferencesParts "{base}/etc/preferences.d";
Dir::State "{base}";
Dir::State::Lists "{base}/lists";
Dir::State::status "{base}/dpkg/status";
Dir::Cache "{base}";
Dir::Cache::Archives "{base}/archives";
APT::Architecture "{host_arch()}";
APT::Architectures {{ {" ".join(f'"{a}";' for a in ARCHITECTURES)} }};
APT::Sandbox::User "root";
Acquire::Languages "none";
Acquire::Retries "3";
Acquire::Check-Valid-Until "false";
'''
    if not conf.is_file() or conf.read_text() != text:  # written once; again if the folder moved
        tmp = conf.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, conf)
    return conf


def _env(release: str | None) -> dict[str, str]:
    env = {**os.environ, "LC_ALL": "C"}
    if release is not None and release != host_release():
        env["APT_CONFIG"] = str(_private_config(release))
    return env


def apt(release: str | None, args: Sequence[str], hint: str = "", cwd: Path | None = None) -> str:
    """Run apt-get/apt-cache (`args[0]`) for `release` (None: the host's own set-up)."""
    try:
        proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, env=_env(release))
    except OSError as err:
        raise RustkoError(f"cannot run {args[0]}: {err.strerror}", "apt-get install apt") from None
    if proc.returncode != 0:
        detail = [line for line in proc.stderr.strip().splitlines() if not line.startswith("W: ")]
        where = f" (Debian {release})" if release else ""
        raise RustkoError(f"`{' '.join(args)}`{where} failed: {detail[-1] if detail else f'exit {proc.returncode}'}",
                          hint or "check the network and the package name")
    return proc.stdout


def update(release: str, force: bool = False) -> None:
    """Fetch the package lists of a private release once (and again when `force`d and stale)."""
    if release == host_release():
        return
    lists = _apt_dir(release) / "lists"
    stamp = _apt_dir(release) / "updated"
    with locked(_apt_dir(release)):
        fresh = stamp.is_file() and (not force or time.time() - stamp.stat().st_mtime < LISTS_MAX_AGE)
        if fresh and any(lists.glob("*Packages*")):
            return
        _say(f"apt-get update (private configuration for Debian {release}, once)")
        apt(release, ["apt-get", "update", "-q"], "check the network: deb.debian.org must be reachable")
        stamp.touch()


def has(package: str, arch: str, release: str | None) -> str | None:
    """The candidate version of `package:arch` in `release` (None: the host's apt), else None."""
    if release is not None:
        update(release)
    try:
        out = apt(release, ["apt-cache", "show", "--no-all-versions", f"{package}:{arch}"])
    except RustkoError:
        return None
    match = re.search(r"^Version: (\S+)", out, re.M)
    return match.group(1) if match else None


def find(packages: str | Sequence[str], arch: str, hint_release: str | None = None) -> tuple[str, str]:
    """(Debian release, package) for the first of `packages` some release's archive has for
    `arch`: the one `hint_release` names first, then the host's, then the others; stale lists
    are refreshed once before giving up."""
    names = [packages] if isinstance(packages, str) else list(packages)
    order = [r for r in dict.fromkeys([hint_release, host_release(), *RELEASES]) if r]
    unreachable: dict[str, str] = {}  # a release whose lists cannot be fetched is skipped, and named
    for force in (False, True):
        for release in order:
            if release in unreachable:
                continue
            try:
                if force and release != host_release():
                    update(release, force=True)
                for name in names:
                    if has(name, arch, None if release == host_release() else release):
                        return release, name
            except RustkoError as err:
                unreachable[release] = err.message
    skipped = "".join(f"; {release} skipped: {why}" for release, why in unreachable.items())
    raise RustkoError(f"no Debian release ({', '.join(order)}) has {' or '.join(f'{n}:{arch}' for n in names)}"
                      + skipped,
                      "check the name: `apt-cache search linux-headers` lists what the host's release has")


def release_hint(kernel: str) -> str | None:
    """The Debian release a kernel release names (`6.12.117+deb13-amd64`: trixie), if any."""
    plus = re.search(r"\+deb(\d+)", kernel)
    return DEB_NUMBER.get(plus.group(1)) if plus else None


def pkgnames(prefix: str, release: str | None = None) -> list[str]:
    """Package names starting with `prefix` in `release` (None: the host's apt)."""
    if release is not None:
        update(release)
    return apt(release, ["apt-cache", "pkgnames", prefix]).split()


def download(package: str, arch: str, dest: Path, release: str | None = None, hint: str = "",
             version: str | None = None) -> Path:
    """A .deb of `package:arch` (arch `all` for arch-independent packages; `version`, else the
    candidate): one already in the cache or apt's archive, else `apt-get download` into `dest`
    from `release`'s archive (None: the host's)."""
    pattern = f"{package}_{version.partition(':')[2] or version if version else '*'}_{arch}.deb"
    for folder in (cache_root() / "debs", *DEB_DIRS):
        found = sorted(folder.glob(pattern))
        if found:
            return found[-1]
    if release is not None:
        update(release)
    apt(release, ["apt-get", "download", f"{package}:{arch}" + (f"={version}" if version else "")], hint, cwd=dest)
    debs = sorted(dest.glob(pattern))
    if not debs:
        raise RustkoError(f"apt-get download {package}:{arch} produced no .deb", hint)
    return debs[-1]


def extract(deb: Path, dest: Path, members: Sequence[str] = ()) -> None:
    """Unpack a .deb into `dest`: all of it, or only `members` (tar wildcards, e.g. `./boot/*`)."""
    if not members:
        _run(["dpkg-deb", "-x", str(deb), str(dest)])
        return
    deb_proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    tar = subprocess.run(["tar", "-x", "-C", str(dest), "--wildcards", *members], stdin=deb_proc.stdout,
                         stderr=subprocess.PIPE)
    _, deb_err = deb_proc.communicate()
    if deb_proc.returncode != 0 or tar.returncode != 0:
        message = (deb_err or tar.stderr).decode(errors="replace").strip()
        raise RustkoError(f"cannot unpack {deb}: {message}")


def extract_file(deb: Path, member: str, out: Path) -> None:
    """One file of a .deb (e.g. `./usr/src/linux-source-6.1.tar.xz`) written to `out`."""
    with open(out, "wb") as sink:
        deb_proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        tar = subprocess.run(["tar", "-xO", member], stdin=deb_proc.stdout, stdout=sink, stderr=subprocess.PIPE)
        deb_proc.wait()
    if deb_proc.returncode != 0 or tar.returncode != 0:
        raise RustkoError(f"cannot unpack {member} from {deb}: {tar.stderr.decode(errors='replace').strip()}")


def field(deb: Path, name: str) -> str:
    """A control field of a .deb (`Depends`, `Version`, ...)."""
    return _run(["dpkg-deb", "-f", str(deb), name]).strip()


def depends(deb: Path) -> dict[str, str]:
    """The package's Depends: name -> required version ('' when unversioned)."""
    found: dict[str, str] = {}
    for item in field(deb, "Depends").split(","):
        match = re.match(r"\s*([^\s(:]+)(?::\w+)?(?:\s*\([<>=]+\s*([^)\s]+)\))?", item)
        if match:
            found[match.group(1)] = match.group(2) or ""
    return found


def installed(package: str, name: str = "Version") -> str | None:
    """A field (default: the version) of an installed host package, None when not installed."""
    try:
        proc = subprocess.run(["dpkg-query", "-W", f"-f=${{Status}}\t${{{name}}}", package],
                              capture_output=True, text=True)
    except OSError:
        raise RustkoError("dpkg-query is not available: this needs a Debian system") from None
    status, _, value = proc.stdout.partition("\t")
    if proc.returncode != 0 or not status.endswith(" installed") or status.startswith("deinstall"):
        return None
    return value.strip()


def version_ge(have: str, want: str) -> bool:
    """Debian version order (`dpkg --compare-versions`)."""
    return subprocess.run(["dpkg", "--compare-versions", have, "ge", want]).returncode == 0


def _run(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:
        raise RustkoError(f"cannot run {cmd[0]}: {err.strerror}", "apt-get install dpkg") from None
    if proc.returncode != 0:
        raise RustkoError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc.stdout
