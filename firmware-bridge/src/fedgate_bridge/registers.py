"""Register maps as pure functions: which reads to send, and what the answers mean.

No IO here. :func:`plan_reads` groups a source's tags into as few Modbus requests as the
protocol allows (one kind per request, contiguous addresses only, at most 125 registers or
2000 bits), and :func:`decode_block` turns one answer into engineering values.

Words are 16-bit registers as the device sends them; bytes inside a word are always
big-endian (the Modbus convention). ``word_order`` only says which word of a 32/64-bit value
comes first: ``big`` = high word first, ``little`` = low word first. Values are
``raw * scale + offset``; a value that is not finite (a float register holding NaN or
infinity, or an overflow after scaling) is refused with :class:`NonFiniteReading`, never
published.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import msgspec

from fedgate_bridge.errors import NonFiniteReading, RegisterDecodeError

if TYPE_CHECKING:
    from fedgate_bridge.config import ModbusRegister

__all__ = [
    "MAX_BITS_PER_READ",
    "MAX_REGISTERS_PER_READ",
    "REGISTER_WIDTHS",
    "BlockValues",
    "ReadBlock",
    "decode_block",
    "decode_raw",
    "encode_raw",
    "plan_reads",
    "register_count",
    "scaled_value",
]

#: Registers (16-bit words) one value of each type occupies.
REGISTER_WIDTHS: Final[dict[str, int]] = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "float64": 4,
    "bool": 1,
}
_FORMATS: Final[dict[str, str]] = {
    "int16": ">h",
    "uint16": ">H",
    "int32": ">i",
    "uint32": ">I",
    "float32": ">f",
    "float64": ">d",
}
#: Protocol limits of one read request (Modbus application protocol v1.1b3, §6.1-6.4).
MAX_REGISTERS_PER_READ: Final = 125
MAX_BITS_PER_READ: Final = 2000
_BIT_KINDS: Final = ("coil", "discrete")


def register_count(data_type: str) -> int:
    """Registers one value of ``data_type`` occupies (``bool`` and coils: 1)."""
    try:
        return REGISTER_WIDTHS[data_type]
    except KeyError:
        raise RegisterDecodeError(f"unknown register type {data_type!r}") from None


def _ordered(words: Sequence[int], word_order: str) -> list[int]:
    if word_order == "big":
        return list(words)
    if word_order == "little":
        return list(reversed(words))
    raise RegisterDecodeError(f"unknown word order {word_order!r}; use big or little")


def decode_raw(words: Sequence[int], *, data_type: str, word_order: str = "big") -> float:
    """The raw (unscaled) number held in ``words``; may be NaN or infinite for floats."""
    width = register_count(data_type)
    if len(words) != width:
        raise RegisterDecodeError(f"{data_type} needs {width} registers, got {len(words)}")
    if any(not 0 <= word <= 0xFFFF for word in words):
        raise RegisterDecodeError(f"register words must be 0..65535, got {list(words)}")
    if data_type == "bool":
        return 1.0 if words[0] else 0.0
    data = b"".join(word.to_bytes(2, "big") for word in _ordered(words, word_order))
    (value,) = struct.unpack(_FORMATS[data_type], data)
    return float(value)


def encode_raw(value: float, *, data_type: str, word_order: str = "big") -> list[int]:
    """The register words a device holds for ``value`` (the inverse of :func:`decode_raw`).

    Integers must be whole and in range; float32 rounds to the nearest float32.
    """
    register_count(data_type)
    if data_type == "bool":
        return [1 if value else 0]
    number: float | int = value
    if not data_type.startswith("float"):
        if not float(value).is_integer():
            raise RegisterDecodeError(f"{data_type} holds whole numbers, not {value!r}")
        number = int(value)
    try:
        data = struct.pack(_FORMATS[data_type], number)
    except (struct.error, OverflowError) as exc:
        raise RegisterDecodeError(f"{value!r} does not fit in {data_type}: {exc}") from None
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    return _ordered(words, word_order)


# The agent trains in float32: a value that float32 rounds to infinity (from 2**128 − 2**103
# on) would be stored only to make every window holding it unusable.
FLOAT32_OVERFLOW = 2.0**128 - 2.0**103


def publishable(value: float) -> bool:
    """Finite, and finite as float32 too."""
    return math.isfinite(value) and abs(value) < FLOAT32_OVERFLOW


def scaled_value(register: ModbusRegister, raw: float) -> float:
    """``raw * scale + offset`` for ``register``; refuses values that are not finite or lie
    beyond float32's range."""
    value = raw * register.scale + register.offset if math.isfinite(raw) else raw
    if not publishable(value):
        raise NonFiniteReading(
            f"tag {register.tag!r} decoded to {value!r}, which is not published",
            tag=register.tag,
            value=value,
        )
    return value


