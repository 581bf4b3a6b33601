"""A run of many modules gives each the findings it gets alone.

`check_paths` checks modules in batches (`check._check_batch`), and `check._screen` clears the
RELA tables of a whole batch in one vectorised pass so that clean modules skip the per-module
numpy pass. The screen may only send a module to that pass needlessly, never spare it one
with a finding: every module here, real and broken, gets from a batch exactly what
`check_module` gives it with the numpy pass alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy  # noqa: F401 - the screen runs once numpy is imported (a big run)
import pytest

from rustko import check
from rustko.errors import RustkoError
from test_check import VARIANTS, _build_c
from test_check_paths import debian_sample, mutants  # noqa: F401 - a fixture

OPTIONS = ({}, {"arch": "um", "version": (6, 1)}, {"version": (4, 15)}, {"version": (6, 12)})


def alone(path: str, **kwargs: object) -> object:
    try:
        return [f.as_dict() for f in check.check_module(path, locate=False, **kwargs)]
    except RustkoError as err:
        return str(err)


def batched(paths: list[str], kdir: str | None = None, arch: str | None = None,
            version: tuple[int, ...] | None = None) -> list[object]:
    return [r if isinstance(r, str) else [f.as_dict() for f in r]
            for _, r in check._check_batch((paths, check.kernel_view(kdir) if kdir else None,
                                            arch, version))]


def agree(monkeypatch: pytest.MonkeyPatch, paths: list[str], kdir: str | None = None,
          **kwargs: object) -> int:
    """Batch and lone results are equal; returns how many modules the screen cleared."""
    cleared: list[bool] = []
    real = check._screen

    def spy(*args: object) -> list:
        said = real(*args)
        cleared.extend(s is not None for s in said)
        return said

    monkeypatch.setattr(check, "_pure_pass", lambda entries: False)
    monkeypatch.setattr(check, "_screen", spy)
    view = check.kernel_view(kdir) if kdir else None
    expected = [alone(p, kernel=view, **kwargs) for p in paths]
    assert batched(paths, kdir, **kwargs) == expected, kwargs
    monkeypatch.undo()
    return sum(cleared)


def test_batches_agree_on_debian_modules(monkeypatch, debian_sample, kdir61) -> None:
    paths = [str(p) for p in debian_sample]
    cleared = [agree(monkeypatch, paths, str(kdir61))]
    cleared += [agree(monkeypatch, paths, **kwargs) for kwargs in OPTIONS]
    # The comparison means something only if the screen cleared modules: it clears every one
    # for the kernels they were built for (under UML's and 4.15's loaders they are refused).
    assert cleared[0] == cleared[1] == cleared[-1] == len(paths), cleared


def test_batches_agree_on_broken_relocations(monkeypatch, debian_sample, tmp_path: Path) -> None:
    seeds = [_build_c(next(iter(VARIANTS))), debian_sample[0], debian_sample[len(debian_sample) // 2]]
    paths = []
    for n, ko in enumerate(seeds):
        for k, data in enumerate(mutants(ko.read_bytes(), n + 100)):
            paths.append(tmp_path / f"m{n}-{k}.ko")
            paths[-1].write_bytes(data)
    cleared = agree(monkeypatch, [str(p) for p in paths], version=(6, 1))
    assert cleared > 5, cleared


def test_batches_agree_on_the_c_variants(monkeypatch, kdir61) -> None:
    paths = [str(_build_c(variant)) for variant in VARIANTS]
    agree(monkeypatch, paths, str(kdir61))
    for kwargs in OPTIONS:
        agree(monkeypatch, paths, **kwargs)
