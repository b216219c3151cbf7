"""One secure-aggregation round with every party in this process.

Used by the tests (exactness under dropouts, attacks) and by ``bench/secagg``: it seals
every message exactly as the network drivers do, so byte counts are the wire's. Agents
listed in ``dropouts[stage]`` stop answering from that stage on.
"""

from __future__ import annotations

import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from functools import partial
from typing import TypeVar

import msgspec
import nacl.signing

from fedgate_common.envelope import decode_payload, open_envelope, seal
from fedgate_common.errors import ProtocolError
from fedgate_common.messages import (
    KeyRoster,
    Payload,
    RoundStart,
    SecAggParams,
    ShareDelivery,
    SurvivorCheck,
    TrainingPlan,
    UnmaskRequest,
)
from fedgate_common.secagg.aggregator import Aborted, Aggregator, Unmasked
from fedgate_common.secagg.context import start_digest
from fedgate_common.secagg.keystream import Words
from fedgate_common.secagg.participant import Participant, encoding_params

STAGES = ("keys", "shares", "masked", "confirm", "reveal")


class LocalRoundResult(msgspec.Struct, kw_only=True):
    outcome: Unmasked | Aborted
    aggregator: Aggregator
    refusals: dict[str, str]  # agent → kind of the refusal it raised
    agent_seconds: dict[str, float]  # stage → mean seconds per answering agent
    coordinator_seconds: dict[str, float]  # stage → seconds to close the stage
    bytes_up: dict[str, int]  # agent → bytes it sent
    bytes_down: dict[str, int]  # agent → bytes sent to it


