"""Flower's SecAgg+ (flwr 1.42.0) timed per stage, for comparison with fedgate's.

Runs only in the benchmark venv (``.venv-bench``, ``make bench-secagg``), where ``flwr`` is
installed. One round is Flower's own code end to end, in one process:

* the server side is Flower's ``SecAggPlusWorkflow``: its four stage methods are called one
  by one with a ``LegacyContext`` (FedAvg strategy, ``SimpleClientManager``);
* every client is Flower's ``secaggplus_mod`` wrapped around a stand-in ClientApp that
  returns a ready-made update (no training);
* between them sits ``_InProcessGrid``, a fake transport. For one watched agent it deflates
  every message both ways into Flower's wire objects, counts their bytes and inflates a
  fresh copy for the receiver; every other agent gets its own copy of the records (cheaper,
  and all the client mod needs, since it edits only the config record it receives).

Times (``time.perf_counter``): an agent's stage is its ``secaggplus_mod`` call, minus the
stand-in ClientApp; the coordinator's stage is the stage method, minus everything inside
``grid.send_and_receive`` (transport and all clients), and for ``unmask`` minus FedAvg's
``aggregate_fit`` (the legacy-strategy hand-off after unmasking, reported apart).

``flower_agent_mask_encode_seconds`` times Flower's client handler
``_collect_masked_vectors`` alone: decrypt the neighbours' shares, scale by the example
weight, clip, quantize, add the self mask and the pairwise masks, reduce, serialize.

Neighbours: ``k`` is the number of *other* agents each agent shares pairwise masks with.
Flower's ``num_shares`` counts the agent itself (it keeps one share) and its neighbours lie
symmetrically on a shuffled ring, so ``num_shares = k + 1`` rounded up to odd, capped at ``n``;
``StageTimes.neighbours`` is the count Flower really used. ``t`` is passed on unchanged as
``reconstruction_threshold`` (shares needed, the owner's own share included).
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from flwr.app import (  # type: ignore[import-not-found, unused-ignore]
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    RecordDict,
)

# flwr is installed only in .venv-bench; the main venv's mypy sees these as Any.
from flwr.app.message.message import (  # type: ignore[import-not-found, unused-ignore]
    make_message,
)
from flwr.client.mod.secure_aggregation.secaggplus_mod import (  # type: ignore[import-not-found, unused-ignore]
    SecAggPlusState,
    _collect_masked_vectors,
    _setup,
    _share_keys,
    secaggplus_mod,
)
from flwr.common import (  # type: ignore[import-not-found, unused-ignore]
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import (  # type: ignore[import-not-found, unused-ignore]
    SUPERLINK_NODE_ID,
)
from flwr.common.secure_aggregation.secaggplus_constants import (  # type: ignore[import-not-found, unused-ignore]
    RECORD_KEY_CONFIGS,
    Key,
)
from flwr.compat.common import (  # type: ignore[import-not-found, unused-ignore]
    recorddict_compat as compat,
)
from flwr.server import ServerConfig  # type: ignore[import-not-found, unused-ignore]
from flwr.server.client_manager import (  # type: ignore[import-not-found, unused-ignore]
    SimpleClientManager,
)
from flwr.server.compat.grid_client_proxy import (  # type: ignore[import-not-found, unused-ignore]
    GridClientProxy,
)
from flwr.server.compat.legacy_context import (  # type: ignore[import-not-found, unused-ignore]
    LegacyContext,
)
from flwr.server.strategy import FedAvg  # type: ignore[import-not-found, unused-ignore]
from flwr.server.workflow.constant import (  # type: ignore[import-not-found, unused-ignore]
    MAIN_CONFIGS_RECORD,
    MAIN_PARAMS_RECORD,
)
from flwr.server.workflow.constant import (  # type: ignore[import-not-found, unused-ignore]
    Key as WorkflowKey,
)
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import (  # type: ignore[import-not-found, unused-ignore]
    SecAggPlusWorkflow,
    WorkflowState,
)
from flwr.supercore.inflatable.inflatable_object import (  # type: ignore[import-not-found, unused-ignore]
    get_all_nested_objects,
)
from flwr.supercore.inflatable.inflatable_utils import (  # type: ignore[import-not-found, unused-ignore]
    inflate_object_from_contents,
)
from flwr.supercore.task_identity import (  # type: ignore[import-not-found, unused-ignore]
    TaskIdentity,
)

# Flower's defaults (SecAggPlusWorkflow.__init__), used unchanged.
CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 4_194_304  # 2**22
MODULUS_RANGE = 4_294_967_296  # 2**32
MAX_WEIGHT = 1000.0
# Every agent reports this many training examples (the FedAvg weight), below MAX_WEIGHT.
NUM_EXAMPLES = 100
# An aggregate further than this from the true mean of the survivors' updates is a harness bug.
MAX_AGGREGATE_ERROR = 1e-3

RUN_ID = 1

STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")

Float32Array = npt.NDArray[np.float32]


@dataclass
class StageTimes:
    """One Flower SecAgg+ round; seconds are medians over repeats."""

    agent: dict[str, float]  # per stage: median over the agents of one agent's time
    coordinator: dict[str, float]  # per stage: the whole coordinator work of the round
    bytes_up_per_agent: int  # Flower wire objects one agent sends in the round
    bytes_down_per_agent: int  # ... and receives (includes the global model in FitIns)
    bytes_up_by_stage: dict[str, int] = field(default_factory=dict)
    bytes_down_by_stage: dict[str, int] = field(default_factory=dict)
    neighbours: int = 0  # pairwise masks per agent that Flower really used
    num_shares: int = 0  # Flower's num_shares (neighbours + 1)
    dropped: int = 0  # agents that stopped replying after share_keys
    strategy_seconds: float = 0.0  # FedAvg.aggregate_fit after unmask; not in coordinator
    max_abs_error: float = math.nan  # aggregate vs the exact mean of the survivors' updates


def flower_num_shares(n: int, k: int) -> int:
    """Flower's ``num_shares`` for ``k`` neighbours among ``n`` agents (self included)."""
    if n < 3 or k < 2:
        raise ValueError(f"need n >= 3 and k >= 2, got n={n}, k={k}")
    shares = min(k + 1, n)
    if shares < n and shares % 2 == 0:
        # SecAggPlusWorkflow.setup_stage makes an even num_shares odd the same way.
        shares += 1
    return min(shares, n)


