"""The local model: the torch form of :class:`fedgate_common.model_spec.ModelSpec`.

``cnn1d-v1`` classifies a window of raw sensor values, shape ``(batch, window, n_features)``:

    standardise ((x - feature_mean) / feature_scale, fixed, not trained)
    → asinh (compresses the tens-of-sigma excursions of a fault, keeps sign and order)
    → conv1: Conv1d(n_features → channels, kernel_size, no padding) → GroupNorm → ReLU
    → conv2: Conv1d(channels → channels, kernel_size, no padding) → GroupNorm → ReLU
    → mean over time → head: Linear(channels → n_classes) → logits

The GroupNorms have no affine parameters and no running statistics: they normalise each
window on its own, so nothing but the six trainable tensors needs averaging. The
standardisation constants are non-persistent buffers, so ``state_dict()`` holds exactly
the six trainable tensors of :func:`~fedgate_common.model_spec.parameter_shapes`, in that
order, and an exported model scores raw sensor values. (``bench/fedavg_sim.py`` measured
why: without asinh and the norms, SGD at the default settings diverged or stalled on TEP.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import torch
from fedgate_common.arrays import check_shapes
from fedgate_common.errors import NonFiniteValues
from fedgate_common.model_spec import ModelSpec, initial_weights, parameter_shapes
from torch import nn

__all__ = ["CHANNELS_PER_GROUP", "WindowCnn", "build_model", "load_weights", "weights_of"]

# GroupNorm groups hold about this many channels (one group when there are fewer), so the
# norm keeps the channels' relative sizes, which a per-channel (instance) norm would erase.
CHANNELS_PER_GROUP = 8


class WindowCnn(nn.Module):
    """``cnn1d-v1``: two normalised 1-D convolutions over time, average pool, linear head.

    A bare ``WindowCnn(spec)`` has torch's default random weights and leaves torch's global
    random state as it found it; :func:`build_model` is the usual way in.
    """

    feature_mean: torch.Tensor
    feature_scale: torch.Tensor

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.architecture != "cnn1d-v1":
            raise ValueError(f"unsupported architecture {spec.architecture!r}")
        self.spec = spec
        # torch's default initialisation draws from the global generator; restore it after.
        with torch.random.fork_rng(devices=[]):
            self.conv1 = nn.Conv1d(spec.n_features, spec.channels, spec.kernel_size)
            self.conv2 = nn.Conv1d(spec.channels, spec.channels, spec.kernel_size)
            self.head = nn.Linear(spec.channels, spec.n_classes)
        groups = math.gcd(max(1, spec.channels // CHANNELS_PER_GROUP), spec.channels)
        self.norm1 = nn.GroupNorm(groups, spec.channels, affine=False)
        self.norm2 = nn.GroupNorm(groups, spec.channels, affine=False)
        mean = spec.feature_mean or (0.0,) * spec.n_features
        scale = spec.feature_scale or (1.0,) * spec.n_features
        self.register_buffer(
            "feature_mean", torch.tensor(mean, dtype=torch.float32), persistent=False
        )
        self.register_buffer(
            "feature_scale", torch.tensor(scale, dtype=torch.float32), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, n_classes)`` for raw windows ``(batch, window, n_features)``."""
        z = torch.asinh((x - self.feature_mean) / self.feature_scale)
        h = torch.relu(self.norm1(self.conv1(z.transpose(1, 2))))
        h = torch.relu(self.norm2(self.conv2(h)))
        return self.head(h.mean(dim=2))  # type: ignore[no-any-return]


def build_model(
    spec: ModelSpec, *, weights: Mapping[str, npt.NDArray[np.generic]] | None = None
) -> WindowCnn:
    """The torch module for ``spec``, holding ``weights`` (checked by :func:`load_weights`).

    Without ``weights`` it starts from :func:`~fedgate_common.model_spec.initial_weights`
    drawn from fresh OS entropy; torch's global random state is not touched.
    """
    model = WindowCnn(spec)
    if weights is None:
        weights = initial_weights(spec, np.random.default_rng())
    load_weights(model, weights)
    return model


def weights_of(model: nn.Module) -> dict[str, npt.NDArray[np.float32]]:
    """A float32 copy of the trainable tensors, in state-dict (= ``parameter_shapes``) order."""
    return {
        name: tensor.detach().cpu().numpy().astype(np.float32, copy=True)
        for name, tensor in model.state_dict().items()
    }


def load_weights(model: nn.Module, weights: Mapping[str, npt.NDArray[np.generic]]) -> None:
    """Copy ``weights`` into ``model`` after checking names, shapes and finiteness.

    Raises :class:`~fedgate_common.errors.MalformedMessage` when names or shapes differ from
    the model's and :class:`~fedgate_common.errors.NonFiniteValues` on NaN/Inf; the model
    is left unchanged in both cases.
    """
    if isinstance(model, WindowCnn):
        expected = parameter_shapes(model.spec)
    else:
        expected = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    check_shapes(weights, expected)
    converted: dict[str, torch.Tensor] = {}
    for name, array in weights.items():
        values = np.asarray(array, dtype=np.float32)
        if not np.isfinite(values).all():
            raise NonFiniteValues(f"weight {name!r} contains NaN or Inf")
        converted[name] = torch.from_numpy(values.copy())
    model.load_state_dict(converted, strict=True)
