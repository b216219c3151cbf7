"""Size limits applied to untrusted input before anything is allocated."""

from __future__ import annotations

import msgspec


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Upper bounds for decoded messages. Defaults fit models up to ~16 M float32 weights."""

    max_message_bytes: int = 80 * 1024 * 1024
    max_arrays: int = 256
    max_array_elements: int = 16 * 1024 * 1024
    max_total_elements: int = 20 * 1024 * 1024
    max_ndim: int = 6


DEFAULT_LIMITS = Limits()
