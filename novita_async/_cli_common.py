"""What every ``novita-async`` command shares: its exit codes, its one error, its lines for the user."""

from __future__ import annotations

import sys

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "UsageError", "in_cli_terms", "say",
           "signal_exit"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

#: The library's hints name Python parameters; on the command line they are flags.
_CLI_TERMS = {"pass api_key=...": "pass --api-key KEY", "pass auto_resize=True": "pass --auto-resize"}


class UsageError(Exception):
    """A problem with the command line or its inputs: exit 2 with this message."""


def in_cli_terms(message: str) -> str:
    """``message`` with the library's Python hints (``pass auto_resize=True``) as CLI flags."""
    for python, flag in _CLI_TERMS.items():
        message = message.replace(python, flag)
    return message


def say(message: str) -> None:
    """Write a line for the user on stderr, without breaking a progress bar."""
    message = in_cli_terms(message)
    try:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        sys.stderr.write(message + "\n")


def signal_exit(signum: int) -> int:
    """The shell's exit code for a process ended by ``signum``: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum
