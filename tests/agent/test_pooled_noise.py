"""Record-level DP with the noise pooled in the secure sum (privacy.md 3.7): what the
coordinator sizes, what one round costs an agent, and the clipped step it takes."""

from __future__ import annotations

import math
from pathlib import Path

import msgspec
import nacl.signing
import numpy as np
import pytest
from fedgate_agent.errors import PlanRejected
from fedgate_agent.model import build_model, weights_of
from fedgate_agent.pooled_noise import pooled_round
from fedgate_agent.privacy_ledger import LedgerEntry, PrivacyLedger, read_ledger
from fedgate_agent.private_training import train_locally_private
from fedgate_agent.record_privacy import RoundSpend, epsilon
from fedgate_agent.service import AgentService
from fedgate_agent.training import LocalDataset
from fedgate_common.messages import SecAggParams, TrainingPlan
from fedgate_common.model_spec import ModelSpec, parameter_count
from fedgate_common.secagg.participant import encoding_params
from fedgate_common.secagg.site_dp import record_bound, record_noise_multiplier
from fedgate_coordinator.errors import ConfigError
from fedgate_coordinator.secure_rounds import SecAggSettings
from fedgate_coordinator.site_privacy import (
    MIN_POOLED_SIGMA,
    SitePrivacySettings,
    pooled_epsilon,
    pooled_record_sigma,
    round_params,
)

SPEC = ModelSpec(n_features=3, window=8, n_classes=2, channels=4)
DIMENSION = parameter_count(SPEC)
SECAGG = SecAggSettings(word_bits=32, clip_norm=10.0, weight_cap=500)
PLAN = TrainingPlan(learning_rate=2.0, momentum=0.0, local_epochs=1, batch_size=100)
POOLED = SitePrivacySettings(
    record_level="pooled",
    record_epsilon=3.0,
    record_clip_norm=1.0,
    record_sample_rate=0.7,
    planned_rounds=40,
)


def _params(privacy: SitePrivacySettings = POOLED, *, selected: int = 3) -> SecAggParams:
    """What a coordinator with pooled record-level noise announces to ``selected`` agents."""
    return round_params(
        SECAGG,
        privacy,
        selected=selected,
        min_participants=2,
        clip_norm=SECAGG.clip_norm,
        dimension=DIMENSION,
        record_bound=record_bound(PLAN, privacy.record_clip_norm),
    )


def test_the_pld_sigma_keeps_its_rounds_within_the_target() -> None:
    """The coordinator's σ, counted again by the agents' accountant, stays within ε 3
    and is tight (a 2 % smaller σ overshoots); 6.257 is the bench's figure for this plan."""
    sigma = pooled_record_sigma(3.0, 1e-5, 0.7, 40)
    assert sigma == pytest.approx(6.257, abs=0.01)

    def spent(noise: float) -> float:
        step = RoundSpend(round=1, noise_multiplier=noise, sample_rate=0.7, steps=40)
        return epsilon([step], 1e-5, accountant="pld")

    assert 2.9 < spent(sigma) <= 3.0
    assert spent(sigma * 0.98) > 3.0


def test_the_round_carries_the_record_sigma_and_no_more_than_needed() -> None:
    """z is the smallest (to 0.1 %) whose sum carries σ for one window's η·C/B."""
    params = _params()
    assert params.noise is not None
    assert params.noise.min_inputs == 2
    target = pooled_record_sigma(3.0, 1e-5, 0.7, 40)
    bound = record_bound(PLAN, 1.0)
    carried = record_noise_multiplier(encoding_params(params), DIMENSION, bound)
    assert target <= carried <= target * 1.002
    # Without pooling the round has no noise at all.
    plain = _params(msgspec.structs.replace(POOLED, record_level="off"))
    assert plain.noise is None


def test_site_level_noise_wins_when_it_is_larger() -> None:
    both = _params(msgspec.structs.replace(POOLED, site_level="on", target_epsilon=8.0))
    pooled = _params()
    assert both.noise is not None
    assert pooled.noise is not None
    assert both.noise.noise_multiplier > 100 * pooled.noise.noise_multiplier


