"""Host names and addresses in settings: the brokers, devices and servers to connect to.

Checked when a configuration is read, so that a host that cannot be a connection's target
is reported with its setting there, not later as a traceback from the network stack. A
name must encode with the IDNA codec, which :func:`socket.getaddrinfo` applies to every
name it resolves: each label between dots needs 1 to 63 characters (``a..b`` fails, as
does a 64-character label). IP literals (``127.0.0.1``, ``::1``) and names (``localhost``,
``broker.example``) pass.
"""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["MAX_NAME_LENGTH", "host_problem", "url_host_problem"]

MAX_NAME_LENGTH = 253  # of a DNS name, without its trailing dot (RFC 1035)


def host_problem(host: str) -> str | None:
    """Why ``host`` cannot be the host of a connection, or None when it can.

    The reason is short (``"it has a port"``); callers name the setting before it.
    """
    if not host:
        return "it is empty"
    if any(c.isspace() for c in host) or "://" in host or "/" in host:
        return "it has a scheme, a path or spaces; give the host alone"
    if host.startswith("[") or host.endswith("]"):
        return "it is in brackets; give an IPv6 address without them"
    if host.count(":") == 1:  # host:port; IPv6 addresses have two or more colons
        return "it has a port; set the port in its own setting"
    if ":" not in host and len(host.rstrip(".")) > MAX_NAME_LENGTH:
        return f"it is longer than the {MAX_NAME_LENGTH} characters a DNS name may have"
    try:
        host.encode("idna")
    except UnicodeError as exc:
        reason = exc.__cause__ if exc.__cause__ is not None else exc
        return f"IDNA cannot encode it: {reason}; each label between dots needs 1 to 63 characters"
    if not host.isprintable():
        return "it has control characters"
    return None


def url_host_problem(url: str) -> str | None:
    """Why the host of ``url`` (``opc.tcp://host:port/path``) cannot be the host of a
    connection, or None when it can."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises ValueError for a port outside 0..65535 or not a number
    except ValueError as exc:  # an IPv6 address without its closing "]", a bad port
        return f"the URL does not parse: {exc}"
    return host_problem(host or "")
