"""Exported models shared by the scoring tests (exported once per test process: ~2 s each)."""

from __future__ import annotations

import functools

import numpy as np
import numpy.typing as npt
from fedgate_agent.datasets.tep import held_out_test_set, tep_model_spec
from fedgate_agent.onnx_export import ExportedModel, export_model, parity_windows
from fedgate_agent.training import LocalDataset
from fedgate_common.model_spec import ModelSpec, initial_weights

#: The demo model: TEP, 52 features, 22 classes, windows of 20 (demo/run_demo.py).
DEMO_WINDOW = 20


@functools.cache
def tep_test_set() -> LocalDataset:
    """The held-out TEP windows of every class (the demo's test set, stride 2)."""
    return held_out_test_set(DEMO_WINDOW, stride=2)


@functools.cache
def demo_spec() -> ModelSpec:
    return tep_model_spec(DEMO_WINDOW)


def weights(spec: ModelSpec, seed: int) -> dict[str, npt.NDArray[np.float32]]:
    return initial_weights(spec, np.random.default_rng(seed))


@functools.cache
def exported_demo_model(seed: int = 0) -> ExportedModel:
    """The demo model with genesis-style weights ``seed``, exported and parity-checked on
    64 test windows (every 40th) plus the synthetic ones."""
    spec = demo_spec()
    return export_model(
        spec,
        weights(spec, seed),
        digest=f"{seed:02d}" * 32,
        round=seed,
        windows=parity_windows(spec, tep_test_set().x[::40]),
    )