def default_threshold(n: int, k: int) -> int:
    """A majority of the shares: ``num_shares // 2 + 1``."""
    return flower_num_shares(n, k) // 2 + 1


def flower_round(
    n: int,
    d: int,
    k: int,
    t: int,
    *,
    dropout_fraction: float = 0.0,
    repeats: int = 1,
) -> StageTimes:
    """Run ``repeats`` complete Flower SecAgg+ rounds of ``n`` agents on ``d`` float32s.

    ``dropout_fraction`` of the agents (rounded down) stop replying after ``share_keys``,
    chosen so that every agent keeps at least ``t`` live shareholders, so the coordinator
    has to rebuild their pairwise masks from Shamir shares of their mask keys.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    _prepare_flower()
    runs = [_one_round(n, d, k, t, dropout_fraction, seed=r) for r in range(repeats)]
    first = runs[0]
    return StageTimes(
        agent={s: statistics.median(r.agent[s] for r in runs) for s in STAGES},
        coordinator={s: statistics.median(r.coordinator[s] for r in runs) for s in STAGES},
        bytes_up_per_agent=first.bytes_up_per_agent,
        bytes_down_per_agent=first.bytes_down_per_agent,
        bytes_up_by_stage=first.bytes_up_by_stage,
        bytes_down_by_stage=first.bytes_down_by_stage,
        neighbours=first.neighbours,
        num_shares=first.num_shares,
        dropped=first.dropped,
        strategy_seconds=statistics.median(r.strategy_seconds for r in runs),
        max_abs_error=max(r.max_abs_error for r in runs),
    )


def flower_agent_mask_encode_seconds(d: int, k: int, *, repeats: int = 5) -> float:
    """Median seconds of one Flower client's ``_collect_masked_vectors`` at ``d``, ``k``.

    The ``k + 1`` agents (one masking agent and its ``k`` neighbours) first run Flower's
    ``_setup`` and ``_share_keys`` handlers for real, so the timed call decrypts real
    shares and derives real pairwise keys.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    _prepare_flower()
    n = k + 1
    node_ids = list(range(1, n + 1))
    setup_config: dict[str, Any] = {
        Key.SAMPLE_NUMBER: n,
        Key.SHARE_NUMBER: n,
        Key.THRESHOLD: n // 2 + 1,
        Key.CLIPPING_RANGE: CLIPPING_RANGE,
        Key.TARGET_RANGE: QUANTIZATION_RANGE,
        Key.MOD_RANGE: MODULUS_RANGE,
        Key.MAX_WEIGHT: MAX_WEIGHT,
    }
    states: dict[int, Any] = {}
    public_keys: dict[str, list[bytes]] = {}
    for nid in node_ids:
        state = SecAggPlusState()
        state.nid = nid
        reply = _setup(state, ConfigRecord(dict(setup_config)))
        states[nid] = state
        public_keys[str(nid)] = [
            cast(bytes, reply[Key.PUBLIC_KEY_1]),
            cast(bytes, reply[Key.PUBLIC_KEY_2]),
        ]
    masker = node_ids[0]
    sources: list[int] = []
    ciphertexts: list[bytes] = []
    for nid in node_ids:
        reply = _share_keys(states[nid], ConfigRecord(dict(public_keys)))
        for dst, ciphertext in zip(
            cast(list[int], reply[Key.DESTINATION_LIST]),
            cast(list[bytes], reply[Key.CIPHERTEXT_LIST]),
            strict=True,
        ):
            if dst == masker:
                sources.append(nid)
                ciphertexts.append(ciphertext)
    update = _random_update(d, np.random.default_rng(0))
    parameters = ndarrays_to_parameters([update])
    samples: list[float] = []
    for _ in range(repeats):
        config = ConfigRecord(
            {Key.CIPHERTEXT_LIST: list(ciphertexts), Key.SOURCE_LIST: list(sources)}
        )
        start = time.perf_counter()
        _collect_masked_vectors(states[masker], config, NUM_EXAMPLES, parameters)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


