"""Site-level DP as the agent counts it: every noisy round it sends a masked input to is
booked in privacy.json, and rounds past ``privacy.site_max_epsilon`` are refused, whatever
the coordinator books or announces."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import nacl.signing
import numpy as np
import pytest
from click.testing import CliRunner
from fedgate_agent.cli import main as agent_main
from fedgate_agent.config import AgentConfig, PrivacyConfig, validate_config, write_config
from fedgate_agent.errors import SiteBudgetExhausted
from fedgate_agent.privacy_ledger import LedgerUnreadable, read_ledger
from fedgate_agent.round_logic import TrainForRound
from fedgate_agent.service import AgentService
from fedgate_agent.site_privacy import (
    SiteBudget,
    SiteLedgerEntry,
    counted_multipliers,
    plan_site_round,
    site_epsilon,
)
from fedgate_common.arrays import encode_arrays
from fedgate_common.digests import GENESIS_PARENT, model_digest
from fedgate_common.messages import GlobalModel, RoundStart, SecAggParams, TrainingPlan
from fedgate_common.model_spec import ModelSpec, initial_weights, parameter_count
from fedgate_coordinator.secure_rounds import SecAggSettings, with_site_noise
from fedgate_coordinator.site_privacy import (
    SitePrivacySettings,
    epsilon,
    round_effective_multiplier,
    round_params,
)

from tests.federation_support import pinned_agent_config

SPEC = ModelSpec(n_features=3, window=8, n_classes=2, channels=4)
SELECTED = tuple(f"gw-{i}" for i in range(1, 7))
SECAGG = SecAggSettings(word_bits=32, clip_norm=1.0, weight_cap=500)


def _noisy_params(*, target_epsilon: float = 8.0, planned_rounds: int = 4) -> SecAggParams:
    """What a coordinator with site-level DP announces to six agents."""
    return round_params(
        SECAGG,
        SitePrivacySettings(
            site_level="on", target_epsilon=target_epsilon, planned_rounds=planned_rounds
        ),
        selected=len(SELECTED),
        min_participants=4,
        clip_norm=1.0,
        dimension=parameter_count(SPEC),
    )


def _model() -> GlobalModel:
    weights = encode_arrays(initial_weights(SPEC, np.random.default_rng(0)))
    digest = model_digest(parent_digest=GENESIS_PARENT, round=0, spec=SPEC, weights=weights)
    return GlobalModel(
        round=0, digest=digest, parent_digest=GENESIS_PARENT, spec=SPEC, weights=weights
    )


def _work(round: int, params: SecAggParams | None) -> TrainForRound:
    model = _model()
    start = RoundStart(
        round=round,
        base_digest=model.digest,
        selected=SELECTED,
        plan=TrainingPlan(learning_rate=0.05, local_epochs=1, batch_size=16),
        update_timeout_s=60.0,
        min_participants=4,
        secagg=params,
    )
    return TrainForRound(start, model, b"certificate")


def _agent(tmp_path: Path, **privacy: object) -> AgentConfig:
    return pinned_agent_config(tmp_path / "state", SPEC, privacy=PrivacyConfig(**privacy))  # type: ignore[arg-type]


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_the_agents_count_is_the_coordinators_formula(accountant: str) -> None:
    """The agent books the effective multiplier the coordinator books; with RDP it reaches
    the coordinator's ε, and PLD (the agent's default) never more."""
    params = _noisy_params(planned_rounds=4)
    z = round_effective_multiplier(params, parameter_count(SPEC))
    budget = SiteBudget(max_epsilon=100.0, delta=1e-5, accountant=accountant)  # type: ignore[arg-type]
    booked: list[SiteLedgerEntry] = []
    for number in range(1, 5):
        entry = plan_site_round(
            booked, round=number, base_digest="ab", params=params, spec=SPEC, budget=budget
        )
        assert entry is not None
        assert entry.effective_noise_multiplier == z
        booked.append(entry)
    coordinator = epsilon([z] * 4, 1e-5)
    assert coordinator <= 8.0
    if accountant == "rdp":
        assert booked[-1].epsilon_total == pytest.approx(coordinator, rel=1e-6)
    else:
        assert booked[-1].epsilon_total < coordinator
    assert booked[0].epsilon_round == pytest.approx(booked[0].epsilon_total)
    assert [e.epsilon_total for e in booked] == sorted(e.epsilon_total for e in booked)


def test_more_assumed_colluders_count_the_booked_rounds_again() -> None:
    """Rounds booked assuming no colluders, then secagg.assumed_colluders = 2: the booked
    rounds protected less than counted, and the next check counts all of them (and the
    new one) without the colluders' shares, for entries with and without their params."""
    params = _noisy_params(planned_rounds=4)
    alone = SiteBudget(max_epsilon=100.0, delta=1e-5, accountant="pld")
    booked: list[SiteLedgerEntry] = []
    for number in (1, 2, 3):
        entry = plan_site_round(
            booked, round=number, base_digest="ab", params=params, spec=SPEC, budget=alone
        )
        assert entry is not None
        booked.append(entry)
    assert booked[0].params == params
    assert booked[0].dimension == parameter_count(SPEC)
    wary = msgspec.structs.replace(alone, assumed_colluders=2)

    fourth = plan_site_round(
        booked, round=4, base_digest="ab", params=params, spec=SPEC, budget=wary
    )

    assert fourth is not None
    z_now = fourth.effective_noise_multiplier
    assert z_now < booked[0].effective_noise_multiplier
    assert fourth.epsilon_total == pytest.approx(site_epsilon([z_now] * 4, 1e-5, "pld"))
    assert counted_multipliers(booked, 2) == pytest.approx([z_now] * 3)
    assert counted_multipliers(booked, 0) == [e.effective_noise_multiplier for e in booked]
    # An entry booked before params were kept: scaled by the surviving share of the noise.
    legacy = msgspec.structs.replace(booked[0], params=None, dimension=0)
    m = legacy.min_inputs
    assert counted_multipliers([legacy], 2) == pytest.approx(
        [legacy.effective_noise_multiplier * ((m - 2) / m) ** 0.5]
    )


