"""Wire arrays: round trips, little-endian on the wire, limits checked before allocating."""

from __future__ import annotations

import tracemalloc

import msgspec
import numpy as np
import numpy.typing as npt
import pytest
from fedgate_common.arrays import (
    WIRE_DTYPES,
    WireArray,
    check_shapes,
    declared_elements,
    decode_array,
    decode_arrays,
    encode_array,
    encode_arrays,
)
from fedgate_common.errors import LimitExceeded, MalformedMessage, NonFiniteValues, ProtocolError
from fedgate_common.limits import DEFAULT_LIMITS, Limits
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

SHAPES = [(), (0,), (1,), (5,), (2, 3), (0, 4), (3, 0), (2, 0, 3), (1, 2, 1, 2, 1, 2)]


def _sample(dtype: str, shape: tuple[int, ...]) -> npt.NDArray[np.generic]:
    count = int(np.prod(shape))
    values = np.arange(count, dtype=np.float64).reshape(shape) * 3 + 1
    if dtype.startswith("<f"):
        values = values / 7 - 0.5
    return values.astype(np.dtype(dtype))


def _through_msgpack(item: WireArray) -> WireArray:
    return msgspec.msgpack.decode(msgspec.msgpack.encode(item), type=WireArray)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
def test_round_trip_every_dtype_and_shape(dtype: str, shape: tuple[int, ...]) -> None:
    original = _sample(dtype, shape)
    wire = _through_msgpack(encode_array("w", original))
    assert wire.dtype == dtype
    assert wire.shape == shape
    assert len(wire.data) == original.size * original.itemsize
    back = decode_array(wire)
    assert back.dtype == np.dtype(dtype)
    assert back.shape == shape
    np.testing.assert_array_equal(back, original)


@given(
    hnp.arrays(
        dtype=st.sampled_from(sorted(WIRE_DTYPES)).map(np.dtype),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4),
        elements={"allow_nan": False, "allow_infinity": False},
    )
)
def test_round_trip_property(original: npt.NDArray[np.generic]) -> None:
    back = decode_arrays(_through_msgpack_all(encode_arrays({"x": original, "y": original.T})))
    assert list(back) == ["x", "y"]
    for name, expected in (("x", original), ("y", original.T)):
        assert back[name].dtype == original.dtype
        np.testing.assert_array_equal(back[name], expected)


def _through_msgpack_all(items: tuple[WireArray, ...]) -> tuple[WireArray, ...]:
    return tuple(_through_msgpack(item) for item in items)


@pytest.mark.parametrize(
    ("big", "little"), [(">f4", "<f4"), (">f8", "<f8"), (">u2", "<u2"), (">i8", "<i8")]
)
def test_big_endian_input_travels_little_endian(big: str, little: str) -> None:
    values = [1, 2, 300, 4000]
    wire = encode_array("w", np.array(values, dtype=big))
    assert wire.dtype == little
    assert wire.data == np.array(values, dtype=little).tobytes()
    back = decode_array(wire)
    assert back.dtype.str == little
    np.testing.assert_array_equal(back, np.array(values, dtype=little))


def test_non_contiguous_input_is_encoded_in_c_order() -> None:
    base = np.arange(12, dtype="<i4").reshape(3, 4)
    view = base.T[::2]  # shape (2, 3), neither C- nor F-contiguous
    wire = encode_array("v", view)
    assert wire.shape == (2, 3)
    assert wire.data == np.ascontiguousarray(view).tobytes()
    np.testing.assert_array_equal(decode_array(wire), view)


@pytest.mark.parametrize("dtype", ["<c16", "|b1", "|i1", "|u1", "<f2", "<M8[s]"])
def test_encode_refuses_dtypes_that_cannot_travel(dtype: str) -> None:
    with pytest.raises(MalformedMessage, match="cannot travel"):
        encode_array("w", np.zeros(2, dtype=dtype))


def test_encode_refuses_object_arrays() -> None:
    with pytest.raises(MalformedMessage):
        encode_array("w", np.array([object(), 1], dtype=object))


