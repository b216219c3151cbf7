"""Exceptions of the gateway data path (all under :class:`fedgate_agent.errors.AgentError`).

Tree::

    AgentError
     └── IngestError              root of every data-path failure
          ├── MalformedPayload    an MQTT payload does not decode; ``reason`` says why
          ├── BufferCorrupted     the buffer file failed its integrity check (it is quarantined)
          ├── BufferFull          the buffer is at its cap and the policy is reject_new
          ├── SourceError         an OPC-UA server or broker cannot be used as configured
          ├── ImportFailed        a historian export cannot be read or mapped
          ├── ColumnMappingInvalid  a historian column mapping is inconsistent (``problems``)
          └── WindowingError      the buffer cannot give windows for the configured tags/labels
"""

from __future__ import annotations

from pathlib import Path

from fedgate_agent.errors import AgentError

__all__ = [
    "BufferCorrupted",
    "BufferFull",
    "BufferPathForeign",
    "ColumnMappingInvalid",
    "ImportFailed",
    "IngestError",
    "MalformedPayload",
    "SourceError",
    "WindowingError",
]


class IngestError(AgentError):
    """Root of every exception of the gateway data path."""


class MalformedPayload(IngestError):
    """A payload is refused; ``reason`` is a short stable key used in counters
    (``not_json``, ``wrong_type``, ``not_finite``, ``too_large``, ``missing_key``,
    ``seq_out_of_range``, ...)."""

    kind = "malformed_payload"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class BufferPathForeign(IngestError):
    """The buffer's path names a file that is not (and never was) an agent's buffer: it is
    left untouched."""


class BufferCorrupted(IngestError):
    """The buffer file at ``path`` failed its integrity check."""

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(message)
        self.path = path


class BufferFull(IngestError):
    """The buffer holds ``max_samples`` and its policy refuses new samples."""


class SourceError(IngestError):
    """A source (``source`` names it) cannot be used as configured."""

    def __init__(self, message: str, *, source: str) -> None:
        super().__init__(message)
        self.source = source


class ImportFailed(IngestError):
    """A historian export cannot be read or mapped; ``path`` is the file."""

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(message)
        self.path = path


class WindowingError(IngestError):
    """The buffer cannot give training windows as configured (missing tags, too little data)."""


class ColumnMappingInvalid(IngestError):
    """A historian column mapping is inconsistent; ``problems`` lists what to fix."""

    def __init__(self, message: str, *, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = list(problems)


class MqttProtocolError(SourceError):
    """The broker refused us, or sent what an MQTT 5 subscriber must not accept: bytes the
    ``mqtt5`` codec cannot decode, a packet above the Maximum Packet Size we announced, a
    QoS 2 message, a topic alias, a packet a subscriber never receives. ``source`` is the
    broker's ``mqtt://host:port``; ``reason_code`` is the MQTT 5 reason code when there is
    one (CONNACK, SUBACK, DISCONNECT). The ingest drops the connection and reconnects."""

    def __init__(self, message: str, *, source: str, reason_code: int | None = None) -> None:
        super().__init__(message, source=source)
        self.reason_code = reason_code


__all__ += ["MqttProtocolError"]