def test_record_sigma_scales_with_the_noise_and_inversely_with_the_bound() -> None:
    params = encoding_params(_params())
    bound = record_bound(PLAN, 1.0)
    base = record_noise_multiplier(params, DIMENSION, bound)
    assert record_noise_multiplier(params, DIMENSION, bound * 2) == pytest.approx(
        base / 2, rel=1e-3
    )
    louder = msgspec.structs.replace(params, noise_multiplier=params.noise_multiplier * 2)
    assert record_noise_multiplier(louder, DIMENSION, bound) == pytest.approx(base * 2, rel=1e-2)
    counted = msgspec.structs.replace(params, count_within_clip=True, count_noise=1.0)
    assert record_noise_multiplier(counted, DIMENSION, bound) == 0.0


def test_an_agent_counts_the_sum_and_its_own_share() -> None:
    params = _params()
    cost = pooled_round(
        params, PLAN, windows=140, max_grad_norm=1.0, dimension=DIMENSION, assumed_colluders=0
    )
    assert cost.sample_rate == pytest.approx(100 / 140)
    assert cost.noise_multiplier >= pooled_record_sigma(3.0, 1e-5, 0.7, 40)
    # Shares sized for 2 inputs: alone, an agent's share is 1/√2 of the sum's.
    assert cost.own_share_noise_multiplier == pytest.approx(
        cost.noise_multiplier / math.sqrt(2), rel=1e-3
    )
    # A colluder assumed: only one honest share is counted on.
    wary = pooled_round(
        params, PLAN, windows=140, max_grad_norm=1.0, dimension=DIMENSION, assumed_colluders=1
    )
    assert wary.noise_multiplier == pytest.approx(cost.own_share_noise_multiplier, rel=1e-3)
    # An agent clipping to 2 moves its update twice as far per window: half the σ.
    loose = pooled_round(
        params, PLAN, windows=140, max_grad_norm=2.0, dimension=DIMENSION, assumed_colluders=0
    )
    assert loose.noise_multiplier == pytest.approx(cost.noise_multiplier / 2, rel=1e-3)
    spend = cost.spend(7)
    assert (spend.round, spend.steps) == (7, 1)
    assert spend.own_share_only.noise_multiplier == cost.own_share_noise_multiplier


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("no noise", "needs secure rounds with distributed noise"),
        ("plaintext", "needs secure rounds with distributed noise"),
        ("two epochs", "one step a round"),
        ("count word", "within-clip count"),
        ("tiny noise", "too little to count"),
        ("huge batch", "at most 10000 windows a step"),
    ],
)
def test_rounds_that_cannot_carry_pooled_noise_are_refused(change: str, message: str) -> None:
    announced = _params()
    assert announced.noise is not None
    params: SecAggParams | None = announced
    plan = PLAN
    if change == "no noise":
        params = msgspec.structs.replace(announced, noise=None)
    elif change == "plaintext":
        params = None
    elif change == "two epochs":
        plan = msgspec.structs.replace(PLAN, local_epochs=2)
    elif change == "count word":
        params = msgspec.structs.replace(announced, count_within_clip=True)
    elif change == "huge batch":
        plan = msgspec.structs.replace(PLAN, batch_size=10_001)
    else:
        noise = msgspec.structs.replace(announced.noise, noise_multiplier=1e-9)
        params = msgspec.structs.replace(announced, noise=noise)
    with pytest.raises(PlanRejected, match=message):
        pooled_round(
            params,
            plan,
            windows=140,
            max_grad_norm=1.0,
            dimension=DIMENSION,
            assumed_colluders=0,
        )


def test_the_pooled_step_is_one_clipped_step_without_noise() -> None:
    """One Poisson batch, every window's gradient clipped to C, the sum over B: the update
    is at most η·C·(windows drawn)/B long, however large the gradients (the labels are
    random and the inputs huge), and the same seed gives the same update (no noise)."""
    rng = np.random.default_rng(5)
    dataset = LocalDataset(
        x=(rng.normal(0, 1000, (140, SPEC.window, SPEC.n_features))).astype(np.float32),
        y=rng.integers(0, 2, 140).astype(np.int64),
    )

    initial = weights_of(build_model(SPEC))
    plan = msgspec.structs.replace(PLAN, batch_size=50)  # q 0.36: two batches an epoch

    def step() -> tuple[float, int, float]:
        model = build_model(SPEC, weights=initial)
        before = weights_of(model)
        trained = train_locally_private(
            model, dataset, plan, noise_multiplier=0.0, max_grad_norm=1.0, seed=11, one_step=True
        )
        after = weights_of(model)
        moved = math.sqrt(sum(float(np.sum((after[n] - before[n]) ** 2)) for n in before))
        return moved, trained.steps, trained.sample_rate

    moved, steps, rate = step()
    assert steps == 1
    assert rate == pytest.approx(50 / 140)
    assert 0 < moved <= plan.learning_rate * 1.0 * 140 / plan.batch_size
    assert step()[0] == moved


