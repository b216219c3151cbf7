"""Register maps: decoding of every type and word order, scaling, refusals, read planning."""

from __future__ import annotations

import logging
import math
import struct

import pytest
from fedgate_bridge.config import ModbusRegister
from fedgate_bridge.counters import RefusalLog
from fedgate_bridge.errors import NonFiniteReading, RegisterDecodeError
from fedgate_bridge.registers import (
    FLOAT32_OVERFLOW,
    MAX_REGISTERS_PER_READ,
    ReadBlock,
    decode_block,
    decode_raw,
    encode_raw,
    plan_reads,
    scaled_value,
)
from hypothesis import given
from hypothesis import strategies as st

DECODE_TABLE = [
    # type, word order, words, value
    ("int16", "big", [0x0000], 0.0),
    ("int16", "big", [0x7FFF], 32767.0),
    ("int16", "big", [0xFFFF], -1.0),
    ("int16", "big", [0x8000], -32768.0),
    ("int16", "little", [0xFF85], -123.0),  # one word: order does not matter
    ("uint16", "big", [0xFFFF], 65535.0),
    ("uint16", "big", [0x8000], 32768.0),
    ("int32", "big", [0xFFFF, 0xFFFE], -2.0),
    ("int32", "little", [0xFFFE, 0xFFFF], -2.0),
    ("int32", "big", [0x8000, 0x0000], -2147483648.0),
    ("int32", "big", [0x0001, 0x0002], 65538.0),
    ("int32", "little", [0x0002, 0x0001], 65538.0),
    ("uint32", "big", [0x8000, 0x0001], 2147483649.0),  # high bit set stays positive
    ("uint32", "little", [0x0001, 0x8000], 2147483649.0),
    ("uint32", "big", [0xFFFF, 0xFFFF], 4294967295.0),
    ("float32", "big", [0x3FC0, 0x0000], 1.5),
    ("float32", "little", [0x0000, 0x3FC0], 1.5),
    ("float32", "big", [0xC2F6, 0xE979], struct.unpack(">f", bytes.fromhex("c2f6e979"))[0]),
    ("float64", "big", [0x3FF8, 0, 0, 0], 1.5),
    ("float64", "little", [0, 0, 0, 0x3FF8], 1.5),
    ("float64", "big", [0xC05E, 0xDD2F, 0x1A9F, 0xBE77], -123.456),
    ("bool", "big", [0], 0.0),
    ("bool", "big", [7], 1.0),
]


@pytest.mark.parametrize(("data_type", "order", "words", "expected"), DECODE_TABLE)
def test_decode_table(data_type: str, order: str, words: list[int], expected: float) -> None:
    assert decode_raw(words, data_type=data_type, word_order=order) == expected
    if data_type != "bool":
        assert encode_raw(expected, data_type=data_type, word_order=order) == words


def register(**fields: object) -> ModbusRegister:
    values: dict[str, object] = {"tag": "T", "address": 0}
    values.update(fields)
    return ModbusRegister(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data_type", "words", "scale", "offset", "expected"),
    [
        ("int16", [0xFF85], 0.1, 0.0, -12.3),  # -123 tenths
        ("int16", [0xFF85], 0.1, 5.0, -7.3),
        ("uint16", [1000], 0.01, -273.15, -263.15),
        ("int32", [0xFFFF, 0xFC18], 0.001, 0.0, -1.0),  # -1000 thousandths
        ("uint32", [0x8000, 0x0000], 2.0, 0.0, 4294967296.0),
        ("float32", [0x3FC0, 0x0000], -2.0, 1.0, -2.0),
        ("bool", [1], 10.0, 0.5, 10.5),
    ],
)
def test_scale_and_offset(
    data_type: str, words: list[int], scale: float, offset: float, expected: float
) -> None:
    reg = register(type=data_type, scale=scale, offset=offset, address=3)
    block = ReadBlock(kind="holding", address=3, count=len(words), registers=(reg,))
    decoded = decode_block(block, words)
    assert decoded.refused == []
    [(got_register, value)] = decoded.values
    assert got_register is reg
    assert value == pytest.approx(expected)


