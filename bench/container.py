"""A clean build of examples/hello in the rustko container vs the same build on the host, one run.

The image is tests/test_container.py's (localhost/rustko-test:bookworm; built here when missing),
and both caches are warmed first, so what is compared is the build itself plus the container's
start-up (goal: at most 1.3x). Median of several runs each.

    .venv/bin/python bench/container.py [--kdir DIR] [--image IMAGE] [--runs N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from table import note, row

REPO = Path(__file__).resolve().parent.parent
SCONS = str(Path(sys.executable).parent / "scons")
CONF = REPO / "container" / "containers.conf"
CACHE = Path(os.environ.get("RUSTKO_IMAGES", "/var/tmp/rustko-images")) / "cache-bookworm"
GOAL = 1.3


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, **env})
    return time.perf_counter() - start


def build_image(image: str, kdir: Path, env: dict[str, str]) -> None:
    """The image tests/test_container.py makes, when the tests have not made it yet."""
    base = subprocess.run([str(REPO / "container" / "base-image"), "bookworm"], check=True, capture_output=True,
                          text=True, env={**os.environ, **env}).stdout.strip()
    subprocess.run(["podman", "build", "--network=host", "-t", image, "--build-arg", f"BASE={base}",
                    "--build-arg", f"HEADERS={kdir.name}", str(REPO)], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, **env})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kdir", type=Path, default=None)
    parser.add_argument("--image", default="localhost/rustko-test:bookworm")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    kdir = args.kdir or max(Path("/usr/src").glob("linux-headers-6.1.*-amd64"), default=None)
    if kdir is None:
        sys.exit("no Debian 6.1 amd64 headers under /usr/src: run ./dev setup")
    podman_env = {"CONTAINERS_CONF": str(CONF)}
    if subprocess.run(["podman", "image", "exists", args.image], env={**os.environ, **podman_env}).returncode:
        build_image(args.image, kdir, podman_env)
    CACHE.mkdir(parents=True, exist_ok=True)
    CACHE.chmod(0o1777)
    with tempfile.TemporaryDirectory(prefix="rustko-bench-", dir="/var/tmp") as tmp:
        project = Path(tmp) / "hello"
        shutil.copytree(REPO / "examples/hello", project, ignore=shutil.ignore_patterns("build"))
        uid = f"{os.getuid()}:{os.getgid()}"
        host = [SCONS, "-Q", f"KDIR={kdir}"]
        container = ["podman", "run", "--rm", "--network=none", f"--user={uid}", "-v", f"{CACHE}:/var/cache/rustko",
                     "-v", f"{project}:/src", "-w", "/src", args.image, "scons", "-Q", f"KDIR={kdir}"]
        host_env = {"PYTHONPATH": str(REPO / "site_scons")}
        samples: dict[str, list[float]] = {"host": [], "container": []}
        for run in range(args.runs + 1):   # the first round warms both caches and is not counted
            for label, cmd, env in (("host", host, host_env), ("container", container, podman_env)):
                shutil.rmtree(project / "build", ignore_errors=True)
                took = timed(cmd, project, env)
                if run:
                    samples[label].append(took)
        note(f"bench/container.py: {args.image}, {args.runs} runs each, medians; reference: the host's build")
        row("clean build in the Containerfile's image (podman, warm cache volume) vs the host's",
            statistics.median(samples["container"]), statistics.median(samples["host"]), GOAL)


if __name__ == "__main__":
    main()
