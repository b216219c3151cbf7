"""A site's local data set: windows and labels in one ``.npz``, read and written without torch.

The file holds two arrays and nothing pickled:

- ``x``: float32 ``(n, window, n_features)``, raw sensor values (the model standardises),
- ``y``: int64 ``(n,)``, class labels in ``0 .. n_classes - 1``.

Only numpy: the command line and the data path cut and check windows without loading torch
(:mod:`fedgate_agent.training` trains on them).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from fedgate_common.atomic_files import atomic_write
from fedgate_common.errors import NpzUnreadable
from fedgate_common.model_spec import ModelSpec
from fedgate_common.npz_files import read_npz

from fedgate_agent.errors import LocalDataError

__all__ = [
    "LocalDataset",
    "check_dataset",
    "load_local_dataset",
    "make_windows",
    "read_npz_arrays",
    "save_local_dataset",
]


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


def read_npz_arrays(
    path: Path, *, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, npt.NDArray[Any]]:
    """The named arrays of the ``.npz`` at ``path`` (never unpickled); ``optional`` ones
    only when present.

    Raises :class:`LocalDataError` naming the file for anything else: a single ``.npy``
    array, a missing array, object arrays, a truncated or damaged archive, or a header
    declaring an array larger than memory.
    """
    save_as = ", ".join(f"{name}=..." for name in required)
    try:
        return read_npz(path, required=required, optional=optional)
    except NpzUnreadable as exc:
        message = {
            "single_array": "holds a single array, not an .npz archive; save it with "
            f"numpy.savez(path, {save_as})",
            "missing": f"arrays {sorted(exc.missing)} missing; save them with "
            f"numpy.savez(path, {save_as})",
            "pickle": f"cannot read arrays without pickle ({exc.detail}); save plain "
            "numeric arrays",
            "unreadable": f"not a readable .npz archive ({exc.detail})",
            "too_large": f"an array is larger than this machine can load ({exc.detail})",
        }[exc.problem]
        raise LocalDataError(f"{path}: {message}", path=path) from None


def load_local_dataset(path: Path, spec: ModelSpec) -> LocalDataset:
    """Read and validate the ``.npz`` at ``path`` (arrays ``x`` and ``y``; never unpickled).

    Floating ``x`` is converted to float32 and integer ``y`` to int64; everything else that
    does not fit ``spec`` raises :class:`LocalDataError` saying what to fix.
    """
    arrays = read_npz_arrays(path, required=("x", "y"))
    x, y = arrays["x"], arrays["y"]
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


def make_windows(
    samples: npt.NDArray[np.floating], labels: npt.NDArray[np.integer], window: int, stride: int
) -> LocalDataset:
    """Windows ``samples[s : s + window]`` for s = 0, stride, 2·stride, …; a window is kept
    only when all its samples share one label, which becomes the window's label."""
    if window < 1 or stride < 1:
        raise ValueError("window and stride must be at least 1")
    if samples.ndim != 2 or labels.shape != samples.shape[:1]:
        raise ValueError(f"samples {samples.shape} and labels {labels.shape} do not match")
    n_features = samples.shape[1]
    if len(samples) < window:
        return LocalDataset(
            x=np.empty((0, window, n_features), dtype=np.float32), y=np.empty(0, dtype=np.int64)
        )
    starts = np.arange(0, len(samples) - window + 1, stride)
    label_windows = np.lib.stride_tricks.sliding_window_view(labels, window)[starts]
    uniform = (label_windows == label_windows[:, :1]).all(axis=1)
    kept = starts[uniform]
    # sliding_window_view gives (n, n_features, window); move time before features.
    x = np.lib.stride_tricks.sliding_window_view(samples, window, axis=0)[kept]
    return LocalDataset(
        x=np.ascontiguousarray(x.transpose(0, 2, 1), dtype=np.float32),
        y=labels[kept].astype(np.int64),
    )
