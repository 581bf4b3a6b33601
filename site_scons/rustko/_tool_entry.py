"""What `SCons.Tool.rustko` resolves to in an installed rustko (see `rustko_scons_finder`)."""

from rustko.scons_tool import exists, generate

__all__ = ["exists", "generate"]