def test_decoded_array_owns_its_memory() -> None:
    data = bytearray(np.arange(4, dtype="<f4").tobytes())
    back = decode_array(WireArray("w", "<f4", (4,), bytes(data)))
    assert back.flags.owndata
    assert back.flags.writeable
    back[0] = 42.0  # would raise on a read-only frombuffer view


@pytest.mark.parametrize("shape", [(10**12,), (2**31, 2**31), (2**64 - 1,), (4097, 4097)])
def test_huge_declared_shape_is_refused_without_allocating(shape: tuple[int, ...]) -> None:
    item = WireArray("w", "<f4", shape, b"\x00" * 4)
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceeded, match="elements > limit"):
            decode_array(item)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


@pytest.mark.parametrize(
    "shape", [(0, 2**63 - 1), (0, 2**64 - 1), (2**62, 2**62, 0), (0, 2**40, 2**40)], ids=str
)
def test_empty_array_with_huge_dimensions_is_refused(shape: tuple[int, ...]) -> None:
    # Zero elements, zero bytes of data, but numpy cannot build the shape: must be a
    # LimitExceeded, not numpy's ValueError.
    with pytest.raises(LimitExceeded):
        decode_array(WireArray("w", "<f4", shape, b""))


def test_empty_array_with_modest_dimensions_decodes() -> None:
    back = decode_array(WireArray("w", "<f8", (0, 1000, 16), b""))
    assert back.shape == (0, 1000, 16)


def test_limits_are_inclusive() -> None:
    limits = Limits(max_array_elements=6, max_ndim=2)
    ok = WireArray("w", "<i4", (2, 3), bytes(24))
    assert declared_elements(ok, limits) == 6
    with pytest.raises(LimitExceeded):
        declared_elements(WireArray("w", "<i4", (7,), bytes(28)), limits)
    with pytest.raises(LimitExceeded, match="dimensions"):
        declared_elements(WireArray("w", "<i4", (1, 1, 1), bytes(4)), limits)


def test_too_many_dimensions_is_refused() -> None:
    shape = (1,) * (DEFAULT_LIMITS.max_ndim + 1)
    with pytest.raises(LimitExceeded):
        decode_array(WireArray("w", "<f4", shape, bytes(4)))


def test_negative_dimension_is_malformed() -> None:
    with pytest.raises(MalformedMessage, match="negative"):
        decode_array(WireArray("w", "<f4", (-1, -4), bytes(16)))


@pytest.mark.parametrize(("shape", "size"), [((3,), 8), ((3,), 16), ((2, 2), 0), ((), 0), ((), 8)])
def test_data_length_mismatch_is_malformed(shape: tuple[int, ...], size: int) -> None:
    with pytest.raises(MalformedMessage, match="bytes"):
        decode_array(WireArray("w", "<f4", shape, bytes(size)))


@pytest.mark.parametrize(
    "dtype", ["|O", ">f4", "<c16", "<f2", "|b1", "|u1", "float32", "", "<f4 ", "O"]
)
def test_unknown_wire_dtype_is_malformed(dtype: str) -> None:
    with pytest.raises(MalformedMessage, match="not accepted"):
        decode_array(WireArray("w", dtype, (2,), bytes(16)))


