"""What the three command lines (agent, coordinator, bridge) share from click: a top-level
group whose usage errors are JSON too under ``--json``, and a check for identifiers given
on the command line.

The commands report their own failures (each distribution's ``fail``); what they cannot
report is a command line click refuses before a command runs (an unknown option, a missing
argument, a bad value). Without this, a script that ran ``… --json`` got exit 2 and nothing
on stdout.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from fedgate_common.errors import InvalidIdentifier
from fedgate_common.identifiers import validate_identifier

__all__ = ["JsonReportingGroup", "identifier"]

_WANTS_JSON = "fedgate.wants_json"


class JsonReportingGroup(click.Group):
    """A click group that prints ``{"error", "exit_code"}`` on stdout when click refuses a
    command line that asks for ``--json`` (click's usage message still goes to stderr, and
    the exit code stays click's: 2 for a usage error)."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        wants_json = "--json" in args[: args.index("--")] if "--" in args else "--json" in args
        try:
            context = super().make_context(info_name, args, parent, **extra)
        except click.ClickException as exc:
            if wants_json:
                _report(exc)
            raise
        context.meta[_WANTS_JSON] = wants_json
        return context

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            # Only the top-level group reports: a nested one's error passes through it.
            if ctx.parent is None and ctx.meta.get(_WANTS_JSON):
                _report(exc)
            raise


def _report(exc: click.ClickException) -> None:
    document = {"error": exc.format_message(), "exit_code": exc.exit_code}
    click.echo(json.dumps(document, indent=2))


def identifier(what: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click ``callback`` that refuses a value that is not a fedgate identifier (agent,
    cloud, deployment ids) as a bad command line (exit 2), naming the rule; ``None`` (the
    option not given) passes."""

    def check(_context: click.Context, _parameter: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return validate_identifier(value, what=what)
        except InvalidIdentifier as exc:
            raise click.BadParameter(str(exc)) from None

    return check
