"""Local data sets, local training and evaluation on the gateway.

A site's training data is one ``.npz`` file with two arrays and nothing pickled:

- ``x``: float32 ``(n, window, n_features)``, raw sensor values (the model standardises),
- ``y``: int64 ``(n,)``, class labels in ``0 .. n_classes - 1``.

Training is plain mini-batch SGD with momentum on cross-entropy, as the coordinator's
:class:`~fedgate_common.messages.TrainingPlan` says. Randomness (the shuffling) comes from
a local :class:`torch.Generator`; nothing here changes torch's global state. DP-SGD
without a seed draws its batches and noise from a
:class:`~fedgate_agent.secure_random.ChaCha20Stream` instead (decision 0043).
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from fedgate_common.messages import TrainingPlan
from fedgate_common.model_spec import ModelSpec
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader, dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, default_collate

from fedgate_agent.atomic_files import atomic_write
from fedgate_agent.errors import LocalDataError, PlanRejected
from fedgate_agent.model import WindowCnn
from fedgate_agent.secure_random import ChaCha20Stream

__all__ = [
    "CsprngDPOptimizer",
    "CsprngPoissonSampler",
    "Evaluation",
    "LocalDataset",
    "PrivateTrainResult",
    "TrainResult",
    "check_dataset",
    "evaluate",
    "load_local_dataset",
    "save_local_dataset",
    "train_locally",
    "train_locally_private",
]

# Bounds on a coordinator's plan; anything outside is refused rather than clamped.
MAX_LOCAL_EPOCHS = 1_000
MAX_BATCH_SIZE = 1 << 16
MAX_LEARNING_RATE = 10.0


@dataclass(frozen=True, eq=False)
class LocalDataset:
    """Windows ``x`` (float32 ``(n, window, n_features)``) and labels ``y`` (int64 ``(n,)``)."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        if self.x.dtype != np.float32 or self.x.ndim != 3:
            raise LocalDataError(
                f"x must be float32 with 3 dimensions (n, window, n_features); "
                f"got {self.x.dtype} with shape {self.x.shape}"
            )
        if self.y.dtype != np.int64 or self.y.ndim != 1:
            raise LocalDataError(
                f"y must be int64 with 1 dimension (n,); "
                f"got {self.y.dtype} with shape {self.y.shape}"
            )
        if len(self.x) != len(self.y):
            raise LocalDataError(f"x has {len(self.x)} windows but y has {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class TrainResult:
    """``num_samples`` windows trained on; ``mean_loss`` = mean cross-entropy of the last epoch."""

    num_samples: int
    mean_loss: float


@dataclass(frozen=True)
class Evaluation:
    """Accuracy and mean cross-entropy over ``n`` windows."""

    accuracy: float
    loss: float
    n: int


def check_dataset(dataset: LocalDataset, spec: ModelSpec) -> None:
    """Raise :class:`LocalDataError` unless ``dataset`` fits ``spec`` and is finite."""
    want = (spec.window, spec.n_features)
    if dataset.x.shape[1:] != want:
        raise LocalDataError(
            f"windows have shape {dataset.x.shape[1:]} (window, n_features) but the model "
            f"needs {want}; re-window the data for this model"
        )
    if len(dataset) == 0:
        raise LocalDataError("the data set holds no windows; collect data before training")
    if not np.isfinite(dataset.x).all():
        bad = int(np.count_nonzero(~np.isfinite(dataset.x).all(axis=(1, 2))))
        raise LocalDataError(f"{bad} windows contain NaN or Inf; drop or repair them")
    low, high = int(dataset.y.min()), int(dataset.y.max())
    if low < 0 or high >= spec.n_classes:
        raise LocalDataError(
            f"labels span {low}..{high} but the model knows classes 0..{spec.n_classes - 1}; "
            "fix the labels or the model spec"
        )


def load_local_dataset(path: Path, spec: ModelSpec) -> LocalDataset:
    """Read and validate the ``.npz`` at ``path`` (arrays ``x`` and ``y``; never unpickled).

    Floating ``x`` is converted to float32 and integer ``y`` to int64; everything else that
    does not fit ``spec`` raises :class:`LocalDataError` saying what to fix.
    """
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise LocalDataError(
                f"{path}: holds a single array, not an .npz archive; save it with "
                "numpy.savez(path, x=windows, y=labels)",
                path=path,
            )
        with loaded as archive:
            missing = sorted({"x", "y"} - set(archive.files))
            if missing:
                raise LocalDataError(
                    f"{path}: arrays {missing} missing; save windows as 'x' and labels as 'y'",
                    path=path,
                )
            x = archive["x"]
            y = archive["y"]
    except LocalDataError:
        raise
    except ValueError as exc:  # object arrays refuse to load without pickle
        raise LocalDataError(
            f"{path}: cannot read arrays without pickle ({exc}); save plain numeric arrays",
            path=path,
        ) from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise LocalDataError(f"{path}: not a readable .npz file ({exc})", path=path) from exc
    if not np.issubdtype(x.dtype, np.floating):
        raise LocalDataError(f"{path}: x has dtype {x.dtype}; store float32 values", path=path)
    if not np.issubdtype(y.dtype, np.integer):
        raise LocalDataError(f"{path}: y has dtype {y.dtype}; store int64 labels", path=path)
    if x.ndim != 3 or y.ndim != 1:
        raise LocalDataError(
            f"{path}: x must be (n, window, n_features) and y (n,); got x{x.shape} and y{y.shape}",
            path=path,
        )
    try:
        dataset = LocalDataset(x=x.astype(np.float32), y=y.astype(np.int64))
        check_dataset(dataset, spec)
    except LocalDataError as exc:
        raise LocalDataError(f"{path}: {exc}", path=path) from exc
    return dataset


def save_local_dataset(path: Path, dataset: LocalDataset) -> None:
    """Write ``dataset`` to ``path`` atomically (mode 0600: it is the site's private data)."""
    buffer = io.BytesIO()
    np.savez(buffer, x=dataset.x, y=dataset.y)
    atomic_write(path, buffer.getvalue(), mode=0o600)


def _check_plan(plan: TrainingPlan) -> None:
    if not (math.isfinite(plan.learning_rate) and 0 < plan.learning_rate <= MAX_LEARNING_RATE):
        raise PlanRejected(f"learning_rate {plan.learning_rate} outside (0, {MAX_LEARNING_RATE}]")
    if not (math.isfinite(plan.momentum) and 0 <= plan.momentum < 1):
        raise PlanRejected(f"momentum {plan.momentum} outside [0, 1)")
    if not 1 <= plan.local_epochs <= MAX_LOCAL_EPOCHS:
        raise PlanRejected(f"local_epochs {plan.local_epochs} outside 1..{MAX_LOCAL_EPOCHS}")
    if not 1 <= plan.batch_size <= MAX_BATCH_SIZE:
        raise PlanRejected(f"batch_size {plan.batch_size} outside 1..{MAX_BATCH_SIZE}")


def _check_fits(model: nn.Module, dataset: LocalDataset) -> None:
    if isinstance(model, WindowCnn):
        check_dataset(dataset, model.spec)
    elif len(dataset) == 0:
        raise LocalDataError("the data set holds no windows; collect data before training")


def train_locally(
    model: nn.Module, dataset: LocalDataset, plan: TrainingPlan, *, seed: int | None = None
) -> TrainResult:
    """Train ``model`` in place for ``plan.local_epochs`` epochs of shuffled mini-batches.

    With ``seed`` the shuffling, hence the result, is reproducible (given the same torch
    build and thread count); without it the order comes from fresh OS entropy.
    """
    _check_plan(plan)
    _check_fits(model, dataset)
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(dataset.x))
    y = torch.from_numpy(np.ascontiguousarray(dataset.y))
    n = len(dataset)
    optimizer = torch.optim.SGD(model.parameters(), lr=plan.learning_rate, momentum=plan.momentum)
    loss_fn = nn.CrossEntropyLoss(reduction="mean")
    was_training = model.training
    model.train()
    epoch_loss = 0.0
    try:
        for _ in range(plan.local_epochs):
            order = torch.randperm(n, generator=generator)
            epoch_loss = 0.0
            for start in range(0, n, plan.batch_size):
                batch = order[start : start + plan.batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x[batch]), y[batch])
                loss.backward()
                optimizer.step()
                epoch_loss += float(loss.detach()) * len(batch)
    finally:
        model.train(was_training)
    return TrainResult(num_samples=n, mean_loss=epoch_loss / n)


