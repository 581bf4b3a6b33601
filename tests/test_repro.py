"""Reproducible builds on the host: the same sources, headers and toolchain give the same .ko
whatever the path, user, umask, locale, time zone, clock, host name, -j and sysroot build; the
build record is enough to rebuild; signatures are compared the way modules_sign leaves them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from conftest import SITE, copy_example, rustko, tool, world_readable_tmp

NOBODY = 65534


def build_hello(project: Path, kdir: Path, *, env: dict[str, str], umask: int, jobs: int,
                prefix: list[str] | None = None) -> Path:
    """`scons -jN KDIR=...` in `project` with exactly `env` (no inherited locale, TZ, cache)."""
    base = {"PATH": os.environ["PATH"], "PYTHONPATH": str(SITE)}  # nothing else inherited
    result = subprocess.run([*(prefix or []), tool("scons"), "-Q", f"-j{jobs}", f"KDIR={kdir}"], cwd=project,
                            env={**base, **env}, umask=umask, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return project / "build" / "hello.ko"


@pytest.fixture(scope="module")
def shared_tmp() -> Iterator[Path]:
    """A folder another user can enter (pytest's tmp_path is private to root)."""
    yield from world_readable_tmp("rustko-repro-")


@pytest.fixture(scope="module")
def root_build(shared_tmp: Path, kdir61: Path) -> Path:
    """hello as root: short path, umask 022, UTC, the C locale, one job, the machine's cache."""
    project = copy_example(shared_tmp / "a" / "hello")
    env = {"HOME": os.environ.get("HOME", "/root"), "TZ": "UTC", "LC_ALL": "C"}
    if "RUSTKO_CACHE" in os.environ:
        env["RUSTKO_CACHE"] = os.environ["RUSTKO_CACHE"]
    return build_hello(project, kdir61, env=env, umask=0o022, jobs=1)


def test_hello_is_the_same_bytes_for_another_user_path_and_machine_state(root_build: Path, shared_tmp: Path,
                                                                       kdir61: Path) -> None:
    """As `nobody`, with its own empty cache (so the sysroot is built again), a deep path, umask
    077, another time zone and locale, SOURCE_DATE_EPOCH, another host name and -j2."""
    other = shared_tmp / "somewhere" / "much deeper" / "x"
    other.mkdir(parents=True)
    project = copy_example(other / "hello")
    cache = shared_tmp / "nobody-cache"
    cache.mkdir()
    for path in [shared_tmp / "somewhere", *shared_tmp.joinpath("somewhere").rglob("*"), cache]:
        os.chown(path, NOBODY, NOBODY)
    env = {"HOME": str(cache), "RUSTKO_CACHE": str(cache), "RUSTKO_SYSTEM_CACHE": str(cache), "TZ": "Pacific/Chatham", "LC_ALL": "C.UTF-8",
           "LANG": "C.UTF-8", "SOURCE_DATE_EPOCH": "1234567890", "USER": "nobody",
           "PATH": "/usr/local/bin:/usr/bin:/bin"}
    # A new UTS namespace for the host name, then drop to nobody for the build itself.
    prefix = ["unshare", "--uts", "sh", "-c",
              'hostname rustko-elsewhere && exec setpriv --reuid=65534 --regid=65534 --clear-groups "$@"', "sh"]
    ko = build_hello(project, kdir61, env=env, umask=0o077, jobs=2, prefix=prefix)
    assert ko.stat().st_uid == NOBODY
    assert any(cache.glob("sysroot/*/lib")), "the sysroot was not rebuilt in the private cache"
    assert str(cache).encode() not in ko.read_bytes(), "a cache path reached the module"
    assert ko.read_bytes() == root_build.read_bytes()
    record = json.loads((ko.parent / "hello.ko.buildinfo").read_text())
    assert record == json.loads((root_build.parent / "hello.ko.buildinfo").read_text()), \
        "the record names nothing that differs between the two builds"


def test_record_names_what_a_rebuild_needs(root_build: Path, kdir61: Path) -> None:
    record = json.loads((root_build.parent / "hello.ko.buildinfo").read_text())
    assert record["module"]["sha256"] == hashlib.sha256(root_build.read_bytes()).hexdigest()
    assert set(record["sources"]) == {"Cargo.toml", "src/lib.rs", "src/log.rs"}
    assert record["rustc"]["version"] in record["rustc"]["verbose_version"]
    headers = kdir61.name.removeprefix("linux-headers-")
    for package in (f"linux-headers-{headers}", "rustc-web", "rust-web-src", "gcc-12", "make"):
        assert package in record["packages"], record["packages"]
    assert str(root_build.parent.parent) not in json.dumps(record), "the project's path leaked"


def test_rebuild_from_the_record_alone(root_build: Path, tmp_path: Path) -> None:
    """Another checkout of the same sources, the record, nothing else: the same bytes."""
    checkout = copy_example(tmp_path / "checkout")
    record = root_build.parent / "hello.ko.buildinfo"
    result = rustko("repro", "rebuild", str(record), "--source", str(checkout), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "byte for byte the recorded module" in result.stdout
    assert (tmp_path / "out" / "hello.ko").read_bytes() == root_build.read_bytes()
    assert not (checkout / "build").exists() and not (checkout / "rebuild").exists()

    log_rs = checkout / "src" / "log.rs"
    log_rs.write_text(log_rs.read_text() + "\n")
    changed = rustko("repro", "rebuild", str(record), "--source", str(checkout), "--out", str(tmp_path / "out2"))
    assert changed.returncode == 1
    assert "src/log.rs" in changed.stderr and "Traceback" not in changed.stderr
    assert not (tmp_path / "out2").exists()


def test_compare_ignores_appended_signatures_only(root_build: Path, tmp_path: Path, kdir61: Path) -> None:
    """A signed copy compares equal to the unsigned module (as modules_sign leaves it); one
    changed byte does not, and the section is named."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.der"
    subprocess.run(["openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
                    "-subj", "/CN=rustko repro/", "-keyout", str(key), "-out", str(cert), "-outform", "DER"],
                   check=True, capture_output=True)
    signed = tmp_path / "signed.ko"
    shutil.copyfile(root_build, signed)
    subprocess.run([str(kdir61 / "scripts" / "sign-file"), "sha256", str(key), str(cert), str(signed)], check=True)
    assert signed.read_bytes().endswith(b"~Module signature appended~\n")
    same = rustko("repro", "compare", str(signed), str(root_build))
    assert same.returncode == 0, same.stdout + same.stderr

    data = bytearray(root_build.read_bytes())
    at = data.index(b"hello from Rust")
    data[at] ^= 0x20
    edited = tmp_path / "edited.ko"
    edited.write_bytes(bytes(data))
    differs = rustko("repro", "compare", str(signed), str(edited))
    assert differs.returncode == 1
    assert "differ" in differs.stdout and "section .rodata" in differs.stdout, differs.stdout
    missing = rustko("repro", "compare", str(tmp_path / "nope.ko"), str(root_build))
    assert missing.returncode == 2 and "cannot read" in missing.stderr and "Traceback" not in missing.stderr