def test_rounds_without_noise_book_nothing() -> None:
    budget = SiteBudget(max_epsilon=1.0, delta=1e-5, accountant="pld")
    plain = SECAGG.params_for(len(SELECTED))
    assert (
        plan_site_round([], round=1, base_digest="ab", params=plain, spec=SPEC, budget=budget)
        is None
    )


def test_repeated_rounds_on_one_base_model_stop_at_the_agents_budget(tmp_path: Path) -> None:
    """A coordinator that runs noisy rounds again and again (here all on one base model,
    as one that averages the noise away would) gets inputs only until the agent's own
    budget is spent; a restarted agent still refuses, and `privacy` shows every round."""
    config = _agent(tmp_path, site_max_epsilon=8.0)
    params = _noisy_params(planned_rounds=4)  # the coordinator plans 4 rounds within ε 8
    service = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
    booked = 4  # what the coordinator planned within ε 8; the fifth goes past it
    for number in range(1, booked + 1):
        service._plan_site_round(_work(number, params))
        service._book_site_round(_work(number, params))
    service._save_status()  # as _send_masked does after booking
    with pytest.raises(SiteBudgetExhausted) as refused:
        service._plan_site_round(_work(booked + 1, params))
    ledger = read_ledger(config.state_path)
    assert [e.round for e in ledger.site_entries] == list(range(1, booked + 1))
    assert len({e.base_digest for e in ledger.site_entries}) == 1
    assert ledger.site_epsilon_total <= 8.0 < refused.value.next_round
    assert refused.value.spent == pytest.approx(ledger.site_epsilon_total)
    assert ledger.entries == []  # nothing at record level
    assert service.status.site_privacy_epsilon == ledger.site_epsilon_total

    restarted = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
    with pytest.raises(SiteBudgetExhausted):
        restarted._plan_site_round(_work(booked + 1, params))

    config_file = tmp_path / "agent.toml"
    write_config(config_file, config)
    shown = CliRunner().invoke(agent_main, ["privacy", "--config", str(config_file), "--json"])
    assert shown.exit_code == 0, shown.output
    site = json.loads(shown.output)["site_level"]
    assert site["budget_epsilon"] == 8.0
    assert site["spent_epsilon"] == pytest.approx(ledger.site_epsilon_total)
    assert [r["round"] for r in site["rounds"]] == list(range(1, booked + 1))
    text = CliRunner().invoke(agent_main, ["privacy", "--config", str(config_file)])
    assert text.exit_code == 0, text.output
    assert "site-level DP" in text.output
    assert f"spent ε {ledger.site_epsilon_total:.4f}" in text.output
    status = CliRunner().invoke(agent_main, ["status", "--config", str(config_file)])
    assert "site-level noise on" in status.output, status.output
    assert "counted again" not in text.output
    assert "another δ" not in text.output

    # More colluders assumed now: the site-level spend is counted again, and the note says
    # so under site level (record level, with no rounds, has nothing recounted).
    wary = msgspec.structs.replace(
        config, secagg=msgspec.structs.replace(config.secagg, assumed_colluders=1)
    )
    write_config(config_file, wary)
    recounted = CliRunner().invoke(agent_main, ["privacy", "--config", str(config_file)])
    assert recounted.exit_code == 0, recounted.output
    record_part, site_part = recounted.output.split("site-level DP", 1)
    assert "another δ" not in record_part
    assert "secagg.assumed_colluders = 1" in site_part


