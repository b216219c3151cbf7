"""The benchmark federation trains a round's sites in worker processes with the same results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedgate_agent.datasets.tep import FederatedSplit
from fedgate_agent.local_dataset import LocalDataset
from fedgate_common.model_spec import ModelSpec

from bench.privacy.federation import RecordDp, run_fedavg, training_plan

SPEC = ModelSpec(n_features=3, window=8, n_classes=2, channels=4)
PLAN = training_plan(learning_rate=0.1, lr_decay=1.0, momentum=0.0, local_epochs=1, batch_size=16)


def windows(rng: np.random.Generator, n: int) -> LocalDataset:
    y = rng.integers(0, 2, size=n)
    x = rng.normal(size=(n, SPEC.window, SPEC.n_features)) + y[:, None, None]
    return LocalDataset(x=x.astype(np.float32), y=y.astype(np.int64))


@pytest.fixture
def split() -> FederatedSplit:
    rng = np.random.default_rng(5)
    return FederatedSplit(
        sites=[windows(rng, 60 + 10 * i) for i in range(3)],
        test=windows(rng, 50),
        spec=SPEC,
        site_segments=((), (), ()),
        test_segments=(),
        site_faults=(frozenset(), frozenset(), frozenset()),
    )


@pytest.fixture(autouse=True)
def one_thread() -> object:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the benchmarks' setting, which the workers also use
    yield None
    torch.set_num_threads(previous)


@pytest.mark.slow
@pytest.mark.parametrize("dp", [None, RecordDp(target_epsilon=3.0, max_grad_norm=1.0)])
def test_two_workers_give_the_same_model_and_epsilon_as_one(
    split: FederatedSplit, dp: RecordDp | None
) -> None:
    one = run_fedavg(split, PLAN, rounds=2, seed=3, dp=dp)
    two = run_fedavg(split, PLAN, rounds=2, seed=3, dp=dp, jobs=2)
    assert one.rounds_trained == two.rounds_trained == (2, 2, 2)
    assert one.epsilon == two.epsilon
    assert set(one.weights) == set(two.weights)
    for name, array in one.weights.items():
        np.testing.assert_array_equal(array, two.weights[name])
    moved = run_fedavg(split, PLAN, rounds=1, seed=3, dp=dp)
    assert any(not np.array_equal(moved.weights[k], one.weights[k]) for k in one.weights)
