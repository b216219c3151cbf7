"""Identifiers for deployments, clouds and agents: safe as single MQTT topic levels."""

from __future__ import annotations

import re

from fedgate_common.errors import InvalidIdentifier

_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def validate_identifier(value: str, *, what: str = "identifier") -> str:
    """Return ``value`` if it is 1-64 chars of ``A-Z a-z 0-9 _ . -`` starting alphanumeric.

    MQTT wildcards (``+``, ``#``), the level separator ``/`` and whitespace are refused, so an
    id can never widen a subscription or an ACL pattern.
    """
    if not isinstance(value, str) or _IDENTIFIER.fullmatch(value) is None:
        shown = value[:80] + "..." if isinstance(value, str) and len(value) > 80 else value
        raise InvalidIdentifier(
            f"invalid {what} {shown!r}: use 1-64 characters from A-Z a-z 0-9 _ . - "
            "starting with a letter or digit (no '/', '+', '#', spaces)"
        )
    return value
