"""The deterministic cross-cloud rule: one global model delta from the per-cloud aggregates.

Every cloud's coordinator averages its agents' updates into one per-cloud aggregate per
federated round (height): the mean model delta and the number of participants (0 when the
cloud's round aborted: the delta is then all zeros and carries no weight). A proposal names
a set of these aggregates; every coordinator recomputes the global delta from them with
:func:`combine` and must get **bit-identical** bytes (DESIGN.md section 5), so the rule is
specified down to the order of floating-point operations:

1. Contributions are sorted by cloud id; clouds with 0 participants are left out.
2. Each delta is flattened in :func:`~fedgate_common.model_spec.parameter_shapes` order and
   widened to float64 (exact). ``-0.0`` becomes ``+0.0``, so equal values are equal bits and
   sorting them can never order them differently.
3. Sums over clouds are element-wise float64 additions in cloud-id order (or in sorted-value
   order for the trimmed mean), each product and quotient one IEEE operation. Sums over
   coordinates (L2 norms) use :func:`math.fsum`, which is correctly rounded and so does not
   depend on any summation order, SIMD width or BLAS.
4. The float64 result is cast to float32 once, at the end.

Rules (``n`` = clouds with participants > 0; every rule returns an all-zero delta when n = 0):

``capped_mean``
    Σ w_c·x_c / Σ w_c with w_c = min(participants_c, weight_cap): a cloud cannot outweigh
    the others by claiming many agents.
``trimmed_mean``
    Per coordinate, drop the f = ⌊(n−1)/3⌋ largest and f smallest values and average the
    rest, unweighted (f is the number of faulty clouds n clouds tolerate).
``median``
    Coordinate-wise median, unweighted (the mean of the two middle values when n is even).
``centered_clip``
    Centered clipping (Karimireddy, He, Jaggi, ICML 2021): v₀ = the coordinate-wise median,
    then :data:`CENTERED_CLIP_ITERATIONS` times v ← v + (1/n) Σ_c clip(x_c − v, τ), where
    clip(d, τ) = d·min(1, τ/‖d‖). τ is fixed once: the median of the distances ‖x_c − v₀‖,
    so at least half the clouds are never clipped in the first step and one far-away
    aggregate moves v by at most τ/n per iteration.

The robust rules (:data:`ROBUST_RULES`) are meant for federations of at least
:data:`~fedgate_common.consensus.manifest.ROBUST_MIN_CLOUDS` clouds; the manifest enforces
that, not this module.
Here they are defined for any n ≥ 1, without special cases: with n ≤ 3 the trim f is 0, so
``trimmed_mean`` is the unweighted mean; ``median`` is the median of what there is
(one cloud: its delta; two: their mean); ``centered_clip`` starts from that median.

Nothing here does IO; the coordinator validates each signed aggregate with
:func:`aggregate_problem` before it goes into a proposal.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from fedgate_common.consensus.manifest import CROSS_CLOUD_RULES, ROBUST_RULES
from fedgate_common.errors import InvalidIdentifier
from fedgate_common.identifiers import validate_identifier
from fedgate_common.model_spec import ModelSpec, parameter_shapes

from fedgate_coordinator.errors import CoordinatorError

__all__ = [
    "CENTERED_CLIP_ITERATIONS",
    "ROBUST_RULES",
    "RULES",
    "CloudContribution",
    "CrossCloudRuleError",
    "aggregate_problem",
    "combine",
    "delta_norm",
    "trim_count",
]

RULES: Final = CROSS_CLOUD_RULES
"""Every cross-cloud rule, by the name a manifest and a proposal use (the manifest's list)."""

CENTERED_CLIP_ITERATIONS: Final = 3
"""Fixed number of centered-clipping steps (part of the rule: changing it changes digests)."""

ShapeList = list[tuple[str, tuple[int, ...]]]
Float64Vector = npt.NDArray[np.float64]


class CrossCloudRuleError(CoordinatorError, ValueError):
    """The cross-cloud rule cannot be applied: unknown rule, bad parameter, or a contribution
    that does not fit the model (``cloud`` names it, ``None`` when no single cloud is at
    fault). ``reason`` says what is wrong."""

    def __init__(self, reason: str, *, cloud: str | None = None) -> None:
        where = f"aggregate of cloud {cloud!r}: " if cloud is not None else ""
        super().__init__(f"cross-cloud rule: {where}{reason}")
        self.reason = reason
        self.cloud = cloud


@dataclass(frozen=True, slots=True, eq=False)
class CloudContribution:
    """One cloud's aggregate for one height: ``delta`` is the mean model delta of its agents
    (``name -> float32 array`` with the spec's shapes), ``participants`` how many agents it
    averaged (0 when its round aborted: ``delta`` is then all zeros and carries no weight).

    Compared by identity: arrays have no single truth value, so ``==`` of two
    contributions would be ambiguous.
    """

    cloud: str
    participants: int
    delta: Mapping[str, npt.NDArray[np.float32]]


def trim_count(clouds: int, faults: int | None = None) -> int:
    """Values dropped at each end per coordinate by ``trimmed_mean`` among ``clouds`` values.

    ``faults`` is the federation's f (⌊(M − 1) / 3⌋ of all M clouds), not of those that made
    it into a proposal: a Byzantine proposer that includes only a quorum of aggregates must
    not thereby shrink the trim. Without it, f of the values at hand. At least one value is
    always kept.
    """
    trim = max(clouds - 1, 0) // 3 if faults is None else faults
    return max(0, min(trim, (clouds - 1) // 2))


def delta_norm(delta: Mapping[str, npt.NDArray[np.generic]]) -> float:
    """The L2 norm of the whole delta (every array together), computed deterministically.

    Each square of a float32 value is exact in float64 and :func:`math.fsum` rounds the sum
    correctly, so the result does not depend on the order of names or on the platform.
    Non-finite values give ``nan`` or ``inf``.
    """
    return math.sqrt(
        math.fsum(_squares(np.asarray(array, dtype=np.float64) for array in delta.values()))
    )


def aggregate_problem(
    contribution: CloudContribution,
    *,
    spec: ModelSpec,
    max_update_norm: float,
    weight_cap: int,
) -> str | None:
    """Why ``contribution`` cannot enter a proposal, or ``None`` when it can.

    Checked: the cloud id is a valid identifier; ``participants`` is an integer ≥ 0; the
    delta has exactly the spec's parameter names, shapes and dtype float32; every value is
    finite; a cloud with 0 participants sends an all-zero delta; the L2 norm of the whole
    delta is at most ``max_update_norm``. A participant count above ``weight_cap`` is not a
    problem: :func:`combine` caps it.

    Raises :class:`CrossCloudRuleError` when ``max_update_norm`` (finite, > 0) or
    ``weight_cap`` (≥ 1) is not a usable setting: that is the caller's configuration, not the
    cloud's fault.
    """
    _check_weight_cap(weight_cap)
    if not _is_real(max_update_norm) or not math.isfinite(max_update_norm) or max_update_norm <= 0:
        raise CrossCloudRuleError(
            f"max_update_norm must be a finite number > 0, got {max_update_norm!r}"
        )
    problem = _structure_problem(contribution, parameter_shapes(spec))
    if problem is not None:
        return problem
    norm = delta_norm(contribution.delta)
    if norm > max_update_norm:
        return f"delta norm {norm:.6g} is above the bound {max_update_norm:.6g}"
    return None


def combine(
    rule: str,
    contributions: Sequence[CloudContribution],
    *,
    weight_cap: int,
    spec: ModelSpec,
    faults: int | None = None,
) -> dict[str, npt.NDArray[np.float32]]:
    """The global model delta by ``rule`` (one of :data:`RULES`; see the module docstring).

    ``faults`` is the federation's f, the trim of ``trimmed_mean`` (see :func:`trim_count`).

    The result is a new ``name -> float32 array`` dict in spec order and does not depend on
    the order of ``contributions``. Clouds with 0 participants are ignored; when none has
    participants the delta is all zeros.

    Raises :class:`CrossCloudRuleError` for an unknown rule, ``weight_cap`` below 1, two
    contributions from the same cloud, or a contribution that does not fit the spec (see
    :func:`aggregate_problem`; the norm bound is not applied here).
    """
    if rule not in RULES:
        raise CrossCloudRuleError(f"unknown rule {rule!r}; use one of {', '.join(RULES)}")
    _check_weight_cap(weight_cap)
    shapes = parameter_shapes(spec)
    ordered = sorted(contributions, key=lambda contribution: str(contribution.cloud))
    for previous, current in itertools.pairwise(ordered):
        if previous.cloud == current.cloud:
            raise CrossCloudRuleError("two aggregates from one cloud", cloud=current.cloud)
    for contribution in ordered:
        problem = _structure_problem(contribution, shapes)
        if problem is not None:
            raise CrossCloudRuleError(problem, cloud=contribution.cloud)
    active = [contribution for contribution in ordered if contribution.participants > 0]
    size = sum(math.prod(shape) for _, shape in shapes)
    if not active:
        return _unflatten(np.zeros(size, dtype=np.float64), shapes)
    rows = np.stack([_flatten(contribution.delta, shapes) for contribution in active])
    if rule == "capped_mean":
        weights = [min(contribution.participants, weight_cap) for contribution in active]
        result = _capped_mean(rows, weights)
    elif rule == "trimmed_mean":
        result = _trimmed_mean(rows, trim_count(rows.shape[0], faults))
    elif rule == "median":
        result = _median(rows)
    else:
        result = _centered_clip(rows)
    return _unflatten(result, shapes)


# -- the rules on a (clouds x parameters) float64 matrix, rows in cloud-id order -----------


def _capped_mean(rows: npt.NDArray[np.float64], weights: Sequence[int]) -> Float64Vector:
    total = sum(weights)  # an exact integer
    accumulator = np.zeros(rows.shape[1], dtype=np.float64)
    for row, weight in zip(rows, weights, strict=True):
        accumulator += float(weight) * row
    return accumulator / float(total)


def _trimmed_mean(rows: npt.NDArray[np.float64], trim: int) -> Float64Vector:
    clouds = rows.shape[0]
    kept = np.sort(rows, axis=0)[trim : clouds - trim]
    accumulator = np.zeros(rows.shape[1], dtype=np.float64)
    for row in kept:
        accumulator += row
    return accumulator / float(kept.shape[0])


def _median(rows: npt.NDArray[np.float64]) -> Float64Vector:
    clouds = rows.shape[0]
    ordered: npt.NDArray[np.float64] = np.sort(rows, axis=0)
    middle = clouds // 2
    if clouds % 2:
        upper: Float64Vector = ordered[middle].copy()
        return upper
    mean_of_two: Float64Vector = (ordered[middle - 1] + ordered[middle]) * 0.5
    return mean_of_two


def _centered_clip(rows: npt.NDArray[np.float64]) -> Float64Vector:
    clouds = rows.shape[0]
    center = _median(rows)
    distances = sorted(_vector_norm(row - center) for row in rows)
    middle = clouds // 2
    tau = distances[middle] if clouds % 2 else (distances[middle - 1] + distances[middle]) * 0.5
    for _ in range(CENTERED_CLIP_ITERATIONS):
        step = np.zeros(rows.shape[1], dtype=np.float64)
        for row in rows:
            difference = row - center
            distance = _vector_norm(difference)
            scale = 1.0 if distance <= tau else tau / distance
            step += scale * difference
        center = center + step / float(clouds)
    return center


# -- helpers ---------------------------------------------------------------------------


def _squares(arrays: Iterable[npt.NDArray[np.float64]]) -> Iterable[float]:
    for array in arrays:
        yield from np.square(array).ravel().tolist()


def _vector_norm(vector: Float64Vector) -> float:
    return math.sqrt(math.fsum(np.square(vector).tolist()))


def _flatten(delta: Mapping[str, npt.NDArray[np.float32]], shapes: ShapeList) -> Float64Vector:
    flat = np.concatenate([np.asarray(delta[name], dtype=np.float64).ravel() for name, _ in shapes])
    # -0.0 + 0.0 == +0.0: equal values become equal bits before any sort.
    return flat + 0.0


def _unflatten(flat: Float64Vector, shapes: ShapeList) -> dict[str, npt.NDArray[np.float32]]:
    result: dict[str, npt.NDArray[np.float32]] = {}
    offset = 0
    for name, shape in shapes:
        size = math.prod(shape)
        result[name] = flat[offset : offset + size].astype(np.float32).reshape(shape)
        offset += size
    return result


def _is_real(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _is_count(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_weight_cap(weight_cap: int) -> None:
    if not _is_count(weight_cap) or weight_cap < 1:
        raise CrossCloudRuleError(f"weight_cap must be an integer >= 1, got {weight_cap!r}")


def _structure_problem(contribution: CloudContribution, shapes: ShapeList) -> str | None:
    """Everything :func:`aggregate_problem` checks except the norm bound."""
    try:
        validate_identifier(contribution.cloud, what="cloud id")
    except InvalidIdentifier as exc:
        return str(exc)
    participants = contribution.participants
    if not _is_count(participants) or participants < 0:
        return f"participants must be an integer >= 0, got {participants!r}"
    delta = contribution.delta
    expected = {name for name, _ in shapes}
    missing = sorted(expected - set(delta))
    if missing:
        return f"delta lacks {', '.join(missing)}"
    unknown = sorted(str(name) for name in set(delta) - expected)
    if unknown:
        return f"delta has unknown parameters {', '.join(unknown)}"
    for name, shape in shapes:
        array = delta[name]
        if not isinstance(array, np.ndarray):
            return f"{name} is a {type(array).__name__}, not an array"
        if array.dtype != np.float32:
            return f"{name} has dtype {array.dtype}, expected float32"
        if array.shape != shape:
            return f"{name} has shape {array.shape}, expected {shape}"
        if not np.isfinite(array).all():
            return f"{name} has NaN or infinite values"
        if participants == 0 and np.any(array):
            return f"a cloud with 0 participants must send an all-zero delta; {name} is not"
    return None
