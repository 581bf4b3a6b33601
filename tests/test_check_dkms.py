"""No false refusal on real out-of-tree code: the modules of Debian 12's DKMS packages (main),
built by Debian's DKMS for 6.1 and 6.12 (tests/dkmscorpus.py), checked per package as a set
(`rustko check --kdir KDIR` over all of a package's .ko in one run, as one `M=` build is for
modpost), agree with what the real kernels did when the same files were loaded package by package
in modprobe's order (siblings first).

The kernels' verdicts are recorded below (taken from the boots of `kernel_verdicts`), and
`test_the_kernels_still_say_so` boots both kernels again with the whole corpus to re-see them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dkmscorpus
from conftest import KDIRS, require_kdir, tool
from rustko.report import Finding
from rustko.vm import REFUSAL_PATTERNS

# Debian 12's DKMS packages (main) that DKMS builds, a subset chosen for what a set check must get
# right and for a cold machine's time (measured 2026-11-26 on the 2-core machine kind under load
# 11: about 25 minutes for these, dahdi's 32 modules alone 10): modules that need a sibling's
# exports (dahdi, xtables-addons' compat_xtables, ddcci, tp-smapi's thinkpad_ec), a module that
# needs a symbol nothing exports (dahdi_echocan_oslec: `oslec_*` come from the staging `echo`
# driver, which Debian's 6.1 does not build), inits that fail without their device or feature.
# For 6.12 only those that still build there: bookworm's DKMS sources predate it and most fail to
# compile (dahdi, ddcci, gost-crypto, xtables-addons, tp-smapi, openvpn-dco, v4l2loopback, vpoll).
PACKAGES: dict[str, list[str]] = {
    "6.1.0-56-amd64": ["dahdi-dkms", "ddcci-dkms", "gost-crypto-dkms", "tp-smapi-dkms", "xtables-addons-dkms",
                       "v4l2loopback-dkms", "vpoll-dkms", "acpi-call-dkms"],
    "6.12.117+deb12-amd64": ["acpi-call-dkms"],
}

# What the real kernels did, module by module: "loaded", "init-failed" (the loader accepted it, its
# init returned an error, e.g. -ENODEV without the hardware) or the loader's first line.
VERDICTS: dict[str, dict[str, dict[str, str]]] = {}


@pytest.fixture(scope="module")
def corpus() -> dict[str, dict[str, Path]]:
    def log(line: str) -> None:
        print(line, file=sys.stderr)

    return {release: dkmscorpus.build(packages, (release,), log)[release] for release, packages in PACKAGES.items()}


def _kdir(release: str) -> Path:
    series = next(s for s, path in KDIRS.items() if path is not None and path.name.endswith(release))
    return require_kdir(series)


def _check(folder: Path, kdir: Path) -> dict[str, list[dict]]:
    """`rustko check --kdir KDIR --json` over every .ko of one package in one run."""
    done = subprocess.run([tool("rustko"), "check", "--kdir", str(kdir), "--json",
                           *sorted(str(p) for p in folder.glob("*.ko"))], capture_output=True, text=True)
    assert done.returncode in (0, 1), done.stderr
    return {Path(item["path"]).stem: item["findings"] for item in json.loads(done.stdout)["modules"]}


def _refusal(findings: list[dict]) -> Finding | None:
    """The checker's first error (the loader stops at it), if it says the module is refused."""
    errors = [Finding(**f) for f in findings if f["severity"] == "error"]
    return errors[0] if errors else None


@pytest.mark.parametrize("release, package", [(r, p) for r, packages in PACKAGES.items() for p in packages])
def test_checked_as_a_set_agrees_with_the_kernel(package: str, release: str, corpus) -> None:
    folder = corpus[release][package]
    assert (folder / "order").is_file(), (folder / "FAILED").read_text()[-3000:]
    said = VERDICTS[release][package]
    results = _check(folder, _kdir(release))
    assert sorted(results) == sorted(said)
    for module, verdict in said.items():
        refusal = _refusal(results[module])
        if verdict in ("loaded", "init-failed"):
            assert refusal is None, (module, results[module])
        else:
            assert refusal is not None, (module, verdict)
            assert refusal.kernel_regex().search(verdict), (module, refusal.kernel, verdict)


@pytest.mark.parametrize("release", PACKAGES)
def test_the_kernels_still_say_so(release: str, corpus) -> None:
    """One boot per kernel loads the whole corpus again: the recorded verdicts are the kernel's."""
    tool("qemu-system-x86_64")
    loads = dkmscorpus.kernel_verdicts(release, corpus[release])
    seen: dict[str, dict[str, str]] = {}
    for load in loads:
        seen.setdefault(load.package, {})[load.module] = _said(load)
    assert seen == VERDICTS[release]


def _said(load: dkmscorpus.Load) -> str:
    """A load's verdict as VERDICTS records it: a refusal by the loader's first line."""
    if load.verdict != "refused":
        return load.verdict
    lines = [line for line in load.kernel if any(p.search(line) for p in REFUSAL_PATTERNS)]
    return lines[0] if lines else f"refused without a line: {load.insmod}"
