"""One error type for everything the user can fix: what went wrong, and how to fix it."""

from __future__ import annotations


class RustkoError(Exception):
    """A problem with the user's input or machine, reported as a short paragraph, never a traceback.

    `exit_code` follows the contract: 2 for bad usage or unreadable input, 1 for a module the
    kernel would refuse.
    """

    def __init__(self, message: str, hint: str = "", exit_code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:
        text = f"error: {self.message}"
        if self.hint:
            text += f"\n  help: {self.hint}"
        return text


def internal_error(err: BaseException) -> str:
    """A bug in rustko, said as one paragraph; RUSTKO_DEBUG=1 shows the traceback instead."""
    import os
    import traceback

    if os.environ.get("RUSTKO_DEBUG"):
        return "".join(traceback.format_exception(err))
    return (f"error: internal error in rustko: {type(err).__name__}: {err}\n"
            "  help: this is a bug in rustko; rerun with RUSTKO_DEBUG=1 for the traceback and report it")
