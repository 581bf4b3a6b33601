"""The command registry: every subcommand listed, and only the chosen one's module imported."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from rustko.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(sorted(name for name in sys.modules if name == "numpy" or name.startswith("rustko.")))
"""


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True)


def test_help_lists_every_command_without_importing_them() -> None:
    done = run("--help")
    for name in ("check", "vmtest", "kdir", "new", "doctor"):
        assert f"    {name}" in done.stdout
    loaded = done.stdout.strip().splitlines()[-1]
    assert "numpy" not in loaded and "rustko.check" not in loaded and "rustko.vm" not in loaded


def test_chosen_command_imports_its_module_only() -> None:
    done = run("new", "--list")
    assert "hello" in done.stdout
    loaded = done.stdout.strip().splitlines()[-1]
    assert "rustko.new" in loaded and "rustko.check" not in loaded and "numpy" not in loaded
    checked = run("check", "--help")
    assert "--kernel-version" in checked.stdout and "rustko.check" in checked.stdout.splitlines()[-1]


def test_unknown_command_is_a_usage_error() -> None:
    done = run("bogus")
    assert "invalid choice: 'bogus'" in done.stderr
