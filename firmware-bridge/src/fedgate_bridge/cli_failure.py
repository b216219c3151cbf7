"""How every ``fedgate-bridge`` command fails: one line on stderr and a documented exit code;
a command run with ``--json`` also prints ``{"error", "exit_code"[, "problems"]}`` on
stdout, so that a script reading its output gets JSON either way."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import NoReturn

import click

__all__ = ["fail"]


def fail(message: str, code: int, *, problems: Sequence[str] = (), **fields: object) -> NoReturn:
    """Exit ``code`` after saying why; ``fields`` are added to the JSON (``check`` adds its
    ``ok`` and ``config``)."""
    click.echo(f"error: {message}", err=True)
    context = click.get_current_context(silent=True)
    if context is not None and context.params.get("as_json"):
        report: dict[str, object] = {**fields, "error": message, "exit_code": int(code)}
        if problems:
            report["problems"] = list(problems)
        click.echo(json.dumps(report, indent=2))
    sys.exit(int(code))
