"""The demo federation in one process: centralized, plain FedAvg, FedAvg with record-level DP.

Everything the product decides is the product's code, called directly:

- the training plan of each round is :meth:`RoundSettings.plan_for` (the coordinator's
  ``[rounds]`` settings: lr, lr decay per round, momentum, local epochs, batch size);
- a site trains with :func:`train_locally`, or with :func:`train_locally_private` (Opacus
  DP-SGD) when record-level DP is on;
- σ, the per-round spend, ε and the budget refusal follow ``AgentService._privacy_spend``
  and ``_record_spend``: σ = :func:`noise_multiplier_for` for ``planned_rounds`` = the run's
  rounds and the first DP round's (q, T), kept for the rest of the run; a round is refused
  when the history plus that round's planned spend would pass the budget, and the spend
  recorded afterwards is the steps actually taken;
- the aggregate is :func:`weighted_mean_delta` (weights = windows per site), applied with
  :func:`apply_delta`; a round with fewer than ``min_participants`` updates, or whose
  aggregate is not finite, leaves the global model unchanged (the coordinator aborts it).

What is *not* the product: no MQTT, no SecAgg masking (it does not change the sum), and
the seeds. Each site trains round ``r`` with seed :func:`site_seed` (different every round
and site). The demo instead gives each agent one fixed ``training.seed`` for every round,
which with DP replays the same Poisson batches and the same noise draws each round;
``fixed_site_seeds=True`` reproduces that. A seeded run has no privacy guarantee
(``docs/privacy.md`` section 5): ε here measures how much noise was added.

The aggregation is a hook (:data:`Aggregator`): it receives the round's site updates and
returns the global delta, or ``None`` to abort the round. A site-level DP mode (clip each
site's delta, add noise to the sum) would be another :data:`Aggregator`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
from fedgate_agent.datasets.tep import FederatedSplit, centralized_dataset, federated_split
from fedgate_agent.model import build_model, load_weights, weights_of
from fedgate_agent.private_training import PrivateTrainResult, train_locally_private
from fedgate_agent.record_privacy import (
    DEFAULT_ACCOUNTANT,
    Accountant,
    RecordPrivacySettings,
    RoundSpend,
    epsilon,
    noise_multiplier_for,
    sample_rate,
    steps_per_round,
)
from fedgate_agent.training import LocalDataset, TrainResult, evaluate, train_locally
from fedgate_common.messages import TrainingPlan
from fedgate_common.model_spec import ModelSpec, initial_weights
from fedgate_coordinator.aggregation import apply_delta, weighted_mean_delta
from fedgate_coordinator.rounds import RoundSettings
from opacus.accountants.analysis import rdp as rdp_analysis
from torch import nn

__all__ = [
    "DEFAULT_PLAN",
    "DP_CLIP",
    "DP_PLAN",
    "DP_ROUNDS",
    "N_SITES",
    "Aggregator",
    "CentralizedResult",
    "FederationResult",
    "RecordDp",
    "RoundContext",
    "SiteJob",
    "SiteLedger",
    "SiteTrained",
    "SiteUpdate",
    "demo_split",
    "genesis",
    "memoize_accountant",
    "quiet_opacus",
    "run_centralized",
    "run_fedavg",
    "score",
    "site_seed",
    "site_trainer",
    "train_site",
    "training_plan",
    "weighted_fedavg",
]

Weights = dict[str, npt.NDArray[np.float32]]
Progress = Callable[[str], None]

N_SITES = 6  # the demo's federation
DEFAULT_PLAN = RoundSettings()  # coordinator defaults: lr 0.01, decay 0.98, mom 0.9, E 5, B 32

# The record-level DP settings chosen by tune_record.py (README.md): the training plan (for
# every site, with or without DP), the clip (DP only) and the rounds (= planned_rounds).
DP_PLAN = RoundSettings(
    learning_rate=1.0, lr_decay=0.9, momentum=0.9, local_epochs=2, batch_size=256
)
DP_CLIP = 1.0
DP_ROUNDS = 20


def training_plan(
    *,
    learning_rate: float,
    lr_decay: float,
    momentum: float,
    local_epochs: int,
    batch_size: int,
) -> RoundSettings:
    """The coordinator's ``[rounds]`` settings for a training plan (other fields default)."""
    return RoundSettings(
        learning_rate=learning_rate,
        lr_decay=lr_decay,
        momentum=momentum,
        local_epochs=local_epochs,
        batch_size=batch_size,
    )


def quiet_opacus() -> None:
    """Silence the warnings Opacus's hooks print on every DP round (they are expected)."""
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")


