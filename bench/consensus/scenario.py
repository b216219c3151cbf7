"""One scenario of the consensus benchmark: M clouds on loopback, f of them silent, H heights.

Every cloud gets a private Mosquitto broker; every honest cloud a real
:class:`~fedgate_coordinator.federation.FederationNode` with its own SQLite store, state
directory and :class:`PublishCountingLink`, all in this process and event loop. Silent
clouds are listed in the manifest (their brokers run) but their coordinators never start.
For each height every honest node calls ``decide`` with a random :class:`CloudAggregate`
at the same moment, then stores and publishes the decision as the coordinator service does;
the next height starts when every honest node has done so.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nacl.signing
import numpy as np
from fedgate_common.arrays import encode_arrays
from fedgate_common.consensus.manifest import (
    ConsensusParams,
    SignedManifest,
)
from fedgate_common.consensus.quorum import faults_tolerated, quorum_size
from fedgate_common.messages import CloudAggregate
from fedgate_common.model_spec import ModelSpec, parameter_shapes
from fedgate_common.topics import parse_federation_topic
from fedgate_coordinator.federation import DecidedModel, FederationNode
from fedgate_coordinator.genesis import first_manifest, genesis_record
from fedgate_coordinator.mqtt_link import MqttLink, MqttSettings
from fedgate_coordinator.store import ModelRecord, Store

from bench.consensus.brokers import mosquitto_brokers

KINDS = ("vote", "proposal", "aggregate", "model")  # federation topic stages
CONNECT_TIMEOUT_S = 30.0
STOP_WAIT_S = 5.0
STOP_ATTEMPTS = 3
GENESIS_SEED = 1

# Loopback timeouts: far below the manifest defaults (propose 10 s, others 2 s, wait 30 s).
LOOPBACK_CONSENSUS = ConsensusParams(
    timeout_propose_s=2.0,
    timeout_prevote_s=1.0,
    timeout_precommit_s=1.0,
    timeout_delta_s=1.0,
    aggregate_wait_s=0.5,
)


class BenchDisagreement(RuntimeError):
    """Honest coordinators decided different models at ``height`` (a safety violation)."""

    def __init__(self, message: str, *, height: int, digests: Mapping[str, str]) -> None:
        super().__init__(message)
        self.height = height
        self.digests = dict(digests)


class PublishCountingLink(MqttLink):
    """An :class:`MqttLink` that counts what it published per federation stage."""

    def __init__(self, *, settings: MqttSettings) -> None:
        super().__init__(settings=settings, subscriptions=())
        self.messages: Counter[str] = Counter()
        self.payload_bytes: Counter[str] = Counter()

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        await super().publish(topic, payload, retain=retain)
        _, _, stage = parse_federation_topic(topic)
        self.messages[stage] += 1
        self.payload_bytes[stage] += len(payload)


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """``clouds`` coordinators, of which those at the ``silent`` indices never start."""

    clouds: int
    silent: tuple[int, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"c{i + 1}" for i in range(self.clouds))

    @property
    def honest(self) -> tuple[str, ...]:
        return tuple(n for i, n in enumerate(self.names) if i not in self.silent)

    @property
    def label(self) -> str:
        return f"M={self.clouds} faulty={len(self.silent)}"


def silent_indices(clouds: int, faulty: int, placement: str) -> tuple[int, ...]:
    """Which clouds stay silent: ``spread`` evenly over the proposer rotation (no two
    adjacent for M ≥ 4), or the ``last`` f (adjacent, so one height can meet f silent
    proposers in a row)."""
    if faulty == 0:
        return ()
    if placement == "last":
        return tuple(range(clouds - faulty, clouds))
    return tuple(sorted(clouds - 1 - (i * clouds) // faulty for i in range(faulty)))


class HeightSample(msgspec.Struct, frozen=True, kw_only=True):
    """One height: latency from the last ``decide`` call to the last decision (and to the
    last stored and published decision), CPU time of this whole process meanwhile (every
    honest node shares it), consensus rounds used (round of the certificate + 1), the
    decided digest, what all honest nodes published during the height (messages and payload
    bytes per stage)."""

    height: int
    latency_s: float
    store_publish_s: float
    cpu_s: float
    rounds: int
    digest: str
    messages: dict[str, int]
    payload_bytes: dict[str, int]


class ScenarioResult(msgspec.Struct, frozen=True, kw_only=True):
    clouds: int
    faulty: int
    silent: tuple[str, ...]
    quorum: int
    heights: int
    samples: tuple[HeightSample, ...]

    def latency_ms(self) -> list[float]:
        return [s.latency_s * 1000 for s in self.samples]

    def latency_p50_ms(self) -> float:
        return statistics.median(self.latency_ms())

    def latency_max_ms(self) -> float:
        return max(self.latency_ms())

    def mean_rounds(self) -> float:
        return statistics.fmean(s.rounds for s in self.samples)

    def cpu_ms_per_decision(self) -> float:
        return statistics.fmean(s.cpu_s * 1000 for s in self.samples)

    def messages_per_decision(self, kind: str | None = None) -> float:
        kinds = KINDS if kind is None else (kind,)
        return sum(s.messages.get(k, 0) for s in self.samples for k in kinds) / self.heights

    def kb_per_decision(self, kind: str | None = None) -> float:
        kinds = KINDS if kind is None else (kind,)
        total = sum(s.payload_bytes.get(k, 0) for s in self.samples for k in kinds)
        return total / self.heights / 1000


def signed_manifest(
    *,
    deployment: str,
    keys: Mapping[str, nacl.signing.SigningKey],
    brokers: Mapping[str, str],
    spec: ModelSpec,
    consensus: ConsensusParams,
) -> SignedManifest:
    """Version 1 listing ``keys``' clouds in that order, signed by every one of them."""
    return first_manifest(
        deployment=deployment,
        keys=keys,
        brokers=brokers,
        spec=spec,
        seed=GENESIS_SEED,
        created_at="2026-01-01T00:00:00Z",
        consensus=consensus,
    )


