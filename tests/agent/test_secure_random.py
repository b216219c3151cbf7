"""DP-SGD's randomness from ChaCha20: the stream, Poisson batches, noise, and the front door."""

from __future__ import annotations

import math
import warnings

import numpy as np
import numpy.typing as npt
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from fedgate_agent.model import build_model, weights_of
from fedgate_agent.private_training import (
    CsprngDPOptimizer,
    CsprngPoissonSampler,
    _csprng_poisson_loader,
    train_locally_private,
)
from fedgate_agent.record_privacy import steps_per_round
from fedgate_agent.secure_random import ChaCha20Stream
from fedgate_agent.training import LocalDataset
from fedgate_common.messages import TrainingPlan
from fedgate_common.model_spec import ModelSpec, initial_weights
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from scipy import stats  # type: ignore[import-untyped]
from torch.utils.data import TensorDataset

torch.set_num_threads(1)

KEY = bytes(range(32))
SPEC = ModelSpec(n_features=3, window=8, n_classes=3, channels=4)

# RFC 7539 appendix A.1, test vector 1: key and nonce all zero, block counter 0.
RFC7539_A1_KEYSTREAM = bytes.fromhex(
    "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
    "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
)


def test_keystream_is_chacha20() -> None:
    stream = ChaCha20Stream(key=bytes(32))
    assert stream.keystream(40) + stream.keystream(24) == RFC7539_A1_KEYSTREAM


def test_uniforms_are_the_top_53_bits_of_little_endian_words() -> None:
    words = np.frombuffer(RFC7539_A1_KEYSTREAM, dtype="<u8")
    want = [int(w) >> 11 for w in words]
    got = ChaCha20Stream(key=bytes(32)).uniform(len(words))
    assert [v * 2**53 for v in got] == want


def test_keys_come_from_the_os_unless_given() -> None:
    assert ChaCha20Stream().keystream(32) != ChaCha20Stream().keystream(32)
    assert ChaCha20Stream(key=KEY).keystream(32) == ChaCha20Stream(key=KEY).keystream(32)
    with pytest.raises(ValueError, match="32 bytes"):
        ChaCha20Stream(key=bytes(16))


class SmallNonceStream(ChaCha20Stream):
    bytes_per_nonce = 128


def test_the_stream_moves_to_the_next_nonce_before_the_counter_could_wrap() -> None:
    stream = SmallNonceStream(key=KEY)
    first = stream.keystream(100)
    second = stream.keystream(50)  # would pass 128 bytes: starts nonce 1 at counter 0
    nonce_1 = bytes(4) + (1).to_bytes(12, "little")
    direct = Cipher(algorithms.ChaCha20(KEY, nonce_1), mode=None).encryptor()
    assert first == ChaCha20Stream(key=KEY).keystream(100)
    assert second == direct.update(bytes(50))
    with pytest.raises(ValueError, match="at once"):
        stream.keystream(129)


class ZerosFirstStream(ChaCha20Stream):
    """Its first 16 keystream bytes are zero: two uniforms that must be drawn again."""

    def __init__(self) -> None:
        super().__init__(key=KEY)
        self.zeros_left = 16

    def keystream(self, size: int) -> bytes:
        if self.zeros_left:
            self.zeros_left -= size
            return bytes(size)
        return super().keystream(size)


def test_zero_is_drawn_again_so_uniforms_lie_in_the_open_interval() -> None:
    values = ZerosFirstStream().uniform(2)
    assert list(values) == list(ChaCha20Stream(key=KEY).uniform(2))
    assert np.all(values > 0)


def test_uniforms_and_normals_pass_kolmogorov_smirnov() -> None:
    stream = ChaCha20Stream(key=KEY)
    uniforms = stream.uniform(200_000)
    assert uniforms.min() > 0
    assert uniforms.max() < 1
    assert stats.kstest(uniforms, "uniform").pvalue > 1e-3
    normals = stream.standard_normal((400, 500), dtype=torch.float64)
    assert normals.shape == (400, 500)
    assert normals.dtype == torch.float64
    flat = normals.flatten().numpy()
    assert stats.kstest(flat, "norm").pvalue > 1e-3
    assert abs(flat.mean()) < 0.01
    assert flat.std() == pytest.approx(1.0, abs=0.01)
    assert stream.standard_normal((3, 2)).dtype == torch.float32


