"""The rustko SCons tool where Debian's scons finds it: /usr/share/scons/site_scons/site_tools/rustko.

Its code is the rustko library in python3's dist-packages. SCons 4.4 runs a site_tools package under
its bare name, `sys.modules["rustko"]` (SCons/Tool/__init__.py, `Tool._tool_module`), which is the
library's own name, with every site_tools folder first on sys.path: this file hands the name back to
the library and imports it with the folders that hold only a tool named rustko left out.
"""

import importlib
import os
import sys


def _tool_folder(entry: str) -> bool:
    """A site_tools folder whose `rustko` is a tool like this one, not the library."""
    folder = os.path.join(entry or os.curdir, "rustko")
    return os.path.isfile(os.path.join(folder, "__init__.py")) and not os.path.isfile(
        os.path.join(folder, "scons_tool.py"))


def _library():
    sys.modules.pop(__name__, None)
    saved = sys.path[:]
    sys.path[:] = [entry for entry in saved if not _tool_folder(entry)]
    try:
        importlib.import_module("rustko")
        return importlib.import_module("rustko.scons_tool")
    finally:
        sys.path[:] = saved


_scons_tool = _library()
generate = _scons_tool.generate
exists = _scons_tool.exists