def random_aggregate(
    height: int, base: ModelRecord, spec: ModelSpec, rng: np.random.Generator
) -> CloudAggregate:
    """A plausible per-cloud mean update: small normal noise, 1..50 participants."""
    delta = {
        name: rng.normal(0.0, 0.01, size=shape).astype(np.float32)
        for name, shape in parameter_shapes(spec)
    }
    return CloudAggregate(
        round=height,
        base_digest=base.digest,
        participants=int(rng.integers(1, 51)),
        delta=encode_arrays(delta),
    )


@dataclass(frozen=True, kw_only=True)
class _HonestCloud:
    name: str
    node: FederationNode
    link: PublishCountingLink
    store: Store


@dataclass(frozen=True, kw_only=True)
class _NodeHeight:
    called: float
    decided: float
    stored_published: float
    decision: DecidedModel


def _published(clouds: Sequence[_HonestCloud]) -> tuple[Counter[str], Counter[str]]:
    messages: Counter[str] = Counter()
    payload: Counter[str] = Counter()
    for cloud in clouds:
        messages.update(cloud.link.messages)
        payload.update(cloud.link.payload_bytes)
    return messages, payload


def _difference(after: Counter[str], before: Counter[str]) -> dict[str, int]:
    return {kind: after[kind] - before[kind] for kind in KINDS}


async def _one_node_height(
    cloud: _HonestCloud, height: int, aggregate: CloudAggregate, base: ModelRecord
) -> _NodeHeight:
    """What the service does for a height: decide, store the model, publish the decision."""
    called = time.perf_counter()
    decision = await cloud.node.decide(height, base, aggregate)
    decided = time.perf_counter()
    cloud.store.add_model(decision.model)
    await cloud.node.publish_decision(decision)
    return _NodeHeight(
        called=called,
        decided=decided,
        stored_published=time.perf_counter(),
        decision=decision,
    )


