"""The Containerfile, built and run with podman: the same .ko in a container as on the host.

The base image comes from `container/base-image` (debootstrap + podman import, cached under
/var/tmp/rustko-images), the image from the repository's Containerfile with the host's own
header, rustc and library-source package versions, so that both sides have the same toolchain.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO, copy_example, tool, world_readable_tmp

CONF = REPO / "container" / "containers.conf"
IMAGE = "localhost/rustko-test:bookworm"
STORE = Path(os.environ.get("RUSTKO_IMAGES", "/var/tmp/rustko-images"))
USER = 1000   # a user id the image has never heard of


def podman(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "CONTAINERS_CONF": str(CONF)})


def host_version(package: str) -> str:
    found = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True)
    if found.returncode != 0:
        pytest.fail(f"{package} is not installed: run ./dev setup")
    return found.stdout


@pytest.fixture(scope="session")
def image(kdir61: Path) -> str:
    """The Containerfile's image for bookworm, with the host's exact rustc and headers packages."""
    for program in ("podman", "runc", "debootstrap"):
        if shutil.which(program) is None and not Path("/usr/sbin", program).exists():
            pytest.fail(f"{program} is not installed: run ./dev setup")
    base = subprocess.run([str(REPO / "container" / "base-image"), "bookworm"], capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "CONTAINERS_CONF": str(CONF)})
    assert base.returncode == 0, base.stderr
    headers = kdir61.name
    rust = " ".join(f"{p}={host_version(p)}" for p in ("rustc-web", "rust-web-src"))
    built = podman("build", "--network=host", "-t", IMAGE, "--build-arg", f"BASE={base.stdout.strip()}",
                   "--build-arg", f"HEADERS={headers}={host_version(headers)}", "--build-arg", f"RUST={rust}",
                   "-f", str(REPO / "Containerfile"), str(REPO), timeout=1800)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return IMAGE


@pytest.fixture(scope="session")
def shared() -> Iterator[Path]:
    """Folders the container's user can write, and a cache volume kept between runs."""
    yield from world_readable_tmp("rustko-container-")


@pytest.fixture(scope="session")
def cache_volume() -> Path:
    """The container's RUSTKO_CACHE (sysroots), kept under the image store between test runs."""
    volume = STORE / "cache-bookworm"
    volume.mkdir(parents=True, exist_ok=True)
    volume.chmod(0o1777)
    return volume


def run_in(image: str, cache: Path, mounts: list[str], workdir: str, kdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`scons KDIR=...` as user 1000 in a container with no network."""
    return podman("run", "--rm", "--network=none", f"--user={USER}:{USER}", "-v", f"{cache}:/var/cache/rustko",
                  *(arg for mount in mounts for arg in ("-v", mount)), "-w", workdir, *extra, image,
                  "scons", "-Q", f"KDIR={kdir}")


@pytest.fixture(scope="session")
def container_build(image: str, shared: Path, cache_volume: Path, kdir61: Path) -> Path:
    """hello from a read-only source mount into a separate build folder (RUSTKO_BUILD_DIR)."""
    source = copy_example(shared / "ro" / "hello")
    out = shared / "out"
    out.mkdir()
    os.chown(out, USER, USER)
    result = run_in(image, cache_volume, [f"{source}:/src:ro", f"{out}:/out"], "/src", kdir61,
                    "-e", "RUSTKO_BUILD_DIR=/out")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (source / "build").exists(), "the read-only source tree got a build folder"
    return out / "hello.ko"


@pytest.fixture(scope="session")
def container_bytes(container_build: Path) -> bytes:
    """The container build's module, read before a test cleans its build folder."""
    return container_build.read_bytes()


def test_container_build_equals_the_host_build(container_build: Path, container_bytes: bytes, tmp_path: Path,
                                               kdir61: Path) -> None:
    """Container: user 1000, /src read-only, UTF-8 locale, its own sysroot. Host: root, another
    path, umask 027, another time zone and locale, -j2, the host's cache."""
    assert container_build.stat().st_uid == USER, "the output belongs to the caller"
    project = copy_example(tmp_path / "on" / "the host" / "hello")
    result = subprocess.run([tool("scons"), "-Q", "-j2", f"KDIR={kdir61}"], cwd=project, umask=0o027,
                            env={**os.environ, "TZ": "America/St_Johns", "LC_ALL": "C", "LANG": "C"},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    host_record = json.loads((project / "build/hello.ko.buildinfo").read_text())
    record = json.loads(container_build.with_name("hello.ko.buildinfo").read_text())
    assert record["packages"] == host_record["packages"], "image and host have different toolchain packages"
    assert (project / "build/hello.ko").read_bytes() == container_bytes
    assert record == host_record


def test_two_container_builds_at_different_mount_points(container_bytes: bytes, image: str, shared: Path,
                                                        cache_volume: Path, kdir61: Path) -> None:
    """A read-write mount at another path, the default build folder, another umask: same bytes."""
    project = copy_example(shared / "rw" / "hello")
    for path in [project, *project.rglob("*")]:
        os.chown(path, USER, USER)
    result = run_in(image, cache_volume, [f"{project}:/home/builder/deep/mount/hello"],
                    "/home/builder/deep/mount/hello", kdir61, "--umask=0077", "-e", "TZ=Asia/Kathmandu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (project / "build/hello.ko").read_bytes() == container_bytes
    assert (project / "build/hello.ko").stat().st_uid == USER


def test_scons_clean_in_a_separate_build_folder_keeps_what_it_did_not_make(
        container_build: Path, image: str, shared: Path, cache_volume: Path, kdir61: Path) -> None:
    out = container_build.parent
    (out / "notes.txt").write_text("not rustko's\n")
    result = podman("run", "--rm", "--network=none", f"--user={USER}:{USER}", "-v",
                    f"{cache_volume}:/var/cache/rustko", "-v", f"{shared / 'ro' / 'hello'}:/src:ro",
                    "-v", f"{out}:/out", "-e", "RUSTKO_BUILD_DIR=/out", "-w", "/src", image,
                    "scons", "-Q", "-c", f"KDIR={kdir61}")
    assert result.returncode == 0, result.stdout + result.stderr
    # SCons's own database stays where it is kept (the build folder), as after any scons run.
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".sconsign")) == ["notes.txt"]


def test_image_starts_warm_with_the_sysroot_built_into_it(container_bytes: bytes, image: str, shared: Path,
                                                          kdir61: Path) -> None:
    """An empty cache volume (a CI job's first build): the image's prebuilt sysroot serves it, read
    only; no sysroot crate is compiled and the module is the same bytes."""
    empty = shared / "empty-cache"
    empty.mkdir()
    empty.chmod(0o1777)
    project = copy_example(shared / "warm" / "hello")
    for path in [project, *project.rglob("*")]:
        os.chown(path, USER, USER)
    result = run_in(image, empty, [f"{project}:/src"], "/src", kdir61)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SYSROOT" not in result.stdout and not (empty / "sysroot").exists(), result.stdout
    assert (project / "build/hello.ko").read_bytes() == container_bytes
