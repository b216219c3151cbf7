"""The deterministic cross-cloud rule: bit-identical results whatever the order of arrival,
capped weights, robustness to one poisoned cloud, and the checks on each aggregate."""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Mapping
from fractions import Fraction

import numpy as np
import numpy.typing as npt
import pytest
from fedgate_common.model_spec import ModelSpec, parameter_shapes
from fedgate_coordinator.cross_cloud import (
    CENTERED_CLIP_ITERATIONS,
    ROBUST_RULES,
    RULES,
    CloudContribution,
    CrossCloudRuleError,
    aggregate_problem,
    combine,
    delta_norm,
    trim_count,
)
from fedgate_coordinator.errors import CoordinatorError

Delta = dict[str, npt.NDArray[np.float32]]

SPEC = ModelSpec(n_features=4, window=8, n_classes=3, channels=4)
SHAPES = parameter_shapes(SPEC)
# Ten parameters in all, one per tensor and 3 per convolution kernel: values are hand-checkable.
TINY = ModelSpec(n_features=1, window=5, n_classes=1, channels=1, kernel_size=3)
TINY_SIZE = 10


def random_delta(seed: int, scale: float = 0.05, spec: ModelSpec = SPEC) -> Delta:
    rng = np.random.default_rng(seed)
    return {
        name: rng.normal(0.0, scale, shape).astype(np.float32)
        for name, shape in parameter_shapes(spec)
    }


def constant_delta(value: float, spec: ModelSpec = SPEC) -> Delta:
    return {name: np.full(shape, value, np.float32) for name, shape in parameter_shapes(spec)}


def tiny_delta(values: list[float]) -> Delta:
    """A delta of :data:`TINY` from its ten values in spec order."""
    flat = np.asarray(values, dtype=np.float32)
    delta: Delta = {}
    offset = 0
    for name, shape in parameter_shapes(TINY):
        size = math.prod(shape)
        delta[name] = flat[offset : offset + size].reshape(shape)
        offset += size
    return delta


def flat(
    delta: Mapping[str, npt.NDArray[np.float32]], spec: ModelSpec = SPEC
) -> npt.NDArray[np.float32]:
    return np.concatenate([delta[name].ravel() for name, _ in parameter_shapes(spec)])


def distance(first: Delta, second: Delta) -> float:
    return delta_norm({name: first[name].astype(np.float64) - second[name] for name in first})


def result_bytes(delta: Delta) -> bytes:
    return b"".join(delta[name].tobytes() for name, _ in SHAPES)


def honest_clouds(count: int, participants: int = 10) -> list[CloudContribution]:
    """Clouds whose deltas share a common direction plus a little cloud-specific noise."""
    common = random_delta(7, scale=0.05)
    clouds = []
    for index in range(count):
        noise = random_delta(100 + index, scale=0.01)
        delta = {name: (common[name] + noise[name]).astype(np.float32) for name in common}
        clouds.append(CloudContribution(f"cloud-{index}", participants, delta))
    return clouds


# -- determinism -------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
def test_result_is_bitwise_independent_of_input_order(rule: str) -> None:
    clouds = [
        CloudContribution(f"cloud-{index}", participants, random_delta(index))
        for index, participants in enumerate([3, 50, 7, 1, 12, 9])
    ]
    clouds.append(CloudContribution("aborted", 0, constant_delta(0.0)))
    expected = result_bytes(combine(rule, clouds, weight_cap=10, spec=SPEC))
    rng = np.random.default_rng(0)
    for _ in range(20):
        shuffled = [clouds[i] for i in rng.permutation(len(clouds))]
        assert result_bytes(combine(rule, shuffled, weight_cap=10, spec=SPEC)) == expected