def test_pooled_rounds_are_counted_again_for_more_colluders() -> None:
    """Rounds booked assuming no colluder, then secagg.assumed_colluders = 1: each booked
    round kept its parameters, so the budget counts it with one share withheld, as site
    level does; the ledger's spend and the budget check both grow."""
    params = _params()
    cost = pooled_round(
        params, PLAN, windows=140, max_grad_norm=1.0, dimension=DIMENSION, assumed_colluders=0
    )
    ledger = PrivacyLedger(
        entries=[
            LedgerEntry(
                spend=cost.spend(number),
                epsilon_round=0.0,
                epsilon_total=0.0,
                delta=1e-5,
                max_grad_norm=1.0,
                num_samples=140,
                accountant="pld",
            )
            for number in range(1, 31)
        ]
    )
    assert [s.noise_multiplier for s in ledger.counted(0)] == [cost.noise_multiplier] * 30
    wary = ledger.counted(1)
    assert [s.noise_multiplier for s in wary] == pytest.approx(
        [cost.noise_multiplier / math.sqrt(2)] * 30, rel=1e-3
    )
    alone, _ = ledger.spent(1e-5, "pld", 0)
    colluded, _ = ledger.spent(1e-5, "pld", 1)
    assert colluded > alone + 0.5
    # Withholding every share leaves no noise: the history is unbounded.
    assert ledger.spent(1e-5, "pld", 2)[0] == math.inf
    # The ledger keeps what a pooled round was computed from across a write and a read.
    again = msgspec.json.decode(msgspec.json.encode(ledger), type=PrivacyLedger)
    assert again.counted(1) == wary


def test_a_budget_no_noise_can_meet_is_a_config_error_not_a_crash() -> None:
    """Sizing the shares fails with the coordinator's ConfigError (serve says it at start,
    exit 3); a budget that needs less than the smallest σ searched gets that σ."""
    hopeless = msgspec.structs.replace(POOLED, record_epsilon=0.01, planned_rounds=100_000)
    with pytest.raises(ConfigError, match="record-level"):
        _params(hopeless)
    generous = msgspec.structs.replace(POOLED, record_epsilon=100.0, planned_rounds=1)
    assert pooled_record_sigma(100.0, 1e-5, 0.7, 1) == MIN_POOLED_SIGMA
    params = _params(generous)
    carried = record_noise_multiplier(encoding_params(params), DIMENSION, record_bound(PLAN, 1.0))
    assert carried >= MIN_POOLED_SIGMA


def test_a_pooled_agent_counts_site_level_noise_when_the_round_has_some(
    tmp_path: Path,
) -> None:
    """Pooled-only shares carry no site-level guarantee and are not counted there; a
    coordinator running site-level DP as well announces the larger z, and then a pooled
    agent books and enforces its own site-level budget as a local one does."""
    from tests.agent.test_site_privacy import SPEC as SITE_SPEC
    from tests.agent.test_site_privacy import _agent, _work

    def noisy(privacy: SitePrivacySettings) -> SecAggParams:
        return round_params(
            SECAGG,
            privacy,
            selected=6,
            min_participants=4,
            clip_norm=SECAGG.clip_norm,
            dimension=parameter_count(SITE_SPEC),
            record_bound=record_bound(PLAN, 1.0),
        )

    pooled_only = noisy(POOLED)
    both = noisy(msgspec.structs.replace(POOLED, site_level="on", target_epsilon=8.0))
    identity = nacl.signing.SigningKey.generate()
    pooled = AgentService(
        config=_agent(tmp_path / "pooled", record_level="on", record_noise="pooled"),
        identity=identity,
    )
    local = AgentService(config=_agent(tmp_path / "local", record_level="on"), identity=identity)
    assert not pooled._counted_at_site_level(_work(1, pooled_only))
    assert pooled._counted_at_site_level(_work(1, both))
    assert local._counted_at_site_level(_work(1, pooled_only))
    assert not pooled._counted_at_site_level(_work(1, None))
    # Counted means booked against privacy.site_max_epsilon.
    pooled._book_site_round(_work(1, both))
    pooled._book_site_round(_work(2, pooled_only))
    assert [e.round for e in read_ledger(pooled.config.state_path).site_entries] == [1]


