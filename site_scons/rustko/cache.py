"""The machine-wide cache (sysroots, kernel images, initramfs), shared by every project and build.

Entries are built in a private temporary folder and published with one atomic `rename`, so
parallel builds never see a half-written entry and an interrupted build leaves none behind.
"""

from __future__ import annotations

import os
from _thread import get_ident  # threading's own, without importing threading at start-up
from collections.abc import Callable
from pathlib import Path

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:
    from typing import IO


# Root's builds (DKMS run from a kernel package's hook, `scons install`) share one machine-wide
# cache, as system programs keep theirs (FHS 3.0, 5.5 /var/cache), not one in a home directory.
SYSTEM_CACHE = Path("/var/cache/rustko")


def system_root() -> Path:
    """The machine-wide cache every user reads: root's (`rustko sysroot`, run by rustko's .deb and
    container image, fills it ahead of the first build). `$RUSTKO_SYSTEM_CACHE` moves it (tests,
    benches: a machine with or without a prebuilt one)."""
    return Path(os.environ.get("RUSTKO_SYSTEM_CACHE") or SYSTEM_CACHE)


def cache_root() -> Path:
    """`$RUSTKO_CACHE`, else `$XDG_CACHE_HOME/rustko`, else /var/cache/rustko for root, else
    `~/.cache/rustko`."""
    env = os.environ.get("RUSTKO_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "rustko"
    if os.geteuid() == 0:
        return SYSTEM_CACHE
    return Path(os.path.expanduser("~")) / ".cache" / "rustko"


def file_stamp(path: Path) -> str:
    """The version of a file, for keying what was read from it (a parsed .config, Module.symvers,
    rustc's `-vV` answer): its resolved path, device, inode, size, mtime and ctime. An edit moves
    the ctime even when it puts the mtime back, and a file renamed over it (a package upgrade)
    has a new inode. Raises OSError when the file cannot be examined."""
    info = path.stat()
    return (f"{path.resolve()}|{info.st_dev}|{info.st_ino}|{info.st_size}|{info.st_mtime_ns}|"
            f"{info.st_ctime_ns}")


def store(path: Path, data: bytes) -> None:
    """Write the cache file `path` whole or not at all: concurrent builds and DKMS runs share the
    cache, and a reader must never see half a file. The bytes go to a temporary file beside it,
    named for this process and thread (SCons runs -j jobs as threads), that one `os.replace`
    publishes. Errors are ignored: a cache that cannot be written only costs the next run speed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{get_ident()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)  # a full disk's partial file
        except OSError:
            pass


class locked:
    """`with locked(path):` an exclusive lock beside `path`, so two builds do not do the same slow
    work twice. A class, not a `contextlib.contextmanager`: `rustko check` imports this module
    and only reads the cache, and contextlib's import costs more than the class."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: IO[str] | None = None

    def __enter__(self) -> None:
        import fcntl  # here, not at the top: `rustko check` only reads the cache

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(f"{self.path}.lock", "a")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX)
        except BaseException:
            self.handle.close()
            raise

    def __exit__(self, *exc: object) -> None:
        import fcntl

        assert self.handle is not None
        try:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
        finally:
            self.handle.close()


def cached_dir(path: Path, fill: Callable[[Path], None]) -> Path:
    """Return `path`, creating it first with `fill(tmpdir)` if it does not exist yet.

    `fill` writes into an empty temporary folder beside `path`; only a complete result is
    renamed into place.
    """
    if path.is_dir():
        return path
    import shutil  # here, not at the top: `rustko check` only reads the cache
    import tempfile

    with locked(path):
        if path.is_dir():
            return path
        # Under the lock, a temporary folder for this entry can only be a killed build's leftover.
        for stale in path.parent.glob(f".{path.name}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            fill(tmp)
            os.rename(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path
