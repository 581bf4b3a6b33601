"""What every build asks before it starts, kept between runs: a kept answer never outlives what it
was read from.

`rustc -vV` is kept per compiler binary (toolchain._version); those tests use the real rustc
(Debian's /usr/bin/rustc, whose driver is a shared library, so a copy of it runs from anywhere).
A KDIR's parsed .config (kernel.read_config) and Module.symvers (kernelview.read_symvers) are
kept per file version.
"""

from __future__ import annotations

import marshal
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rustko import kernel, toolchain
from rustko.kernelview import _parse_symvers, read_symvers

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


def _tamper_config(cache: Path, value: str) -> None:
    """Rewrite every kept .config, so that a test sees whether the cache or the file answered."""
    for entry in (cache / "config").iterdir():
        stamp, config = marshal.loads(entry.read_bytes())
        entry.write_bytes(marshal.dumps((stamp, {**config, "CONFIG_MODULES": value})))


def test_config_is_kept_until_the_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kernel.read_config keeps the parsed .config per file version (`rustko check --kdir` reads
    it on every run): an in-place rewrite with the mtime put back, or a file renamed over it, is
    read again."""
    monkeypatch.setenv("RUSTKO_CACHE", str(tmp_path / "cache"))
    dotconfig = tmp_path / ".config"
    dotconfig.write_text("# Linux/x86 6.1 Kernel Configuration\nCONFIG_MODULES=y\n# CONFIG_KASAN is not set\n"
                         "CONFIG_CC_VERSION_TEXT=\"gcc\"\n")
    expected = {"CONFIG_MODULES": "y", "CONFIG_CC_VERSION_TEXT": '"gcc"'}
    assert kernel.read_config(dotconfig) == expected
    assert len(list((tmp_path / "cache" / "config").iterdir())) == 1

    _tamper_config(tmp_path / "cache", "kept")
    assert kernel.read_config(dotconfig)["CONFIG_MODULES"] == "kept"  # the file was not parsed

    # Rewritten in place, same size, mtime put back: the ctime still moved (file times tick at
    # the kernel's coarse clock, a few ms: wait one tick so the rewrite gets a new one).
    stat = dotconfig.stat()
    time.sleep(0.05)
    dotconfig.write_text(dotconfig.read_text().replace("CONFIG_MODULES=y", "CONFIG_MODULES=m"))
    os.utime(dotconfig, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert dotconfig.stat().st_size == stat.st_size and dotconfig.stat().st_mtime_ns == stat.st_mtime_ns
    assert kernel.read_config(dotconfig)["CONFIG_MODULES"] == "m"

    # Replaced by a new file renamed over it (a headers package upgrade): read again.
    _tamper_config(tmp_path / "cache", "kept")
    (tmp_path / "new").write_text(dotconfig.read_text())
    os.replace(tmp_path / "new", dotconfig)
    assert kernel.read_config(dotconfig) == {**expected, "CONFIG_MODULES": "m"}


def test_symvers_is_kept_until_the_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kernelview.read_symvers keeps Module.symvers as sorted lines per file version: an in-place
    rewrite with the mtime put back is read again."""
    monkeypatch.setenv("RUSTKO_CACHE", str(tmp_path / "cache"))
    symvers = tmp_path / "Module.symvers"
    symvers.write_text("0x12345678\tprintk\tvmlinux\tEXPORT_SYMBOL\t\n"
                       "0x0badcafe\tkmalloc\tvmlinux\tEXPORT_SYMBOL_GPL\t\n")
    assert read_symvers(symvers)["printk"].crc == 0x12345678
    (entry,) = (tmp_path / "cache" / "symvers").iterdir()
    entry.write_bytes(entry.read_bytes().replace(b"printk\t12345678", b"printk\t87654321"))
    assert read_symvers(symvers)["printk"].crc == 0x87654321  # the file was not parsed

    stat = symvers.stat()
    time.sleep(0.05)  # one tick of the kernel's coarse file clock
    symvers.write_text(symvers.read_text().replace("0x12345678", "0x11111111"))
    os.utime(symvers, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert symvers.stat().st_size == stat.st_size and symvers.stat().st_mtime_ns == stat.st_mtime_ns
    assert read_symvers(symvers)["printk"].crc == 0x11111111
    assert read_symvers(symvers)["kmalloc"].gpl_only


def test_kept_symvers_answers_as_the_file(kdir61: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The kept Module.symvers of Debian's 6.1 headers, searched in its bytes from a sample of
    its lines (as parsed, and as read back from the cache after its stamp line), gives every
    export of the file, and nothing for names beside them (the first and last lines, names
    between two others, before the first and after the last)."""
    monkeypatch.setenv("RUSTKO_CACHE", str(tmp_path / "cache"))
    parsed = _parse_symvers(kdir61 / "Module.symvers")
    made = read_symvers(kdir61 / "Module.symvers")  # parsed and kept
    names = sorted(parsed)
    near = [n[:-1] for n in names[::211]] + [n + "_" for n in names[::223]] + ["", "~", "A"]
    for exports in (made, read_symvers(kdir61 / "Module.symvers")):  # the kept bytes
        assert exports.start == 0 if exports is made else exports.start > 0
        for name in names + near:
            assert exports.get(name) == parsed.get(name), name
            assert (name in exports) == (name in parsed)
        assert len(exports) == len(parsed) and list(exports) == names


def test_cache_lock_excludes_other_processes(tmp_path: Path) -> None:
    """cache.locked holds an exclusive lock beside its path for the `with` block alone: another
    process cannot take it meanwhile, and can right after (also after an exception)."""
    from rustko.cache import locked

    entry = tmp_path / "entry"
    probe = ("import fcntl, sys\nwith open(sys.argv[1], 'a') as f:\n"
             "    try:\n        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "    except BlockingIOError:\n        sys.exit(3)\n")

    def other_gets_it() -> bool:
        done = subprocess.run([sys.executable, "-c", probe, f"{entry}.lock"])
        assert done.returncode in (0, 3)
        return done.returncode == 0

    with locked(entry):
        assert not other_gets_it()
    assert other_gets_it()
    with pytest.raises(RuntimeError):
        with locked(entry):
            assert not other_gets_it()
            raise RuntimeError("inside")
    assert other_gets_it()


def test_store_replaces_whole_files_and_never_fails(tmp_path: Path) -> None:
    """cache.store publishes a complete new file: a reader that opened the old one still reads
    all of it (a rewrite in place would cut it short), and nothing else is left in the folder.
    A cache that cannot be written (its folder is a file) is not an error."""
    from rustko.cache import store

    entry = tmp_path / "kept" / "entry"
    store(entry, b"old " * 1000)
    with open(entry, "rb") as reader:
        store(entry, b"new")
        assert reader.read() == b"old " * 1000
    assert entry.read_bytes() == b"new"
    assert [p.name for p in entry.parent.iterdir()] == ["entry"]

    (tmp_path / "file").write_text("")
    store(tmp_path / "file" / "entry", b"x")  # NotADirectoryError, swallowed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "kept"]
