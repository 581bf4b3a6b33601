"""The `rustko` command: a registry of subcommands, each living in the module that owns its job.

Like pip's command registry: the table below names each subcommand's module and summary, and only
the chosen subcommand's module is imported, so `rustko --help` and `rustko new` never pay for the
checker's numpy or the VM code.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import signal
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import RustkoError, internal_error
from .record import record


@record
class Command:
    module: str    # rustko.<module> defines add_parser(subparsers), which sets `run`
    summary: str   # one line for `rustko --help`


COMMANDS: dict[str, Command] = {
    "check": Command("check", "prove .ko files loadable by the target kernel"),
    "vmtest": Command("vm", "boot the module's kernel in QEMU, insmod and rmmod it, show its log"),
    "kdir": Command("kdir", "prepare a KDIR for another kernel release or architecture from Debian's packages"),
    "new": Command("new", "create a module project from a template"),
    "sysroot": Command("sysroot", "build the Rust sysroot for installed kernel headers ahead of the first build"),
    "doctor": Command("doctor", "show what rustko sees for a KDIR and what is missing"),
    "repro": Command("repro", "rebuild a module from its build record, compare two modules"),
    "dkms": Command("dkms", "write dkms.conf so Debian's DKMS rebuilds the module for every kernel"),
}


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, told the terminal's width: argparse would import `shutil` (and the
    bz2 and lzma modules it pulls in) at every `add_argument` to ask it, a few ms of every
    start-up."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         terminal_columns() - 2 if width is None else width)


def terminal_columns() -> int:
    """shutil.get_terminal_size().columns: $COLUMNS, else stdout's terminal, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", 0))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help is laid out by `HelpFormatter`, its subcommands' too (a
    subparser is made by its parent's class)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def chosen(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line: the first argument that is not an option."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand listed, or with `command`'s alone when one is chosen: only
    its module is imported to fill its options, and the others' stub parsers (a few ms each at
    start-up) would never be reached, as the first positional argument picks the subcommand."""
    parser = Parser(
        prog="rustko",
        description="Build Linux kernel modules in Rust and prove them loadable.",
    )
    parser.add_argument("--version", action="version", version=f"rustko {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    if command is not None:
        importlib.import_module(f"rustko.{COMMANDS[command].module}").add_parser(sub)
        return parser
    for name, entry in COMMANDS.items():
        sub.add_parser(name, help=entry.summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    # `rustko check ... | head` ends quietly, like any Unix tool.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(chosen(argv)).parse_args(argv)
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


# Allocations between two runs of the cyclic garbage collector's youngest generation (Python's
# default: 700). A run makes many objects and frees them by reference counting (a check's ELF
# columns and findings, the Module.symvers lines it looked up), so collecting rarely loses no
# memory and spares repeated walks over everything the imports made.
GC_THRESHOLD = 20_000


def entry() -> None:
    """The `rustko` command (pip's console script, the .deb's, `python -m rustko.cli`): `main`,
    then exit without the collector walking the run's objects once more (gc.freeze: Python
    frees them at exit anyway). Both spare about 5% of the instructions of `rustko check` over
    Debian's DKMS corpus (valgrind: 526 to 505 million)."""
    gc.set_threshold(GC_THRESHOLD)
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
