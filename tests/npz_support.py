"""Hostile ``.npy`` / ``.npz`` files for the tests of every reader: headers that declare
arrays no machine holds, archives with one member replaced."""

from __future__ import annotations

import io
import struct
import zipfile


def npy_header_only(shape: tuple[int, ...], *, dtype: str = "<f8", padding: int = 0) -> bytes:
    """A .npy header declaring ``shape`` (``padding`` spaces longer), with no data after it:
    what a corrupt or hostile file may hold."""
    header = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape!r}, }}"
    header += " " * padding
    header += " " * (-(12 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x02\x00" + struct.pack("<I", len(header)) + header.encode("latin1")


def with_member(npz: bytes, name: str, data: bytes) -> bytes:
    """The .npz archive ``npz`` with member ``name`` replaced by ``data``."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(npz)) as source, zipfile.ZipFile(out, "w") as target:
        for member in source.namelist():
            target.writestr(member, data if member == name else source.read(member))
    return out.getvalue()


HUGE_SHAPE = (10**16, 3)  # 240 PB of float64: more than any address space holds