def memoize_accountant() -> None:
    """Memoise Opacus's per-order RDP of the subsampled Gaussian, ``_compute_rdp(q, σ, α)``.

    It is a pure function, so every ε and σ stays bit-for-bit what the agent computes; but
    the agent recomputes it for every history entry at every round, and at a large
    sampling rate (q ≳ 0.1, fractional orders) one call costs milliseconds: uncached, the
    accountant took 90 % of a 6-site run at batch 512. Idempotent.
    """
    if not hasattr(rdp_analysis._compute_rdp, "cache_info"):
        rdp_analysis._compute_rdp = functools.lru_cache(maxsize=None)(rdp_analysis._compute_rdp)


def demo_split(seed: int, stride: int = 2) -> FederatedSplit:
    """The demo's non-IID TEP split over 6 sites (the demo itself uses seed 0's default).

    ``stride`` 1 instead of the demo's 2 doubles the windows per site (each raw reading
    then lies in up to 20 windows instead of 10: docs/privacy.md section 2)."""
    return federated_split(N_SITES, seed=seed, stride=stride)


def genesis(split: FederatedSplit, seed: int) -> Weights:
    """The genesis weights of ``fedgate-coordinator init --genesis-seed seed``."""
    return initial_weights(split.spec, np.random.default_rng(seed))


def site_seed(seed: int, round_number: int, site: int) -> int:
    """The training seed of ``site`` in round ``round_number`` (1-based) of run ``seed``."""
    return seed * 1_000_003 + round_number * 1_000 + site


# --------------------------------------------------------------------------- record DP


@dataclass(frozen=True)
class RecordDp:
    """The agent's ``[privacy]`` settings at record level; ``planned_rounds`` is the run's."""

    target_epsilon: float
    max_grad_norm: float
    delta: float = 1e-5
    accountant: Accountant = DEFAULT_ACCOUNTANT

    def settings(self, planned_rounds: int) -> RecordPrivacySettings:
        return RecordPrivacySettings(
            target_epsilon=self.target_epsilon,
            delta=self.delta,
            max_grad_norm=self.max_grad_norm,
            planned_rounds=planned_rounds,
            accountant=self.accountant,
        )


@dataclass
class SiteLedger:
    """One site's ``privacy.json`` in memory: σ once chosen, and the rounds spent."""

    settings: RecordPrivacySettings
    noise_multiplier: float | None = None
    history: list[RoundSpend] = field(default_factory=list)
    refused_from: int | None = None  # first round refused for the budget

    def plan_round(
        self, round_number: int, num_samples: int, batch_size: int, epochs: int
    ) -> RoundSpend | None:
        """The spend of training this round, or ``None`` if it would pass the budget
        (``AgentService._privacy_spend``)."""
        rate = sample_rate(num_samples, batch_size)
        steps = steps_per_round(num_samples, batch_size, epochs)
        sigma = self.noise_multiplier or noise_multiplier_for(
            self.settings, sample_rate=rate, steps=steps
        )
        spend = RoundSpend(
            round=round_number, noise_multiplier=sigma, sample_rate=rate, steps=steps
        )
        settings = self.settings
        if (
            epsilon([*self.history, spend], settings.delta, accountant=settings.accountant)
            > settings.target_epsilon
        ):
            if self.refused_from is None:
                self.refused_from = round_number
            return None
        return spend

    def record(self, spend: RoundSpend, trained: PrivateTrainResult) -> None:
        """Record the steps actually taken (``AgentService._record_spend``)."""
        self.noise_multiplier = trained.noise_multiplier
        self.history.append(
            RoundSpend(
                round=spend.round,
                noise_multiplier=trained.noise_multiplier,
                sample_rate=trained.sample_rate,
                steps=trained.steps,
            )
        )

    @property
    def epsilon(self) -> float:
        return epsilon(self.history, self.settings.delta, accountant=self.settings.accountant)


# --------------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class SiteUpdate:
    """What a site sends: its delta (trained − global) and its number of windows."""

    site: int
    delta: Weights
    num_samples: int
    train_loss: float


@dataclass(frozen=True)
class RoundContext:
    """What an aggregator may use besides the updates."""

    round: int  # 1-based
    rounds: int
    n_sites: int
    global_weights: Weights
    rng: np.random.Generator  # seeded per run and round, for aggregators that add noise


# Returns the global delta of the round, or None to abort it (global model unchanged).
Aggregator = Callable[[Sequence[SiteUpdate], RoundContext], Weights | None]