@pytest.mark.parametrize("rule", RULES)
def test_result_ignores_the_order_of_names_in_a_delta(rule: str) -> None:
    clouds = [CloudContribution(f"c{i}", 4, random_delta(i)) for i in range(5)]
    reordered = [
        CloudContribution(c.cloud, c.participants, dict(reversed(list(c.delta.items()))))
        for c in clouds
    ]
    first = combine(rule, clouds, weight_cap=8, spec=SPEC)
    second = combine(rule, reordered, weight_cap=8, spec=SPEC)
    assert result_bytes(first) == result_bytes(second)
    assert list(first) == [name for name, _ in SHAPES]
    for name, shape in SHAPES:
        assert first[name].dtype == np.float32
        assert first[name].shape == shape


@pytest.mark.parametrize("rule", RULES)
def test_negative_zero_and_positive_zero_give_the_same_bits(rule: str) -> None:
    # -0.0 == 0.0, so an unstable sort could order them either way; the rule must not care.
    zeros = [0.0] * TINY_SIZE
    negative = CloudContribution("a", 1, tiny_delta([-0.0] * TINY_SIZE))
    positive = CloudContribution("b", 1, tiny_delta(zeros))
    third = CloudContribution("c", 1, tiny_delta(zeros))
    results = {
        result_bytes_tiny(combine(rule, order, weight_cap=1, spec=TINY))
        for order in itertools.permutations([negative, positive, third])
    }
    assert len(results) == 1


def result_bytes_tiny(delta: Delta) -> bytes:
    return flat(delta, TINY).tobytes()


# Pinned digests of the results for fixed inputs: if numpy or this module
# ever changes a rounding, coordinators of different versions would disagree; this fails.
def known_answer_clouds() -> list[CloudContribution]:
    clouds = []
    for index in range(5):
        values = np.arange(sum(math.prod(shape) for _, shape in SHAPES), dtype=np.float64)
        # Exact integer arithmetic and a power-of-two scale: the same inputs everywhere.
        delta_flat = (((values * (7 * index + 3)) % 997 - 498) / 1024).astype(np.float32)
        delta: Delta = {}
        offset = 0
        for name, shape in SHAPES:
            size = math.prod(shape)
            delta[name] = delta_flat[offset : offset + size].reshape(shape)
            offset += size
        clouds.append(CloudContribution(f"cloud-{index}", index * 4 + 1, delta))
    return clouds


KNOWN_ANSWERS = {
    "capped_mean": "0eb929513e04725e830cfc7e5d1a082d84e799d7c4fdc88acf0f397fb1b44f90",
    "trimmed_mean": "160f1ff56363ca21381af03df8a4d5d59728b25f06e0a440ace9c1202445138c",
    "median": "12af2aa15831e65cfdb000ff5003f5370b5886fdf5e4375ebf589374d67deb56",
    "centered_clip": "042b377e6518076864404c9727f32ac8ab966774cd30c667ac6621d879ee907a",
}


@pytest.mark.parametrize("rule", RULES)
def test_known_answers(rule: str) -> None:
    result = combine(rule, known_answer_clouds(), weight_cap=10, spec=SPEC)
    assert hashlib.sha256(result_bytes(result)).hexdigest() == KNOWN_ANSWERS[rule]


def exact_answer(rule: str, clouds: list[CloudContribution], weight_cap: int) -> list[float]:
    """The rule in exact rational arithmetic, rounded to float64 and then to float32."""
    columns = zip(*(flat(cloud.delta).tolist() for cloud in clouds), strict=True)
    weights = [min(cloud.participants, weight_cap) for cloud in clouds]
    trim = trim_count(len(clouds))
    answers = []
    for column in columns:
        values = [Fraction(value) for value in column]
        ordered = sorted(values)
        if rule == "capped_mean":
            exact = sum(w * v for w, v in zip(weights, values, strict=True)) / sum(weights)
        elif rule == "trimmed_mean":
            kept = ordered[trim : len(ordered) - trim]
            exact = sum(kept, Fraction(0)) / len(kept)
        else:
            middle = len(ordered) // 2
            exact = (
                ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
            )
        answers.append(float(np.float32(float(exact))))
    return answers


