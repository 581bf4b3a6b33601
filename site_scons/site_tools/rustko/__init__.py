"""The rustko SCons tool as SCons finds it in a project's `site_scons/site_tools` (the classic layout).

SCons imports a site tool under its bare name, `rustko`, which is also the name of the library
the tool drives: imported as is, `from rustko.scons_tool import ...` would look inside this very
folder. So the library is loaded by path (the `rustko` folder beside `site_tools`, else the
installed package) and put back under its own name before its SCons glue is imported.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import SCons.Errors


def _glue() -> ModuleType:
    loaded = sys.modules.get("rustko.scons_tool")
    if loaded is not None:  # a second Environment: SCons has just shadowed the library again
        sys.modules["rustko"] = loaded.LIBRARY
        return loaded
    tools = Path(__file__).resolve().parent.parent
    sibling = tools.parent / "rustko" / "__init__.py"
    if sibling.is_file():
        spec = importlib.util.spec_from_file_location("rustko", sibling,
                                                      submodule_search_locations=[str(sibling.parent)])
    else:
        spec = importlib.machinery.PathFinder.find_spec(
            "rustko", [entry for entry in sys.path if entry and Path(entry).resolve() != tools])
    if spec is None or spec.loader is None:
        raise SCons.Errors.UserError(f"the rustko tool in {tools} found no rustko library: copy "
                                     "site_scons/rustko beside site_scons/site_tools, or pip install rustko")
    package = importlib.util.module_from_spec(spec)
    sys.modules["rustko"] = package
    spec.loader.exec_module(package)
    return importlib.import_module("rustko.scons_tool")


_tool = _glue()
exists, generate = _tool.exists, _tool.generate

__all__ = ["exists", "generate"]
