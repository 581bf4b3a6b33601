"""Which sysroot crates a module's Rust files make rustko build (no rustc needed here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rustko import sysroot


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
