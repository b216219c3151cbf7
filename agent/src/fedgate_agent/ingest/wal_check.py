"""Find damage inside an SQLite write-ahead log before SQLite reads it.

When SQLite opens a database whose ``-wal`` file holds frames, it replays the frames up to
the first one whose checksum or salt does not match, and silently drops that frame and
every frame after it. That is right for the tail of a write cut off by a crash, but a
damaged frame in the middle (a bad sector, a failing SD card) then takes every transaction
committed after it with it, and nothing says so: ``quick_check`` sees a sound, shorter
database. The buffer acknowledges an MQTT message only after its transaction was synced,
so those transactions held acknowledged readings that no broker will deliver again.

:func:`wal_damage` walks the frames as SQLite would (file format, section 4 of
https://www.sqlite.org/fileformat2.html: 32-byte header; frames of a 24-byte header and one
page; salts copied from the header; a running checksum over 32-bit words in the byte order
the header's magic number names) and reports a frame that fails *followed by a commit
frame of the same log*: the sign that committed work lies beyond the damage. A torn tail,
or frames of a transaction that never committed, are not reported. No IO beyond reading
the bytes handed in.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

__all__ = ["WalDamage", "wal_damage"]

_HEADER: Final = 32
_FRAME_HEADER: Final = 24
_MAGIC_LITTLE: Final = 0x377F0682
_MAGIC_BIG: Final = 0x377F0683
_MASK: Final = 0xFFFFFFFF


class WalDamage(NamedTuple):
    """Frame ``frame`` (1-based) is damaged; ``commits_after`` commit frames of the same
    log follow it (the transactions SQLite would drop)."""

    frame: int
    frames: int
    commits_after: int


def _checksum(data: bytes, big_endian: bool, s0: int, s1: int) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & _MASK
        s1 = (s1 + words[i + 1] + s0) & _MASK
    return s0, s1


def wal_damage(wal: bytes) -> WalDamage | None:
    """The first damaged frame of ``wal`` with committed frames after it, else ``None``
    (also for a log SQLite would ignore whole: too short, or a header that fails)."""
    if len(wal) < _HEADER:
        return None
    magic, _version, page_size, _seq, salt1, salt2, c1, c2 = struct.unpack(">8I", wal[:_HEADER])
    if magic not in (_MAGIC_LITTLE, _MAGIC_BIG) or page_size < 512 or page_size & (page_size - 1):
        return None
    big = magic == _MAGIC_BIG
    s0, s1 = _checksum(wal[:24], big, 0, 0)
    if (s0, s1) != (c1, c2):
        return None  # SQLite ignores the whole log: nothing in it was replayed before either
    frame_size = _FRAME_HEADER + page_size
    frames = (len(wal) - _HEADER) // frame_size
    damaged: int | None = None
    commits_after = 0
    for index in range(frames):
        start = _HEADER + index * frame_size
        head = wal[start : start + _FRAME_HEADER]
        _page, commit, f_salt1, f_salt2, f_c1, f_c2 = struct.unpack(">6I", head)
        if (f_salt1, f_salt2) != (salt1, salt2):
            if damaged is None:
                return None  # the end of this log: older frames of an earlier one follow
            continue
        if damaged is not None:
            commits_after += commit != 0
            continue
        body = wal[start + _FRAME_HEADER : start + frame_size]
        s0, s1 = _checksum(head[:8] + body, big, s0, s1)
        if (s0, s1) != (f_c1, f_c2):
            damaged = index + 1
    if damaged is None or commits_after == 0:
        return None
    return WalDamage(frame=damaged, frames=frames, commits_after=commits_after)