def test_the_coordinators_count_is_the_agents_for_a_site_in_every_round() -> None:
    """A site sampling at the coordinator's rate and taking part in every round counts
    what the coordinator books: the same accountant on the same grid, σ by σ (here a
    decaying learning rate's, a different σ each round)."""
    settings = SitePrivacySettings(record_level="pooled", record_sample_rate=0.6)
    sigmas = [5.0 * 1.03**round for round in range(8)]
    history = [
        RoundSpend(round=round + 1, noise_multiplier=sigma, sample_rate=0.6, steps=1)
        for round, sigma in enumerate(sigmas)
    ]

    agent = epsilon(history, settings.delta, accountant="pld")

    assert pooled_epsilon(settings, sigmas) == pytest.approx(agent, rel=1e-6)
    assert 0 < agent < settings.record_epsilon * 2


def test_the_pooled_update_is_the_step_itself_whatever_the_weights() -> None:
    """The update a pooled round sends is −η·g computed from the clipped gradients, not
    (stepped − base) weights: with weights of norm ~10⁵ and a step of 10⁻⁷ per window,
    float32 rounds most of the step away from the weights (how far depends on the weights,
    which one window's data does not bound), while the step keeps it all, stays within
    η·C·(windows drawn)/B and is exactly linear in η."""
    rng = np.random.default_rng(8)
    dataset = LocalDataset(
        x=rng.normal(0, 1, (140, SPEC.window, SPEC.n_features)).astype(np.float32),
        y=rng.integers(0, 2, 140).astype(np.int64),
    )
    heavy = {n: (w * 1e4).astype(np.float32) for n, w in weights_of(build_model(SPEC)).items()}
    plan = msgspec.structs.replace(PLAN, learning_rate=1e-5)

    def pooled(learning_rate: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        model = build_model(SPEC, weights=heavy)
        trained = train_locally_private(
            model,
            dataset,
            msgspec.structs.replace(plan, learning_rate=learning_rate),
            noise_multiplier=0.0,
            max_grad_norm=1.0,
            seed=4,
            one_step=True,
        )
        assert trained.step is not None
        after = weights_of(model)
        return trained.step, {n: after[n].astype(np.float64) - heavy[n] for n in heavy}

    step, rounded = pooled(plan.learning_rate)
    assert set(step) == set(heavy)
    length = math.sqrt(sum(float(np.sum(v**2)) for v in step.values()))
    assert 0 < length <= plan.learning_rate * 1.0 * 140 / plan.batch_size
    kept = sum(int(np.count_nonzero(v)) for v in step.values())
    lost = sum(int(np.count_nonzero((v == 0) & (step[n] != 0))) for n, v in rounded.items())
    assert lost > kept // 2  # the weights' float32 rounding swallowed most coordinates
    doubled, _ = pooled(2 * plan.learning_rate)
    for name in step:
        assert np.array_equal(doubled[name], 2 * step[name])


def test_a_pooled_round_is_booked_when_its_masked_input_leaves_not_after_training(
    tmp_path: Path,
) -> None:
    """With pooled noise the update carries no noise of its own, so training books nothing:
    a round that ends before the masked input leaves (at the keys or shares stage) released
    nothing of this site's windows. The spend waits for _send_masked, which books it before
    the input is published (and fails closed without it)."""
    from fedgate_agent.config import PrivacyConfig
    from fedgate_agent.round_logic import TrainForRound
    from fedgate_common.messages import RoundStart

    from tests.agent.test_record_privacy import _model, _private_agent

    config = _private_agent(
        tmp_path, PrivacyConfig(record_level="on", record_noise="pooled"), windows=140
    )
    service = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
    model = _model()
    work = TrainForRound(
        RoundStart(
            round=1,
            base_digest=model.digest,
            selected=("gw-1", "gw-2", "gw-3"),
            plan=PLAN,
            update_timeout_s=60.0,
            min_participants=2,
            secagg=_params(),
        ),
        model,
        b"certificate",
    )
    service._pending_spend = service._privacy_spend(work)
    assert service._pending_spend is not None
    update = service._train(work)
    assert update.record_privacy is None  # no report yet: nothing is booked
    assert read_ledger(config.state_path).entries == []
    assert service._unbooked is not None
    spend, trained = service._unbooked
    assert (spend.round, trained.steps) == (1, 1)
    # What _send_masked does before publishing: book it, and the report goes with it.
    report = service._record_spend(spend, trained)
    assert report is not None
    assert [e.spend.round for e in read_ledger(config.state_path).entries] == [1]
