"""Record-level DP: the accountant, DP-SGD's clipping and noise, the budget and its ledger."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import msgspec
import nacl.signing
import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from fedgate_agent.cli import main as agent_main
from fedgate_agent.config import AgentConfig, PrivacyConfig, write_config
from fedgate_agent.errors import PrivacyBudgetExhausted
from fedgate_agent.model import build_model
from fedgate_agent.privacy_ledger import LedgerUnreadable, read_ledger
from fedgate_agent.record_privacy import (
    ACCOUNTANTS,
    Accountant,
    RecordPrivacySettings,
    RoundSpend,
    as_accountant,
    epsilon,
    noise_multiplier_for,
    steps_per_round,
)
from fedgate_agent.round_logic import TrainForRound
from fedgate_agent.service import AgentService
from fedgate_agent.training import LocalDataset, save_local_dataset
from fedgate_common.arrays import encode_arrays
from fedgate_common.digests import GENESIS_PARENT, model_digest
from fedgate_common.messages import GlobalModel, RoundStart, TrainingPlan
from fedgate_common.model_spec import ModelSpec, initial_weights
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from tests.federation_support import pinned_agent_config

SPEC = ModelSpec(n_features=3, window=8, n_classes=2, channels=4)


def test_rdp_accountant_regression_matches_opacus_tests() -> None:
    """σ = 1.5, q = 0.04, 2250 steps, δ = 1e-5: ε ≈ 7.33 with RDP."""
    once = [RoundSpend(round=1, noise_multiplier=1.5, sample_rate=0.04, steps=2250)]
    assert epsilon(once, 1e-5, accountant="rdp") == pytest.approx(7.33, abs=0.01)


def test_pld_is_tighter_than_rdp_and_agrees_with_an_independent_prv_accountant() -> None:
    """The same run under dp-accounting's PLD: below RDP's 7.33, and within 1 % of Opacus's
    PRV accountant, a different numerical method from a different library."""
    from opacus.accountants import PRVAccountant

    once = [RoundSpend(round=1, noise_multiplier=1.5, sample_rate=0.04, steps=2250)]
    pld = epsilon(once, 1e-5, accountant="pld")
    prv = PRVAccountant()
    prv.history = [(1.5, 0.04, 2250)]
    assert pld < epsilon(once, 1e-5, accountant="rdp") - 0.4
    assert pld == pytest.approx(prv.get_epsilon(delta=1e-5), rel=0.01)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_history_composes_like_one_long_run(accountant: Accountant) -> None:
    """Ten rounds of 225 steps spend what 2250 steps in one go spend; a round without
    noise spends everything."""
    once = [RoundSpend(round=1, noise_multiplier=1.5, sample_rate=0.04, steps=2250)]
    rounds = [
        RoundSpend(round=r, noise_multiplier=1.5, sample_rate=0.04, steps=225) for r in range(10)
    ]
    expected = epsilon(once, 1e-5, accountant=accountant)
    assert epsilon(rounds, 1e-5, accountant=accountant) == pytest.approx(expected, rel=1e-9)
    assert epsilon([], 1e-5, accountant=accountant) == 0.0
    noiseless = RoundSpend(round=11, noise_multiplier=0.0, sample_rate=0.04, steps=1)
    assert math.isinf(epsilon([*rounds, noiseless], 1e-5, accountant=accountant))


def test_a_mixed_history_costs_more_than_either_part() -> None:
    """Rounds with different (σ, q) compose: more than each part alone, at most their sum."""
    a = RoundSpend(round=1, noise_multiplier=1.5, sample_rate=0.04, steps=1000)
    b = RoundSpend(round=2, noise_multiplier=3.0, sample_rate=0.2, steps=100)
    both = epsilon([a, b], 1e-5, accountant="pld")
    alone = [epsilon([x], 1e-5, accountant="pld") for x in (a, b)]
    assert max(alone) < both < sum(alone)


def test_accountant_names() -> None:
    assert as_accountant("pld") == "pld"
    assert ACCOUNTANTS["pld"].startswith("pld (dp_accounting")
    with pytest.raises(ValueError, match="unknown accountant 'prv'"):
        as_accountant("prv")


@settings(max_examples=12, deadline=None)
@given(
    target=st.floats(0.5, 10.0),
    rate=st.floats(0.005, 0.2),
    steps=st.integers(10, 400),
    rounds=st.integers(1, 30),
)
def test_noise_multiplier_for_a_target_never_overshoots_rdp(
    target: float, rate: float, steps: int, rounds: int
) -> None:
    _check_never_overshoots("rdp", target, rate, steps, rounds)


@settings(max_examples=8, deadline=None)
@given(
    target=st.floats(0.5, 10.0),
    rate=st.floats(0.005, 0.3),
    steps=st.integers(10, 200),
    rounds=st.integers(1, 20),
)
def test_noise_multiplier_for_a_target_never_overshoots_pld(
    target: float, rate: float, steps: int, rounds: int
) -> None:
    sigma = _check_never_overshoots("pld", target, rate, steps, rounds)
    # and it is the tighter search: never more noise than RDP asks for the same target
    rdp = RecordPrivacySettings(
        target_epsilon=target,
        delta=1e-5,
        max_grad_norm=4.0,
        planned_rounds=rounds,
        accountant="rdp",
    )
    assert sigma <= noise_multiplier_for(rdp, sample_rate=rate, steps=steps)


def _check_never_overshoots(
    accountant: Accountant, target: float, rate: float, steps: int, rounds: int
) -> float:
    budget = RecordPrivacySettings(
        target_epsilon=target,
        delta=1e-5,
        max_grad_norm=4.0,
        planned_rounds=rounds,
        accountant=accountant,
    )
    sigma = noise_multiplier_for(budget, sample_rate=rate, steps=steps)
    history = [
        RoundSpend(round=r, noise_multiplier=sigma, sample_rate=rate, steps=steps)
        for r in range(rounds)
    ]
    spent = epsilon(history, 1e-5, accountant=accountant)
    assert spent <= target
    # and not far below it: the search found the edge, not just some safe σ
    assert spent >= 0.97 * target
    return sigma


def _summed_clipped_gradient(x: torch.Tensor, y: torch.Tensor, clip: float) -> torch.Tensor:
    """Opacus's pre-noise sum of per-window clipped gradients for one batch."""
    torch.manual_seed(0)
    model = GradSampleModule(
        build_model(SPEC, weights=initial_weights(SPEC, np.random.default_rng(1)))
    )
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=len(y),
    )
    optimizer.zero_grad()
    torch.nn.CrossEntropyLoss()(model(x), y).backward()
    optimizer.clip_and_accumulate()
    summed = torch.cat([p.summed_grad.flatten() for p in model.parameters()])
    model._close()
    return summed


