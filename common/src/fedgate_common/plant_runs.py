"""Simulated plant runs on disk: the public data a genesis model is pre-trained on.

``fedgate-bridge simulate-runs`` writes them, ``fedgate-agent pretrain`` reads them. One
file is a numpy ``.npz`` archive (read with ``allow_pickle=False``) holding:

- ``meta``: a JSON text (:class:`RunsMeta`) saying how the runs were simulated;
- ``x``: every run's samples one after another, float64, shape (samples, features);
- ``y``: the fault label of each sample, int64 (0 = normal operation);
- ``run_lengths``, ``run_faults``, ``run_sets``: per run, its sample count, the fault it
  simulates and the set it belongs to (a set is one run per fault).

Reading checks every array against the others and refuses NaN/Inf, so a truncated or
hand-edited file fails with :class:`~fedgate_common.errors.PlantRunsInvalid` instead of
training a model on garbage.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt

from fedgate_common.atomic_files import atomic_write
from fedgate_common.errors import NpzUnreadable, PlantRunsInvalid
from fedgate_common.npz_files import read_npz

__all__ = [
    "PLANT_RUNS_FORMAT",
    "PlantRun",
    "RunsMeta",
    "load_plant_runs",
    "save_plant_runs",
]

PLANT_RUNS_FORMAT = "fedgate-plant-runs/1"
_ARRAYS = ("meta", "x", "y", "run_lengths", "run_faults", "run_sets")


class RunsMeta(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the runs of a file were simulated (reported, not used to train)."""

    format: str = PLANT_RUNS_FORMAT
    simulator: str
    seed: int
    sets: int
    hours: float
    fault_start_h: float
    sample_minutes: float
    control_seconds: float
    created_at: str


@dataclass(frozen=True, slots=True)
class PlantRun:
    """One simulated run: ``x`` (samples × features) labelled sample by sample by ``y``."""

    fault: int
    set: int
    x: npt.NDArray[np.float64]
    y: npt.NDArray[np.int64]


def save_plant_runs(path: Path, runs: Sequence[PlantRun], meta: RunsMeta) -> None:
    """Write ``runs`` to ``path`` atomically (:func:`atomic_write`), readable by everyone:
    the runs are public data. What :func:`load_plant_runs` would refuse is refused here,
    before anything is written."""
    where = str(path)
    if not runs:
        raise PlantRunsInvalid("no run to write", path=where)
    xs = [np.asarray(run.x, dtype=np.float64) for run in runs]
    widths = {x.shape[1] for x in xs if x.ndim == 2 and x.size}
    if len(widths) > 1 or any(x.ndim != 2 and x.size for x in xs):
        raise PlantRunsInvalid("every run needs the same number of features", path=where)
    width = widths.pop() if widths else 0
    for run, x in zip(runs, xs, strict=True):
        if len(x) != len(run.y):
            raise PlantRunsInvalid(
                f"run of set {run.set}, fault {run.fault}: {len(x)} samples, {len(run.y)} labels",
                path=where,
            )
    arrays: dict[str, npt.NDArray[np.generic]] = {
        "meta": np.asarray(msgspec.json.encode(meta).decode()),
        "x": np.concatenate([x.reshape(-1, width) for x in xs]),
        "y": np.concatenate([np.asarray(run.y, dtype=np.int64) for run in runs]),
        "run_lengths": np.asarray([len(run.y) for run in runs], dtype=np.int64),
        "run_faults": np.asarray([run.fault for run in runs], dtype=np.int64),
        "run_sets": np.asarray([run.set for run in runs], dtype=np.int64),
    }
    _check_arrays(
        arrays["x"],
        arrays["y"],  # type: ignore[arg-type]
        arrays["run_lengths"],  # type: ignore[arg-type]
        arrays["run_faults"],  # type: ignore[arg-type]
        arrays["run_sets"],  # type: ignore[arg-type]
        where,
    )
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    atomic_write(path, buffer.getvalue(), mode=0o644)


def load_plant_runs(path: Path) -> tuple[RunsMeta, list[PlantRun]]:
    """The metadata and runs of ``path``; raises :class:`PlantRunsInvalid` on anything
    unreadable or inconsistent."""
    where = str(path)
    try:
        stored = read_npz(path, required=_ARRAYS)
    except NpzUnreadable as exc:
        message = {
            "single_array": "holds a single array (.npy), not a simulated-runs .npz archive",
            "missing": f"not a simulated-runs file: no {', '.join(exc.missing)}",
            "pickle": f"cannot read it: {exc.detail}",
            "unreadable": f"cannot read it: {exc.detail}",
            "too_large": f"an array is larger than this machine can load ({exc.detail})",
        }[exc.problem]
        raise PlantRunsInvalid(message, path=where) from None
    meta_text = str(stored["meta"])
    x, y = stored["x"], stored["y"]
    lengths, faults, sets = stored["run_lengths"], stored["run_faults"], stored["run_sets"]
    try:
        declared = msgspec.json.decode(meta_text)
    except msgspec.DecodeError as exc:
        raise PlantRunsInvalid(f"bad meta: {exc}", path=where) from None
    found = declared.get("format") if isinstance(declared, dict) else None
    if found != PLANT_RUNS_FORMAT:
        raise PlantRunsInvalid(
            f"format {found!r}; this release reads {PLANT_RUNS_FORMAT!r}", path=where
        )
    try:
        meta = msgspec.convert(declared, type=RunsMeta)
    except msgspec.ValidationError as exc:
        raise PlantRunsInvalid(f"bad meta: {exc}", path=where) from None
    _check_arrays(x, y, lengths, faults, sets, where)
    runs: list[PlantRun] = []
    offset = 0
    for length, fault, run_set in zip(
        lengths.tolist(), faults.tolist(), sets.tolist(), strict=True
    ):
        runs.append(
            PlantRun(
                fault=fault,
                set=run_set,
                x=x[offset : offset + length].astype(np.float64),
                y=y[offset : offset + length].astype(np.int64),
            )
        )
        offset += length
    return meta, runs


def _check_arrays(
    x: npt.NDArray[np.generic],
    y: npt.NDArray[np.integer],
    lengths: npt.NDArray[np.integer],
    faults: npt.NDArray[np.integer],
    sets: npt.NDArray[np.integer],
    where: str,
) -> None:
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise PlantRunsInvalid(f"x must be a 2-D float array, not {x.dtype} {x.shape}", path=where)
    for name, array in (
        ("y", y),
        ("run_lengths", lengths),
        ("run_faults", faults),
        ("run_sets", sets),
    ):
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise PlantRunsInvalid(f"{name} must be a 1-D integer array", path=where)
    if len(y) != len(x):
        raise PlantRunsInvalid(f"{len(x)} samples but {len(y)} labels", path=where)
    if not len(lengths) == len(faults) == len(sets) or len(lengths) == 0:
        raise PlantRunsInvalid("run_lengths, run_faults and run_sets disagree", path=where)
    if (lengths < 0).any() or int(lengths.sum()) != len(x):
        raise PlantRunsInvalid(
            f"run lengths add up to {int(lengths.sum())}, not the {len(x)} samples", path=where
        )
    if (y < 0).any() or (faults < 0).any():
        raise PlantRunsInvalid("negative fault label", path=where)
    if not np.isfinite(x).all():
        raise PlantRunsInvalid("samples contain NaN or Inf", path=where)
