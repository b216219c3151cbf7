"""What every secure-aggregation key and signature is bound to."""

from __future__ import annotations

import hashlib

import msgspec

from fedgate_common.messages import RoundStart

_START_PURPOSE = b"fedgate-secagg-start-v1"


class RoundContext(msgspec.Struct, frozen=True, kw_only=True):
    """One round of one cloud, fixed once the key roster is known.

    ``roster_digest`` pins the exact set of advertised keys, so material made for one view
    of the roster is useless under another.
    """

    deployment: str
    cloud: str
    round: int
    roster_digest: bytes

    def label(self, purpose: bytes, *parts: str) -> bytes:
        """Unambiguous bytes naming ``purpose`` in this round (msgpack, not concatenation)."""
        return msgspec.msgpack.encode(
            [purpose, self.deployment, self.cloud, self.round, self.roster_digest, *parts]
        )


def sha256(*parts: bytes) -> bytes:
    """SHA-256 over length-prefixed parts (so no two part lists collide)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


def start_digest(start: RoundStart) -> bytes:
    """What binds an agent's round keys to the round start it answers: H over the msgpack
    encoding of the whole :class:`RoundStart` (plan, selection, secure-aggregation and
    noise parameters), so two agents that were sent different starts never share a roster."""
    return sha256(_START_PURPOSE, msgspec.msgpack.encode(start))