def test_bernoulli_masks_check_their_rate() -> None:
    stream = ChaCha20Stream(key=KEY)
    assert stream.bernoulli_mask(1000, 1.0).all()
    assert not stream.bernoulli_mask(1000, 0.0).any()
    for rate in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="probability"):
            stream.bernoulli_mask(10, rate)


def test_poisson_batch_sizes_have_binomial_mean_and_variance() -> None:
    n, rate = 1000, 0.05
    sampler = CsprngPoissonSampler(num_samples=n, sample_rate=rate, stream=ChaCha20Stream(key=KEY))
    assert len(sampler) == int(1 / rate)
    batches = [batch for _ in range(150) for batch in sampler]  # 3000 steps
    assert len(batches) == 150 * int(1 / rate)
    assert all(b == sorted(set(b)) and all(0 <= i < n for i in b) for b in batches)
    sizes = np.array([len(b) for b in batches], dtype=np.float64)
    # n q = 50 and n q (1 - q) = 47.5; the bounds are about four standard errors.
    assert sizes.mean() == pytest.approx(n * rate, abs=0.5)
    assert sizes.var(ddof=1) == pytest.approx(n * rate * (1 - rate), abs=5.0)
    drawn = np.bincount(np.concatenate([np.array(b, dtype=np.int64) for b in batches]), minlength=n)
    assert stats.chisquare(drawn).pvalue > 1e-3  # every window equally likely


def test_empty_poisson_batches_keep_the_shape_of_a_window() -> None:
    windows = TensorDataset(torch.ones(50, 8, 3), torch.zeros(50, dtype=torch.int64))
    loader = _csprng_poisson_loader(windows, 1 / 512, ChaCha20Stream(key=KEY))
    batches = [batch for _ in range(2) for batch in loader]
    assert len(batches) == 2 * 512
    empty = [(x, y) for x, y in batches if len(y) == 0]
    assert len(empty) > len(batches) / 2  # (1 - q)ⁿ ≈ 91 % of them
    x, y = empty[0]
    assert (x.shape, x.dtype) == ((0, 8, 3), torch.float32)
    assert (y.shape, y.dtype) == ((0,), torch.int64)


def zero_gradient_step(optimizer_stream: ChaCha20Stream, sigma: float) -> torch.Tensor:
    """The gradient after one step in which every window's gradient is zero: noise / B."""
    module = torch.nn.Linear(400, 50, bias=False)
    torch.nn.init.zeros_(module.weight)
    model = GradSampleModule(module)
    optimizer = CsprngDPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=sigma,
        max_grad_norm=4.0,
        expected_batch_size=8,
        stream=optimizer_stream,
    )
    optimizer.zero_grad()
    (model(torch.zeros(8, 400)).sum() * 0.0).backward()
    optimizer.step()
    grad = module.weight.grad
    assert grad is not None
    model._close()
    return grad


def test_csprng_noise_has_std_sigma_times_clip_over_the_batch() -> None:
    sigma, clip, batch = 1.3, 4.0, 8
    noise = zero_gradient_step(ChaCha20Stream(key=KEY), sigma)
    std = sigma * clip / batch
    assert noise.dtype == torch.float32
    assert float(noise.std()) == pytest.approx(std, rel=0.03)
    assert abs(float(noise.mean())) < 4 * std / math.sqrt(noise.numel())
    assert stats.kstest(noise.flatten().numpy() / std, "norm").pvalue > 1e-3
    assert not zero_gradient_step(ChaCha20Stream(key=KEY), 0.0).any()


def test_each_noise_value_is_four_stream_normals_over_two() -> None:
    """Opacus's secure-mode construction (n = 2), with the draws from the keystream."""
    sigma, clip, batch = 1.3, 4.0, 8
    noise = zero_gradient_step(ChaCha20Stream(key=KEY), sigma)
    draws = ChaCha20Stream(key=KEY).standard_normal((4, 50, 400), dtype=torch.float64)
    assert torch.equal(noise, (draws.sum(dim=0) * (sigma * clip / 2)).float() / batch)