@pytest.mark.parametrize("rule", ["capped_mean", "trimmed_mean", "median"])
def test_known_answers_match_exact_arithmetic(rule: str) -> None:
    # The inputs are multiples of 1/1024 and the weights small, so every float64 sum is
    # exact and each rule rounds once: it must equal the exact rational answer, rounded.
    clouds = known_answer_clouds()
    result = combine(rule, clouds, weight_cap=10, spec=SPEC)
    assert flat(result).tolist() == exact_answer(rule, clouds, weight_cap=10)


# -- the rules on hand-checkable values ------------------------------------------------------


def test_capped_mean_weights_by_participants_up_to_the_cap() -> None:
    clouds = [
        CloudContribution("a", 1, tiny_delta([4.0] * TINY_SIZE)),
        CloudContribution("b", 3, tiny_delta([0.0] * TINY_SIZE)),
    ]
    result = combine("capped_mean", clouds, weight_cap=10, spec=TINY)
    assert flat(result, TINY).tolist() == [1.0] * TINY_SIZE  # (1*4 + 3*0) / 4


def test_a_cloud_claiming_a_million_participants_weighs_no_more_than_the_cap() -> None:
    clouds = [
        CloudContribution("big-claim", 1_000_000, constant_delta(1.0)),
        CloudContribution("honest-1", 10, constant_delta(0.0)),
        CloudContribution("honest-2", 25, constant_delta(0.0)),
    ]
    result = combine("capped_mean", clouds, weight_cap=10, spec=SPEC)
    # Weights 10, 10, 10 (25 is capped too): the claim counts like any capped cloud.
    np.testing.assert_array_equal(flat(result), np.float32(1 / 3))
    uncapped = combine("capped_mean", clouds, weight_cap=10**9, spec=SPEC)
    assert flat(uncapped)[0] > 0.99


def test_trimmed_mean_drops_f_values_at_each_end() -> None:
    assert [trim_count(n) for n in range(0, 11)] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    values = [10.0, -50.0, 1.0, 2.0, 3.0, 4.0, 1000.0]  # n = 7: f = 2
    clouds = [
        CloudContribution(f"c{i}", 1, tiny_delta([value] * TINY_SIZE))
        for i, value in enumerate(values)
    ]
    result = combine("trimmed_mean", clouds, weight_cap=1, spec=TINY)
    assert flat(result, TINY).tolist() == [(2.0 + 3.0 + 4.0) / 3] * TINY_SIZE


def test_trimmed_mean_is_unweighted() -> None:
    clouds = [
        CloudContribution("a", 1, tiny_delta([0.0] * TINY_SIZE)),
        CloudContribution("b", 9, tiny_delta([3.0] * TINY_SIZE)),
    ]
    for rule in ("trimmed_mean", "median"):
        result = combine(rule, clouds, weight_cap=100, spec=TINY)
        assert flat(result, TINY).tolist() == [1.5] * TINY_SIZE


def test_median_is_coordinate_wise() -> None:
    rows = [
        [1.0, 5.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 7.0],
        [2.0, 4.0, -3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 8.0],
        [3.0, 6.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0],
        [4.0, 3.0, -4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 100.0],
    ]
    clouds = [CloudContribution(f"c{i}", 2, tiny_delta(row)) for i, row in enumerate(rows)]
    result = flat(combine("median", clouds, weight_cap=5, spec=TINY), TINY).tolist()
    assert result[:3] == [2.5, 4.5, -2.5]
    assert result[9] == 8.5
    odd = flat(combine("median", clouds[:3], weight_cap=5, spec=TINY), TINY).tolist()
    assert odd[:3] == [2.0, 5.0, -2.0]