@dataclass(frozen=True)
class PrivateTrainResult:
    """A DP-SGD round: the usual result plus what the accountant must record."""

    result: TrainResult
    noise_multiplier: float
    sample_rate: float
    steps: int


class CsprngPoissonSampler(UniformWithReplacementSampler):  # type: ignore[misc]
    """Opacus's Poisson batch sampler with the draws from a :class:`ChaCha20Stream`.

    Each of ``int(1 / sample_rate)`` steps yields the indices of the windows drawn, each
    independently with probability ``sample_rate``; a batch may be empty.
    """

    def __init__(self, *, num_samples: int, sample_rate: float, stream: ChaCha20Stream) -> None:
        super().__init__(num_samples=num_samples, sample_rate=sample_rate)
        self.stream = stream

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = self.stream.bernoulli_mask(self.num_samples, self.sample_rate)
            yield np.flatnonzero(mask).tolist()


class CsprngDPOptimizer(DPOptimizer):  # type: ignore[misc]
    """Opacus's :class:`DPOptimizer` with its noise drawn from a :class:`ChaCha20Stream`.

    Clipping, scaling and the step are Opacus's; only :meth:`add_noise` changes. Each
    noise value keeps Opacus's secure-mode defence against floating-point attacks
    (``_generate_noise``, n = 2): the sum of four Gaussian draws of standard deviation
    σ·C, divided by two. Opacus first throws one draw away to move torch's generator on;
    a keystream gives every draw fresh bytes, so there is nothing to discard.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        stream: ChaCha20Stream,
    ) -> None:
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            secure_mode=True,
        )
        self.stream = stream

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + self._noise_like(p.summed_grad, std)).view_as(p)
            _mark_as_processed(p.summed_grad)

    def _noise_like(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        if std == 0:
            return torch.zeros_like(reference)
        draws = self.stream.standard_normal((4, *reference.shape), dtype=torch.float64)
        return (draws.sum(dim=0) * (std / 2)).to(reference.dtype)


def _csprng_poisson_loader(
    windows: TensorDataset, sample_rate: float, stream: ChaCha20Stream
) -> DataLoader[tuple[torch.Tensor, ...]]:
    """What :class:`DPDataLoader` builds, with :class:`CsprngPoissonSampler` as its sampler:
    Opacus's collate wrapper turns an empty batch into tensors with no rows."""
    first = windows[0]
    return DataLoader(
        windows,
        batch_sampler=CsprngPoissonSampler(
            num_samples=len(windows), sample_rate=sample_rate, stream=stream
        ),
        collate_fn=wrap_collate_with_empty(
            collate_fn=default_collate,
            sample_empty_shapes=[(0, *shape_safe(t)) for t in first],
            dtypes=[dtype_safe(t) for t in first],
        ),
        # Each epoch the loader draws a worker seed (unused without workers) from this
        # generator; without one it would take it from torch's global generator.
        generator=torch.Generator(),
    )


