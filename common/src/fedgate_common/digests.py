"""Content digests: the global-model hash chain."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgspec

from fedgate_common.arrays import WireArray
from fedgate_common.model_spec import ModelSpec

GENESIS_PARENT = ""
_MODEL_DOMAIN = b"fedgate-model-v1"


def model_digest(
    *, parent_digest: str, round: int, spec: ModelSpec, weights: Sequence[WireArray]
) -> str:
    """SHA-256 (hex) over the parent digest, round, spec and weights.

    Because each digest covers its parent's, changing any stored model breaks every later
    link of the chain.
    """
    encoded = msgspec.msgpack.encode([_MODEL_DOMAIN, parent_digest, round, spec, list(weights)])
    return hashlib.sha256(encoded).hexdigest()
