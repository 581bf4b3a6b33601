"""Lets `Environment(tools=["rustko"])` work in any project once rustko is installed.

SCons looks for a tool in the project's site_scons, then as the module `SCons.Tool.<name>`.
The `rustko-scons.pth` file installed beside the package runs this at interpreter start-up:
a finder that answers only for `SCons.Tool.rustko` (it imports nothing, so it costs nothing).
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path


class RustkoToolFinder:
    NAME = "SCons.Tool.rustko"

    @classmethod
    def find_spec(cls, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        if fullname != cls.NAME:
            return None
        return importlib.util.spec_from_file_location(fullname, Path(__file__).with_name("_tool_entry.py"))


def install() -> None:
    if RustkoToolFinder not in sys.meta_path:
        sys.meta_path.append(RustkoToolFinder)
