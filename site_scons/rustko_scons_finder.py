"""Lets `Environment(tools=["rustko"])` work in any project once rustko is installed.

SCons looks for a tool in the project's site_scons, then as the module `SCons.Tool.<name>`.
The `rustko-scons.pth` file installed beside this module runs `install()` at interpreter start-up:
a finder that answers only for `SCons.Tool.rustko`. It is a top-level module on purpose:
importing the `rustko` package at start-up would pin the installed copy before PYTHONPATH or
pytest could put a working tree first.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at every start-up

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec


class RustkoToolFinder:
    NAME = "SCons.Tool.rustko"

    @classmethod
    def find_spec(cls, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        if fullname != cls.NAME:
            return None
        # Imported here: this module runs at every interpreter start-up (`rustko check` too).
        import importlib.util
        from pathlib import Path

        package = importlib.util.find_spec("rustko")
        if package is None or package.origin is None:
            return None
        return importlib.util.spec_from_file_location(fullname, Path(package.origin).with_name("_tool_entry.py"))


def install() -> None:
    if RustkoToolFinder not in sys.meta_path:
        sys.meta_path.append(RustkoToolFinder)