async def test_a_round_past_the_budget_is_not_joined(tmp_path: Path) -> None:
    """The refusal comes before the agent advertises keys: counted, answered, and
    status says the site-level budget is spent."""
    config = _agent(tmp_path, site_max_epsilon=0.5)
    service = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
    await service.begin_round(_work(1, _noisy_params(planned_rounds=4)))
    assert service.rejected["site_privacy_budget_exhausted"] == 1
    assert service.secure is None
    assert service._training is None
    assert service.status.last_answered_round == 1
    assert service.status.site_privacy == "budget exhausted"
    assert read_ledger(config.state_path).site_entries == []


def test_count_noise_too_small_to_hide_the_count_is_refused(tmp_path: Path) -> None:
    """Adaptive clipping with almost no noise on the within-clip word would give the bit
    away in one round: the agent's count makes that round cost more than any budget."""
    adaptive = SecAggSettings(word_bits=32, clip_norm=1.0, weight_cap=500, adaptive_clip=True)
    plain = adaptive.params_for(len(SELECTED))
    params = with_site_noise(plain, noise_multiplier=5.0, min_inputs=4, count_noise=1e-4)
    budget = SiteBudget(max_epsilon=100.0, delta=1e-5, accountant="pld")
    with pytest.raises(SiteBudgetExhausted):
        plan_site_round([], round=1, base_digest="ab", params=params, spec=SPEC, budget=budget)
    sane = with_site_noise(plain, noise_multiplier=5.0, min_inputs=4, count_noise=2.0)
    entry = plan_site_round([], round=1, base_digest="ab", params=sane, spec=SPEC, budget=budget)
    assert entry is not None
    assert entry.epsilon_round < 3


def test_a_rolled_back_site_ledger_stops_training(tmp_path: Path) -> None:
    config = _agent(tmp_path)
    params = _noisy_params()
    service = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
    for number in (1, 2):
        service._book_site_round(_work(number, params))
    service._save_status()  # as _send_masked does after booking
    ledger_file = config.state_path / "privacy.json"
    older = read_ledger(config.state_path)
    older.site_entries = older.site_entries[:1]
    ledger_file.write_bytes(msgspec.json.encode(older))
    restarted = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
    with pytest.raises(LedgerUnreadable, match="site-level"):
        restarted._plan_site_round(_work(3, params))


def test_site_epsilon_of_negligible_noise_is_infinite() -> None:
    assert site_epsilon([1.0, 0.001], 1e-5, "pld") == float("inf")
    assert site_epsilon([], 1e-5, "pld") == 0.0


@pytest.mark.parametrize("value", [0.0, -1.0, 101.0, float("nan")])
def test_site_max_epsilon_out_of_range_is_refused(tmp_path: Path, value: float) -> None:
    config = _agent(tmp_path, site_max_epsilon=value)
    assert any("privacy.site_max_epsilon" in problem for problem in validate_config(config))


