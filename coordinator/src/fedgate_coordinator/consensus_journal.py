"""The coordinator's consensus journal: its Tendermint state, written before any vote leaves.

DESIGN.md §5: a coordinator persists every vote it signs (fsync + atomic rename) before
sending it, and after a crash never signs a different value for the same (height, round,
step). The core's persistent state holds its own signed votes and its lock; the driver
writes it here whenever the core asks (``Persist``), before it publishes anything.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import msgspec
from fedgate_common.consensus.tendermint import ConsensusState

from fedgate_coordinator.errors import StoreError

JOURNAL_NAME = "consensus-state.msgpack"
_decoder = msgspec.msgpack.Decoder(ConsensusState)


def write_journal(state_dir: Path, state: ConsensusState) -> None:
    """Replace the journal atomically: temp file, fsync, rename, fsync the directory."""
    path = state_dir / JOURNAL_NAME
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".consensus.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(msgspec.msgpack.encode(state))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_journal(state_dir: Path) -> ConsensusState | None:
    """The last persisted state, ``None`` before the first vote.

    A journal that does not decode is an error, never silently dropped: starting without
    it could sign a second, different vote for a step already voted on.
    """
    path = state_dir / JOURNAL_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise StoreError(
            f"{path} is unreadable ({exc}); refusing to vote without it. Restore it from a "
            "backup; deleting it risks double-signing at the current height"
        ) from None
