"""What every build asks before it starts, kept between runs: a kept answer never outlives what it
was read from.

`rustc -vV` is kept per compiler binary (toolchain._version). These use the real rustc (Debian's
/usr/bin/rustc, whose driver is a shared library, so a copy of it runs from anywhere).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rustko import toolchain

REAL_RUSTC = Path("/usr/bin/rustc")


@pytest.fixture
def copied_rustc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the real rustc in a folder laid out as a sysroot (bin/, lib/rustlib), with its
    own empty cache."""
    if not REAL_RUSTC.is_file():
        pytest.skip("needs Debian's rustc-web (/usr/bin/rustc)")
    monkeypatch.setenv("RUSTKO_CACHE", str(tmp_path / "cache"))
    (tmp_path / "rust" / "lib" / "rustlib").mkdir(parents=True)
    (tmp_path / "rust" / "bin").mkdir()
    rustc = tmp_path / "rust" / "bin" / "rustc"
    shutil.copy2(REAL_RUSTC, rustc)
    return rustc


def _real_release() -> str:
    out = subprocess.run([str(REAL_RUSTC), "-vV"], capture_output=True, text=True, check=True).stdout
    return next(line.split()[1] for line in out.splitlines() if line.startswith("release:"))


def _tamper(cache: Path, release: str, fake: str) -> None:
    """Rewrite every kept answer, so that a test sees whether the cache or rustc answered."""
    for entry in (cache / "probe").iterdir():
        entry.write_text(entry.read_text().replace(f"release: {release}", f"release: {fake}"))


def test_rustc_answer_is_kept_until_the_binary_changes(copied_rustc: Path, tmp_path: Path) -> None:
    release = _real_release()
    sysroot, binary = toolchain._sysroot(copied_rustc)
    assert (sysroot, binary) == (tmp_path / "rust", copied_rustc)  # no process: the layout says it
    assert toolchain._version(copied_rustc, binary)[0] == release
    assert len(list((tmp_path / "cache" / "probe").iterdir())) == 1

    _tamper(tmp_path / "cache", release, "1.999.0")
    assert toolchain._version(copied_rustc, binary)[0] == "1.999.0"  # kept: rustc was not asked

    # Rewritten in place, same bytes, same size, mtime put back: the ctime still moved.
    stat = copied_rustc.stat()
    copied_rustc.write_bytes(copied_rustc.read_bytes())
    os.utime(copied_rustc, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert toolchain._version(copied_rustc, binary)[0] == release

    # Replaced as a package manager does (a new file renamed over it): asked again.
    _tamper(tmp_path / "cache", release, "1.999.0")
    shutil.copy2(REAL_RUSTC, copied_rustc.with_name("rustc.new"))
    os.replace(copied_rustc.with_name("rustc.new"), copied_rustc)
    assert toolchain._version(copied_rustc, binary)[0] == release


def test_wrapper_is_asked_for_its_sysroot_every_time(tmp_path: Path, copied_rustc: Path) -> None:
    """A rustc outside its sysroot (a wrapper, a rustup proxy) is asked where it runs from on
    every build (a proxy's answer follows the folder and the environment); the answer of the
    binary in that sysroot is kept, keyed on that binary."""
    wrapper = tmp_path / "wrap" / "rustc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {REAL_RUSTC} "$@"\n')
    wrapper.chmod(0o755)
    real_sysroot = Path(subprocess.run([str(REAL_RUSTC), "--print", "sysroot"], capture_output=True,
                                       text=True, check=True).stdout.strip())
    sysroot, binary = toolchain._sysroot(wrapper)
    assert (sysroot, binary) == (real_sysroot, real_sysroot / "bin" / "rustc")

    release = _real_release()
    assert toolchain._version(wrapper, binary)[0] == release
    _tamper(tmp_path / "cache", release, "1.999.0")
    assert toolchain._version(wrapper, binary)[0] == "1.999.0"

    wrapper.write_text("#!/bin/sh\nexit 1\n")  # names no sysroot now: no binary, nothing kept
    assert toolchain._sysroot(wrapper)[1] is None


def test_unknown_binary_is_always_asked(copied_rustc: Path, tmp_path: Path) -> None:
    """No binary known (a --print sysroot that named nothing usable): nothing is kept."""
    assert toolchain._version(copied_rustc, None)[0] == _real_release()
    assert not (tmp_path / "cache" / "probe").exists()