def test_one_huge_window_moves_the_pre_noise_sum_by_at_most_the_clip_norm() -> None:
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(0, 1, (16, SPEC.window, SPEC.n_features)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 2, 16).astype(np.int64))
    clip = 4.0
    without = _summed_clipped_gradient(x[:15], y[:15], clip)
    huge = x.clone()
    huge[15] = 1e6  # a window whose raw gradient is enormous
    with_outlier = _summed_clipped_gradient(huge, y, clip)
    assert float(torch.linalg.norm(with_outlier - without)) <= clip * (1 + 1e-5)


def test_noise_is_added_once_per_step_with_std_sigma_times_clip() -> None:
    """With every per-window gradient zero, the gradient after a step is the noise alone,
    divided by the expected batch size: std = σ C / B, not scaled by the batch."""
    sigma, clip, batch = 1.3, 4.0, 8
    module = torch.nn.Linear(400, 50, bias=False)
    torch.nn.init.zeros_(module.weight)
    model = GradSampleModule(module)
    generator = torch.Generator().manual_seed(5)
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=batch,
        generator=generator,
    )
    optimizer.zero_grad()
    (model(torch.zeros(batch, 400)).sum() * 0.0).backward()
    optimizer.step()
    noise = next(iter(model.parameters())).grad
    assert noise is not None
    assert float(noise.std()) == pytest.approx(sigma * clip / batch, rel=0.05)
    model._close()


