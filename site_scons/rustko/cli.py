"""The `rustko` command: each subcommand lives in the module that owns its job."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Callable

from . import __version__
from .errors import RustkoError, internal_error

# Subcommand name -> "module:function" registering its parser; imported lazily so that
# `rustko check` never pays for the VM code and the other way round.
SUBCOMMANDS: dict[str, str] = {
    "check": "check:add_parser",
    "vmtest": "vm:add_parser",
    "kdir": "kdir:add_parser",
    "new": "new:add_parser",
    "doctor": "doctor:add_parser",
    "repro": "repro:add_parser",
    "dkms": "dkms:add_parser",
}


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="rustko",
        description="Build Linux kernel modules in Rust and prove them loadable.",
    )
    parser.add_argument("--version", action="version", version=f"rustko {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, target in SUBCOMMANDS.items():
        module_name, func = target.split(":")
        module = importlib.import_module(f"rustko.{module_name}")
        getattr(module, func)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # `rustko check ... | head` ends quietly, like any Unix tool.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except RustkoError as err:
        print(err, file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a bug is reported as a message, never a traceback
        print(internal_error(err), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
