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
from rustko.elf import Elf
from rustko.report import Finding
from rustko.vm import REFUSAL_PATTERNS

PACKAGES = dkmscorpus.CHOSEN

# A refusal caused only by a sibling whose init failed (no ThinkPad here, so thinkpad_ec's init
# returns -ENODEV and hdaps finds none of its exports): the loader itself would take the module
# wherever the sibling loads, which is what a static check can say.
AFTER_SIBLING = "after a sibling's init failed: "

# What the real kernels did (kernel_verdicts' boots, 2026-11-26) with each module of PACKAGES that
# did not simply load ("PACKAGE/MODULE"; every other one loaded): "init-failed" (the loader
# accepted it, its init returned an error: -ENODEV without the hardware, gost-test's self-test
# without the algorithms loaded, xt_DNETMAP without NF_NAT, lime without its path= parameter) or
# the loader's first line.
NOT_LOADED: dict[str, dict[str, str]] = {
    "6.1.0-56-amd64": {
        "bbswitch-dkms/bbswitch": "init-failed",
        "dahdi-dkms/dahdi_echocan_oslec": "dahdi_echocan_oslec: Unknown symbol oslec_create (err -2)",
        "gost-crypto-dkms/gost-test": "init-failed",
        "lime-forensics-dkms/lime": "init-failed",
        "tp-smapi-dkms/hdaps": AFTER_SIBLING + "hdaps: Unknown symbol thinkpad_ec_unlock (err -2)",
        "tp-smapi-dkms/thinkpad_ec": "init-failed",
        "tp-smapi-dkms/tp_smapi": AFTER_SIBLING + "tp_smapi: Unknown symbol thinkpad_ec_unlock (err -2)",
        "xtables-addons-dkms/xt_DNETMAP": "init-failed",
    },
    "6.12.117+deb12-amd64": {
        "bbswitch-dkms/bbswitch": "init-failed",
        "lime-forensics-dkms/lime": "init-failed",
    },
}


def verdicts(release: str, modules: dict[str, list[str]]) -> dict[str, dict[str, str]]:
    """The recorded verdict of each of `modules` ({package: [module]})."""
    said = NOT_LOADED[release]
    return {package: {m: said.get(f"{package}/{m}", "loaded") for m in names} for package, names in modules.items()}


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
    results = _check(folder, _kdir(release))
    said = verdicts(release, {package: list(results)})[package]
    for module, verdict in said.items():
        refusal = _refusal(results[module])
        if verdict in ("loaded", "init-failed") or verdict.startswith(AFTER_SIBLING):
            assert refusal is None, (module, results[module])
        else:
            assert refusal is not None, (module, verdict)
            assert refusal.kernel_regex().search(verdict), (module, refusal.kernel, verdict)


@pytest.mark.parametrize("release", PACKAGES)
def test_the_kernels_still_say_so(release: str, corpus) -> None:
    """One boot per kernel loads the whole corpus again: the recorded verdicts are the kernel's."""
    tool("qemu-system-x86_64")
    loads = dkmscorpus.kernel_verdicts(release, corpus[release])
    helpers = [(load.module, load.verdict) for load in loads if load.package == dkmscorpus.KERNEL]
    assert all(verdict == "loaded" for _, verdict in helpers), helpers  # else the guest, not the checker, is wrong
    seen = kernel_says(loads, corpus[release])
    assert seen == verdicts(release, {package: list(modules) for package, modules in seen.items()})
    built = {package: (corpus[release][package] / "order").read_text().split() for package in PACKAGES[release]}
    assert {package: list(modules) for package, modules in seen.items()} == built  # each one insmod-ed, in order


def kernel_says(loads: list[dkmscorpus.Load], folders: dict[str, Path]) -> dict[str, dict[str, str]]:
    """{package: {module: verdict}} as NOT_LOADED records it: "loaded", "init-failed", or the
    loader's first line (prefixed AFTER_SIBLING when every symbol it misses is a sibling's export
    and that sibling's init failed)."""
    failed = {(load.package, load.module) for load in loads if load.verdict == "init-failed"}
    seen: dict[str, dict[str, str]] = {}
    for load in loads:
        if load.package == dkmscorpus.KERNEL:
            continue
        verdict = load.verdict
        if verdict == "refused":
            lines = [line for line in load.kernel if any(p.search(line) for p in REFUSAL_PATTERNS)]
            verdict = lines[0] if lines else f"refused without a line: {load.insmod}"
            missing = {m.group(1) for line in lines for m in [re.search(r"Unknown symbol (\S+)", line)] if m}
            exporters = {module: _exports(folders[load.package] / f"{module}.ko")
                         for package, module in failed if package == load.package}
            if missing and all(any(s in names for names in exporters.values()) for s in missing):
                verdict = AFTER_SIBLING + verdict
        seen.setdefault(load.package, {})[load.module] = verdict
    return seen


def _exports(path: Path) -> set[str]:
    elf = Elf(path.read_bytes(), str(path))
    return set(elf.export_names(elf.symbols()))
