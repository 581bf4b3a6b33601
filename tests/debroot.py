"""A debootstrapped Debian 12 root to install rustko's .deb into and run Debian's DKMS in (chroot).

The base root (`debootstrap --variant=minbase`, Debian's `dkms`, the 6.1 headers and the packages
rustko's .deb depends on; the headers a test installs later already downloaded) is made once and
kept under /var/tmp/rustko-roots, outside any clone, named by what it holds. Each test session
works on an overlay of it (the base stays untouched, the session's changes are small and go away
with it). Commands run through `unshare --mount`: their proc/sys/dev mounts live in a private
mount namespace and end with the command.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

ROOTS = Path(os.environ.get("RUSTKO_ROOTS", "/var/tmp/rustko-roots"))
MIRROR = "http://deb.debian.org/debian"
# The host's sources name bookworm's point releases and security suite (newer headers, rustc-web);
# a debootstrapped root names bookworm alone (FIELD-NOTES "Containers on this machine").
HOST_APT = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/apt.conf.d/99artifact-registry"))
# Debian's DKMS (openssl: it makes its signing key), one kernel's headers, what rustko's .deb
# depends on, and the 6.12 kernel image (its headers depend on it; installing an image builds an
# initramfs, slow, so once here): installed ahead, so each session's overlay holds only what the
# tests change.
BASE_PACKAGES = ("dkms", "openssl", "linux-headers-6.1.0-56-amd64", "scons", "python3-pyelftools",
                 "python3-numpy", "rustc-web", "rust-web-src", "libc6-dev", "linux-image-6.12.117+deb12-amd64")
# Fetched into the base root's apt archive, not installed: headers a test installs after `dkms add`.
LATER_PACKAGES = ("linux-headers-6.12.117+deb12-amd64",)
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
       "DEBIAN_FRONTEND": "noninteractive"}
# rustko's machine-wide cache (/var/cache/rustko for root) outlives each copy, as on a real machine.
CACHE = ROOTS / "rustko-cache"
MOUNT_AND_CHROOT = ('set -e; mount -t proc proc "$R/proc"; mount -t sysfs sys "$R/sys"; '
                    'mount --rbind /dev "$R/dev"; mkdir -p "$R/var/cache/rustko"; '
                    'mount --bind "$C" "$R/var/cache/rustko"; exec chroot "$R" "$@"')


def run(root: Path, *command: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """`command` inside `root` as root, with a kernel hook's minimal environment (no venv, no
    PYTHONPATH), stdout and stderr together."""
    CACHE.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", MOUNT_AND_CHROOT,
                           "sh", *command],
                          env={**ENV, "R": str(root), "C": str(CACHE)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


def must(root: Path, *command: str, timeout: float = 900) -> str:
    proc = run(root, *command, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed in {root} ({proc.returncode}):\n{proc.stdout[-4000:]}")
    return proc.stdout


def _mounted_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as handle:
        return [line.split()[4] for line in handle if (line.split()[4] + "/").startswith(prefix)]


def remove(path: Path) -> None:
    """Delete a root, never while anything is mounted inside it (that would reach the host's /dev)."""
    mounts = _mounted_under(path)
    if mounts:
        raise RuntimeError(f"not deleting {path}: still mounted inside it: {mounts}")
    shutil.rmtree(path)


def _make_base(tmp: Path) -> None:
    # debootstrap mounts /proc in the new root: in a mount namespace of its own, that mount cannot
    # outlive it even when it is killed.
    subprocess.run(["unshare", "--mount", "--propagation", "private", "debootstrap", "--variant=minbase", "bookworm", str(tmp), MIRROR],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=1800)
    for source in HOST_APT:
        if source.is_file():
            shutil.copy(source, tmp / str(source).lstrip("/"))
    (tmp / "etc/apt/sources.list").unlink(missing_ok=True)
    shutil.copy("/etc/resolv.conf", tmp / "etc/resolv.conf")
    # A throw-away root needs no fsync per unpacked file (Debian's own image builders do the same).
    (tmp / "etc/dpkg/dpkg.cfg.d/unsafe-io").write_text("force-unsafe-io\n")
    must(tmp, "apt-get", "update", "-q")
    must(tmp, "apt-get", "install", "-y", "-q", "--no-install-recommends", *BASE_PACKAGES, timeout=1800)
    # No initramfs is ever booted from this root: DKMS's `update-initramfs -u` after each install
    # becomes a no-op (initramfs-tools' update-initramfs.conf).
    conf = tmp / "etc/initramfs-tools/update-initramfs.conf"
    conf.write_text(conf.read_text().replace("update_initramfs=yes", "update_initramfs=no"))
    must(tmp, "apt-get", "install", "-y", "-q", "--no-install-recommends", "--download-only", *LATER_PACKAGES,
         timeout=1800)


def base_root() -> Path:
    """The cached base root, made on first use (about five minutes, network to Debian's archive)."""
    digest = hashlib.sha256(" ".join(BASE_PACKAGES + LATER_PACKAGES).encode()).hexdigest()[:10]
    base = ROOTS / f"bookworm-dkms-{digest}"
    if (base / ".complete").is_file():
        return base
    ROOTS.mkdir(parents=True, exist_ok=True)
    tmp = ROOTS / f"{base.name}.tmp"
    if tmp.exists():
        remove(tmp)
    _make_base(tmp)
    (tmp / ".complete").touch()
    os.rename(tmp, base)
    return base


def overlay_root(name: str) -> Path:
    """A writable root for one session: an overlay mount whose lower layer is the base root.
    `close_root` unmounts it; a session killed before that leaves a mount the next one removes."""
    base = base_root()
    folder = ROOTS / name
    close_root(folder / "root")
    for part in ("upper", "work", "root"):
        (folder / part).mkdir(parents=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={base},upperdir={folder / 'upper'},workdir={folder / 'work'}", str(folder / "root")],
                   check=True)
    return folder / "root"


def close_root(merged: Path) -> None:
    """Unmount a session's overlay and delete its changes."""
    if merged.is_dir() and str(merged.resolve()) in [line.split()[4] for line in open("/proc/self/mountinfo")]:
        subprocess.run(["umount", str(merged)], check=True)
    if merged.parent.exists() and merged.parent != ROOTS:
        remove(merged.parent)


if __name__ == "__main__":
    print(base_root())
