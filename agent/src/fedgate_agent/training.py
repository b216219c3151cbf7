"""Local data sets, local training and evaluation on the gateway.

A site's training data is one ``.npz`` file with two arrays and nothing pickled:

- ``x``: float32 ``(n, window, n_features)``, raw sensor values (the model standardises),
- ``y``: int64 ``(n,)``, class labels in ``0 .. n_classes - 1``.

Training is plain mini-batch SGD with momentum on cross-entropy, as the coordinator's
:class:`~fedgate_common.messages.TrainingPlan` says. Randomness (the shuffling) comes from
a local :class:`torch.Generator`; nothing here changes torch's global state. DP-SGD is in
:mod:`fedgate_agent.private_training`, so that only agents that train with it load Opacus.
"""

from __future__ import annotations

import io
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from fedgate_common.messages import TrainingPlan
from fedgate_common.model_spec import ModelSpec
from torch import nn

from fedgate_agent.atomic_files import atomic_write
from fedgate_agent.errors import LocalDataError, PlanRejected
from fedgate_agent.model import WindowCnn

__all__ = [
    "Evaluation",
    "LocalDataset",
    "TrainResult",
    "check_dataset",
    "check_fits",
    "check_plan",
    "evaluate",
    "load_local_dataset",
    "save_local_dataset",
    "train_locally",
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


def check_plan(plan: TrainingPlan) -> None:
    """Refuse a plan outside the bounds above (:class:`PlanRejected`)."""
    if not (math.isfinite(plan.learning_rate) and 0 < plan.learning_rate <= MAX_LEARNING_RATE):
        raise PlanRejected(f"learning_rate {plan.learning_rate} outside (0, {MAX_LEARNING_RATE}]")
    if not (math.isfinite(plan.momentum) and 0 <= plan.momentum < 1):
        raise PlanRejected(f"momentum {plan.momentum} outside [0, 1)")
    if not 1 <= plan.local_epochs <= MAX_LOCAL_EPOCHS:
        raise PlanRejected(f"local_epochs {plan.local_epochs} outside 1..{MAX_LOCAL_EPOCHS}")
    if not 1 <= plan.batch_size <= MAX_BATCH_SIZE:
        raise PlanRejected(f"batch_size {plan.batch_size} outside 1..{MAX_BATCH_SIZE}")


def check_fits(model: nn.Module, dataset: LocalDataset) -> None:
    """Refuse a data set the model cannot train on (:class:`LocalDataError`)."""
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
    check_plan(plan)
    check_fits(model, dataset)
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


def evaluate(model: nn.Module, dataset: LocalDataset, batch_size: int = 512) -> Evaluation:
    """Accuracy and mean cross-entropy of ``model`` on ``dataset`` (no gradients)."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    check_fits(model, dataset)
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
