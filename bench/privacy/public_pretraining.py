"""Public pre-training: the genesis model trained on simulated TEP runs before any site trains.

The plant simulator that ships with ``fedgate-bridge[sim]`` (tep-studio's revised TEP under
Ricker's control, ``fedgate_bridge.simulator.tep_plant``) produces labelled runs of the
same 52 variables and fault numbers as the TEP data set the sites hold. Nothing in those
runs comes from a site, so training on them costs no privacy: the pre-trained weights are
public, and the federation, with or without DP, starts from them instead of from random
weights. The sites' held-out test set is never touched.

Differences from the sites' data, on purpose or not: another revision of the process
model and another controller, a coarser control step (``CONTROL_SECONDS``; faster, less
faithful), faults switched on at 1 h of a 25 h run, fault 21 left out (the revision's IDV
21 is not the data set's fault 21), and a run that trips (IDV 6 shuts the plant down after
about 7 h) ends there.

Runs are cached in ``--out`` as ``sim-runs-<seed>.npz`` (about 4 MB and 80 s each).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from fedgate_agent import pretraining
from fedgate_agent.training import LocalDataset
from fedgate_common.genesis_weights import read_genesis_weights
from fedgate_common.model_spec import ModelSpec
from fedgate_common.plant_runs import PlantRun

from bench.fedavg_sim import Weights

__all__ = [
    "CONTROL_SECONDS",
    "PRETRAIN_PLAN",
    "PUBLIC_FAULTS",
    "load_or_simulate",
    "load_pretrained",
    "pretrain",
    "public_windows",
    "simulate",
]

PUBLIC_FAULTS = tuple(range(21))  # normal operation and IDV 1-20
RUN_HOURS = 25.0
FAULT_START_H = 1.0
CONTROL_SECONDS = 9.0  # 5 × Ricker's 1.8 s

Runs = list[tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]]
Progress = Callable[[str], None]


def simulate(seed: int, *, faults: Sequence[int] = PUBLIC_FAULTS, hours: float = RUN_HOURS) -> Runs:
    """One run per fault in ``faults`` (0: normal operation), ``hours`` long, the fault on
    from :data:`FAULT_START_H`; samples every 3 minutes, as in the sites' data. The runs of
    ``fedgate-bridge simulate-runs --seed SEED --sets 1``."""
    from fedgate_bridge.simulator.plant_runs import simulate_run

    runs: Runs = []
    for fault in faults:
        run = simulate_run(
            seed=seed,
            set_index=0,
            fault=fault,
            hours=hours,
            fault_start_h=FAULT_START_H,
            control_seconds=CONTROL_SECONDS,
        )
        runs.append((run.x, run.y))
    return runs


def load_or_simulate(seeds: Sequence[int], cache: Path, progress: Progress) -> Runs:
    """The simulated runs of every seed, from ``cache`` or simulated and cached."""
    cache.mkdir(parents=True, exist_ok=True)
    runs: Runs = []
    for seed in seeds:
        path = cache / f"sim-runs-{seed}.npz"
        if not path.exists():
            started = time.perf_counter()
            progress(f"simulating public runs, seed {seed} ({len(PUBLIC_FAULTS)} runs)")
            simulated = simulate(seed)
            arrays: dict[str, npt.NDArray[np.generic]] = {}
            for i, (x, y) in enumerate(simulated):
                arrays[f"x{i}"], arrays[f"y{i}"] = x, y
            np.savez(path, **arrays)  # type: ignore[arg-type]
            progress(f"  {time.perf_counter() - started:.0f} s, cached in {path}")
        with np.load(path) as stored:
            runs.extend((stored[f"x{i}"], stored[f"y{i}"]) for i in range(len(PUBLIC_FAULTS)))
    return runs


def public_windows(runs: Runs, window: int, stride: int) -> LocalDataset:
    """The runs cut into labelled windows as the sites' data is (one label per window), by
    ``fedgate-agent pretrain``'s own windowing."""
    return pretraining.public_windows(
        [
            PlantRun(fault=int(y.max(initial=0)), set=0, x=x, y=y)  # fault, set: not used
            for x, y in runs
        ],
        window=window,
        stride=stride,
    )


# What `fedgate-agent pretrain` trains with: plain SGD with the coordinator's default lr,
# momentum and batch, 2 epochs (see fedgate_agent.pretraining).
PRETRAIN_PLAN = pretraining.PRETRAIN_PLAN


def pretrain(spec: ModelSpec, genesis: Weights, public: LocalDataset, *, seed: int) -> Weights:
    """``genesis`` trained with :data:`PRETRAIN_PLAN` on ``public`` (no DP: nothing in it is
    private), as ``fedgate-agent pretrain --seed seed`` trains the genesis of ``seed``."""
    return pretraining.pretrain_weights(
        spec, genesis, public, seed=seed, epochs=PRETRAIN_PLAN.local_epochs
    )


def load_pretrained(path: Path, spec: ModelSpec) -> Weights:
    """The weights of a genesis-weights file (``fedgate-agent pretrain --out``), which must
    be for ``spec``: the benchmark's federations start from it as the product's would."""
    pretrained = read_genesis_weights(path)
    if pretrained.spec != spec:
        raise SystemExit(
            f"{path}: genesis weights for another model spec than the benchmark's (make it "
            "with `fedgate-agent pretrain --model-spec` for the same data and --channels)"
        )
    return pretrained.named_weights()
