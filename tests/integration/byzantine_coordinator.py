"""A test-only Byzantine coordinator: the real `fedgate-coordinator serve`, except that its
cloud aggregate is scaled by 1000 and it accepts any aggregate, its own poisoned one
included, when it proposes and votes.

Usage: python byzantine_coordinator.py STATE_DIR HEIGHTS
"""

from __future__ import annotations

import sys

import msgspec
import numpy as np
from fedgate_common.arrays import decode_arrays, encode_arrays
from fedgate_common.messages import CloudAggregate
from fedgate_coordinator import federation, service
from fedgate_coordinator.cli import main
from fedgate_coordinator.rounds import RoundResult
from fedgate_coordinator.store import ModelRecord

POISON = 1000.0
_honest_aggregate = service.CoordinatorService._aggregate


def _poisoned_aggregate(
    self: service.CoordinatorService,
    number: int,
    head: ModelRecord,
    result: RoundResult | None,
) -> CloudAggregate:
    honest = _honest_aggregate(self, number, head, result)
    delta = {
        name: np.asarray(value, dtype=np.float32) * np.float32(POISON)
        for name, value in decode_arrays(honest.delta).items()
    }
    return msgspec.structs.replace(honest, delta=encode_arrays(delta), participants=50)


service.CoordinatorService._aggregate = _poisoned_aggregate  # type: ignore[method-assign]
setattr(federation, "aggregate_problem", lambda *args, **kwargs: None)  # noqa: B010

if __name__ == "__main__":
    state, heights = sys.argv[1], sys.argv[2]
    main(["--state-dir", state, "serve", "--until-height", heights])
