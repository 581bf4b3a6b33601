"""Which sysroot crates a module's Rust files make rustko build (no rustc needed here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rustko import sysroot
from rustko.toolchain import Toolchain


@pytest.mark.parametrize(("text", "crates"), [
    ("#![no_std]\nuse core::fmt::Write;\n", ["core", "compiler_builtins"]),
    ("//! logs through the shim that rustko generates\n/* alloc-free */\n", ["core", "compiler_builtins"]),
    ("#[global_allocator]\nstatic A: MyAlloc = MyAlloc;\n", ["core", "compiler_builtins"]),
    ("extern crate alloc;\nuse alloc::vec::Vec;\n", ["core", "compiler_builtins", "alloc"]),
    ("use rustko::prelude::*;\n", ["core", "compiler_builtins", "rustko"]),
])
def test_uses_names_outside_comments(tmp_path: Path, text: str, crates: list[str]) -> None:
    source = tmp_path / "lib.rs"
    source.write_text(text)
    assert list(sysroot.uses([source])) == crates


def test_closure_adds_dependencies_in_build_order() -> None:
    assert sysroot._closure(["rustko"]) == ["core", "compiler_builtins", "alloc", "rustko"]
    assert sysroot._closure(sysroot.ALWAYS) == ["core", "compiler_builtins"]


def test_unreadable_file_builds_everything(tmp_path: Path) -> None:
    assert list(sysroot.uses([tmp_path / "missing.rs"])) == list(sysroot.CRATES)


@pytest.mark.parametrize(("flags", "options"), [
    (["-Copt-level=2", "-Cdebuginfo=2"], ["-Cdebuginfo=line-tables-only"]),
    (["-Cdebuginfo=2", "-Cdebuginfo=1"], ["-Cdebuginfo=line-tables-only"]),
    (["-Cdebuginfo=2", "-Cdebuginfo=0"], []),   # the last one wins, as in rustc
    (["-Copt-level=2"], []),                     # no DEBUG_INFO: the sysroot gets none either
])
def test_sysroot_debug_info_is_capped_at_line_tables(flags: list[str], options: list[str]) -> None:
    assert sysroot.tracked_options(flags) == options


def toolchain(tmp_path: Path, version: str) -> Toolchain:
    return Toolchain(rustc=Path("/usr/bin/rustc"), version=version, verbose_version=f"rustc {version}",
                     lib_src=tmp_path)


def test_threads_follow_the_cpus_but_not_the_cache_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sysroot prebuilt on a machine with more CPUs must serve this one: -Zthreads stays out
    of the key, while the debug info cap (it changes the rlib's bytes) is in it."""
    tools, flags = toolchain(tmp_path, "1.96.0"), ["--target", "x86_64-unknown-none", "-Cdebuginfo=2"]
    keys, commands = set(), []
    for cpus in (1, 8):
        monkeypatch.setattr(sysroot, "_cpus", lambda cpus=cpus: cpus)
        keys.add(sysroot.key(tools, flags))
        commands.append(sysroot.build_options(tools, flags))
    assert commands == [["-Cdebuginfo=line-tables-only", "-Zthreads=1"],
                        ["-Cdebuginfo=line-tables-only", "-Zthreads=8"]]
    assert len(keys) == 1
    old = sysroot.build_options(toolchain(tmp_path, "1.78.0"), flags)
    assert old == ["-Cdebuginfo=line-tables-only"], "1.78 may lack the parallel front end"
    monkeypatch.setattr(sysroot, "tracked_options", lambda flags: [])
    assert sysroot.key(tools, flags) not in keys