@pytest.mark.parametrize(
    ("data_type", "words", "scale"),
    [
        ("float32", [0x7FC0, 0x0000], 1.0),  # NaN
        ("float32", [0x7F80, 0x0000], 1.0),  # +inf
        ("float32", [0xFF80, 0x0000], 1.0),  # -inf
        ("float64", [0x7FF8, 0, 0, 0], 1.0),  # NaN
        ("float64", [0x7FF0, 0, 0, 0], 1.0),  # +inf
        ("float32", [0x7F7F, 0xFFFF], 1e300),  # finite register, infinite after scaling
    ],
)
def test_non_finite_values_are_refused(data_type: str, words: list[int], scale: float) -> None:
    bad = register(tag="BAD", type=data_type, scale=scale)
    good = register(tag="GOOD", type="uint16", address=len(words))
    block = ReadBlock(kind="holding", address=0, count=len(words) + 1, registers=(bad, good))
    decoded = decode_block(block, [*words, 42])
    assert [(r.tag, v) for r, v in decoded.values] == [("GOOD", 42.0)]
    [refusal] = decoded.refused
    assert isinstance(refusal, NonFiniteReading)
    assert refusal.tag == "BAD"
    assert not math.isfinite(refusal.value)
    with pytest.raises(NonFiniteReading):
        scaled_value(bad, math.nan)


def test_malformed_answers_raise() -> None:
    with pytest.raises(RegisterDecodeError, match="needs 2 registers"):
        decode_raw([1], data_type="float32")
    with pytest.raises(RegisterDecodeError, match=r"0\.\.65535"):
        decode_raw([70000], data_type="uint16")
    with pytest.raises(RegisterDecodeError, match="unknown register type"):
        decode_raw([1], data_type="int8")
    with pytest.raises(RegisterDecodeError, match="word order"):
        decode_raw([1, 2], data_type="int32", word_order="middle")
    block = ReadBlock(kind="holding", address=0, count=4, registers=(register(type="float64"),))
    with pytest.raises(RegisterDecodeError, match="asked for 4 and got 3"):
        decode_block(block, [0, 0, 0])
    with pytest.raises(RegisterDecodeError, match="does not fit"):
        encode_raw(70000, data_type="int16")
    with pytest.raises(RegisterDecodeError, match="whole numbers"):
        encode_raw(1.5, data_type="int32")


def test_bits_decode_from_coil_answers_with_padding() -> None:
    pump = register(tag="PUMP", kind="coil", type="bool", address=10)
    mid = register(tag="MID", kind="coil", type="bool", address=11)
    valve = register(tag="VALVE", kind="coil", type="bool", address=12, scale=5.0)
    [block] = plan_reads([valve, pump, mid])
    assert (block.kind, block.address, block.count, block.reads_bits) == ("coil", 10, 3, True)
    answer = [True, False, True, False, False, False, False, False]  # padded to a byte
    decoded = decode_block(block, answer)
    assert {r.tag: v for r, v in decoded.values} == {"PUMP": 1.0, "MID": 0.0, "VALVE": 5.0}


def test_plan_groups_contiguous_registers_only() -> None:
    regs = [
        register(tag="A", address=0, type="float32"),  # 0-1
        register(tag="B", address=2, type="int16"),  # 2 touches A
        register(tag="C", address=3, type="float64"),  # 3-6
        register(tag="D", address=10, type="uint16"),  # gap at 7-9: new read
        register(tag="E", address=10, type="int16"),  # same register, other type
        register(tag="F", address=0, kind="input", type="uint16"),  # other kind
        register(tag="G", address=1, kind="input", type="uint32"),
        register(tag="H", address=5, kind="coil", type="bool"),
        register(tag="I", address=6, kind="coil", type="bool"),
        register(tag="J", address=0, kind="discrete", type="bool"),
    ]
    blocks = plan_reads(regs)
    summary = [(b.kind, b.address, b.count, [r.tag for r in b.registers]) for b in blocks]
    assert summary == [
        ("holding", 0, 7, ["A", "B", "C"]),
        ("holding", 10, 1, ["D", "E"]),
        ("input", 0, 3, ["F", "G"]),
        ("coil", 5, 2, ["H", "I"]),
        ("discrete", 0, 1, ["J"]),
    ]
    values = decode_block(blocks[1], [0xFFFF])
    assert [(r.tag, v) for r, v in values.values] == [("D", 65535.0), ("E", -1.0)]


def test_plan_respects_the_125_register_limit_without_splitting_values() -> None:
    # 100 float32 values back to back: 200 registers, split at a value boundary.
    regs = [register(tag=f"T{i}", address=2 * i, type="float32") for i in range(100)]
    blocks = plan_reads(regs)
    assert [b.count for b in blocks] == [124, 76]
    assert all(b.count <= MAX_REGISTERS_PER_READ for b in blocks)
    assert sum(len(b.registers) for b in blocks) == 100
    assert blocks[1].address == 124
    # Exactly 125 single registers fit one read; the 126th starts another.
    singles = [register(tag=f"S{i}", address=i) for i in range(126)]
    assert [b.count for b in plan_reads(singles)] == [125, 1]


