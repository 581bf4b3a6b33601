"""Differential: the real Debian 6.1 kernel (QEMU) refuses exactly what `rustko check` predicts,
with the line the checker said it would print."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import tool
from rustko import check
from rustko.kernel import KernelInfo, probe
from rustko.vm import vmtest
from test_check import _build_c, _edited


@pytest.fixture(scope="module")
def kernel(kdir61: Path) -> KernelInfo:
    tool("qemu-system-x86_64")  # fails with "run ./dev setup" when QEMU is missing
    return probe(kdir61)


def _verdicts(path, kernel):
    findings = check.check_module(path, kernel)
    return findings, vmtest(path, arch="x86_64")


def test_good_module_loads(kernel) -> None:
    findings, result = _verdicts(_build_c("good"), kernel)
    assert findings == [] and result.ok, result.failure or result.refusal


@pytest.mark.parametrize("variant", ["pic", "small", "missing", "vermagic"])
def test_refusal_matches_the_kernel(variant: str, kernel, tmp_path) -> None:
    if variant == "vermagic":
        path = _edited(_build_c("good"), tmp_path / "m.ko", b"mod_unload ", b"mod_unl0ad ")
    else:
        path = _build_c(variant)
    findings, result = _verdicts(path, kernel)
    assert findings and not result.loaded
    # The loader stops at the first stage that fails; its first finding's lines are in the log.
    first = [f for f in findings if f.stage == findings[0].stage]
    assert any(f.kernel_regex().search(result.console) for f in first), result.console[-2000:]