def _model() -> GlobalModel:
    weights = encode_arrays(initial_weights(SPEC, np.random.default_rng(0)))
    digest = model_digest(parent_digest=GENESIS_PARENT, round=0, spec=SPEC, weights=weights)
    return GlobalModel(
        round=0, digest=digest, parent_digest=GENESIS_PARENT, spec=SPEC, weights=weights
    )


def _work(round: int, model: GlobalModel) -> TrainForRound:
    start = RoundStart(
        round=round,
        base_digest=model.digest,
        selected=("gw-1",),
        plan=TrainingPlan(learning_rate=0.05, local_epochs=2, batch_size=16),
        update_timeout_s=60.0,
        min_participants=1,
    )
    return TrainForRound(start, model, b"certificate")


def _privacy_command(tmp_path: Path, config: AgentConfig, *options: str) -> Result:
    """`fedgate-agent privacy` for ``config``, written to tmp_path/agent.toml."""
    config_file = tmp_path / "agent.toml"
    write_config(config_file, config)
    return CliRunner().invoke(agent_main, ["privacy", "--config", str(config_file), *options])


def _status_command(tmp_path: Path, config: AgentConfig) -> str:
    """`fedgate-agent status` for ``config`` (an agent that has run: status.json exists)."""
    config_file = tmp_path / "agent.toml"
    write_config(config_file, config)
    result = CliRunner().invoke(agent_main, ["status", "--config", str(config_file)])
    assert result.exit_code == 0, result.output
    return result.output


