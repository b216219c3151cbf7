"""Local data sets, local training and evaluation on the gateway.

A site's training data is a :class:`~fedgate_agent.local_dataset.LocalDataset` (that
module reads and writes it without torch; its names are re-exported here).

Training is plain mini-batch SGD with momentum on cross-entropy, as the coordinator's
:class:`~fedgate_common.messages.TrainingPlan` says. Randomness (the shuffling) comes from
a local :class:`torch.Generator`; nothing here changes torch's global state. DP-SGD is in
:mod:`fedgate_agent.private_training`, so that only agents that train with it load Opacus.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from fedgate_common.messages import TrainingPlan
from torch import nn

from fedgate_agent.errors import LocalDataError, PlanRejected
from fedgate_agent.local_dataset import (
    LocalDataset,
    check_dataset,
    load_local_dataset,
    save_local_dataset,
)
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
    model: nn.Module,
    dataset: LocalDataset,
    plan: TrainingPlan,
    *,
    seed: int | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``plan.local_epochs`` epochs of shuffled mini-batches.

    With ``seed`` the shuffling, hence the result, is reproducible (given the same torch
    build and thread count); without it the order comes from fresh OS entropy.
    ``on_epoch(epoch, mean_loss)`` is called after each epoch (1-based), e.g. to report
    progress; it does not change the training.
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
        for epoch in range(1, plan.local_epochs + 1):
            order = torch.randperm(n, generator=generator)
            epoch_loss = 0.0
            for start in range(0, n, plan.batch_size):
                batch = order[start : start + plan.batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x[batch]), y[batch])
                loss.backward()
                optimizer.step()
                epoch_loss += float(loss.detach()) * len(batch)
            if on_epoch is not None:
                on_epoch(epoch, epoch_loss / n)
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
