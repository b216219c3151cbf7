"""Pre-training a federation's genesis model on simulated plant runs (public data).

The genesis weights a coordinator would draw from ``genesis_seed``
(:func:`~fedgate_common.model_spec.initial_weights` with ``default_rng(seed)``) are trained
with plain SGD — no DP: nothing in simulated runs comes from a site — on windows cut from
the runs of ``fedgate-bridge simulate-runs`` files, and packed as a genesis-weights file
(:mod:`fedgate_common.genesis_weights`) that says how it was made. Decision 0046 and
``bench/privacy/public_pretraining.py`` measured the recipe: :data:`PRETRAIN_PLAN`.

Layers: :func:`public_windows` cuts runs into windows, :func:`pretrain_weights` trains
weights on them, :func:`pretrain_genesis` does both for runs files read by
:func:`read_public_runs` and fills in the provenance. ``fedgate-agent pretrain``
(:mod:`fedgate_agent.pretrain_cli`) is the front door.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from fedgate_common.consensus.manifest import MAX_SEED  # a genesis seed is 0..2**63-1
from fedgate_common.genesis_weights import GenesisWeights, Pretraining, make_genesis_weights
from fedgate_common.messages import TrainingPlan
from fedgate_common.model_spec import ModelSpec, initial_weights
from fedgate_common.plant_runs import PlantRun, load_plant_runs

from fedgate_agent import __version__ as agent_version
from fedgate_agent.errors import AgentError, TrainingDiverged
from fedgate_agent.local_dataset import LocalDataset, make_windows
from fedgate_agent.model import build_model, weights_of
from fedgate_agent.training import MAX_LOCAL_EPOCHS, train_locally

__all__ = [
    "DEFAULT_EPOCHS",
    "PRETRAIN_PLAN",
    "EpochProgress",
    "PretrainingRefused",
    "PublicRuns",
    "check_public_runs",
    "pretrain_genesis",
    "pretrain_weights",
    "public_windows",
    "read_public_runs",
]

# Plain SGD with the coordinator's default lr, momentum and batch. Two epochs: on seed 1
# the sites' test accuracy of the pre-trained model peaks there (0.34 at 2, 0.32 at 4;
# bench/privacy, windows of stride 2).
PRETRAIN_PLAN = TrainingPlan(learning_rate=0.01, momentum=0.9, local_epochs=2, batch_size=32)
DEFAULT_EPOCHS = PRETRAIN_PLAN.local_epochs

Weights = dict[str, npt.NDArray[np.float32]]


class PretrainingRefused(AgentError):
    """Pre-training cannot start: the runs do not fit the model spec (feature count, a
    label outside its classes), give no window, or a setting is out of range.

    ``path`` is the runs file at fault when there is one.
    """

    kind = "pretraining_refused"

    def __init__(self, message: str, *, path: Path | None = None) -> None:
        super().__init__(f"{path}: {message}" if path is not None else message)
        self.path = path


@dataclass(frozen=True)
class PublicRuns:
    """The runs of simulated-runs files, in file order, and each file's SHA-256."""

    files: tuple[Path, ...]
    sha256: tuple[str, ...]
    runs: tuple[tuple[PlantRun, ...], ...]  # per file

    def all_runs(self) -> list[PlantRun]:
        return [run for file_runs in self.runs for run in file_runs]


@dataclass(frozen=True)
class EpochProgress:
    """One finished epoch: its mean cross-entropy and how long it took."""

    epoch: int
    epochs: int
    mean_loss: float
    seconds: float


Progress = Callable[[EpochProgress], None]


def read_public_runs(paths: Sequence[Path]) -> PublicRuns:
    """Read and check every simulated-runs file (``PlantRunsInvalid`` names a bad one).

    Each file is hashed, then loaded; the digests go into the genesis file's provenance.
    """
    if not paths:
        raise PretrainingRefused("no simulated-runs file given")
    digests: list[str] = []
    runs: list[tuple[PlantRun, ...]] = []
    for path in paths:
        digests.append(_file_sha256(path))
        runs.append(tuple(load_plant_runs(path)[1]))
    return PublicRuns(files=tuple(paths), sha256=tuple(digests), runs=tuple(runs))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise PretrainingRefused(f"cannot read it: {exc.strerror}", path=path) from None
    return digest.hexdigest()


def check_public_runs(public: PublicRuns, spec: ModelSpec, *, stride: int, epochs: int) -> None:
    """Refuse (:class:`PretrainingRefused`) settings out of range and runs that do not fit
    ``spec``: another feature count, or a fault label the model has no class for."""
    if not 1 <= epochs <= MAX_LOCAL_EPOCHS:
        raise PretrainingRefused(f"epochs is {epochs}; use 1..{MAX_LOCAL_EPOCHS}")
    if stride < 1:
        raise PretrainingRefused(f"stride is {stride}; use at least 1")
    for path, runs in zip(public.files, public.runs, strict=True):
        for run in runs:
            if run.x.shape[1] != spec.n_features:
                raise PretrainingRefused(
                    f"its runs have {run.x.shape[1]} features but the model spec has "
                    f"n_features={spec.n_features}; simulate runs for this model or pass "
                    "its --model-spec",
                    path=path,
                )
            if len(run.y) and int(run.y.max()) >= spec.n_classes:
                raise PretrainingRefused(
                    f"run of fault {run.fault} (set {run.set}) has label {int(run.y.max())} "
                    f"but the model knows classes 0..{spec.n_classes - 1}; leave that fault "
                    "out of the simulation or raise n_classes in the model spec",
                    path=path,
                )