def weighted_fedavg(updates: Sequence[SiteUpdate], context: RoundContext) -> Weights | None:
    """The coordinator's plaintext aggregate: the window-weighted mean of the deltas."""
    del context
    cap = DEFAULT_PLAN.max_weight
    return weighted_mean_delta([(min(u.num_samples, cap), u.delta) for u in updates])


# --------------------------------------------------------------------------- runs


def _finite(weights: Weights) -> bool:
    return all(np.isfinite(w).all() for w in weights.values())


@dataclass(frozen=True)
class FederationResult:
    """A FedAvg run: final test accuracy/loss, and per site ε spent and rounds trained."""

    accuracy: float
    test_loss: float
    accuracy_per_round: tuple[float, ...]
    noise_multiplier: tuple[float, ...]  # per site; empty without DP
    epsilon: tuple[float, ...]  # per site; empty without DP
    rounds_trained: tuple[int, ...]  # per site
    rounds_aborted: int
    seconds: float
    weights: Weights = field(repr=False)


def score(split: FederatedSplit, weights: Weights) -> tuple[float, float]:
    """Test accuracy and loss of ``weights`` on the split's held-out windows (NaN when not
    finite)."""
    if not _finite(weights):
        return float("nan"), float("nan")
    result = evaluate(build_model(split.spec, weights=weights), split.test)
    return result.accuracy, result.loss


@dataclass(frozen=True)
class SiteJob:
    """One site's training in one round: what a worker needs besides the site's windows."""

    site: int
    weights: Weights  # the global model the site starts from
    plan: TrainingPlan
    seed: int
    noise_multiplier: float | None  # None: plain training; else DP-SGD with this σ
    max_grad_norm: float


@dataclass(frozen=True)
class SiteTrained:
    delta: Weights
    result: TrainResult
    private: PrivateTrainResult | None


def train_site(model: nn.Module, data: LocalDataset, job: SiteJob) -> SiteTrained:
    """The site's round, as its agent trains it: from ``job.weights``, with or without DP."""
    load_weights(model, job.weights)
    private = None
    if job.noise_multiplier is None:
        result = train_locally(model, data, job.plan, seed=job.seed)
    else:
        private = train_locally_private(
            model,
            data,
            job.plan,
            noise_multiplier=job.noise_multiplier,
            max_grad_norm=job.max_grad_norm,
            seed=job.seed,
        )
        result = private.result
    trained = weights_of(model)
    delta = {name: trained[name] - job.weights[name] for name in job.weights}
    return SiteTrained(delta, result, private)


class _Worker:
    """A worker process's sites and model, set once by :func:`_start_worker` (the process
    is spawned, so it inherits nothing of the parent's torch state)."""

    sites: Sequence[LocalDataset] = ()
    model: nn.Module | None = None


def _start_worker(sites: Sequence[LocalDataset], spec: ModelSpec) -> None:
    torch.set_num_threads(1)  # the benchmarks' setting, so results match jobs=1
    quiet_opacus()
    _Worker.sites = sites
    _Worker.model = build_model(spec)


def _train_in_worker(job: SiteJob) -> SiteTrained:
    if _Worker.model is None:
        raise RuntimeError("site worker used before _start_worker")
    return train_site(_Worker.model, _Worker.sites[job.site], job)


@contextlib.contextmanager
def site_trainer(
    split: FederatedSplit, jobs: int
) -> Iterator[Callable[[Sequence[SiteJob]], list[SiteTrained]]]:
    """Train a round's sites one after another (``jobs`` 1), or in ``jobs`` worker
    processes, each with the split's windows loaded once. Each site's training is seeded,
    and a worker runs one torch thread, as the benchmarks and the demo do: with one thread
    here too, the results are the same either way."""
    if jobs <= 1:
        model = build_model(split.spec)
        yield lambda batch: [train_site(model, split.sites[job.site], job) for job in batch]
        return
    with ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(tuple(split.sites), split.spec),
    ) as pool:
        yield lambda batch: list(pool.map(_train_in_worker, batch))