# --- one round ------------------------------------------------------------------------


def _one_round(n: int, d: int, k: int, t: int, dropout_fraction: float, seed: int) -> StageTimes:
    num_shares = flower_num_shares(n, k)
    if not 2 <= t < num_shares:
        raise ValueError(f"need 2 <= t < num_shares={num_shares}, got t={t}")
    rng = np.random.default_rng(seed)
    node_ids = [int(x) for x in rng.choice(2**62, size=n, replace=False) + SUPERLINK_NODE_ID + 1]
    watched = node_ids[0]
    base_update = _random_update(d, rng)
    offsets = {nid: 0.001 * (i % 7) for i, nid in enumerate(node_ids)}

    grid = _InProcessGrid(node_ids, base_update, offsets, watched=watched)
    # Both are duck-typed: Flower calls only grid.send_and_receive, and only configure_fit
    # and aggregate_fit of the strategy.
    flower_grid = cast(Any, grid)
    strategy = _TimedFedAvg(n)
    client_manager = SimpleClientManager()
    for nid in node_ids:
        client_manager.register(GridClientProxy(nid, flower_grid, run_id=RUN_ID))
    server_context = LegacyContext(
        Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=1),
        strategy=cast(Any, strategy),
        client_manager=client_manager,
    )
    server_context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: 1}
    )
    # A random (not constant) global model, so that Flower's chunk deduplication does not
    # shrink the FitIns message below a real model's size.
    global_model = _random_update(d, rng)
    server_context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord([global_model])

    workflow = SecAggPlusWorkflow(
        num_shares=num_shares,
        reconstruction_threshold=t,
        max_weight=MAX_WEIGHT,
        clipping_range=CLIPPING_RANGE,
        quantization_range=QUANTIZATION_RANGE,
        modulus_range=MODULUS_RANGE,
    )
    state = WorkflowState()
    stage_methods = {
        "setup": workflow.setup_stage,
        "share_keys": workflow.share_keys_stage,
        "collect_masked_vectors": workflow.collect_masked_vectors_stage,
        "unmask": workflow.unmask_stage,
    }
    coordinator: dict[str, float] = {}
    dropped: set[int] = set()
    neighbours = 0
    for stage, method in stage_methods.items():
        if stage == "share_keys":
            # Read before unmask_stage, which edits the neighbour sets of dropped agents.
            neighbours = len(next(iter(state.nid_to_neighbours.values()))) - 1
        if stage == "collect_masked_vectors":
            dropped = _choose_dropouts(state, t, dropout_fraction, watched, seed)
            grid.dropped = dropped
        transport_before = grid.transport_seconds
        strategy_before = strategy.aggregate_seconds
        start = time.perf_counter()
        completed = method(flower_grid, server_context, state)
        elapsed = time.perf_counter() - start
        if not completed:
            raise RuntimeError(f"Flower's SecAgg+ halted in stage {stage} (n={n}, k={k}, t={t})")
        coordinator[stage] = (
            elapsed
            - (grid.transport_seconds - transport_before)
            - (strategy.aggregate_seconds - strategy_before)
        )

    aggregate = compat.arrayrecord_to_parameters(
        server_context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
    )
    (result,) = parameters_to_ndarrays(aggregate)
    survivors = [nid for nid in node_ids if nid not in dropped]
    expected = base_update + np.float32(statistics.fmean(offsets[nid] for nid in survivors))
    max_abs_error = float(np.max(np.abs(np.asarray(result, dtype=np.float64) - expected)))
    if max_abs_error > MAX_AGGREGATE_ERROR:
        raise RuntimeError(f"Flower's aggregate is off by {max_abs_error} (n={n}, d={d})")
    return StageTimes(
        agent={s: statistics.median(grid.agent_seconds[s]) for s in STAGES},
        coordinator=coordinator,
        bytes_up_per_agent=sum(grid.bytes_up.values()),
        bytes_down_per_agent=sum(grid.bytes_down.values()),
        bytes_up_by_stage=dict(grid.bytes_up),
        bytes_down_by_stage=dict(grid.bytes_down),
        neighbours=neighbours,
        num_shares=num_shares,
        dropped=len(dropped),
        strategy_seconds=strategy.aggregate_seconds,
        max_abs_error=max_abs_error,
    )


