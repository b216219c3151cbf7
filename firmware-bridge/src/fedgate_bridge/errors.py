"""Exceptions of fedgate-bridge.

Tree::

    FedgateError                 root of every fedgate exception (fedgate_common.errors)
     └── BridgeError             root of every exception raised by the bridge
          ├── ConfigError        the bridge configuration is missing or invalid
          ├── RegisterDecodeError  registers read from a device do not decode as mapped
          │    └── NonFiniteReading  a value decoded or scaled to NaN or infinity
          ├── SourceUnavailable  a Modbus device or OPC-UA server cannot be reached
          ├── OutboxError        the on-disk outbox cannot be opened or written
          └── SimulatorError     the plant simulator cannot start or step

Messages say what to fix; details a caller may act on are attributes.
"""

from __future__ import annotations

from fedgate_common.errors import FedgateError

__all__ = [
    "BridgeError",
    "ConfigError",
    "NonFiniteReading",
    "OutboxError",
    "RegisterDecodeError",
    "SimulatorError",
    "SourceUnavailable",
]


class BridgeError(FedgateError):
    """Root of every exception raised by fedgate-bridge."""


class ConfigError(BridgeError):
    """The bridge configuration is missing or invalid; ``problems`` lists each one."""

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = [message] if problems is None else list(problems)


class RegisterDecodeError(BridgeError):
    """Registers do not decode as the register map says (count, type, non-finite value)."""


class SourceUnavailable(BridgeError):
    """A Modbus device or OPC-UA server cannot be reached; ``source`` names it."""

    def __init__(self, message: str, *, source: str) -> None:
        super().__init__(message)
        self.source = source


class BlockRefused(SourceUnavailable):
    """The device answered one read with a Modbus exception: the link works, but it will not
    give those registers (an address it does not have, or busy). The poll goes on without
    them."""


class OutboxError(BridgeError):
    """The on-disk outbox cannot be opened or written.

    ``transient`` is True for failures that can pass (locked by another process, disk
    full, I/O error): a running bridge retries those instead of stopping.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class SimulatorError(BridgeError):
    """The plant simulator cannot start or step."""


class NonFiniteReading(RegisterDecodeError):
    """A value decoded or scaled to NaN or infinity; it is counted and never published.

    ``tag`` names the tag, ``value`` is what it decoded to.
    """

    def __init__(self, message: str, *, tag: str, value: float) -> None:
        super().__init__(message)
        self.tag = tag
        self.value = value
