"""Site-level differential privacy of a federation: settings, accountant, budget (no IO).

The unit of privacy is one site's whole contribution to a round. Each round that releases
a sum is one Gaussian mechanism with the noise multiplier
:func:`fedgate_common.secagg.site_dp.effective_noise_multiplier` gives; Google's
``dp_accounting`` RDP accountant composes them, with no amplification by sampling (the
coordinator chooses the agents, so selection is not random in the accountant's sense).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence

import msgspec
from fedgate_common import pld_accounting
from fedgate_common.messages import SecAggParams
from fedgate_common.secagg.aggregator import fewest_inputs
from fedgate_common.secagg.encoding import EncodingParams
from fedgate_common.secagg.participant import encoding_params
from fedgate_common.secagg.site_dp import (
    effective_noise_multiplier,
    pooled_sum_noise_multiplier,
    record_noise_multiplier,
)

from fedgate_coordinator.errors import ConfigError
from fedgate_coordinator.secure_rounds import SecAggSettings, with_site_noise

ACCOUNTANT = "rdp (dp_accounting.rdp.RdpAccountant)"
UNIT = "site (one agent's whole contribution to a round)"
SAMPLING = "none (agents are chosen, not sampled: no amplification)"
SITE_LEVEL_MODES = ("on", "off")
RECORD_LEVEL_MODES = ("off", "pooled")
MIN_POOLED_SIGMA = 0.3  # the least pooled record-level σ sized for (see pooled_record_sigma)
_MAX_POOLED_SIGMA = 1e4

USEFUL_NOISE_RATIO = 1.0
"""Warn when the noise norm in a round's mean update exceeds this many clip norms."""


class SitePrivacySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[privacy]`` in coordinator.toml.

    With ``site_level = "on"`` every secure round carries distributed discrete Gaussian
    noise. ``noise_multiplier`` 0 means the smallest multiplier that keeps
    ``planned_rounds`` rounds within ``target_epsilon`` at ``delta``; the coordinator stops
    scheduling rounds once the next one would exceed the budget.
    """

    site_level: str = "off"
    target_epsilon: float = 8.0
    delta: float = 1e-5
    planned_rounds: int = 20
    noise_multiplier: float = 0.0
    # Record level with the noise pooled (privacy.md §3.7): each round's shares sized so
    # that one window of a site sampling at most ``record_sample_rate`` and clipping to
    # ``record_clip_norm`` stays within ``record_epsilon`` over ``planned_rounds``.
    record_level: str = "off"
    record_epsilon: float = 3.0
    record_clip_norm: float = 1.0
    record_sample_rate: float = 0.7

    @property
    def enabled(self) -> bool:
        return self.site_level == "on"

    @property
    def pooled(self) -> bool:
        return self.record_level == "pooled"


def site_privacy_problems(settings: SitePrivacySettings) -> list[str]:
    problems = []
    if settings.site_level not in SITE_LEVEL_MODES:
        problems.append(f"privacy.site_level={settings.site_level!r}: use on or off")
    if settings.record_level not in RECORD_LEVEL_MODES:
        problems.append(f"privacy.record_level={settings.record_level!r}: use off or pooled")
    for key, value, allowed, ok in (
        ("target_epsilon", settings.target_epsilon, "(0, 100]", 0 < settings.target_epsilon <= 100),
        ("delta", settings.delta, "(0, 0.01]", 0 < settings.delta <= 0.01),
        (
            "planned_rounds",
            settings.planned_rounds,
            "1..100000",
            1 <= settings.planned_rounds <= 100_000,
        ),
        (
            "noise_multiplier",
            settings.noise_multiplier,
            "0 (from the target) or (0, 1000]",
            0 <= settings.noise_multiplier <= 1000,
        ),
        ("record_epsilon", settings.record_epsilon, "(0, 100]", 0 < settings.record_epsilon <= 100),
        (
            "record_clip_norm",
            settings.record_clip_norm,
            "(0, 1000]",
            0 < settings.record_clip_norm <= 1000,
        ),
        (
            "record_sample_rate",
            settings.record_sample_rate,
            "(0, 1]",
            0 < settings.record_sample_rate <= 1,
        ),
    ):
        if not ok:  # NaN fails every comparison, so it lands here too
            problems.append(f"privacy.{key}={value!r}: use {allowed}")
    return problems


@functools.lru_cache(maxsize=32)
def pooled_record_sigma(epsilon: float, delta: float, sample_rate: float, rounds: int) -> float:
    """The noise multiplier, relative to one window, that keeps ``rounds`` Poisson-sampled
    Gaussian steps at ``sample_rate`` within ``epsilon`` at ``delta``, by the PLD
    arithmetic the agents count with (:func:`fedgate_common.pld_accounting.noise_multiplier`;
    the σ returned never overshoots): an agent that samples at ``sample_rate``, clips to
    ``record_clip_norm`` and assumes no colluders counts such a round as planned.

    Searched in [:data:`MIN_POOLED_SIGMA`, 1e4]: a budget that needs less noise gets the
    lower end (more noise than it needs; below it the PLD grows slow), one that needs more
    is a :class:`ConfigError`.
    """
    try:
        return pld_accounting.noise_multiplier(
            epsilon, delta, sample_rate, rounds, floor=MIN_POOLED_SIGMA, ceiling=_MAX_POOLED_SIGMA
        )
    except pld_accounting.NoNoiseFits:
        raise ConfigError(
            f"no noise multiplier up to {_MAX_POOLED_SIGMA:g} keeps {rounds} rounds at sampling "
            f"rate {sample_rate:g} within record-level ε = {epsilon}: raise "
            "privacy.record_epsilon, plan fewer rounds (privacy.planned_rounds) or sample "
            "fewer windows a step (privacy.record_sample_rate, with the agents' batch_size)"
        ) from None


def pooled_noise_multiplier(
    settings: SitePrivacySettings,
    encoding_for: Callable[[float], EncodingParams],
    dimension: int,
    record_bound: float,
) -> float:
    """The smallest z (to 0.1 %) whose round, encoded as ``encoding_for(z)``, carries at
    least the pooled record-level σ for one window moving an update by ``record_bound``."""
    target = pooled_record_sigma(
        settings.record_epsilon,
        settings.delta,
        settings.record_sample_rate,
        settings.planned_rounds,
    )

    def carries(z: float) -> bool:
        return record_noise_multiplier(encoding_for(z), dimension, record_bound) >= target

    return _smallest_z(
        carries,
        low=1e-9,
        high=1e-6,
        failure=f"no noise multiplier up to 1e4 carries record-level σ {target:.3f}: lower "
        "the learning rate or privacy.record_clip_norm, or raise the batch size",
    )


def _smallest_z(passes: Callable[[float], bool], *, low: float, high: float, failure: str) -> float:
    """The smallest z (to 0.1 %) with ``passes(z)``, for a test that passes from some z on:
    doubling ``high`` until it passes (:class:`ConfigError` ``failure`` past 1e4), then
    bisecting geometrically between the last z that failed and the first that passed."""
    while not passes(high):
        low, high = high, high * 2
        if high > 1e4:
            raise ConfigError(failure)
    while high / low > 1.001:
        middle = math.sqrt(low * high)
        if passes(middle):
            high = middle
        else:
            low = middle
    return high


def epsilon(noise_multipliers: Sequence[float], delta: float) -> float:
    """ε at ``delta`` after one Gaussian mechanism per entry (0 for none, inf for z = 0)."""
    if not noise_multipliers:
        return 0.0
    if min(noise_multipliers) <= 0:
        return math.inf
    import dp_accounting  # here: it takes ~1 s to import, which every CLI call would pay

    accountant = dp_accounting.rdp.RdpAccountant()
    for z in noise_multipliers:
        accountant.compose(dp_accounting.GaussianDpEvent(z))
    return float(accountant.get_epsilon(delta))


def plan_noise_multiplier(
    settings: SitePrivacySettings,
    encoding_for: Callable[[float], EncodingParams],
    dimension: int,
) -> float:
    """The configured multiplier, or the smallest z (to 0.1 %) whose ``planned_rounds``
    rounds encoded as ``encoding_for(z)`` stay within the target.

    The effective multiplier grows with z (more noise, and the rounding term of the
    sensitivity is fixed), so bisection finds it.
    """
    if settings.noise_multiplier > 0:
        return settings.noise_multiplier

    def within(z: float) -> bool:
        effective = effective_noise_multiplier(encoding_for(z), dimension)
        spent = epsilon([effective] * settings.planned_rounds, settings.delta)
        return spent <= settings.target_epsilon

    return _smallest_z(
        within,
        low=1e-3,
        high=1.0,
        failure=f"no noise multiplier up to 1e4 keeps {settings.planned_rounds} rounds "
        f"within ε = {settings.target_epsilon}: raise privacy.target_epsilon, plan "
        "fewer rounds, or (with adaptive clipping) raise secagg.clip_count_noise",
    )


def noise_to_signal(noise_multiplier: float, dimension: int, inputs: int) -> float:
    """Expected L2 norm of the noise in a round's mean update, in clip norms: z·√d / n.

    Every site's clipped update has norm at most the clip norm C; the mean of n of them
    carries noise of norm about z·C·√d / n. Above 1 the noise outweighs any one site's
    largest possible update.
    """
    return noise_multiplier * math.sqrt(dimension) / max(inputs, 1)


def round_effective_multiplier(params: SecAggParams, dimension: int) -> float:
    """The Gaussian-equivalent noise multiplier of a secure round with these parameters."""
    return effective_noise_multiplier(encoding_params(params), dimension)


class BudgetCheck(msgspec.Struct, frozen=True, kw_only=True):
    spent: float  # ε of the rounds released so far
    after: float  # ε if the next round is released too
    target: float

    @property
    def allows_next(self) -> bool:
        return self.after <= self.target


def check_budget(
    settings: SitePrivacySettings, released: Sequence[float], next_multiplier: float
) -> BudgetCheck:
    """Would one more round with ``next_multiplier`` keep the federation within budget?"""
    return BudgetCheck(
        spent=epsilon(released, settings.delta),
        after=epsilon([*released, next_multiplier], settings.delta),
        target=settings.target_epsilon,
    )


def pooled_accountant(settings: SitePrivacySettings) -> str:
    """How a pooled ledger row's ε was counted (the ``accountant`` column): the agents'
    PLD accountant at the configured sampling rate."""
    return f"{pld_accounting.NAME}, poisson q={settings.record_sample_rate:g}"


def pooled_count(settings: SitePrivacySettings, sigmas: Sequence[float]) -> pld_accounting.Running:
    """The running count of one window of a site that took part in every round with these
    pooled σ (one step each at ``record_sample_rate``), to grow round by round; runs of
    equal σ are composed as one self-composed step."""
    count = pld_accounting.Running(settings.delta)
    for sigma, run in itertools.groupby(sigmas):
        count.compose(sigma, settings.record_sample_rate, sum(1 for _ in run))
    return count


def pooled_epsilon(settings: SitePrivacySettings, sigmas: Sequence[float]) -> float:
    """ε at ``settings.delta`` of one window of a site that took part in every round with
    these pooled σ (:func:`pooled_count`)."""
    return pooled_count(settings, sigmas).epsilon()


def pooled_round_sigma(params: SecAggParams, dimension: int, record_bound: float) -> float:
    """The σ per window a pooled round with ``params`` carries (0 without noise)."""
    return pooled_sum_noise_multiplier(encoding_params(params), dimension, record_bound)


def check_pooled_budget(
    settings: SitePrivacySettings, released: pld_accounting.Running, next_sigma: float
) -> BudgetCheck:
    """Would one more round pooling ``next_sigma`` per window keep a site that took part in
    every released round (``released``) within ``record_epsilon``? (The agents count their
    own rounds and refuse past their budgets; this is what stops the coordinator's
    schedule.)"""
    return BudgetCheck(
        spent=released.epsilon(),
        after=released.plus(next_sigma, settings.record_sample_rate).epsilon(),
        target=settings.record_epsilon,
    )


def round_params(
    secagg: SecAggSettings,
    privacy: SitePrivacySettings,
    *,
    selected: int,
    min_participants: int,
    clip_norm: float,
    dimension: int,
    record_bound: float | None = None,
) -> SecAggParams:
    """A secure round's parameters: the clip norm, and with site-level DP or pooled
    record-level DP the noise.

    The shares are sized for the fewest inputs the round may sum, max(t, min_participants)
    (the aggregator aborts below it); z is planned for ``privacy.planned_rounds`` rounds
    of this shape. With pooled record-level noise and ``record_bound`` (η·C/B of this
    round's plan) z is also at least what the record-level budget needs.
    """
    params = secagg.params_for(selected, clip_norm=clip_norm)
    pooled = privacy.pooled and record_bound is not None
    if not privacy.enabled and not pooled:
        return params
    min_inputs = fewest_inputs(params, min_participants)  # params have no noise yet
    count_noise = secagg.count_noise_for(selected)

    def noised(z: float) -> SecAggParams:
        return with_site_noise(
            params, noise_multiplier=z, min_inputs=min_inputs, count_noise=count_noise
        )

    def encoded(z: float) -> EncodingParams:
        return encoding_params(noised(z))

    z = plan_noise_multiplier(privacy, encoded, dimension) if privacy.enabled else 0.0
    if pooled:
        assert record_bound is not None
        z = max(z, pooled_noise_multiplier(privacy, encoded, dimension, record_bound))
    return noised(z)


def federation_size_warning(
    secagg: SecAggSettings,
    privacy: SitePrivacySettings,
    *,
    agents: int,
    min_participants: int,
    dimension: int,
) -> str:
    """A warning when site-level noise would swamp the mean update of ``agents`` sites, else
    "" (also without site-level DP or agents). Plans z as a round of that size would;
    raises :class:`ConfigError` when no z fits the budget."""
    if not privacy.enabled or agents < 1:
        return ""
    params = round_params(
        secagg,
        privacy,
        selected=agents,
        min_participants=min_participants,
        clip_norm=secagg.clip_norm,  # z does not depend on the clip norm
        dimension=dimension,
    )
    assert params.noise is not None
    z = params.noise.noise_multiplier
    ratio = noise_to_signal(z, dimension, agents)
    if ratio <= USEFUL_NOISE_RATIO:
        return ""
    needed = math.ceil(z * math.sqrt(dimension) / USEFUL_NOISE_RATIO)
    return (
        f"the federation is too small for site-level DP to leave a useful model: with "
        f"{agents} sites, noise multiplier {z:.3g} and {dimension} parameters "
        f"the noise in each round's mean update is about {ratio:.3g} times the largest "
        f"update one site may send; about {needed} sites would bring it to "
        f"{USEFUL_NOISE_RATIO:g} (or raise privacy.target_epsilon, or plan fewer rounds)"
    )
