"""What the three command lines (agent, coordinator, bridge) share from click: JSON output,
how a command fails (:func:`fail`), a top-level group whose usage errors are JSON too under
``--json``, and a check for identifiers given on the command line.

A command reports its own failures with :func:`fail` and the exit code its program
documents. What no command can report is a command line click refuses before it runs (an
unknown option, a missing argument, a bad value): :class:`JsonReportingGroup` does, so that a
script that ran ``… --json`` gets JSON on stdout either way.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import click
import msgspec

from fedgate_common.errors import InvalidIdentifier
from fedgate_common.identifiers import validate_identifier

__all__ = ["JsonReportingGroup", "echo_json", "fail", "identifier", "several"]

_WANTS_JSON = "fedgate.wants_json"


def echo_json(data: object) -> None:
    """``data`` (msgspec structs, dataclasses, paths, datetimes …) as indented JSON on stdout.

    JSON has no infinity or NaN (``json.dumps`` would write ``Infinity``, which strict
    parsers refuse): a number that is not finite, such as ε with no noise to bound it, is
    written as ``null``; the text output says ``inf``."""
    builtins = _finite(msgspec.to_builtins(data, enc_hook=str))
    click.echo(json.dumps(builtins, indent=2, default=str, allow_nan=False))


def _finite(value: Any) -> Any:
    """``value`` with every float that is not finite replaced by None, at any depth."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def fail(message: str, code: int, *, problems: Sequence[str] = (), **fields: object) -> NoReturn:
    """``error: <message>`` on stderr (then each of ``problems`` the message does not
    already say) and exit ``code``. A command run with ``--json`` also
    prints ``{**fields, "error", "exit_code"[, "problems"]}`` on stdout, so that a script
    reading its output gets JSON either way (``problems``: every problem found, as the caller
    gives them; ``fields``: what else the command's JSON carries, e.g. ``ok``)."""
    click.echo(f"error: {message}", err=True)
    for problem in problems:
        if problem not in message:  # a message that is only a heading: list what it heads
            click.echo(f"  - {problem}", err=True)
    context = click.get_current_context(silent=True)
    if context is not None and context.params.get("as_json"):
        report: dict[str, object] = {**fields, "error": message, "exit_code": int(code)}
        if problems:
            report["problems"] = list(problems)
        echo_json(report)
    sys.exit(int(code))


def several(problems: Sequence[str]) -> Sequence[str]:
    """``problems`` for :func:`fail` from an error that always carries a list: the list
    when it holds several, none when its one problem is the message itself."""
    return problems if len(problems) > 1 else ()


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
    echo_json({"error": exc.format_message(), "exit_code": exc.exit_code})


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