def test_centered_clip_by_hand() -> None:
    # Three clouds at 0 and one far away: the median is 0 and so are three distances,
    # so tau = 0 and the centre never moves.
    clouds = [CloudContribution(f"c{i}", 1, tiny_delta([0.0] * TINY_SIZE)) for i in range(3)]
    clouds.append(CloudContribution("far", 1, tiny_delta([1e6] * TINY_SIZE)))
    still = combine("centered_clip", clouds, weight_cap=1, spec=TINY)
    assert flat(still, TINY).tolist() == [0.0] * TINY_SIZE
    # Clouds at 0, 0, 1, 1, 10 (every coordinate): median 1; distances sqrt(10) * (1, 1, 0,
    # 0, 9), so tau = sqrt(10). Each step: the far cloud pulls with +1 per coordinate
    # (clipped to tau), the others with their differences; v: 1 -> 0.8 -> 0.76 -> 0.752.
    values = [0.0, 0.0, 1.0, 1.0, 10.0]
    clouds = [
        CloudContribution(f"c{i}", 1, tiny_delta([value] * TINY_SIZE))
        for i, value in enumerate(values)
    ]
    assert CENTERED_CLIP_ITERATIONS == 3
    result = flat(combine("centered_clip", clouds, weight_cap=1, spec=TINY), TINY)
    np.testing.assert_allclose(result, 0.752, rtol=1e-6)
    assert len(set(result.tolist())) == 1


# -- robustness --------------------------------------------------------------------------------


def test_one_poisoned_cloud_among_four_is_contained_by_the_robust_rules() -> None:
    honest = honest_clouds(3)
    honest_mean = combine("capped_mean", honest, weight_cap=100, spec=SPEC)
    assert 0.4 < delta_norm(honest_mean) < 0.6
    poisoned_delta = random_delta(103, scale=0.05)
    poisoned = CloudContribution(
        "cloud-x",
        10,
        {name: (1000 * array).astype(np.float32) for name, array in poisoned_delta.items()},
    )
    clouds = [*honest, poisoned]

    moved = {
        rule: distance(combine(rule, clouds, weight_cap=100, spec=SPEC), honest_mean)
        for rule in RULES
    }

    # capped_mean follows the poison: a quarter of a 1000x delta.
    assert moved["capped_mean"] > 100
    # The robust rules stay within the honest clouds' own spread (each ~0.11 from their mean).
    for rule in ROBUST_RULES:
        assert moved[rule] < 0.1, (rule, moved[rule])


@pytest.mark.parametrize("rule", ROBUST_RULES)
def test_a_poisoned_cloud_among_seven_with_huge_values_is_contained(rule: str) -> None:
    honest = honest_clouds(6)
    honest_mean = combine("capped_mean", honest, weight_cap=100, spec=SPEC)
    poisoned = CloudContribution("cloud-x", 10**6, constant_delta(-3e30))
    result = combine(rule, [*honest, poisoned], weight_cap=100, spec=SPEC)
    assert distance(result, honest_mean) < 0.1


# -- aborted clouds and small federations ---------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
def test_clouds_with_zero_participants_are_ignored(rule: str) -> None:
    clouds = honest_clouds(4)
    aborted = [CloudContribution(f"aborted-{i}", 0, constant_delta(0.0)) for i in range(3)]
    with_aborted = combine(rule, [*clouds, *aborted], weight_cap=10, spec=SPEC)
    without = combine(rule, clouds, weight_cap=10, spec=SPEC)
    assert result_bytes(with_aborted) == result_bytes(without)


@pytest.mark.parametrize("rule", RULES)
def test_no_cloud_with_participants_gives_a_zero_delta(rule: str) -> None:
    aborted = [CloudContribution(f"aborted-{i}", 0, constant_delta(0.0)) for i in range(4)]
    for contributions in (aborted, []):
        result = combine(rule, contributions, weight_cap=10, spec=SPEC)
        assert not np.any(flat(result))
        assert [(name, array.shape) for name, array in result.items()] == SHAPES