def public_windows(runs: Iterable[PlantRun], *, window: int, stride: int) -> LocalDataset:
    """The runs cut into labelled windows as the sites' data is: windows ``x[s : s +
    window]`` for s = 0, stride, 2·stride, … of each run, kept when one label covers the
    whole window (it becomes the window's label); runs shorter than ``window`` give none.

    Raises :class:`PretrainingRefused` when no window is left.
    """
    if window < 1 or stride < 1:
        raise PretrainingRefused(f"window {window} and stride {stride} must be at least 1")
    parts = [make_windows(run.x, run.y, window, stride) for run in runs if len(run.x) >= window]
    if sum(len(part) for part in parts) == 0:
        raise PretrainingRefused(
            f"no window of {window} samples with one label in the runs (stride {stride}): "
            "simulate longer runs or use a model spec with a shorter window"
        )
    return LocalDataset(
        x=np.concatenate([part.x for part in parts]), y=np.concatenate([part.y for part in parts])
    )


def pretrain_weights(
    spec: ModelSpec,
    start: Mapping[str, npt.NDArray[np.floating]],
    public: LocalDataset,
    *,
    seed: int,
    epochs: int = DEFAULT_EPOCHS,
    progress: Progress | None = None,
) -> Weights:
    """``start`` trained on ``public`` for ``epochs`` epochs of :data:`PRETRAIN_PLAN`,
    shuffled from ``seed`` (reproducible for the same torch build and thread count).

    Raises :class:`TrainingDiverged` if the result is not finite.
    """
    if not 1 <= epochs <= MAX_LOCAL_EPOCHS:
        raise PretrainingRefused(f"epochs is {epochs}; use 1..{MAX_LOCAL_EPOCHS}")
    plan = TrainingPlan(
        learning_rate=PRETRAIN_PLAN.learning_rate,
        momentum=PRETRAIN_PLAN.momentum,
        local_epochs=epochs,
        batch_size=PRETRAIN_PLAN.batch_size,
    )
    model = build_model(spec, weights=start)
    began = time.perf_counter()

    def epoch_done(epoch: int, mean_loss: float) -> None:
        nonlocal began
        now = time.perf_counter()
        if progress is not None:
            progress(EpochProgress(epoch, epochs, mean_loss, now - began))
        began = now

    train_locally(model, public, plan, seed=seed, on_epoch=epoch_done)
    trained = weights_of(model)
    if not all(np.isfinite(array).all() for array in trained.values()):
        raise TrainingDiverged(
            "pre-training produced NaN/Inf weights; check the runs for extreme values"
        )
    return trained


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pretrain_genesis(
    spec: ModelSpec,
    public: PublicRuns,
    *,
    seed: int,
    epochs: int = DEFAULT_EPOCHS,
    stride: int,
    progress: Progress | None = None,
    created_at: datetime | None = None,
) -> GenesisWeights:
    """The genesis of ``spec`` and ``seed`` pre-trained on the windows of ``public``, with
    its provenance (``created_at``: now unless given).

    Training runs on one CPU thread (torch's setting is restored afterwards): the result
    depends on the thread count, and one thread makes the same runs files, spec, seed and
    settings give the same digest again with the same torch build, so whoever signs the
    manifest can rebuild the file. (On a 2-core VM it was as fast as two threads.)
    """
    if not 0 <= seed < MAX_SEED:
        raise PretrainingRefused(f"seed {seed} is not in 0..2**63-1")
    check_public_runs(public, spec, stride=stride, epochs=epochs)
    runs = public.all_runs()
    windows = public_windows(runs, window=spec.window, stride=stride)
    start = initial_weights(spec, np.random.default_rng(seed))
    with _one_torch_thread():
        trained = pretrain_weights(
            spec, start, windows, seed=seed, epochs=epochs, progress=progress
        )
    made = (created_at or datetime.now(UTC)).astimezone(UTC)
    provenance = Pretraining(
        start_seed=seed,
        runs_sha256=public.sha256,
        runs=len(runs),
        windows=len(windows),
        stride=stride,
        epochs=epochs,
        learning_rate=PRETRAIN_PLAN.learning_rate,
        momentum=PRETRAIN_PLAN.momentum,
        batch_size=PRETRAIN_PLAN.batch_size,
        created_at=made.strftime("%Y-%m-%dT%H:%M:%SZ"),
        trainer=_trainer(),
    )
    return make_genesis_weights(spec, trained, provenance)


def _trainer() -> str:
    """What the weights depend on besides the inputs: to rebuild them bit for bit, train
    with the same versions on one thread."""
    versions = f"torch {torch.__version__}, numpy {np.__version__}"
    return f"fedgate-agent {agent_version}, {versions}, 1 thread"