def run_fedavg(
    split: FederatedSplit,
    plan: RoundSettings,
    *,
    rounds: int,
    seed: int,
    dp: RecordDp | None = None,
    aggregate: Aggregator = weighted_fedavg,
    min_participants: int = DEFAULT_PLAN.min_participants,
    fixed_site_seeds: bool = False,
    track_accuracy: bool = False,
    progress: Progress | None = None,
    initial: Weights | None = None,
    jobs: int = 1,
) -> FederationResult:
    """``rounds`` rounds of FedAvg over ``split.sites`` from the genesis of ``seed``.

    With ``dp`` every site runs DP-SGD under its own budget (``planned_rounds = rounds``),
    and a site whose next round would pass the budget contributes nothing from then on.
    ``track_accuracy`` evaluates the global model after every round (slower). ``initial``
    replaces the genesis weights of ``seed`` (a pre-trained model, public_pretraining.py).
    ``jobs`` > 1 trains a round's sites in that many processes (same results).
    """
    started = time.perf_counter()
    global_weights = genesis(split, seed) if initial is None else initial
    ledgers = [SiteLedger(dp.settings(rounds)) for _ in split.sites] if dp is not None else []
    trained_rounds = [0] * len(split.sites)
    aborted = 0
    curve: list[float] = []
    with site_trainer(split, jobs) as train:
        for round_number in range(1, rounds + 1):
            round_plan = plan.plan_for(round_number)
            batch: list[SiteJob] = []
            spends: dict[int, RoundSpend] = {}
            for index, site in enumerate(split.sites):
                sigma = None
                if dp is not None:
                    spend = ledgers[index].plan_round(
                        round_number, len(site), round_plan.batch_size, round_plan.local_epochs
                    )
                    if spend is None:
                        continue  # PrivacyBudgetExhausted: the site answers but sends nothing
                    spends[index] = spend
                    sigma = spend.noise_multiplier
                train_seed = (
                    seed * 1_000 + index
                    if fixed_site_seeds
                    else site_seed(seed, round_number, index)
                )
                batch.append(
                    SiteJob(
                        site=index,
                        weights=global_weights,
                        plan=round_plan,
                        seed=train_seed,
                        noise_multiplier=sigma,
                        max_grad_norm=dp.max_grad_norm if dp is not None else 0.0,
                    )
                )
            updates: list[SiteUpdate] = []
            for job, done in zip(batch, train(batch), strict=True):
                if done.private is not None:
                    ledgers[job.site].record(spends[job.site], done.private)
                if not math.isfinite(done.result.mean_loss) or not _finite(done.delta):
                    continue  # TrainingDiverged: the update is not sent
                trained_rounds[job.site] += 1
                updates.append(
                    SiteUpdate(job.site, done.delta, done.result.num_samples, done.result.mean_loss)
                )
            context = RoundContext(
                round=round_number,
                rounds=rounds,
                n_sites=len(split.sites),
                global_weights=global_weights,
                rng=np.random.default_rng([seed, round_number]),
            )
            mean = aggregate(updates, context) if len(updates) >= min_participants else None
            candidate = apply_delta(global_weights, mean) if mean is not None else None
            if candidate is None or not _finite(candidate):
                aborted += 1
            else:
                global_weights = candidate
            if track_accuracy:
                curve.append(score(split, global_weights)[0])
            if progress is not None:
                spent = (
                    f", max ε {max(ledger.epsilon for ledger in ledgers):.2f}" if ledgers else ""
                )
                shown = f", acc {curve[-1]:.3f}" if track_accuracy else ""
                progress(f"round {round_number}/{rounds}: {len(updates)} updates{spent}{shown}")
    accuracy, loss = score(split, global_weights)
    return FederationResult(
        accuracy=accuracy,
        test_loss=loss,
        accuracy_per_round=tuple(curve),
        noise_multiplier=tuple(ledger.noise_multiplier or 0.0 for ledger in ledgers),
        epsilon=tuple(ledger.epsilon for ledger in ledgers),
        rounds_trained=tuple(trained_rounds),
        rounds_aborted=aborted,
        seconds=time.perf_counter() - started,
        weights=global_weights,
    )


@dataclass(frozen=True)
class CentralizedResult:
    accuracy: float
    test_loss: float
    seconds: float


def run_centralized(
    split: FederatedSplit,
    plan: RoundSettings,
    *,
    rounds: int,
    seed: int,
    initial: Weights | None = None,
) -> CentralizedResult:
    """The union of the sites' windows, trained like ``demo/run_demo.py`` does it: one
    ``plan.plan_for(r)`` for r = 1..rounds, i.e. as many epochs as one site trains in the
    federation, with the same lr decay; the same genesis weights."""
    started = time.perf_counter()
    model = build_model(split.spec, weights=genesis(split, seed) if initial is None else initial)
    union: LocalDataset = centralized_dataset(split)
    for round_number in range(1, rounds + 1):
        train_locally(
            model, union, plan.plan_for(round_number), seed=site_seed(seed, round_number, 99)
        )
    accuracy, loss = score(split, weights_of(model))
    return CentralizedResult(
        accuracy=accuracy, test_loss=loss, seconds=time.perf_counter() - started
    )