def _choose_dropouts(
    state: Any, t: int, dropout_fraction: float, watched: int, seed: int
) -> set[int]:
    """Agents to drop after share_keys, keeping >= t live shareholders for everyone."""
    wanted = math.floor(dropout_fraction * len(state.sampled_node_ids))
    neighbourhoods: dict[int, set[int]] = state.nid_to_neighbours
    candidates = sorted(nid for nid in state.sampled_node_ids if nid != watched)
    random.Random(seed).shuffle(candidates)
    live_count = {nid: len(members) for nid, members in neighbourhoods.items()}
    holders_of: dict[int, list[int]] = {nid: [] for nid in neighbourhoods}
    for owner, members in neighbourhoods.items():
        for member in members:
            holders_of[member].append(owner)
    dropped: set[int] = set()
    for nid in candidates:
        if len(dropped) == wanted:
            break
        if all(live_count[owner] - 1 >= t for owner in holders_of[nid]):
            dropped.add(nid)
            for owner in holders_of[nid]:
                live_count[owner] -= 1
    if len(dropped) < wanted:
        raise ValueError(f"cannot drop {wanted} agents and keep t={t} live shares for everyone")
    return dropped


def _random_update(d: int, rng: np.random.Generator) -> Float32Array:
    return (rng.standard_normal(d, dtype=np.float32) * np.float32(0.05)).astype(np.float32)


def _prepare_flower() -> None:
    """Quiet Flower's INFO logs; give this process the server task identity, as its app does."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = RUN_ID
    TaskIdentity.node_id = SUPERLINK_NODE_ID


def _stage_of(message: Any) -> str:
    return str(message.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])


def _over_the_wire(message: Any) -> tuple[Any, int]:
    """Deflate ``message`` into Flower's wire objects and inflate a fresh copy of it."""
    objects = get_all_nested_objects(message)
    contents = {object_id: obj.deflate() for object_id, obj in objects.items()}
    size = sum(len(content) for content in contents.values())
    root_id = next(reversed(objects))  # post-order: the message itself comes last
    return inflate_object_from_contents(root_id, contents), size


