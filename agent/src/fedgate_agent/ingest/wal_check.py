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
the header's magic number names). At the first frame SQLite would stop at (a checksum that
does not follow, or salts that differ), it looks further for *whole commit frames of the
same log*: a frame with the log's salts, a commit mark, and stored checksums that follow
from the stored checksums of the frame before it and its own bytes. Each stands for a
transaction that was written whole and that SQLite will drop. A torn tail, frames of a
transaction that never committed, a commit frame whose page never reached the disk and the
frames of older logs beyond the current one are not counted. A damaged header (SQLite then
ignores the whole log) is frame 0. No IO beyond reading the bytes handed in.
"""

from __future__ import annotations

import mmap
import struct
from typing import Final, NamedTuple

__all__ = ["WalDamage", "wal_damage"]

_HEADER: Final = 32
_FRAME_HEADER: Final = 24
_MAGIC_LITTLE: Final = 0x377F0682
_MAGIC_BIG: Final = 0x377F0683
_MASK: Final = 0xFFFFFFFF


class WalDamage(NamedTuple):
    """Frame ``frame`` (1-based; 0 is the header) is damaged; ``commits_after`` whole
    commit frames of the same log follow it (the transactions SQLite would drop)."""

    frame: int
    frames: int
    commits_after: int


def _checksum(data: bytes, big_endian: bool, s0: int, s1: int) -> tuple[int, int]:
    """SQLite's running checksum over ``data`` (a multiple of 8 bytes), from ``(s0, s1)``."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & _MASK
        s1 = (s1 + words[i + 1] + s0) & _MASK
    return s0, s1


def wal_damage(wal: bytes | mmap.mmap) -> WalDamage | None:
    """The first frame SQLite would stop at when whole commit frames of the same log follow
    it (frame 0: the header), else ``None``."""
    if len(wal) < _HEADER:
        return None
    magic, _version, page_size, _seq, salt1, salt2, c1, c2 = struct.unpack(">8I", wal[:_HEADER])
    if magic not in (_MAGIC_LITTLE, _MAGIC_BIG) or page_size < 512 or page_size & (page_size - 1):
        return None  # not a log SQLite could have written: nothing to compare with
    big = magic == _MAGIC_BIG
    frame_size = _FRAME_HEADER + page_size
    frames = (len(wal) - _HEADER) // frame_size
    damaged: int | None = None
    if _checksum(wal[:24], big, 0, 0) != (c1, c2):
        damaged = 0  # SQLite ignores the whole log; its frames still name their salts
        if frames:
            salt1, salt2 = struct.unpack(">2I", wal[_HEADER + 8 : _HEADER + 16])
    sums = (c1, c2)  # running checksum while the chain holds
    stored = (c1, c2)  # the checksums the previous frame (or the header) holds
    commits_after = 0
    for index in range(frames):
        start = _HEADER + index * frame_size
        head = wal[start : start + _FRAME_HEADER]
        _page, commit, f_salt1, f_salt2, f_c1, f_c2 = struct.unpack(">6I", head)
        ours = (f_salt1, f_salt2) == (salt1, salt2)
        if ours and (damaged is None or commit):
            body = wal[start + _FRAME_HEADER : start + frame_size]
            seed = sums if damaged is None else stored
            computed = _checksum(head[:8] + body, big, *seed)
            whole = computed == (f_c1, f_c2)
            if damaged is None and whole:
                sums = computed
            elif damaged is not None and whole:
                commits_after += 1  # a transaction written whole after the damage
            elif damaged is None:
                damaged = index + 1
        elif damaged is None:
            damaged = index + 1  # salts that differ: where SQLite's log ends
        stored = (f_c1, f_c2)
    if damaged is None or commits_after == 0:
        return None
    return WalDamage(frame=damaged, frames=frames, commits_after=commits_after)