def train_locally_private(
    model: nn.Module,
    dataset: LocalDataset,
    plan: TrainingPlan,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    seed: int | None = None,
) -> PrivateTrainResult:
    """DP-SGD with Opacus: Poisson sampling, per-window clipping, Gaussian noise.

    Each step draws every window independently with probability ``batch_size / n``, clips
    each window's gradient to ``max_grad_norm``, sums them, adds Gaussian noise of standard
    deviation ``noise_multiplier * max_grad_norm`` once, and divides by the expected batch
    size. Without ``seed`` the batches and the noise come from a ChaCha20 keystream under
    a fresh key from the OS (:class:`CsprngPoissonSampler`, :class:`CsprngDPOptimizer`),
    with Opacus's secure-mode noise (robust to floating-point attacks). With ``seed`` (tests
    and demos only: known noise protects nothing) a seeded :class:`torch.Generator` draws
    both, through Opacus's own loader and optimizer, without secure mode.
    """
    _check_plan(plan)
    _check_fits(model, dataset)
    if noise_multiplier < 0 or max_grad_norm <= 0:
        raise PlanRejected("noise multiplier must be >= 0 and the clipping norm > 0")
    n = len(dataset)
    rate = min(1.0, plan.batch_size / n)
    windows = TensorDataset(
        torch.from_numpy(np.ascontiguousarray(dataset.x)),
        torch.from_numpy(np.ascontiguousarray(dataset.y)),
    )
    private_model = GradSampleModule(model)
    sgd = torch.optim.SGD(private_model.parameters(), lr=plan.learning_rate, momentum=plan.momentum)
    loader: DataLoader[tuple[torch.Tensor, ...]]
    optimizer: DPOptimizer
    if seed is None:
        stream = ChaCha20Stream()
        loader = _csprng_poisson_loader(windows, rate, stream)
        optimizer = CsprngDPOptimizer(
            sgd,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=plan.batch_size,
            stream=stream,
        )
    else:
        generator = torch.Generator()
        generator.manual_seed(seed)
        loader = DPDataLoader(windows, sample_rate=rate, generator=generator)
        optimizer = DPOptimizer(
            sgd,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=plan.batch_size,
            generator=generator,
            secure_mode=False,
        )
    loss_fn = nn.CrossEntropyLoss(reduction="mean")
    was_training = model.training
    private_model.train()
    steps, loss_sum, seen = 0, 0.0, 0
    try:
        for _ in range(plan.local_epochs):
            loss_sum, seen = 0.0, 0  # the last epoch's mean, as train_locally reports
            for x, y in loader:
                # An empty Poisson batch is a step too, for the accountant and here: the
                # clipped sum is zero and the noise is added all the same (its loss, the
                # mean of nothing, is NaN and is not counted).
                steps += 1
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(private_model(x), y)
                loss.backward()
                optimizer.step()
                if len(y):
                    loss_sum += float(loss.detach()) * len(y)
                    seen += len(y)
    finally:
        private_model._close()
        model.train(was_training)
    return PrivateTrainResult(
        result=TrainResult(num_samples=n, mean_loss=loss_sum / max(seen, 1)),
        noise_multiplier=noise_multiplier,
        sample_rate=rate,
        steps=steps,
    )


def evaluate(model: nn.Module, dataset: LocalDataset, batch_size: int = 512) -> Evaluation:
    """Accuracy and mean cross-entropy of ``model`` on ``dataset`` (no gradients)."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    _check_fits(model, dataset)
    x = torch.from_numpy(np.ascontiguousarray(dataset.x))
    y = torch.from_numpy(np.ascontiguousarray(dataset.y))
    total_loss = 0.0
    correct = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(dataset), batch_size):
                logits = model(x[start : start + batch_size])
                labels = y[start : start + batch_size]
                total_loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(dim=1) == labels).sum())
    finally:
        model.train(was_training)
    n = len(dataset)
    return Evaluation(accuracy=correct / n, loss=total_loss / n, n=n)