def _private_agent(tmp_path: Path, privacy: PrivacyConfig, windows: int) -> AgentConfig:
    """An agent's configuration with ``windows`` random training windows, pinned to a
    one-cloud federation."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, windows).astype(np.int64)
    x = rng.normal(0, 1, (windows, SPEC.window, SPEC.n_features)).astype(np.float32)
    config = pinned_agent_config(tmp_path / "state", SPEC, privacy=privacy)
    save_local_dataset(config.data_path, LocalDataset(x=x, y=y))
    return config


@pytest.mark.parametrize(
    ("plan", "refusal"),
    [
        (TrainingPlan(learning_rate=0.05, local_epochs=2, batch_size=0), "batch_size 0 outside"),
        (TrainingPlan(learning_rate=0.05, local_epochs=2, batch_size=-32), "batch_size -32"),
        (TrainingPlan(learning_rate=0.05, local_epochs=0, batch_size=16), "local_epochs 0"),
        (
            TrainingPlan(learning_rate=0.05, local_epochs=1000, batch_size=1),
            "the plan takes 200000 DP-SGD steps per round (1000 epoch(s) of 200 windows in "
            "batches of 1); at most 100000",
        ),
        (
            # At the round's limit (100,000 steps), but σ is sized for the agent's 40
            # planned rounds: 4,000,000 steps in all.
            TrainingPlan(learning_rate=0.05, local_epochs=500, batch_size=1),
            "sizing σ for 40 rounds of 100000 DP-SGD steps (4000000 in all) would take minutes",
        ),
    ],
    ids=["batch-0", "batch-negative", "epochs-0", "too-many-steps", "too-many-planned"],
)
async def test_a_plan_dp_sgd_cannot_take_is_refused_and_the_round_answered(
    tmp_path: Path, plan: TrainingPlan, refusal: str
) -> None:
    """A coordinator's plan (malicious or buggy) that the accountant cannot plan σ for, or
    that would take the σ search minutes, refuses the round: no crash, so a retained round
    start cannot put the agent in a crash loop, and nothing is booked."""
    privacy = PrivacyConfig(record_level="on", target_epsilon=2.0, planned_rounds=40)
    config = _private_agent(tmp_path, privacy, windows=200)
    service = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
    work = _work(1, _model())
    work = TrainForRound(msgspec.structs.replace(work.start, plan=plan), work.model, b"c")

    await service.begin_round(work)

    assert service.status.last_answered_round == 1
    assert service.rejected["plan_rejected"] == 1
    assert refusal in (service.status.last_error or "")
    assert not (config.state_path / "privacy.json").exists()


def test_budget_is_refused_after_a_restart_and_the_ledger_survives(tmp_path: Path) -> None:
    privacy = PrivacyConfig(record_level="on", target_epsilon=2.0, planned_rounds=2)
    config = _private_agent(tmp_path, privacy, windows=200)
    model = _model()
    service = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
    reports = []
    for number in (1, 2):
        service._pending_spend = service._privacy_spend(_work(number, model))
        update = service._train(_work(number, model))
        assert math.isfinite(update.train_loss)
        reports.append(update.record_privacy)
    ledger = read_ledger(config.state_path)
    # Each update carries what the ledger now says, for the coordinator's privacy_ledger.
    for report, kept in zip(reports, ledger.entries, strict=True):
        assert report is not None
        assert (report.epsilon_round, report.epsilon_total) == (
            kept.epsilon_round,
            kept.epsilon_total,
        )
        assert (report.delta, report.target_epsilon, report.max_grad_norm) == (1e-5, 2.0, 4.0)
        assert report.noise_multiplier == ledger.noise_multiplier
        assert report.accountant == ACCOUNTANTS["pld"]  # the default
    assert [e.spend.round for e in ledger.entries] == [1, 2]
    assert {e.accountant for e in ledger.entries} == {ACCOUNTANTS["pld"]}
    # The budget is planned with the steps Opacus's Poisson loader really takes.
    assert [e.spend.steps for e in ledger.entries] == [steps_per_round(200, 16, 2)] * 2
    assert 0 < ledger.entries[0].epsilon_total < ledger.entries[1].epsilon_total <= 2.0
    assert ledger.noise_multiplier is not None

    restarted = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
    with pytest.raises(PrivacyBudgetExhausted) as refused:
        restarted._privacy_spend(_work(3, model))
    assert refused.value.spent == pytest.approx(ledger.epsilon_total)
    assert refused.value.next_round > 2.0
    # Exhausted stays exhausted across a restart; raising the budget shows "on" again
    # (until the next round is trained or refused).
    restarted.status.privacy = "budget exhausted"
    restarted._save_status()
    again = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
    assert again.status.privacy == "budget exhausted"
    raised = msgspec.structs.replace(
        config, privacy=msgspec.structs.replace(privacy, target_epsilon=3.0)
    )
    fresh_key = nacl.signing.SigningKey.generate()
    assert AgentService(config=raised, identity=fresh_key).status.privacy == "on"
    # Raised in agent.toml but not restarted: status shows the budget the agent runs with
    # and says the new one waits for a restart.
    again._save_status()
    status = _status_command(tmp_path, raised)
    assert "of 2.0 spent" in status
    assert "agent.toml says 3.0: restart to apply" in status
    # δ changed in agent.toml: ε is counted at the new δ, and the line says the running
    # agent still checks with its own.
    moved = msgspec.structs.replace(config, privacy=msgspec.structs.replace(privacy, delta=1e-6))
    status = _status_command(tmp_path, moved)
    assert "(δ 1e-06; agent.toml says δ 1e-06 (it runs with 1e-05): restart to apply)" in status

    shown = _privacy_command(tmp_path, config, "--json")
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.output)
    assert data["spent_epsilon"] == pytest.approx(ledger.epsilon_total)
    assert [r["round"] for r in data["rounds"]] == [1, 2]
    assert data["accountant"] == ACCOUNTANTS["pld"]
    assert [r["accountant"] for r in data["rounds"]] == [ACCOUNTANTS["pld"]] * 2
    assert data["sampling"] == "poisson"
    assert data["budget_left"] == pytest.approx(data["budget_epsilon"] - data["spent_epsilon"])
    assert data["state"] == "budget exhausted"  # status.json: it refuses rounds now
    assert data["warnings"] == []
    text = _privacy_command(tmp_path, config)
    assert "the agent refuses further rounds (budget exhausted)" in text.output
    assert text.exit_code == 0, text.output
    steps = steps_per_round(200, 16, 2)
    assert ledger.sized_for is not None
    assert (ledger.sized_for.rounds, ledger.sized_for.steps) == (2, steps)
    assert (
        f"noise multiplier {ledger.noise_multiplier:.4f} (sized for 2 rounds of {steps} steps "
        f"at sample rate {16 / 200:.5f})\n"
    ) in text.output
    assert data["sized_for"] == {"rounds": 2, "steps": steps, "sample_rate": 16 / 200}
    (config.state_path / "privacy.json").write_text("{not json")
    broken = _privacy_command(tmp_path, config)
    assert broken.exit_code == 4
    assert "privacy.json" in broken.output


@pytest.mark.parametrize("name", ["privacy.json", "status.json"])
def test_a_state_file_that_cannot_be_read_is_exit_4_not_a_traceback(
    tmp_path: Path, name: str
) -> None:
    """privacy.json or status.json that the file system will not read (here a directory in
    its place; a file of another owner fails the same way): `privacy` (and, for status.json,
    `status`) say which file and what to do, exit 4 (the documented code), and print no
    traceback. (`status` shows an unusable ledger as a line of its output.)"""
    config = _private_agent(tmp_path, PrivacyConfig(record_level="on"), windows=64)
    (config.state_path / name).mkdir(parents=True)
    config_file = tmp_path / "agent.toml"
    write_config(config_file, config)
    commands = [["privacy"], ["privacy", "--json"]]
    if name == "status.json":
        commands += [["status"], ["status", "--json"]]
    for command in commands:
        result = CliRunner().invoke(agent_main, [*command, "--config", str(config_file)])
        assert result.exit_code == 4, (command, result.output)
        assert f"{name} cannot be read" in result.output
        assert "service user" in result.output
        assert "Traceback" not in result.output


def test_privacy_before_the_first_private_round(tmp_path: Path) -> None:
    config = _private_agent(tmp_path, PrivacyConfig(record_level="on"), windows=64)
    shown = _privacy_command(tmp_path, config)
    assert shown.exit_code == 0, shown.output
    assert "spent ε 0.0000" in shown.output
    assert "noise multiplier chosen at the first private round" in shown.output
    assert "no private rounds yet" in shown.output


def test_report_epsilon_off_keeps_the_spend_on_the_gateway(tmp_path: Path) -> None:
    privacy = PrivacyConfig(record_level="on", report_epsilon="off")
    config = _private_agent(tmp_path, privacy, windows=64)
    service = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
    model = _model()
    service._pending_spend = service._privacy_spend(_work(1, model))
    update = service._train(_work(1, model))
    assert update.record_privacy is None
    assert "record_privacy" not in msgspec.to_builtins(update)  # encodes as before
    assert read_ledger(config.state_path).epsilon_total > 0  # still spent and kept locally


def test_switching_the_accountant_recounts_the_whole_history(tmp_path: Path) -> None:
    """Rounds counted by RDP, then ``privacy.accountant = "pld"``: the next round's ε total
    is PLD's for the whole history (σ stays fixed), each entry names its accountant, and
    ``fedgate-agent privacy`` says the accountants differ."""
    model = _model()
    rdp_config = _private_agent(
        tmp_path, PrivacyConfig(record_level="on", planned_rounds=3, accountant="rdp"), windows=200
    )
    service = AgentService(config=rdp_config, identity=nacl.signing.SigningKey.generate())
    service._pending_spend = service._privacy_spend(_work(1, model))
    service._train(_work(1, model))
    first = read_ledger(rdp_config.state_path)
    assert first.entries[0].accountant == ACCOUNTANTS["rdp"]

    pld_config = msgspec.structs.replace(
        rdp_config, privacy=msgspec.structs.replace(rdp_config.privacy, accountant="pld")
    )
    switched = AgentService(config=pld_config, identity=nacl.signing.SigningKey.generate())
    switched._pending_spend = switched._privacy_spend(_work(2, model))
    update = switched._train(_work(2, model))
    switched._save_status()  # as the running agent does after each round
    ledger = read_ledger(pld_config.state_path)
    assert [e.accountant for e in ledger.entries] == [ACCOUNTANTS["rdp"], ACCOUNTANTS["pld"]]
    assert ledger.noise_multiplier == first.noise_multiplier  # σ was fixed at round 1
    history = ledger.history
    assert ledger.epsilon_total == pytest.approx(epsilon(history, 1e-5, accountant="pld"))
    assert ledger.epsilon_total < epsilon(history, 1e-5, accountant="rdp")
    assert update.record_privacy is not None
    assert update.record_privacy.accountant == ACCOUNTANTS["pld"]

    shown = _privacy_command(tmp_path, pld_config)
    assert shown.exit_code == 0, shown.output
    assert "accountant       pld (dp_accounting.pld.PLDAccountant)" in shown.output
    assert f"spent ε {ledger.epsilon_total:.4f}\n" in shown.output  # its last round recounted all
    assert "counted again" not in shown.output

    # δ changed afterwards: the entries' totals are at the old δ; what is shown as spent is
    # the whole history at the new one, as the next round's budget check counts it.
    tighter = msgspec.structs.replace(
        pld_config, privacy=msgspec.structs.replace(pld_config.privacy, delta=1e-9)
    )
    at_new_delta = epsilon(history, 1e-9, accountant="pld")
    assert at_new_delta > ledger.epsilon_total
    shown = _privacy_command(tmp_path, tighter)
    assert shown.exit_code == 0, shown.output
    assert f"at δ 1e-09 over 3 rounds; spent ε {at_new_delta:.4f}" in shown.output
    assert "counted again at this δ" in shown.output
    data = json.loads(_privacy_command(tmp_path, tighter, "--json").output)
    assert data["spent_epsilon"] == pytest.approx(at_new_delta)
    assert data["spent_epsilon_recorded"] == pytest.approx(ledger.epsilon_total)
    status = _status_command(tmp_path, tighter)
    assert (
        f"record-level DP on: ε {at_new_delta:.4f} of 3.0 spent (δ 1e-09; agent.toml says "
        "δ 1e-09 (it runs with 1e-05): restart to apply)"
    ) in status


def test_privacy_warns_when_a_training_seed_makes_the_noise_reproducible(tmp_path: Path) -> None:
    config = _private_agent(tmp_path, PrivacyConfig(record_level="on"), windows=64)
    unseeded = _privacy_command(tmp_path, config)
    assert unseeded.exit_code == 0, unseeded.output
    assert "warning" not in unseeded.output
    assert (
        json.loads(_privacy_command(tmp_path, config, "--json").output)["reproducible_noise"]
        is False
    )

    seeded = msgspec.structs.replace(
        config, training=msgspec.structs.replace(config.training, seed=1000)
    )
    text = _privacy_command(tmp_path, seeded)
    assert text.exit_code == 0, text.output
    assert "warning          training.seed is set" in text.output
    assert "no privacy guarantee" in text.output
    assert json.loads(_privacy_command(tmp_path, seeded, "--json").output)["reproducible_noise"]

    # Without record-level DP there is no noise to repeat, and nothing to warn about.
    plain = msgspec.structs.replace(
        seeded, privacy=msgspec.structs.replace(seeded.privacy, record_level="off")
    )
    assert "warning" not in _privacy_command(tmp_path, plain).output


def test_a_lost_or_rolled_back_ledger_stops_training(tmp_path: Path) -> None:
    """status.json keeps the ε the agent last reported; a privacy.json that holds less
    (deleted, emptied, an older copy) would hand the spent budget out again: refused."""
    privacy = PrivacyConfig(record_level="on", target_epsilon=8.0, planned_rounds=4)
    config = _private_agent(tmp_path, privacy, windows=200)
    model = _model()
    service = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
    for number in (1, 2):
        service._pending_spend = service._privacy_spend(_work(number, model))
        service._train(_work(number, model))
    service._save_status()
    ledger_file = config.state_path / "privacy.json"
    full = ledger_file.read_bytes()
    older = read_ledger(config.state_path)
    older.entries = older.entries[:1]
    for damage in (b"", b"{}", msgspec.json.encode(older)):
        if damage:
            ledger_file.write_bytes(damage)
        else:
            ledger_file.unlink()
        restarted = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
        with pytest.raises(LedgerUnreadable, match="had recorded"):
            restarted._privacy_spend(_work(3, model))
        # The command lines say so too, rather than show the smaller spend as the spend.
        shown = _privacy_command(tmp_path, config, "--json")
        assert shown.exit_code == 4, shown.output
        assert "had recorded 2 rounds" in json.loads(shown.stdout)["error"]
        status = _status_command(tmp_path, config)
        assert "ledger unusable, training stays off" in status
        assert "had recorded 2 rounds" in status
    ledger_file.write_bytes(full)
    assert _privacy_command(tmp_path, config).exit_code == 0
    assert "ledger unusable" not in _status_command(tmp_path, config)
    restarted = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
    assert restarted._privacy_spend(_work(3, model)) is not None


async def test_a_round_that_starts_while_the_last_one_trains_is_not_joined(
    tmp_path: Path,
) -> None:
    """Two rounds must not draw on the budget at once: while a training task runs, the next
    round start is answered as not joined, counted, and its spend never planned."""
    config = _private_agent(tmp_path, PrivacyConfig(record_level="on"), windows=64)
    service = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
    busy = asyncio.create_task(asyncio.sleep(30))
    service._training = busy
    try:
        await service.begin_round(_work(2, _model()))
    finally:
        busy.cancel()
    assert service.rejected["still_training"] == 1
    assert service.status.last_answered_round == 2
    assert not (config.state_path / "privacy.json").exists()
    assert service._training is busy


def test_privacy_warns_about_rounds_trained_without_dp(tmp_path: Path) -> None:
    """DP on, off for a round, on again: the ledger has no entry for the round without it,
    and its update has no record-level guarantee; `privacy` says so."""
    config = _private_agent(tmp_path, PrivacyConfig(record_level="on"), windows=64)
    service = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
    service._pending_spend = service._privacy_spend(_work(1, _model()))
    service._train(_work(1, _model()))
    service.status.rounds_trained = 2  # round 1 with DP, one more while it was off
    service._save_status()

    shown = _privacy_command(tmp_path, config)
    assert shown.exit_code == 0, shown.output
    assert "1 round(s) trained without record-level DP (2 trained, 1 in the ledger)" in (
        shown.output
    )
    data = json.loads(_privacy_command(tmp_path, config, "--json").output)
    assert data["rounds_trained_without_dp"] == 1
    service.status.rounds_trained = 1
    service._save_status()
    assert "without record-level DP" not in _privacy_command(tmp_path, config).output


def test_privacy_warns_when_delta_is_not_below_one_over_n(tmp_path: Path) -> None:
    config = _private_agent(tmp_path, PrivacyConfig(record_level="on", delta=0.01), windows=200)
    service = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
    service._pending_spend = service._privacy_spend(_work(1, _model()))
    service._train(_work(1, _model()))

    shown = _privacy_command(tmp_path, config)
    assert "δ 0.01 is not below 1/n for this site's 200 windows" in shown.output
    tight = msgspec.structs.replace(
        config, privacy=msgspec.structs.replace(config.privacy, delta=1e-5)
    )
    assert "not below 1/n" not in _privacy_command(tmp_path, tight).output
