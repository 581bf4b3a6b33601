"""rustko: build Linux kernel modules written in Rust, out of tree, and prove them loadable.

The library is usable without SCons; `rustko.scons_tool` is the thin SCons glue.
"""

__version__ = "0.1.0"
