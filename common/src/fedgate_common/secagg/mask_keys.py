"""Keys that expand into masks: pairwise (X25519 agreement) and self (a random seed).

Both go through HKDF-SHA256 with a label naming the round and roster, so every mask
stream is used once. Pairwise masks are added by the agent whose id sorts first and
subtracted by the other, so they cancel in the sum.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedgate_common.secagg.context import RoundContext
from fedgate_common.secagg.share_box import x25519_shared_secret

_PAIRWISE = b"fedgate-secagg-pairwise-mask-v1"
_SELF = b"fedgate-secagg-self-mask-v1"


def _hkdf(material: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(material)


def pairwise_mask_key(
    private: X25519PrivateKey, peer_public: bytes, context: RoundContext, a: str, b: str
) -> bytes:
    """The 256-bit key both ``a`` and ``b`` derive for their shared mask."""
    first, second = sorted((a, b))
    return _hkdf(
        x25519_shared_secret(private, peer_public), context.label(_PAIRWISE, first, second)
    )


def pairwise_sign(own: str, peer: str) -> int:
    """+1 if ``own`` adds the pair's mask, -1 if it subtracts it."""
    return 1 if own < peer else -1


def self_mask_key(seed: bytes, context: RoundContext, owner: str) -> bytes:
    return _hkdf(seed, context.label(_SELF, owner))
