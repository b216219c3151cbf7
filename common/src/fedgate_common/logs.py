"""Structured logs: one ``key=value`` line per event (logfmt), or JSON lines.

Call sites pass fields with ``extra={"fields": {...}}`` or use :func:`log_event`.
Never pass secrets, key shares or raw updates as fields.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in ' ="' or not c.isprintable() for c in text):
        # Printable non-ASCII (ε, σ, names) stays as it is, so that grep finds it; quotes,
        # backslashes and control characters are escaped, so one event stays one line.
        quoted = json.dumps(text, ensure_ascii=False)
        return "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in quoted)
    return text


class LogfmtFormatter(logging.Formatter):
    def __init__(self, *, as_json: bool = False) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields.update(getattr(record, "fields", {}))
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        if self.as_json:
            return json.dumps(fields, default=str)
        return " ".join(f"{key}={_quote(value)}" for key, value in fields.items())


def configure_logging(level: str = "info", *, as_json: bool = False) -> None:
    """Send structured logs to stderr (journald picks them up under systemd)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(as_json=as_json))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def log_event(logger: logging.Logger, level: int, msg: str, **fields: object) -> None:
    logger.log(level, msg, extra={"fields": fields})
