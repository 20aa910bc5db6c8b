"""The console script works in a real subprocess: --help, --version and every command's help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from radflash import __version__
from radflash.cli import COMMANDS, LazyGroup


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "radflash", *args], capture_output=True, text=True, timeout=120)


def test_root_help_and_version() -> None:
    out = _run("--help")
    assert out.returncode == 0, out.stderr
    for name in LazyGroup().list_commands(None):
        assert name in out.stdout
    version = _run("--version")
    assert version.returncode == 0 and __version__ in version.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_help(command: str) -> None:
    assert LazyGroup._available(command), f"{command} is registered but its module is missing"
    out = _run(command, "--help")
    assert out.returncode == 0, out.stderr
    assert "Usage: radflash " + command in out.stdout


def test_unknown_command_is_a_usage_error_without_traceback() -> None:
    out = _run("frobnicate")
    assert out.returncode == 2 and "No such command" in out.stderr and "Traceback" not in out.stderr