def dataset(n: int, seed: int) -> LocalDataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, SPEC.window, SPEC.n_features)).astype(np.float32)
    return LocalDataset(x=x, y=rng.integers(0, SPEC.n_classes, n).astype(np.int64))


def train_private(
    data: LocalDataset, plan: TrainingPlan, seed: int | None
) -> dict[str, npt.NDArray[np.float32]]:
    model = build_model(SPEC, weights=initial_weights(SPEC, np.random.default_rng(0)))
    train_locally_private(model, data, plan, noise_multiplier=1.0, max_grad_norm=1.0, seed=seed)
    return weights_of(model)


PLAN = TrainingPlan(learning_rate=0.05, momentum=0.9, local_epochs=2, batch_size=8)


def test_unseeded_runs_draw_from_the_keystream_and_differ(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    noise_steps = 0
    csprng_add_noise = CsprngDPOptimizer.add_noise

    def counted(self: CsprngDPOptimizer) -> None:
        nonlocal noise_steps
        noise_steps += 1
        csprng_add_noise(self)

    def refused(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("torch's generator drew batches or noise")

    monkeypatch.setattr(CsprngDPOptimizer, "add_noise", counted)
    monkeypatch.setattr(torch, "rand", refused)  # Opacus's Poisson sampler
    monkeypatch.setattr(torch, "normal", refused)  # Opacus's noise
    data = dataset(64, seed=1)
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    first, second = train_private(data, PLAN, None), train_private(data, PLAN, None)
    assert torch.equal(torch.get_rng_state(), global_state)
    assert noise_steps > 0
    assert any(not np.array_equal(first[name], second[name]) for name in first)


def test_private_training_warns_nothing_and_restores_the_callers_filters() -> None:
    """torch warns on Opacus's hooks at the first backward of a process; the agent's log
    is structured, so the product path (unseeded) must not print that bare warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        before = list(warnings.filters)
        train_private(dataset(32, seed=3), PLAN, None)
        assert warnings.filters == before


@pytest.mark.parametrize("seed", [None, 5])
def test_empty_batches_are_steps_that_add_noise(
    monkeypatch: pytest.MonkeyPatch, seed: int | None
) -> None:
    """The mechanism the accountant counts: every step, empty or not, adds noise once."""
    noised: list[int] = []
    optimizer_class = CsprngDPOptimizer if seed is None else DPOptimizer
    add_noise = optimizer_class.add_noise

    def counted(self: DPOptimizer) -> None:
        noised.append(len(self.grad_samples[0]))
        add_noise(self)

    monkeypatch.setattr(optimizer_class, "add_noise", counted)
    data = dataset(30, seed=2)
    plan = TrainingPlan(learning_rate=0.05, local_epochs=3, batch_size=1)  # ~37 % empty
    model = build_model(SPEC, weights=initial_weights(SPEC, np.random.default_rng(0)))
    result = train_locally_private(
        model, data, plan, noise_multiplier=1.0, max_grad_norm=1.0, seed=seed
    )
    assert result.sample_rate == 1 / 30
    assert result.steps == steps_per_round(30, 1, 3) == 90 == len(noised)
    assert noised.count(0) > 10  # empty batches were drawn, and noised
    assert result.noise_multiplier == 1.0
    assert math.isfinite(result.result.mean_loss)
    assert all(np.isfinite(w).all() for w in weights_of(model).values())


def test_seeded_runs_are_reproducible_bit_for_bit_and_skip_the_keystream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refused(self: ChaCha20Stream, key: bytes | None = None) -> None:
        raise AssertionError("a seeded run made a ChaCha20 stream")

    monkeypatch.setattr(ChaCha20Stream, "__init__", refused)
    data = dataset(64, seed=3)
    runs = [train_private(data, PLAN, seed) for seed in (7, 7, 8)]
    for name in runs[0]:
        np.testing.assert_array_equal(runs[0][name], runs[1][name])
    assert any(not np.array_equal(runs[0][name], runs[2][name]) for name in runs[0])