async def _run_height(
    clouds: Sequence[_HonestCloud],
    height: int,
    spec: ModelSpec,
    rng: np.random.Generator,
    timeout_s: float,
) -> HeightSample:
    bases: list[ModelRecord] = []
    for cloud in clouds:
        head = cloud.store.head_model()
        if head is None:
            raise RuntimeError(f"{cloud.name} has no model to build height {height} on")
        bases.append(head)
    aggregates = [random_aggregate(height, base, spec, rng) for base in bases]
    messages_before, bytes_before = _published(clouds)
    cpu_before = time.process_time()
    async with asyncio.timeout(timeout_s):
        outcomes = await asyncio.gather(
            *(
                _one_node_height(cloud, height, aggregate, base)
                for cloud, aggregate, base in zip(clouds, aggregates, bases, strict=True)
            )
        )
    cpu_s = time.process_time() - cpu_before
    messages_after, bytes_after = _published(clouds)
    digests = {c.name: o.decision.model.digest for c, o in zip(clouds, outcomes, strict=True)}
    if len(set(digests.values())) != 1:
        raise BenchDisagreement(
            f"height {height}: honest clouds decided different models: {digests}",
            height=height,
            digests=digests,
        )
    all_called = max(o.called for o in outcomes)
    return HeightSample(
        height=height,
        latency_s=max(o.decided for o in outcomes) - all_called,
        store_publish_s=max(o.stored_published for o in outcomes) - all_called,
        cpu_s=cpu_s,
        rounds=max(o.decision.consensus_round for o in outcomes) + 1,
        digest=next(iter(digests.values())),
        messages=_difference(messages_after, messages_before),
        payload_bytes=_difference(bytes_after, bytes_before),
    )


async def _all_connected(clouds: Sequence[_HonestCloud]) -> None:
    """Own links and every peer link subscribed, so that no vote is published unheard."""
    links: list[MqttLink] = []
    for cloud in clouds:
        links.append(cloud.link)
        links.extend(cloud.node.peer_links.values())
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        await asyncio.gather(*(link.connected.wait() for link in links))


def check_agreement(clouds: Sequence[_HonestCloud], samples: Sequence[HeightSample]) -> None:
    """Every honest store holds one intact chain of the decided models, and a decision
    record for each height naming the same model."""
    for cloud in clouds:
        length = cloud.store.verify_chain()
        if length != len(samples) + 1:
            raise BenchDisagreement(
                f"{cloud.name} stored a chain of {length} models, not genesis + "
                f"{len(samples)} heights",
                height=len(samples),
                digests={},
            )
    chains = {
        cloud.name: {model.round: model.digest for model in cloud.store.list_models()}
        for cloud in clouds
    }
    for sample in samples:
        digests = {name: chain.get(sample.height, "missing") for name, chain in chains.items()}
        recorded = {cloud.name: cloud.store.decision(sample.height) for cloud in clouds}
        values = {name: record.value for name, record in recorded.items() if record is not None}
        if set(digests.values()) != {sample.digest} or set(values.values()) != {sample.digest}:
            raise BenchDisagreement(
                f"height {sample.height}: stored models {digests} or decisions {values} "
                f"differ from the decided {sample.digest}",
                height=sample.height,
                digests=digests,
            )
        if len(values) != len(clouds):
            missing = sorted(set(recorded) - set(values))
            raise BenchDisagreement(
                f"height {sample.height}: no decision recorded by {', '.join(missing)}",
                height=sample.height,
                digests=digests,
            )


@contextlib.contextmanager
def _honest_clouds(
    directory: Path,
    scenario: Scenario,
    ports: Sequence[int],
    spec: ModelSpec,
    consensus: ConsensusParams,
) -> Iterator[list[_HonestCloud]]:
    deployment = f"bench-m{scenario.clouds}-f{len(scenario.silent)}"
    keys = {name: nacl.signing.SigningKey.generate() for name in scenario.names}
    brokers = {name: f"127.0.0.1:{port}" for name, port in zip(scenario.names, ports, strict=True)}
    manifest = signed_manifest(
        deployment=deployment, keys=keys, brokers=brokers, spec=spec, consensus=consensus
    )
    genesis = genesis_record(spec, GENESIS_SEED)
    with contextlib.ExitStack() as stack:
        clouds: list[_HonestCloud] = []
        for name in scenario.honest:
            state_dir = directory / name
            state_dir.mkdir()
            store = stack.enter_context(Store.open(f"sqlite:///{state_dir / 'coordinator.db'}"))
            store.add_model(genesis)
            host, _, port = brokers[name].rpartition(":")
            link = PublishCountingLink(
                settings=MqttSettings(
                    host=host, port=int(port), client_id=f"{deployment}-{name}-own"
                )
            )
            node = FederationNode(
                deployment=deployment,
                cloud=name,
                manifest=manifest,
                signing_key=keys[name],
                store=store,
                own_link=link,
                state_dir=state_dir,
            )
            clouds.append(_HonestCloud(name=name, node=node, link=link, store=store))
        yield clouds


