"""Shared fixtures: the real Debian headers and kernels the tests build for and boot.

Missing parts are an error, not a skip: `./dev setup` installs all of them, and a suite that
silently skips its real-kernel tests proves nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
SITE = REPO / "site_scons"
VENV_BIN = Path(sys.executable).parent

# Subprocesses (scons, rustko) import the working tree's library, like pytest itself does.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), os.environ.get("PYTHONPATH")]))
# A machine-wide prebuilt sysroot (`rustko sysroot` as root) would make the tests' empty caches warm:
# the tests that want one name it (test_prebuilt.py).
os.environ["RUSTKO_SYSTEM_CACHE"] = "/nonexistent/rustko-system-cache"


def _newest(pattern: str) -> Path | None:
    """The newest Debian amd64 headers of one series (flavours like -rt or -cloud left out)."""
    regex = re.compile(pattern)
    found = [p for p in Path("/usr/src").glob("linux-headers-*") if regex.fullmatch(p.name)]

    def version(path: Path) -> list[int]:
        return [int(n) for n in re.findall(r"\d+", path.name)]

    return max(found, key=version) if found else None


KDIRS: dict[str, Path | None] = {
    "6.1": _newest(r"linux-headers-6\.1\.\d+-\d+-amd64"),
    "6.12": _newest(r"linux-headers-6\.12\.\d+\+deb12-amd64"),
}


@pytest.fixture(scope="session", params=["6.1", "6.12"])
def kdir(request: pytest.FixtureRequest) -> Path:
    """Each amd64 headers series in turn."""
    return require_kdir(request.param)


@pytest.fixture(scope="session")
def kdir61() -> Path:
    return require_kdir("6.1")


def require_kdir(series: str) -> Path:
    path = KDIRS[series]
    if path is None:
        pytest.fail(f"no Debian {series} amd64 headers under /usr/src: run ./dev setup")
    return path


def tool(name: str) -> str:
    """A command from the test's own venv (scons, rustko), else from PATH."""
    path = VENV_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: run ./dev setup")
    return found


def copy_example(dest: Path, example: str = "hello") -> Path:
    """A copy of examples/<example> (without build output) at `dest`."""
    shutil.copytree(REPO / "examples" / example, dest,
                    ignore=shutil.ignore_patterns("build", ".sconsign*"))
    return dest


def scons(project: Path, *args: str, env: dict[str, str] | None = None,
          timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("scons"), "-Q", *args], cwd=project, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def rustko(*args: str, env: dict[str, str] | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rustko.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def release_kdir(release: str) -> Path:
    """`rustko kdir --release RELEASE`: a kernel of another Debian release is prepared in a root
    of that release, which takes root."""
    if os.geteuid() != 0:
        pytest.fail(f"{release}'s KDIR is prepared in a Debian root: run the tests as root")
    proc = rustko("kdir", "--release", release, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip())


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and mtime: equal snapshots mean nothing was written."""
    files: dict[str, tuple[int, int]] = {}
    for folder, dirs, names in os.walk(root):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            files[os.path.relpath(path, root)] = (info.st_size, info.st_mtime_ns)
    return files


def world_readable_tmp(prefix: str) -> Iterator[Path]:
    """A folder another user (or a container's user) can enter: pytest's tmp_path is private to
    root. Under /var/tmp, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