@pytest.mark.parametrize("rule", ROBUST_RULES)
def test_robust_rules_with_one_to_three_clouds(rule: str) -> None:
    one = [CloudContribution("a", 2, tiny_delta([3.0] * TINY_SIZE))]
    assert flat(combine(rule, one, weight_cap=4, spec=TINY), TINY).tolist() == [3.0] * TINY_SIZE
    two = [*one, CloudContribution("b", 7, tiny_delta([1.0] * TINY_SIZE))]
    # Unweighted: the mean of the two for every rule (f = 0, median of two, clip starts there).
    assert flat(combine(rule, two, weight_cap=4, spec=TINY), TINY).tolist() == [2.0] * TINY_SIZE
    three = [*two, CloudContribution("c", 1, tiny_delta([8.0] * TINY_SIZE))]
    result = flat(combine(rule, three, weight_cap=4, spec=TINY), TINY).tolist()
    if rule == "trimmed_mean":
        assert result == [4.0] * TINY_SIZE  # f = 0 below four clouds: the unweighted mean
    elif rule == "median":
        assert result == [3.0] * TINY_SIZE
    else:
        assert len(set(result)) == 1
        assert 3.0 <= result[0] <= 4.0  # from the median towards the mean, clipped


# -- refusals --------------------------------------------------------------------------------


def test_unknown_rule_and_bad_cap_are_refused() -> None:
    clouds = honest_clouds(2)
    with pytest.raises(CrossCloudRuleError, match="unknown rule 'mean'"):
        combine("mean", clouds, weight_cap=10, spec=SPEC)
    for cap in (0, -1, 2.5, True):
        with pytest.raises(CrossCloudRuleError, match="weight_cap"):
            combine("capped_mean", clouds, weight_cap=cap, spec=SPEC)  # type: ignore[arg-type]


def test_error_type_is_a_coordinator_error_and_a_value_error() -> None:
    with pytest.raises(CrossCloudRuleError) as caught:
        combine("nope", [], weight_cap=1, spec=SPEC)
    assert isinstance(caught.value, CoordinatorError)
    assert isinstance(caught.value, ValueError)
    assert caught.value.cloud is None


def test_two_aggregates_from_one_cloud_are_refused() -> None:
    first, second = honest_clouds(2)
    twin = CloudContribution(first.cloud, 3, second.delta)
    with pytest.raises(CrossCloudRuleError, match="two aggregates") as caught:
        combine("median", [first, second, twin], weight_cap=10, spec=SPEC)
    assert caught.value.cloud == first.cloud


def test_combine_refuses_a_contribution_that_does_not_fit() -> None:
    good = honest_clouds(3)
    bad_delta = dict(good[0].delta)
    bad_delta["head.bias"] = np.zeros(7, np.float32)
    bad = CloudContribution("cloud-bad", 5, bad_delta)
    with pytest.raises(CrossCloudRuleError, match="shape") as caught:
        combine("capped_mean", [*good, bad], weight_cap=10, spec=SPEC)
    assert caught.value.cloud == "cloud-bad"


# -- aggregate_problem -------------------------------------------------------------------------


def check(contribution: CloudContribution, max_update_norm: float = 10.0) -> str | None:
    return aggregate_problem(
        contribution, spec=SPEC, max_update_norm=max_update_norm, weight_cap=10
    )


def test_a_good_aggregate_has_no_problem() -> None:
    (cloud,) = honest_clouds(1)
    assert check(cloud) is None
    assert check(CloudContribution("aborted", 0, constant_delta(0.0))) is None
    # A claim above the cap is capped by combine, not refused.
    assert check(CloudContribution("big", 10**6, cloud.delta)) is None


def test_nan_and_inf_are_problems() -> None:
    for bad_value in (np.nan, np.inf, -np.inf):
        delta = constant_delta(0.01)
        delta["conv2.weight"][1, 2, 0] = bad_value
        problem = check(CloudContribution("c", 4, delta))
        assert problem is not None
        assert "conv2.weight" in problem
        assert "NaN or infinite" in problem


