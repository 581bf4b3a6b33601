"""SCons finds this tool through the checkout's site_scons; the code lives in `rustko.scons_tool`."""

from rustko.scons_tool import exists, generate

__all__ = ["exists", "generate"]
