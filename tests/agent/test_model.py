from __future__ import annotations

import numpy as np
import pytest
import torch
from fedgate_agent.model import WindowCnn, build_model, load_weights, weights_of
from fedgate_common.errors import MalformedMessage, NonFiniteValues
from fedgate_common.model_spec import ModelSpec, initial_weights, parameter_shapes

torch.set_num_threads(1)

SPECS = [
    ModelSpec(n_features=52, window=20, n_classes=22),
    ModelSpec(n_features=3, window=5, n_classes=2, channels=4, kernel_size=3),
    ModelSpec(n_features=1, window=1, n_classes=1, channels=1, kernel_size=1),
    ModelSpec(n_features=7, window=30, n_classes=5, channels=16, kernel_size=5),
]


@pytest.mark.parametrize("spec", SPECS)
def test_state_dict_matches_parameter_shapes(spec: ModelSpec) -> None:
    model = build_model(spec)
    got = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    assert got == parameter_shapes(spec)
    assert [name for name, _ in model.named_parameters()] == [n for n, _ in parameter_shapes(spec)]


@pytest.mark.parametrize("spec", SPECS)
def test_forward_gives_logits_per_window(spec: ModelSpec) -> None:
    model = build_model(spec)
    out = model(torch.zeros(3, spec.window, spec.n_features))
    assert out.shape == (3, spec.n_classes)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("spec", SPECS)
def test_weights_round_trip(spec: ModelSpec) -> None:
    weights = initial_weights(spec, np.random.default_rng(1))
    model = build_model(spec, weights=weights)
    back = weights_of(model)
    assert list(back) == [name for name, _ in parameter_shapes(spec)]
    for name, value in weights.items():
        assert back[name].dtype == np.float32
        np.testing.assert_array_equal(back[name], value)
    # A copy: changing the model afterwards does not change the returned arrays.
    load_weights(model, initial_weights(spec, np.random.default_rng(2)))
    np.testing.assert_array_equal(back["head.bias"], weights["head.bias"])


def test_load_weights_rejects_wrong_shapes_names_and_nan() -> None:
    spec = SPECS[1]
    model = build_model(spec, weights=initial_weights(spec, np.random.default_rng(0)))
    before = weights_of(model)
    good = initial_weights(spec, np.random.default_rng(3))

    wrong_shape = dict(good)
    wrong_shape["conv2.weight"] = np.zeros((4, 4, 2), dtype=np.float32)
    with pytest.raises(MalformedMessage, match=r"wrong_shape=\['conv2.weight'\]"):
        load_weights(model, wrong_shape)

    missing = dict(good)
    del missing["head.bias"]
    with pytest.raises(MalformedMessage, match="missing"):
        load_weights(model, missing)

    extra = dict(good)
    extra["feature_mean"] = np.zeros(spec.n_features, dtype=np.float32)
    with pytest.raises(MalformedMessage, match="extra"):
        load_weights(model, extra)

    nan = dict(good)
    nan["conv1.bias"] = np.full(spec.channels, np.nan, dtype=np.float32)
    with pytest.raises(NonFiniteValues):
        load_weights(model, nan)

    after = weights_of(model)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])


def test_standardisation_happens_inside_the_model() -> None:
    n_features = 4
    base = ModelSpec(n_features=n_features, window=8, n_classes=3, channels=5)
    mean = (10.0, -3.0, 0.5, 1000.0)
    scale = (2.0, 0.1, 7.0, 50.0)
    shifted = ModelSpec(
        n_features=n_features,
        window=8,
        n_classes=3,
        channels=5,
        feature_mean=mean,
        feature_scale=scale,
    )
    weights = initial_weights(base, np.random.default_rng(5))
    plain = build_model(base, weights=weights)
    standardising = build_model(shifted, weights=weights)

    z = torch.from_numpy(
        np.random.default_rng(6).normal(size=(6, 8, n_features)).astype(np.float32)
    )
    raw = z * torch.tensor(scale) + torch.tensor(mean)
    with torch.no_grad():
        expected = plain(z)
        got = standardising(raw)
        unstandardised = plain(raw)
    # (torch.testing imports torch.distributed: seconds; numpy compares just as well)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(unstandardised, expected, atol=1e-2)


def test_standardisation_constants_are_not_in_the_state_dict() -> None:
    spec = ModelSpec(
        n_features=2,
        window=5,
        n_classes=2,
        channels=3,
        feature_mean=(1.0, 2.0),
        feature_scale=(3.0, 4.0),
    )
    model = build_model(spec)
    assert isinstance(model, WindowCnn)
    assert "feature_mean" not in model.state_dict()
    assert model.feature_scale.tolist() == [3.0, 4.0]
    assert all(p.requires_grad for p in model.parameters())
    assert len(list(model.parameters())) == 6