@pytest.mark.parametrize(
    ("z", "count_noise"), [(1e-300, 0.0), (1.0, 1e-300), (1.0, 0.0102), (0.05, 0.0)]
)
async def test_noise_too_small_to_count_is_refused_at_once(
    tmp_path: Path, z: float, count_noise: float
) -> None:
    """Tiny noise (also on adaptive clipping's count) is refused as infinite ε: no
    ZeroDivisionError out of the round, and no accountant run that takes seconds and
    gigabytes (a coordinator can announce such a round every time)."""
    adaptive = SecAggSettings(
        word_bits=32, clip_norm=1.0, weight_cap=500, adaptive_clip=count_noise > 0
    )
    params = with_site_noise(
        adaptive.params_for(len(SELECTED)),
        noise_multiplier=z,
        min_inputs=4,
        count_noise=count_noise,
    )
    budget = SiteBudget(max_epsilon=100.0, delta=1e-2, accountant="pld")
    with pytest.raises(SiteBudgetExhausted) as refused:
        plan_site_round([], round=1, base_digest="ab", params=params, spec=SPEC, budget=budget)
    assert refused.value.next_round == float("inf")
    # The likeliest cause of tiny update noise, a coordinator sizing it for pooled
    # record-level DP (which has no count word), is named.
    assert ("privacy.record_noise = pooled" in str(refused.value)) == (count_noise == 0)
    service = AgentService(config=_agent(tmp_path), identity=nacl.signing.SigningKey.generate())
    await service.begin_round(_work(1, params))
    assert service.rejected["site_privacy_budget_exhausted"] == 1


def test_rounds_compose_as_one_gaussian() -> None:
    """Gaussian rounds of one sensitivity compose exactly into one Gaussian, which is what
    the agent asks its accountant about: the same ε as composing them one by one."""
    import dp_accounting

    multipliers = [2.85] * 10 + [1.5] * 3
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    for z in multipliers:
        accountant.compose(dp_accounting.GaussianDpEvent(z))
    composed = accountant.get_epsilon(1e-5)
    assert site_epsilon(multipliers, 1e-5, "pld") == pytest.approx(composed, rel=2e-3)
    assert site_epsilon(multipliers, 1e-5, "rdp") == pytest.approx(
        epsilon(multipliers, 1e-5), rel=1e-9
    )


async def test_a_round_without_noise_does_not_need_the_ledger(tmp_path: Path) -> None:
    """Secure rounds without site-level noise book nothing, so a damaged privacy.json does
    not stop an agent without record-level DP from joining them."""
    config = _agent(tmp_path)
    config.state_path.mkdir(parents=True, exist_ok=True)
    (config.state_path / "privacy.json").write_text("{not json")
    service = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
    service._plan_site_round(_work(1, SECAGG.params_for(len(SELECTED))))
    service._book_site_round(_work(1, SECAGG.params_for(len(SELECTED))))
    with pytest.raises(LedgerUnreadable):
        service._plan_site_round(_work(1, _noisy_params()))


def test_a_ledger_with_fewer_rounds_is_refused_whatever_its_totals(tmp_path: Path) -> None:
    """After a change of δ or accountant the totals are counted differently; a restored
    older copy is still refused, by its number of rounds."""
    config = _agent(tmp_path)
    params = _noisy_params(planned_rounds=8)
    service = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
    for number in (1, 2, 3):
        service._book_site_round(_work(number, params))
    service._save_status()
    older = read_ledger(config.state_path)
    older.site_entries = [
        msgspec.structs.replace(e, epsilon_total=e.epsilon_total * 10)
        for e in older.site_entries[:2]
    ]
    (config.state_path / "privacy.json").write_bytes(msgspec.json.encode(older))
    restarted = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
    with pytest.raises(LedgerUnreadable, match="holds 2 site-level rounds"):
        restarted._plan_site_round(_work(4, params))


def test_assumed_colluders_shares_are_not_counted_on() -> None:
    """An agent that assumes c colluders (secagg.assumed_colluders) counts only the noise
    of min_inputs − c honest shares: √((m − c)/m) of the announced; none at c ≥ m."""
    params = _noisy_params(planned_rounds=4)  # min_inputs 4
    assert params.noise is not None
    counted = {}
    for colluders in (0, 2):
        budget = SiteBudget(
            max_epsilon=100.0, delta=1e-5, accountant="pld", assumed_colluders=colluders
        )
        entry = plan_site_round(
            [], round=1, base_digest="ab", params=params, spec=SPEC, budget=budget
        )
        assert entry is not None
        assert entry.assumed_colluders == colluders
        counted[colluders] = entry
    assert counted[2].effective_noise_multiplier == pytest.approx(
        counted[0].effective_noise_multiplier * (2 / 4) ** 0.5, rel=1e-6
    )
    assert counted[2].epsilon_round > counted[0].epsilon_round
    everyone = SiteBudget(max_epsilon=100.0, delta=1e-5, accountant="pld", assumed_colluders=4)
    with pytest.raises(SiteBudgetExhausted):
        plan_site_round([], round=1, base_digest="ab", params=params, spec=SPEC, budget=everyone)