def test_plan_respects_the_2000_bit_limit() -> None:
    coils = [register(tag=f"C{i}", address=i, kind="coil", type="bool") for i in range(2001)]
    assert [b.count for b in plan_reads(coils)] == [2000, 1]


TYPES = st.sampled_from(["int16", "uint16", "int32", "uint32", "float32", "float64"])
ORDERS = st.sampled_from(["big", "little"])
INT_RANGES = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
}


@st.composite
def typed_values(draw: st.DrawFn) -> tuple[str, str, float]:
    data_type = draw(TYPES)
    order = draw(ORDERS)
    if data_type in INT_RANGES:
        low, high = INT_RANGES[data_type]
        return data_type, order, float(draw(st.integers(low, high)))
    if data_type == "float32":
        value = draw(st.floats(width=32, allow_nan=False, allow_infinity=False))
        return data_type, order, value
    # float64 registers: any value float32 can carry (larger ones are refused, tested above)
    limit = FLOAT32_OVERFLOW
    value = draw(st.floats(min_value=-limit, max_value=limit, exclude_min=True, exclude_max=True))
    return data_type, order, value


@given(typed_values())
def test_encode_decode_round_trip(case: tuple[str, str, float]) -> None:
    data_type, order, value = case
    words = encode_raw(value, data_type=data_type, word_order=order)
    assert all(0 <= w <= 0xFFFF for w in words)
    assert decode_raw(words, data_type=data_type, word_order=order) == value


@given(st.lists(typed_values(), min_size=1, max_size=20), st.integers(0, 1000))
def test_planned_reads_decode_every_tag(cases: list[tuple[str, str, float]], base: int) -> None:
    """Tags laid out back to back decode to their values through plan_reads + decode_block."""
    registers: list[ModbusRegister] = []
    memory: dict[int, int] = {}
    address = base
    for index, (data_type, order, value) in enumerate(cases):
        registers.append(
            register(tag=f"T{index}", address=address, type=data_type, word_order=order)
        )
        for offset, word in enumerate(encode_raw(value, data_type=data_type, word_order=order)):
            memory[address + offset] = word
        address += len(encode_raw(value, data_type=data_type, word_order=order))
    decoded: dict[str, float] = {}
    for block in plan_reads(registers):
        answer = [memory[block.address + i] for i in range(block.count)]
        result = decode_block(block, answer)
        assert result.refused == []
        decoded.update((r.tag, v) for r, v in result.values)
    assert decoded == {f"T{i}": value for i, (_, _, value) in enumerate(cases)}


@pytest.mark.parametrize(
    ("data_type", "words", "scale"),
    [
        ("float32", [0x7F7F, 0xFFFF], 1e10),  # 3.4e38 × 1e10: finite in Python, not float32
        ("int16", [0x8000], -1e300),  # -32768 × -1e300
        ("float64", [0x47F0, 0x0000, 0x0000, 0x0000], 1.0),  # 2**128: past float32's largest
    ],
)
def test_values_beyond_float32_are_refused(data_type: str, words: list[int], scale: float) -> None:
    """The agent trains in float32: such a value would be stored, then make every window
    holding it unusable. It is refused as non-finite here instead."""
    bad = register(tag="HUGE", type=data_type, scale=scale)
    block = ReadBlock(kind="holding", address=0, count=len(words), registers=(bad,))
    decoded = decode_block(block, words)
    assert decoded.values == []
    [refusal] = decoded.refused
    assert abs(refusal.value) >= FLOAT32_OVERFLOW  # float32 would round it to infinity


def test_refused_values_are_logged_per_tag_and_reason_not_per_reading(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    refusals = RefusalLog(
        logging.getLogger("test.refusals"), what="value refused", clock=lambda: now[0], source="s"
    )
    with caplog.at_level(logging.WARNING, logger="test.refusals"):
        logged = [refusals.refused("A", "non_finite", "nan") for _ in range(5)]
        logged.append(refusals.refused("B", "non_finite", "inf"))
        now[0] = 61.0
        logged.append(refusals.refused("A", "non_finite", "nan"))
    assert logged == [True, False, False, False, False, True, True]
    fields = [r.__dict__["fields"] for r in caplog.records]
    assert [(f["tag"], f["refused_since_last_line"]) for f in fields] == [
        ("A", 0),
        ("B", 0),
        ("A", 4),
    ]
    assert fields[0]["source"] == "s"