@pytest.mark.parametrize("dtype", ["<f4", "<f8"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(dtype: str, bad: float) -> None:
    wire = encode_array("w", np.array([[1.0, 2.0], [bad, 3.0]], dtype=dtype))
    with pytest.raises(NonFiniteValues, match="'w'"):
        decode_array(wire)
    with pytest.raises(NonFiniteValues):
        decode_arrays([wire])
    back = decode_array(wire, require_finite=False)
    assert back[1, 0] == bad or (np.isnan(bad) and np.isnan(back[1, 0]))
    assert decode_arrays([wire], require_finite=False)["w"].shape == (2, 2)


def test_integer_arrays_have_no_finiteness_check() -> None:
    wire = encode_array("i", np.array([np.iinfo(np.int64).max, -1], dtype="<i8"))
    np.testing.assert_array_equal(decode_array(wire), [np.iinfo(np.int64).max, -1])


def test_duplicate_names_are_malformed() -> None:
    one = encode_array("w", np.zeros(2, dtype="<f4"))
    other = encode_array("b", np.zeros(1, dtype="<f4"))
    with pytest.raises(MalformedMessage, match="duplicate"):
        decode_arrays([one, other, one])


def test_too_many_arrays() -> None:
    limits = Limits(max_arrays=2)
    items = [encode_array(f"a{i}", np.zeros(1, dtype="<f4")) for i in range(3)]
    assert len(decode_arrays(items[:2], limits)) == 2
    with pytest.raises(LimitExceeded, match="3 arrays"):
        decode_arrays(items, limits)


def test_total_elements_limit() -> None:
    limits = Limits(max_array_elements=8, max_total_elements=10)
    items = [encode_array(f"a{i}", np.zeros(5, dtype="<f4")) for i in range(3)]
    assert len(decode_arrays(items[:2], limits)) == 2  # 10 elements: at the limit
    with pytest.raises(LimitExceeded, match="15 elements in total"):
        decode_arrays(items, limits)


def test_total_is_checked_before_any_array_is_allocated() -> None:
    # Each declared array is within the per-array limit and has the right byte count,
    # but the total is too large: nothing may be decoded.
    limits = Limits(max_array_elements=4, max_total_elements=4)
    items = [WireArray(f"a{i}", "<u2", (4,), bytes(8)) for i in range(2)]
    with pytest.raises(LimitExceeded):
        decode_arrays(items, limits)


SPEC_SHAPES = [("w", (2, 3)), ("b", (2,))]


def test_check_shapes_accepts_exact_match_in_any_order() -> None:
    check_shapes({"b": np.zeros(2), "w": np.zeros((2, 3))}, SPEC_SHAPES)


@pytest.mark.parametrize(
    ("named", "report"),
    [
        ({"w": np.zeros((2, 3))}, "missing=['b'] extra=[] wrong_shape=[]"),
        (
            {"w": np.zeros((2, 3)), "b": np.zeros(2), "z": np.zeros(1)},
            "missing=[] extra=['z'] wrong_shape=[]",
        ),
        ({"w": np.zeros((3, 2)), "b": np.zeros(2)}, "missing=[] extra=[] wrong_shape=['w']"),
        ({"b": np.zeros(()), "x": np.zeros(1)}, "missing=['w'] extra=['x'] wrong_shape=['b']"),
        ({}, "missing=['b', 'w'] extra=[] wrong_shape=[]"),
    ],
)
def test_check_shapes_reports_missing_extra_and_wrong(
    named: dict[str, npt.NDArray[np.generic]], report: str
) -> None:
    with pytest.raises(MalformedMessage) as info:
        check_shapes(named, SPEC_SHAPES)
    assert report in str(info.value)


NAMES = st.text(max_size=4)
DIMS = (
    st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.integers(0, 5)
    | st.sampled_from([0, 2**31, 2**40, 2**63 - 1, 2**64 - 1])
)


@given(
    st.lists(
        st.builds(
            WireArray,
            name=NAMES,
            dtype=st.sampled_from([*sorted(WIRE_DTYPES), "|O", ">f4", "<c16", "|u1", "x"]),
            shape=st.lists(DIMS, max_size=8).map(tuple),
            data=st.just(b"") | st.binary(max_size=80),
        ),
        max_size=4,
    ),
    st.booleans(),
)
def test_arbitrary_wire_arrays_raise_only_protocol_errors(
    items: list[WireArray], require_finite: bool
) -> None:
    try:
        decoded = decode_arrays(items, require_finite=require_finite)
    except ProtocolError:
        return
    assert [item.name for item in items] == list(decoded)
    for item in items:
        assert decoded[item.name].shape == item.shape
        assert decoded[item.name].tobytes() == item.data
