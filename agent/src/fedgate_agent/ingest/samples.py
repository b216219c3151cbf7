"""What every source produces and the buffer stores: one value of one tag at one time.

A *source* is one ordered stream with its own sequence numbers: an MQTT topic, an OPC-UA
node of one server, a tag of a historian import. ``(source, seq)`` identifies a sample for
good, so a redelivered or re-imported sample is recognised and stored once.
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "MAX_CLOCK_SKEW_S",
    "MAX_SEQ",
    "Sample",
    "SampleSink",
    "tag_problem",
    "too_far_ahead",
]

#: Sequence numbers are non-negative and fit SQLite's signed 64-bit INTEGER.
MAX_SEQ = 2**63 - 1

#: How far ahead of the gateway's clock a sample's timestamp may be. A sample stamped later
#: is refused (reason ``ts_in_future``): one reading a year ahead would otherwise stretch
#: every training window grid to that year.
MAX_CLOCK_SKEW_S = 3600.0
# A live device reading stamped this far behind the gateway comes from a clock that is not
# set (or a replay); OPC-UA ingest falls back to the server's stamp, else refuses it.
MAX_DEVICE_LAG_S = 86400.0


#: Characters that change how text around them reads: controls (Cc), format characters
#: such as bidi overrides and zero-width ones (Cf), and line and paragraph separators (Zl,
#: Zp).
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def tag_problem(tag: str, *, slash: bool = False) -> str | None:
    """What is wrong with ``tag`` as a tag name, phrased as what to fix; ``None`` when it
    is usable.

    A tag name is non-empty text without control, format or separator characters (bidi
    overrides, zero-width and line separators included): tags reach status output,
    reports and logs, where a NUL, a line break or an escape sequence would cut or forge
    what an operator reads. ``/`` is refused too unless ``slash``: Sparkplug metric names
    (so also ``windows.tags``, which may name them) put it between folders, but anywhere
    else a tag is one level of an MQTT topic, and the part after the last ``/`` of an
    imported stream ``import:<source>/<tag>``.
    """
    if not tag:
        return "is empty; name the tag"
    control = next((c for c in tag if unicodedata.category(c) in _INVISIBLE_CATEGORIES), None)
    if control is not None:
        return (
            f"contains the control character U+{ord(control):04X}; a tag name is text "
            "without control, format or separator characters"
        )
    if not slash and "/" in tag:
        return "contains '/'; only Sparkplug metric names have '/' in a tag name"
    return None


def too_far_behind(ts: float) -> bool:
    """Whether ``ts`` (Unix seconds) lies :data:`MAX_DEVICE_LAG_S` or more in the past: a
    device's clock, read live, that cannot be right."""
    return ts < time.time() - MAX_DEVICE_LAG_S


def too_far_ahead(ts: float) -> bool:
    """Whether ``ts`` (Unix seconds) lies more than :data:`MAX_CLOCK_SKEW_S` in the future."""
    return ts > time.time() + MAX_CLOCK_SKEW_S


@dataclass(frozen=True, slots=True)
class Sample:
    """One measurement.

    ``source``: stream identity (``mqtt:<topic>``, ``opcua:<endpoint>#<node id>``,
    ``import:<tag>``); ``seq``: its position in that stream (0 ≤ seq ≤ :data:`MAX_SEQ`);
    ``tag``: the process variable it measures (``XMEAS_1``); ``ts``: the source's timestamp,
    seconds since the Unix epoch (UTC); ``value``: a finite float (booleans as 0.0 / 1.0).
    """

    source: str
    seq: int
    tag: str
    ts: float
    value: float


class SampleSink(Protocol):
    """Where sources put samples: :class:`~fedgate_agent.ingest.buffer.IngestBuffer`.

    ``insert`` commits the whole batch durably (one transaction) before it returns; a
    sample whose ``(source, seq)`` is stored already is counted as a duplicate, not stored.
    It is blocking: async callers run it in a worker thread.
    """

    def insert(self, samples: Sequence[Sample]) -> object: ...