class ReadBlock(msgspec.Struct, frozen=True, kw_only=True):
    """One read request: ``count`` registers (or bits) of ``kind`` from ``address``."""

    kind: str  # holding | input | coil | discrete
    address: int
    count: int
    registers: tuple[ModbusRegister, ...]  # the tags answered by this read

    @property
    def reads_bits(self) -> bool:
        return self.kind in _BIT_KINDS


def _width(register: ModbusRegister) -> int:
    return 1 if register.kind in _BIT_KINDS else register_count(register.type)


def plan_reads(registers: Sequence[ModbusRegister]) -> list[ReadBlock]:
    """Group tags into the fewest reads: same kind, touching or overlapping addresses.

    Gaps are never bridged (reading an unmapped address can make a device answer with an
    "illegal data address" exception), and no value is split across two reads.
    """
    blocks: list[ReadBlock] = []
    for kind in ("holding", "input", "coil", "discrete"):
        limit = MAX_BITS_PER_READ if kind in _BIT_KINDS else MAX_REGISTERS_PER_READ
        members = sorted((r for r in registers if r.kind == kind), key=lambda r: r.address)
        start = end = -1
        group: list[ModbusRegister] = []
        for register in members:
            stop = register.address + _width(register)
            if group and register.address <= end and max(end, stop) - start <= limit:
                group.append(register)
                end = max(end, stop)
                continue
            if group:
                blocks.append(
                    ReadBlock(kind=kind, address=start, count=end - start, registers=tuple(group))
                )
            group, start, end = [register], register.address, stop
        if group:
            blocks.append(
                ReadBlock(kind=kind, address=start, count=end - start, registers=tuple(group))
            )
    return blocks


class BlockValues(msgspec.Struct, frozen=True):
    """What one read answered: values by tag, and the tags that were refused."""

    values: list[tuple[ModbusRegister, float]]
    refused: list[NonFiniteReading]


def decode_block(block: ReadBlock, answer: Sequence[int] | Sequence[bool]) -> BlockValues:
    """Decode every tag of ``block`` from the words (or bits) the device answered.

    Bit reads may return more bits than asked (padding to whole bytes). Raises
    :class:`RegisterDecodeError` if the answer is shorter than the request; a tag whose
    value is not finite is listed in ``refused`` and the others are still decoded.
    """
    if len(answer) < block.count:
        raise RegisterDecodeError(
            f"{block.kind} read at {block.address} asked for {block.count} and got {len(answer)}"
        )
    values: list[tuple[ModbusRegister, float]] = []
    refused: list[NonFiniteReading] = []
    for register in block.registers:
        first = register.address - block.address
        if block.reads_bits:
            raw = 1.0 if answer[first] else 0.0
        else:
            words = [int(word) for word in answer[first : first + _width(register)]]
            raw = decode_raw(words, data_type=register.type, word_order=register.word_order)
        try:
            values.append((register, scaled_value(register, raw)))
        except NonFiniteReading as exc:
            refused.append(exc)
    return BlockValues(values, refused)