def test_wrong_shape_dtype_and_names_are_problems() -> None:
    delta = constant_delta(0.01)
    delta["conv1.weight"] = np.zeros((4, 4, 2), np.float32)
    assert "conv1.weight has shape (4, 4, 2), expected (4, 4, 3)" in str(
        check(CloudContribution("c", 4, delta))
    )
    delta = constant_delta(0.01)
    delta["conv1.bias"] = delta["conv1.bias"].astype(np.float64)
    assert "dtype float64" in str(check(CloudContribution("c", 4, delta)))
    delta = constant_delta(0.01)
    del delta["head.bias"]
    assert "lacks head.bias" in str(check(CloudContribution("c", 4, delta)))
    delta = constant_delta(0.01)
    delta["extra"] = np.zeros(1, np.float32)
    assert "unknown parameters extra" in str(check(CloudContribution("c", 4, delta)))
    delta = constant_delta(0.01)
    delta["head.bias"] = [0.0, 0.0, 0.0]  # type: ignore[assignment]
    assert "not an array" in str(check(CloudContribution("c", 4, delta)))


def test_oversized_norm_is_a_problem() -> None:
    delta = constant_delta(0.5)
    norm = delta_norm(delta)
    size = sum(math.prod(shape) for _, shape in SHAPES)
    assert norm == pytest.approx(0.5 * math.sqrt(size))
    assert check(CloudContribution("c", 4, delta), max_update_norm=norm) is None
    problem = check(CloudContribution("c", 4, delta), max_update_norm=norm * 0.99)
    assert problem is not None
    assert "above the bound" in problem


def test_bad_participants_cloud_id_and_aborted_nonzero_delta_are_problems() -> None:
    delta = constant_delta(0.01)
    assert "participants must be an integer >= 0" in str(check(CloudContribution("c", -1, delta)))
    assert "participants" in str(check(CloudContribution("c", 2.0, delta)))  # type: ignore[arg-type]
    assert "cloud id" in str(check(CloudContribution("bad/cloud", 2, delta)))
    assert "0 participants must send an all-zero delta" in str(
        check(CloudContribution("c", 0, delta))
    )


def test_bad_settings_raise_instead_of_blaming_the_cloud() -> None:
    (cloud,) = honest_clouds(1)
    for bound in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(CrossCloudRuleError, match="max_update_norm"):
            aggregate_problem(cloud, spec=SPEC, max_update_norm=bound, weight_cap=10)
    with pytest.raises(CrossCloudRuleError, match="weight_cap"):
        aggregate_problem(cloud, spec=SPEC, max_update_norm=1.0, weight_cap=0)


def test_delta_norm_is_exact_and_order_free() -> None:
    delta = {"a": np.array([3.0], np.float32), "b": np.array([[4.0]], np.float32)}
    assert delta_norm(delta) == 5.0
    assert delta_norm(dict(reversed(list(delta.items())))) == 5.0
    assert delta_norm({}) == 0.0
    values = random_delta(3)
    expected = math.sqrt(math.fsum(float(v) ** 2 for v in flat(values).tolist()))
    assert delta_norm(values) == expected


def test_trimmed_mean_trims_the_federations_faults_not_the_proposals() -> None:
    """Four clouds (f = 1): a proposal with only three aggregates, one poisoned, is still
    trimmed by one at each end (the median of three), not averaged."""
    rng = np.random.default_rng(5)
    honest = [[float(v) for v in rng.normal(0, 0.01, TINY_SIZE)] for _ in range(2)]
    rows = [*honest, [1000.0] * TINY_SIZE]
    contributions = [
        CloudContribution(cloud=f"c{i}", participants=3, delta=tiny_delta(row))
        for i, row in enumerate(rows)
    ]
    trimmed = combine("trimmed_mean", contributions, weight_cap=10, spec=TINY, faults=1)
    assert max(abs(float(v)) for a in trimmed.values() for v in a.ravel()) < 0.1
    untrimmed = combine("trimmed_mean", contributions, weight_cap=10, spec=TINY)
    assert max(abs(float(v)) for a in untrimmed.values() for v in a.ravel()) > 100
    assert [trim_count(n, 1) for n in (1, 2, 3, 4)] == [0, 0, 1, 1]