def run_local_round(
    encoded: Mapping[str, Words],
    params: SecAggParams,
    *,
    dropouts: Mapping[str, set[str]] | None = None,
    deployment: str = "local",
    cloud: str = "c1",
    round: int = 1,
    base_certificate: bytes = b"certificate",
    min_participants: int = 1,
    dimension: int | None = None,
    random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    min_threshold: int = 0,
) -> LocalRoundResult:
    """Run a round over the already encoded inputs ``encoded`` (agent id → words)."""
    ids = tuple(sorted(encoded))
    dimension = (
        dimension if dimension is not None else next(iter(encoded.values())).size - (_limbs(params))
    )
    drop_from: dict[str, int] = {}
    for stage, agents in (dropouts or {}).items():
        for agent in agents:
            drop_from[agent] = min(drop_from.get(agent, 99), STAGES.index(stage))
    identities = {a: nacl.signing.SigningKey(random_bytes(32)) for a in ids}
    start = RoundStart(
        round=round,
        base_digest="base",
        selected=ids,
        plan=TrainingPlan(learning_rate=0.01),
        update_timeout_s=60.0,
        min_participants=min_participants,
        secagg=params,
    )
    aggregator = Aggregator(
        deployment=deployment,
        cloud=cloud,
        round=round,
        base_digest="base",
        start_digest=start_digest(start),
        base_certificate=base_certificate,
        selected=ids,
        params=params,
        dimension=dimension,
        min_participants=min_participants,
    )
    agent_time: dict[str, list[float]] = defaultdict(list)
    coordinator_time: dict[str, float] = {}
    bytes_up: dict[str, int] = defaultdict(int)
    bytes_down: dict[str, int] = defaultdict(int)
    refusals: dict[str, str] = {}
    participants: dict[str, Participant] = {}

    def wire(agent: str, payload: Payload) -> bytes:
        return seal(
            payload, signing_key=identities[agent], deployment=deployment, cloud=cloud, sender=agent
        )

    def alive(agent: str, stage: str) -> bool:
        return agent not in refusals and drop_from.get(agent, 99) > STAGES.index(stage)

    def act(agent: str, stage: str, step: Callable[[], Payload | None]) -> None:
        if not alive(agent, stage):
            return
        began = time.perf_counter()
        try:
            payload = step()
        except (ProtocolError, ValueError) as exc:
            refusals[agent] = getattr(exc, "kind", type(exc).__name__)
            return
        finally:
            agent_time[stage].append(time.perf_counter() - began)
        if payload is None:
            return
        raw = wire(agent, payload)
        bytes_up[agent] += len(raw)
        opened = decode_payload(open_envelope(raw))
        aggregator.add(agent, opened, raw=raw, identity_key=bytes(identities[agent].verify_key))

    def close(stage: str, closer: Callable[[], _T]) -> _T:
        began = time.perf_counter()
        result = closer()
        coordinator_time[stage] = time.perf_counter() - began
        return result

    def broadcast(message: Payload, to: tuple[str, ...]) -> None:
        raw = seal(
            message, signing_key=_COORDINATOR, deployment=deployment, cloud=cloud, sender=cloud
        )
        for agent in to:
            bytes_down[agent] += len(raw)

    broadcast(start, ids)
    for agent in ids:

        def advertise(agent: str = agent) -> Payload:
            participants[agent] = Participant(
                agent_id=agent,
                deployment=deployment,
                cloud=cloud,
                start=start,
                base_certificate=base_certificate,
                pinned_identities={},
                random_bytes=random_bytes,
                min_threshold=min_threshold,
            )
            return participants[agent].advertise_keys()

        act(agent, "keys", advertise)
    roster = close("keys", aggregator.close_keys)
    if not isinstance(roster, KeyRoster):
        return _result(
            roster, aggregator, refusals, agent_time, coordinator_time, bytes_up, bytes_down
        )
    broadcast(roster, ids)
    for agent in ids:
        act(agent, "shares", partial(_on_roster, participants, agent, roster))
    deliveries = close("shares", aggregator.close_shares)
    if isinstance(deliveries, Aborted):
        return _result(
            deliveries, aggregator, refusals, agent_time, coordinator_time, bytes_up, bytes_down
        )
    assert isinstance(deliveries, dict)
    for agent, delivery in deliveries.items():
        broadcast(delivery, (agent,))

        def mask(agent: str = agent, delivery: ShareDelivery = delivery) -> Payload:
            participants[agent].on_delivery(delivery)
            return participants[agent].mask_input(encoded[agent])

        act(agent, "masked", mask)
    check = close("masked", aggregator.close_masked)
    if not isinstance(check, SurvivorCheck):
        assert isinstance(check, Aborted)
        return _result(
            check, aggregator, refusals, agent_time, coordinator_time, bytes_up, bytes_down
        )
    broadcast(check, check.survivors)
    for agent in check.survivors:
        act(agent, "confirm", partial(_on_check, participants, agent, check))
    request = close("confirm", aggregator.close_confirmations)
    if not isinstance(request, UnmaskRequest):
        assert isinstance(request, Aborted)
        return _result(
            request, aggregator, refusals, agent_time, coordinator_time, bytes_up, bytes_down
        )
    broadcast(request, request.survivors)
    for agent in request.survivors:
        act(agent, "reveal", partial(_on_unmask, participants, agent, request))
    outcome = close("reveal", aggregator.close_reveals)
    assert isinstance(outcome, Unmasked | Aborted)
    return _result(
        outcome, aggregator, refusals, agent_time, coordinator_time, bytes_up, bytes_down
    )


_COORDINATOR = nacl.signing.SigningKey(bytes(32))
_T = TypeVar("_T")


def _on_roster(participants: Mapping[str, Participant], agent: str, roster: KeyRoster) -> Payload:
    return participants[agent].on_roster(roster)


def _on_check(participants: Mapping[str, Participant], agent: str, check: SurvivorCheck) -> Payload:
    return participants[agent].on_check(check)


def _on_unmask(
    participants: Mapping[str, Participant], agent: str, request: UnmaskRequest
) -> Payload:
    return participants[agent].on_unmask(request)


def _limbs(params: SecAggParams) -> int:
    """Words after the update: the within-clip word, if any, and the weight limbs."""
    encoding = encoding_params(params)
    return encoding.count_words + encoding.weight_limbs


def _result(
    outcome: Unmasked | Aborted,
    aggregator: Aggregator,
    refusals: dict[str, str],
    agent_time: Mapping[str, list[float]],
    coordinator_time: dict[str, float],
    bytes_up: Mapping[str, int],
    bytes_down: Mapping[str, int],
) -> LocalRoundResult:
    return LocalRoundResult(
        outcome=outcome,
        aggregator=aggregator,
        refusals=refusals,
        agent_seconds={s: sum(v) / len(v) for s, v in agent_time.items() if v},
        coordinator_seconds=coordinator_time,
        bytes_up=dict(bytes_up),
        bytes_down=dict(bytes_down),
    )