def _private_copy(message: Any) -> Any:
    """The receiver's own copy of ``message``: fresh records, shared immutable payloads.

    Cheaper than ``_over_the_wire`` and enough for the client mod, which pops keys from the
    config record it receives (the server sends one record object to every node in setup).
    """
    content = RecordDict()
    for key, record in message.content.items():
        content[key] = ConfigRecord(dict(record)) if isinstance(record, ConfigRecord) else record
    return make_message(metadata=message.metadata, content=content)


class _InProcessGrid:
    """Flower's ``Grid.send_and_receive`` with every client in this process."""

    def __init__(
        self,
        node_ids: Sequence[int],
        base_update: Float32Array,
        offsets: dict[int, float],
        *,
        watched: int,
    ) -> None:
        self.contexts = {
            nid: Context(
                run_id=RUN_ID, node_id=nid, node_config={}, state=RecordDict(), run_config={}
            )
            for nid in node_ids
        }
        self.base_update = base_update
        self.offsets = offsets
        self.watched = watched
        self.dropped: set[int] = set()
        self.agent_seconds: dict[str, list[float]] = {s: [] for s in STAGES}
        self.bytes_up: dict[str, int] = {s: 0 for s in STAGES}
        self.bytes_down: dict[str, int] = {s: 0 for s in STAGES}
        self.transport_seconds = 0.0
        self._client_app_seconds = 0.0

    def send_and_receive(
        self, messages: Iterable[Any], *, timeout: float | None = None
    ) -> list[Any]:
        del timeout  # every in-process client answers at once
        start = time.perf_counter()
        replies = [self._deliver(message) for message in messages]
        self.transport_seconds += time.perf_counter() - start
        return replies

    def _deliver(self, message: Any) -> Any:
        node_id: int = message.metadata.dst_node_id
        stage = _stage_of(message)
        if node_id in self.dropped:
            return Message(Error(code=0, reason="agent dropped out"), reply_to=message)
        watched = node_id == self.watched
        if watched:
            received, size_down = _over_the_wire(message)
        else:
            received = _private_copy(message)
        self._client_app_seconds = 0.0
        start = time.perf_counter()
        reply = secaggplus_mod(received, self.contexts[node_id], self._client_app)
        self.agent_seconds[stage].append(time.perf_counter() - start - self._client_app_seconds)
        if watched:
            reply, size_up = _over_the_wire(reply)
            self.bytes_down[stage] += size_down
            self.bytes_up[stage] += size_up
        return reply

    def _client_app(self, message: Any, context: Any) -> Any:
        """Stand-in for training: return this agent's fixed update as a FitRes."""
        start = time.perf_counter()
        update = self.base_update + np.float32(self.offsets[context.node_id])
        fit_res = FitRes(
            status=Status(code=Code.OK, message="ok"),
            parameters=ndarrays_to_parameters([update]),
            num_examples=NUM_EXAMPLES,
            metrics={},
        )
        reply = Message(compat.fitres_to_recorddict(fit_res, keep_input=False), reply_to=message)
        self._client_app_seconds += time.perf_counter() - start
        return reply


def _no_metrics(fit_metrics: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    del fit_metrics  # the stand-in ClientApp reports none
    return {}


class _TimedFedAvg:
    """FedAvg for all ``n`` agents, timing its ``aggregate_fit`` apart from the unmask."""

    def __init__(self, n: int) -> None:
        self._fedavg = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_evaluate_clients=0,
            min_available_clients=n,
            fit_metrics_aggregation_fn=_no_metrics,
        )
        self.aggregate_seconds = 0.0

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        return self._fedavg.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        start = time.perf_counter()
        aggregated = self._fedavg.aggregate_fit(server_round, results, failures)
        self.aggregate_seconds += time.perf_counter() - start
        return aggregated


def run_flower_grid(
    sizes: Iterable[tuple[int, int]],
    k: int,
    threshold: Callable[[int, int], int] = default_threshold,
    *,
    repeats: int = 1,
) -> list[tuple[int, int, StageTimes]]:
    """``flower_round`` for each ``(n, d)``, with ``t = threshold(n, k)``."""
    return [(n, d, flower_round(n, d, k, threshold(n, k), repeats=repeats)) for n, d in sizes]
