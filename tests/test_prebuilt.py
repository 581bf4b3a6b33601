"""A sysroot built ahead (`rustko sysroot`, as rustko's .deb postinst and container image run it)
serves a build whose own cache is empty: nothing compiled, the same bytes, a module the real
kernel loads."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import copy_example, rustko, scons
from rustko import cache, vm


def test_prebuilt_sysroot_serves_an_empty_cache(tmp_path: Path, kdir61: Path) -> None:
    machine = cache.cache_root()  # root's machine-wide cache, as the postinst fills it
    as_root = {"RUSTKO_CACHE": str(machine), "RUSTKO_SYSTEM_CACHE": str(machine)}
    done = rustko("sysroot", str(kdir61), env=as_root)
    assert done.returncode == 0, done.stdout + done.stderr
    (line,) = done.stdout.splitlines()
    assert line.startswith(f"sysroot for {kdir61.name.removeprefix('linux-headers-')} (x86_64): {machine}/sysroot/")
    entry = Path(line.split(": ", 1)[1].split(" (")[0])
    assert (entry / "complete").is_file() and (entry.stat().st_mode & 0o755) == 0o755
    libdir = next(entry.glob("lib/rustlib/*/lib"))
    assert sorted(p.name for p in libdir.iterdir()) == ["liballoc.rlib", "libcompiler_builtins.rlib", "libcore.rlib",
                                                       "librustko.rlib"]
    again = rustko("sysroot", str(kdir61), env=as_root)
    assert again.returncode == 0 and "(already there)" in again.stdout, again.stdout + again.stderr

    # A user's first build on that machine: an empty cache of its own, the prebuilt entry read only.
    user = tmp_path / "user-cache"
    project = copy_example(tmp_path / "hello")
    built = scons(project, f"KDIR={kdir61}", env={"RUSTKO_CACHE": str(user), "RUSTKO_SYSTEM_CACHE": str(machine)})
    assert built.returncode == 0, built.stdout + built.stderr
    assert "SYSROOT" not in built.stdout and not (user / "sysroot").exists()
    ko = project / "build" / "hello.ko"
    assert str(machine).encode() not in ko.read_bytes()

    # The same sources and crates, the entry in the user's own cache instead: the same bytes.
    own = tmp_path / "own-cache"
    (own / "sysroot").mkdir(parents=True)
    subprocess.run(["cp", "-al", str(entry), str(own / "sysroot" / entry.name)], check=True)
    other = copy_example(tmp_path / "other")
    same = scons(other, f"KDIR={kdir61}", env={"RUSTKO_CACHE": str(own)})
    assert same.returncode == 0, same.stdout + same.stderr
    assert (other / "build" / "hello.ko").read_bytes() == ko.read_bytes()

    booted = vm.vmtest(ko)
    assert booted.ok, booted.console[-3000:]
    assert any("hello from Rust" in line for line in booted.module_log), booted.module_log


def test_sysroot_command_refuses_no_kdir_and_unusable_headers(tmp_path: Path) -> None:
    missing = rustko("sysroot")
    assert missing.returncode == 2 and "--installed" in missing.stderr and "Traceback" not in missing.stderr
    broken = tmp_path / "headers"
    (broken / "include").mkdir(parents=True)
    refused = rustko("sysroot", str(broken))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr and str(broken) in refused.stderr
    assert not any(os.scandir(tmp_path / "headers" / "include"))
