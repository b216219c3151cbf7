"""DP-SGD on the gateway: record-level differential privacy of local training.

``train_locally_private`` is Opacus's DP-SGD (Poisson sampling, per-window clipping,
Gaussian noise once per step) on the model and data of :mod:`fedgate_agent.training`.
Without a seed its batches and noise come from a
:class:`~fedgate_agent.secure_random.ChaCha20Stream` (decision 0043); with one, from a
seeded torch generator through Opacus's own loader and optimizer (tests and demos only).
This module is the only one that imports Opacus's training parts, so an agent without
record-level DP (and every CLI command) never loads them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from fedgate_common.messages import TrainingPlan
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader, dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, default_collate

from fedgate_agent.errors import PlanRejected
from fedgate_agent.secure_random import ChaCha20Stream
from fedgate_agent.training import LocalDataset, TrainResult, check_fits, check_plan

_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to module"

__all__ = [
    "CsprngDPOptimizer",
    "CsprngPoissonSampler",
    "PrivateTrainResult",
    "train_locally_private",
]


@dataclass(frozen=True)
class PrivateTrainResult:
    """A DP-SGD round: the usual result plus what the accountant must record."""

    result: TrainResult
    noise_multiplier: float
    sample_rate: float
    steps: int
    # With ``one_step``: the step −η·g (g the clipped gradients' sum over B), per state-dict
    # name, in float64, computed from the gradient rather than as (stepped − base) weights,
    # whose float32 rounding depends on the weights (privacy.md §3.7). None otherwise.
    step: dict[str, npt.NDArray[np.float64]] | None = None


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
    one_step: bool = False,
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

    With ``one_step`` (pooled noise, :mod:`fedgate_agent.pooled_noise`) the round is the
    first Poisson batch's step alone, whatever ``local_epochs`` says; with
    ``noise_multiplier`` 0 it adds no noise (the secure sum's shares do).
    """
    check_plan(plan)
    check_fits(model, dataset)
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
    step: dict[str, npt.NDArray[np.float64]] | None = None
    with warnings.catch_warnings():
        # Opacus's per-window gradient hooks sit on every layer, so torch warns on each
        # process's first backward that the first layer's input needs no gradient. It is
        # expected, and it would land in the agent's structured log as a bare traceback line.
        # (The filters are the process's; nothing else in the agent changes them.)
        warnings.filterwarnings("ignore", message=_HOOK_WARNING, category=UserWarning)
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
                    if one_step:  # the first SGD step moves each weight by −η·grad exactly
                        step = _exact_step(model, plan.learning_rate)
                    if len(y):
                        loss_sum += float(loss.detach()) * len(y)
                        seen += len(y)
                    if one_step:
                        break
                if one_step:
                    break
        finally:
            private_model._close()
            model.train(was_training)
    return PrivateTrainResult(
        result=TrainResult(num_samples=n, mean_loss=loss_sum / max(seen, 1)),
        noise_multiplier=noise_multiplier,
        sample_rate=rate,
        steps=steps,
        step=step,
    )


def _exact_step(model: nn.Module, learning_rate: float) -> dict[str, npt.NDArray[np.float64]]:
    """−η·grad of every state-dict entry (0 for buffers and frozen weights), in float64.

    After the first step of a fresh SGD optimizer (no weight decay; momentum's buffer starts
    as the gradient, so it changes nothing yet) the weights moved by exactly this, before
    float32 rounded them."""
    grads = {name: p.grad for name, p in model.named_parameters()}
    step = {}
    for name, tensor in model.state_dict().items():
        grad = grads.get(name)
        step[name] = (
            np.zeros(tuple(tensor.shape), dtype=np.float64)
            if grad is None
            else grad.detach().cpu().numpy().astype(np.float64) * -learning_rate
        )
    return step
