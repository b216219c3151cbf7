"""Help text shared by the command lines of every distribution (it works on any command
tree shaped like click's)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

__all__ = ["show_exit_codes"]


class HelpCommand(Protocol):
    help: str | None
    epilog: str | None


def show_exit_codes(group: HelpCommand, table: str) -> None:
    """Give every command under ``group`` that lists no exit codes of its own ``table`` as
    its epilog (a click ``Group``'s ``commands``, recursively)."""
    commands: Mapping[str, HelpCommand] = getattr(group, "commands", {})
    for command in commands.values():
        show_exit_codes(command, table)
        if command.epilog is None and "exit code" not in (command.help or "").lower():
            command.epilog = table
