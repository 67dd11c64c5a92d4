"""The errors nfgate reports to a person, and the exit codes they map to.

A user error never produces a traceback (DESIGN.md invariant 10): anything the
operator can fix is raised as one of these and printed as one line (or one
line per config problem) by the CLI.
"""

from __future__ import annotations

import os

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2


class NfgateError(Exception):
    """A failure the operator can act on; its message is the whole report."""

    exit_code = EXIT_RUNTIME


class UsageError(NfgateError):
    """Bad arguments or a bad config: exit code 2."""

    exit_code = EXIT_USAGE


class PrivilegeError(NfgateError):
    """The command needs root (or a capability) it does not have."""

    exit_code = EXIT_RUNTIME


class KernelError(NfgateError):
    """The kernel, or a tool that talks to it, refused something."""

    exit_code = EXIT_RUNTIME


def require_root(what: str) -> None:
    """Stop with one line when a command that changes the kernel runs unprivileged."""
    if os.geteuid() != 0:
        raise PrivilegeError(f"{what}: needs root (run it with sudo)")