def _progress_line(scenario: Scenario, sample: HeightSample, heights: int) -> str:
    return (
        f"{scenario.label} height {sample.height}/{heights}: "
        f"{sample.latency_s * 1000:.0f} ms, {sample.rounds} round(s), "
        f"{sum(sample.messages.values())} messages"
    )


def _coroutine_name(task: asyncio.Task[Any]) -> str:
    return str(getattr(task.get_coro(), "__qualname__", task.get_name()))


async def _stop_tasks(
    tasks: Sequence[asyncio.Task[None]],
    started_before: set[asyncio.Task[Any]],
    progress: Callable[[str], None],
) -> None:
    """Cancel ``tasks`` and wait until they are done.

    On Python 3.11, ``asyncio.wait_for`` (which aiomqtt's publish uses) drops a cancellation
    that arrives in the same loop turn as the awaited result; ``MqttLink.publish`` then waits
    for a reconnection that never comes, and its task group waits with it. Hence nodes stop
    while their links are still up, and any task still running after ``STOP_WAIT_S`` is
    cancelled again: every task this scenario started, down to the innermost.
    """
    for task in tasks:
        task.cancel()
    for _ in range(STOP_ATTEMPTS):
        _, pending = await asyncio.wait(tasks, timeout=STOP_WAIT_S)
        if not pending:
            return
        current = asyncio.current_task()
        stragglers = [t for t in asyncio.all_tasks() - started_before if t is not current]
        progress(
            f"{len(pending)} task(s) ignored their cancellation; cancelling again: "
            + ", ".join(sorted({_coroutine_name(t) for t in stragglers}))
        )
        for task in stragglers:
            task.cancel()
    raise RuntimeError(f"{len(tasks)} background tasks did not stop after {STOP_ATTEMPTS} tries")


async def run_scenario(
    scenario: Scenario,
    *,
    heights: int,
    spec: ModelSpec,
    consensus: ConsensusParams = LOOPBACK_CONSENSUS,
    seed: int = 0,
    height_timeout_s: float = 120.0,
    progress: Callable[[str], None] = lambda line: None,
) -> ScenarioResult:
    """Run ``heights`` heights of ``scenario``; raise :class:`BenchDisagreement` if honest
    clouds decide or store different models."""
    rng = np.random.default_rng(seed)
    samples: list[HeightSample] = []
    started_before = asyncio.all_tasks()
    with tempfile.TemporaryDirectory(prefix="fedgate-bench-consensus-") as tmp:
        directory = Path(tmp)
        async with mosquitto_brokers(directory, scenario.clouds) as ports:
            with _honest_clouds(directory, scenario, ports, spec, consensus) as clouds:
                # Nodes stop before the links they publish on (see _stop_tasks).
                async with asyncio.TaskGroup() as links:
                    link_tasks = [links.create_task(c.link.run()) for c in clouds]
                    try:
                        async with asyncio.TaskGroup() as nodes:
                            node_tasks = [nodes.create_task(c.node.run()) for c in clouds]
                            try:
                                await _all_connected(clouds)
                                for height in range(1, heights + 1):
                                    sample = await _run_height(
                                        clouds, height, spec, rng, height_timeout_s
                                    )
                                    samples.append(sample)
                                    progress(_progress_line(scenario, sample, heights))
                            finally:
                                await _stop_tasks(node_tasks, started_before, progress)
                    finally:
                        await _stop_tasks(link_tasks, started_before, progress)
                check_agreement(clouds, samples)
    return ScenarioResult(
        clouds=scenario.clouds,
        faulty=len(scenario.silent),
        silent=tuple(scenario.names[i] for i in scenario.silent),
        quorum=quorum_size(scenario.clouds),
        heights=heights,
        samples=tuple(samples),
    )


def scenarios(clouds: Sequence[int], placement: str = "spread") -> list[Scenario]:
    """For each M: no faults, and (when M tolerates any) f = ⌊(M − 1)/3⌋ silent clouds."""
    out: list[Scenario] = []
    for m in clouds:
        out.append(Scenario(clouds=m))
        f = faults_tolerated(m)
        if f:
            out.append(Scenario(clouds=m, silent=silent_indices(m, f, placement)))
    return out
