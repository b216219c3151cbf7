"""Numeric arrays on the wire: raw little-endian bytes plus dtype and shape.

Decoding checks the declared dtype, shape and byte length against limits before any
array is allocated, and refuses NaN/Inf where finiteness is required.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import msgspec
import numpy as np
import numpy.typing as npt

from fedgate_common.errors import LimitExceeded, MalformedMessage, NonFiniteValues
from fedgate_common.limits import DEFAULT_LIMITS, Limits

# Wire dtype names (numpy ``dtype.str`` little-endian form) accepted from the network.
WIRE_DTYPES: frozenset[str] = frozenset({"<f4", "<f8", "<u2", "<u4", "<u8", "<i4", "<i8"})
_FLOAT_DTYPES = frozenset({"<f4", "<f8"})


class WireArray(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One named tensor: ``data`` holds ``prod(shape)`` items of ``dtype``, little-endian."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes


def encode_array(name: str, array: npt.NDArray[np.generic]) -> WireArray:
    """Encode ``array`` as a :class:`WireArray` (converted to little-endian, C order)."""
    le = array.dtype.newbyteorder("<")
    if le.str not in WIRE_DTYPES:
        raise MalformedMessage(f"array {name!r}: dtype {array.dtype} cannot travel on the wire")
    contiguous = np.ascontiguousarray(array, dtype=le)
    return WireArray(
        name=name, dtype=le.str, shape=tuple(int(d) for d in array.shape), data=contiguous.tobytes()
    )


def declared_elements(item: WireArray, limits: Limits = DEFAULT_LIMITS) -> int:
    """Number of elements ``item`` declares, after checking dtype, rank and limits."""
    if item.dtype not in WIRE_DTYPES:
        raise MalformedMessage(f"array {item.name!r}: dtype {item.dtype!r} is not accepted")
    if len(item.shape) > limits.max_ndim:
        raise LimitExceeded(
            f"array {item.name!r}: {len(item.shape)} dimensions > {limits.max_ndim}"
        )
    if any(d < 0 for d in item.shape):
        raise MalformedMessage(f"array {item.name!r}: negative dimension in {item.shape}")
    count = math.prod(item.shape)
    if count > limits.max_array_elements:
        raise LimitExceeded(
            f"array {item.name!r}: {count} elements > limit {limits.max_array_elements}"
        )
    # An empty array may still declare huge other dimensions, e.g. (0, 2**63 - 1), which
    # numpy refuses with ValueError; bound the product of the non-zero dimensions too.
    if math.prod(d for d in item.shape if d) > limits.max_array_elements:
        raise LimitExceeded(
            f"array {item.name!r}: shape {item.shape} > limit {limits.max_array_elements}"
        )
    itemsize = np.dtype(item.dtype).itemsize
    if len(item.data) != count * itemsize:
        raise MalformedMessage(
            f"array {item.name!r}: {len(item.data)} bytes, "
            f"shape {item.shape} needs {count * itemsize}"
        )
    return count


def decode_array(
    item: WireArray, limits: Limits = DEFAULT_LIMITS, *, require_finite: bool = True
) -> npt.NDArray[np.generic]:
    """Decode one array; it owns its memory (a copy), so the message bytes can be freed."""
    declared_elements(item, limits)
    array = np.frombuffer(item.data, dtype=np.dtype(item.dtype)).reshape(item.shape).copy()
    if require_finite and item.dtype in _FLOAT_DTYPES and not np.isfinite(array).all():
        raise NonFiniteValues(f"array {item.name!r} contains NaN or Inf")
    return array


def encode_arrays(named: Mapping[str, npt.NDArray[np.generic]]) -> tuple[WireArray, ...]:
    """Encode a name → array mapping, in the mapping's order."""
    return tuple(encode_array(name, value) for name, value in named.items())


def decode_arrays(
    items: Sequence[WireArray], limits: Limits = DEFAULT_LIMITS, *, require_finite: bool = True
) -> dict[str, npt.NDArray[np.generic]]:
    """Decode several arrays; totals and duplicate names are checked before allocating."""
    if len(items) > limits.max_arrays:
        raise LimitExceeded(f"{len(items)} arrays > limit {limits.max_arrays}")
    total = sum(declared_elements(item, limits) for item in items)
    if total > limits.max_total_elements:
        raise LimitExceeded(f"{total} elements in total > limit {limits.max_total_elements}")
    names = [item.name for item in items]
    if len(set(names)) != len(names):
        raise MalformedMessage("duplicate array names")
    return {item.name: decode_array(item, limits, require_finite=require_finite) for item in items}


def check_shapes(
    named: Mapping[str, npt.NDArray[np.generic]], expected: Iterable[tuple[str, tuple[int, ...]]]
) -> None:
    """Raise :class:`MalformedMessage` unless ``named`` has exactly the expected
    names and shapes."""
    want = dict(expected)
    got = {name: tuple(array.shape) for name, array in named.items()}
    if got != want:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        wrong = sorted(n for n in set(want) & set(got) if want[n] != got[n])
        raise MalformedMessage(
            f"arrays do not match the model: missing={missing} extra={extra} wrong_shape={wrong}"
        )
