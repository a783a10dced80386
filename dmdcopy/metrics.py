"""Delta E, the pairing inefficiency: how much a student copies its teacher's noise-to-data pairing.

Given ``N`` noises ``z_i``, teacher samples ``t_i = T(z_i)`` and student samples ``s_i = G(z_i)``,
and the cost ``C_ij = ||s_i - t_j||^2 / dim``::

    E_pair = mean_i C_ii                               (the pairing shared noise gives)
    E_opt  = min_p mean_i C_i,p(i)                     (exact optimal assignment)
    E_ind  = mean_ij C_ij                              (an independent pairing)
    Delta E = (E_pair - E_opt) / (E_ind - E_opt)

0: the shared-noise pairing is the optimal one (the student copies the teacher's pairing);
about 1: no better than an independent pairing (the student remapped the noise).

(About 600 lines: the two readings, their result type, the transport figure and the accumulator
are one concept and stay together; the assignment machinery is :mod:`dmdcopy.assignment`, the
``W2`` closed forms and bounds :mod:`dmdcopy.w2`.)

Two readings, reported side by side and never mixed (docs/delta_e.md says why):

- ``delta_e``, the **finite-N** figure: with ``E_opt`` the exact assignment among the ``N`` (or
  ``block_size``) samples. It asks "is each student sample identified with its own teacher sample
  among N?". Its ``E_opt`` is biased upwards as an estimate of ``W2^2``, so in high dimension it
  reads 0 for students that moved far from their teacher.
- the **population** figure, with ``E_opt`` replaced by ``W2^2`` between the two distributions and
  means by expectations over ``z``. It is bracketed by ``[delta_e_lower, delta_e_upper]``: one end
  uses the finite-N ``E_opt`` (at least ``W2^2`` in expectation), the other a held-out lower bound
  of ``W2^2`` (:func:`dmdcopy.w2.w2_lower_bound`, unbiased for a valid bound); Delta E is monotone
  in ``E_opt``, so the population value lies between them. ``[bracket_low, bracket_high]`` widens
  the bracket by its bootstrap intervals.

How it is computed (every choice is reported in the result):

- The cost matrix is built with torch in row chunks on the inputs' device, after subtracting the
  teacher mean from both sets, with products in ``dtype`` (float32 by default). The costs that
  decide the figures are recomputed directly from ``s_i - t_j`` with float64 sums: ``E_pair``,
  the optimal pairs' costs, and ``E_ind`` (from moments), so an identical student gives exactly 0
  and float32 moves the figures by about 1e-7 relative (the permutation can only differ between
  near-ties); ``dtype=torch.float64`` makes every step float64.
- The assignment is exact: LAPJV (the ``lap`` package) for ``dim >= 8``, where it was 2-10x faster
  than scipy on our benchmarks, :func:`scipy.optimize.linear_sum_assignment` below (there scipy
  was faster) or when ``lap`` is not installed; or any ``assignment=`` callable.
- Beyond ``block_size`` pairs the set is cut, in the given order, into ``ceil(N / block_size)``
  disjoint contiguous blocks of near-equal size; each block is solved exactly and the three
  energies are averaged over blocks (weighted by block size) before the ratio is taken.
  ``E_opt`` of a block of ``b`` pairs is the optimal cost among ``b`` candidates, so the finite-N
  figure depends on ``b``: compare it at the same block size. The bracket's held-out bound uses
  all ``N`` pairs.
- The intervals are a percentile bootstrap over pairs, stratified by block, with the optimal
  permutation found on the full block kept (each resampled student keeps its matched teacher)
  and the fitted ``W2`` potential kept: every figure is then a mean of per-pair terms. ``E_ind``
  of a resample uses its linear (Hajek) projection ``mean_k (r_k + c_k) - E_ind`` with ``r, c`` the
  row and column means of ``C``; the dropped quadratic term is ``O(1/N)`` relative. The
  assignment is deliberately not re-solved on resamples: a with-replacement resample holds only
  about 63% distinct pairs, which raises its optimal cost and biases a re-solved Delta E
  downwards. Intervals are conditional on the matching and on the fitted potential.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from dmdcopy._json import json_safe
from dmdcopy.assignment import (
    Progress,
    _check_finite,
    _check_tensor,
    _pooled,
    _report,
    _resamples,
    _solve_blocks,
    lapjv_assignment,
    optimal_assignment,
    pairwise_cost,
    scipy_assignment,
)
from dmdcopy.errors import ConfigError, ShapeError
from dmdcopy.w2 import GaussianDeltaE, frechet_distance, gaussian_delta_e, w2_lower_bound

__all__ = [
    "GaussianDeltaE",
    "PairingInefficiency",
    "PairingResult",
    "TransportResult",
    "frechet_distance",
    "gaussian_delta_e",
    "lapjv_assignment",
    "optimal_assignment",
    "pairing_inefficiency",
    "pairwise_cost",
    "scipy_assignment",
    "transport_inefficiency",
    "w2_lower_bound",
]

# Below this resolution (E_ind - E_opt) / E_ind, Delta E divides by a small difference of two
# nearly equal energies; the figure is then flagged.
DEFAULT_MIN_RESOLUTION = 0.05
# Below this (E_ind - W2^2) / E_ind, even at the lower bound of W2^2, the two distributions differ so
# much that the pairing decides little of the cost (a collapsed or far-off student).
DEFAULT_MIN_POPULATION_RESOLUTION = 0.1
# A bracket [delta_e_lower, delta_e_upper] wider than this cannot tell a copy (0) from a remap (1).
DEFAULT_MAX_BRACKET_WIDTH = 0.25


# ----------------------------------------------------------------------------------------------
# Checks and the cost matrix


def _flatten_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str], where: str,
                  check_finite: bool = True):
    """Check ``a, b: (N, ...)`` of the same shape (and finite); return both as ``(N, dim)``.
    ``check_finite=False`` leaves that check to the caller (:func:`_solve_blocks` makes it from
    the pair costs it computes anyway, a pass over the data fewer)."""
    for x, name in zip((a, b), names):
        _check_tensor(x, name, where)
    if a.shape != b.shape:
        raise ShapeError(f"{where}: {names[0]} and {names[1]} must have the same shape (N, ...), "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ShapeError(f"{where}: {names[0]} is on {a.device} but {names[1]} is on {b.device}")
    if a.shape[0] < 2:
        raise ShapeError(f"{where}: need at least 2 pairs, got N = {a.shape[0]}")
    if check_finite:
        for x, name in zip((a, b), names):
            _check_finite(x, name, where)
    # The metric is not differentiable (an assignment); detaching keeps autograd from recording
    # the N x N cost computation when samples come straight from a network.
    return a.detach().flatten(1), b.detach().flatten(1)  # (N, dim)


def _apply_features(features: Callable, x: torch.Tensor, name: str, batch: int,
                    progress: Progress | None, done: int, total: int) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for lo in range(0, x.shape[0], batch):
            f = features(x[lo:lo + batch])
            if not isinstance(f, torch.Tensor) or f.ndim < 2 or f.shape[0] != min(batch, x.shape[0] - lo):
                raise ShapeError(f"pairing_inefficiency: features must map (B, ...) to a tensor (B, ...), "
                                 f"got {tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__} "
                                 f"for {name} rows {lo}..")
            out.append(f.detach())
            done += f.shape[0]
            _report(progress, "features", done, total)
    return torch.cat(out)


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    if num == 0:
        return 0.0  # 0 / 0 only when every pairing costs the same; see the warning in the result
    return math.inf if den == 0 and num > 0 else math.nan


def _check_common(n_boot: int, ci: float, where: str) -> None:
    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 0:
        raise ConfigError(f"{where}: n_boot must be an int >= 0 (0 = no interval), got {n_boot!r}")
    if not isinstance(ci, (int, float)) or not 0 < ci < 1:
        raise ConfigError(f"{where}: ci must lie in (0, 1), got {ci!r}")


def _interval(values: np.ndarray, ci: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(values, [(1 - ci) / 2, (1 + ci) / 2])
    return float(lo), float(hi)


def _default_generator(generator: torch.Generator | None) -> torch.Generator:
    # A fixed default seed keeps a reported interval reproducible run to run.
    return generator if generator is not None else torch.Generator().manual_seed(0)


def _delta(p, o, i):
    """Delta E ``(p - o) / (i - o)`` elementwise over arrays (0 where ``p == o``; NaN where
    ``i <= o``)."""
    p, o, i = np.broadcast_arrays(np.asarray(p, float), np.asarray(o, float), np.asarray(i, float))
    out = np.where(p == o, 0.0, np.nan)
    return np.divide(p - o, i - o, out=out, where=i > o)


def _ends(p, o, i, lower_w2):
    """The population bracket's ends: Delta E at the finite-N ``E_opt`` and at the held-out lower
    bound of ``W2^2`` (clamped to ``[0, E_opt]``: ``W2^2 >= 0``, and a bound above the finite-N
    optimum is noise). Delta E is monotone in ``E_opt``, so the two values bound the population
    figure whichever way it moves (it falls with ``E_opt`` when ``E_pair < E_ind``, rises when a
    systematic remap makes ``E_pair > E_ind``)."""
    lb = np.minimum(np.maximum(lower_w2, 0.0), o)
    at_opt, at_lb = _delta(p, o, i), _delta(p, lb, i)
    return np.fmin(at_opt, at_lb), np.fmax(at_opt, at_lb), lb


# ----------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class PairingResult:
    """Delta E with everything needed to report it.

    Energies are per dimension (``||.||^2 / dim``). Two readings (see the module docstring):
    ``delta_e`` is the finite-N figure with its ``ci`` bootstrap interval ``[ci_low, ci_high]``;
    ``[delta_e_lower, delta_e_upper]`` brackets the population figure and
    ``[bracket_low, bracket_high]`` is that bracket widened by its ends' bootstrap intervals (the
    interval to report). ``resolution`` is ``(E_ind - E_opt) / E_ind``. ``warnings`` lists every
    reason not to read the figures at face value (``warning`` joins them).
    """

    delta_e: float  # finite-N: (E_pair - E_opt) / (E_ind - E_opt), from block-pooled energies
    e_pair: float  # mean_i C_ii
    e_opt: float  # min_p mean_i C_i,p(i), exact per block
    e_ind: float  # mean_ij C_ij (within blocks)
    n: int  # number of pairs
    dim: int  # numel of one sample (of its features when features= was given)
    block_size: int  # the largest block actually used
    n_blocks: int
    ci_low: float
    ci_high: float
    ci: float  # interval level, e.g. 0.95
    n_boot: int
    bootstrap: str  # what was resampled (see the module docstring)
    block_delta_e: tuple[float, ...]  # Delta E of each block
    block_std: float  # standard deviation of block_delta_e (NaN for one block)
    resolution: float  # (E_ind - E_opt) / E_ind
    own_pair_rate: float  # share of students whose nearest teacher sample is their own pair
    pair_ind_ratio: float  # E_pair / E_ind (the population figure when the laws are equal)
    delta_e_lower: float = math.nan  # lower end of the population bracket
    delta_e_upper: float = math.nan  # upper end of the population bracket
    bracket_low: float = math.nan  # ci_low of the lower end
    bracket_high: float = math.nan  # ci_high of the upper end
    e_opt_lower: float = math.nan  # held-out lower bound of W2^2 / dim, clamped to [0, E_opt]
    bound_rank: int = 0  # principal directions of the fitted W2 potential
    warnings: tuple[str, ...] = field(default=())
    warning: str | None = field(default=None)

    @property
    def reliable(self) -> bool:
        """False when a warning was raised about the figures."""
        return not self.warnings

    @property
    def bracket(self) -> tuple[float, float]:
        """``(delta_e_lower, delta_e_upper)``."""
        return self.delta_e_lower, self.delta_e_upper

    def to_dict(self) -> dict:
        """A JSON-ready dict (floats, ints, strings, lists); NaN or inf becomes ``None`` (JSON null)."""
        return json_safe(asdict(self))


@dataclass(frozen=True)
class TransportResult:
    """Teacher-free transport inefficiency ``(E_model - E_opt) / E_opt`` of one model's coupling.

    ``E_model = mean_i ||x_i - z_i||^2 / dim`` and ``E_opt`` the optimal assignment cost between
    the same noises and samples (exact per block, pooled over blocks as for Delta E).
    """

    value: float
    e_model: float
    e_opt: float
    n: int
    dim: int
    block_size: int
    n_blocks: int
    ci_low: float
    ci_high: float
    ci: float
    n_boot: int
    bootstrap: str
    block_values: tuple[float, ...]
    block_std: float

    def to_dict(self) -> dict:
        """A JSON-ready dict; NaN or inf becomes ``None`` (JSON null)."""
        return json_safe(asdict(self))


# ----------------------------------------------------------------------------------------------
# Public functions


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def _fmt(v: float) -> str:
    return f"{v:.3f}" if math.isfinite(v) else str(v)


def _warnings(delta_e, resolution, lower, upper, e_ind, e_opt_lower, min_resolution,
              min_population_resolution, max_bracket_width) -> tuple[str, ...]:
    out = []
    if math.isnan(delta_e):
        out.append("Delta E is undefined: E_ind == E_opt (every pairing costs the same, e.g. all "
                   "teacher samples are equal)")
        return tuple(out)
    if resolution < min_resolution:
        out.append(f"low resolution: (E_ind - E_opt) / E_ind = {resolution:.3g} < {min_resolution}; "
                   "an optimal pairing barely beats an independent one, so Delta E divides by a "
                   "small difference and is not trustworthy")
    best_resolution = (e_ind - e_opt_lower) / e_ind  # the population resolution is at most this
    if best_resolution < min_population_resolution:
        out.append(f"the two distributions differ so much that W2^2 is at least {1 - best_resolution:.0%} "
                   "of E_ind (a collapsed or far-off student?): the pairing decides little of the "
                   "cost, and Delta E is a ratio of small differences")
    if not math.isfinite(upper) or not math.isfinite(lower):
        out.append(f"the population Delta E is unbounded here: the lower bound of W2^2 "
                   f"({e_opt_lower:.4g}) reaches E_ind ({e_ind:.4g}), so every coupling of the two "
                   "distributions may cost about the same (a collapsed or far-off student?)")
    elif upper - lower > max_bracket_width:
        out.append(f"the population Delta E lies anywhere in [{_fmt(lower)}, {_fmt(upper)}] "
                   f"(width {upper - lower:.2f} > {max_bracket_width}): too wide to read as copy or "
                   "remap; the finite-N delta_e is not the population value here. Report the "
                   "bracket, or raise N / lower the dimension (features=)")
    return tuple(out)


def pairing_inefficiency(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    block_size: int = 10_000,
    n_boot: int = 1000,
    ci: float = 0.95,
    generator: torch.Generator | None = None,
    min_resolution: float = DEFAULT_MIN_RESOLUTION,
    min_population_resolution: float = DEFAULT_MIN_POPULATION_RESOLUTION,
    max_bracket_width: float = DEFAULT_MAX_BRACKET_WIDTH,
    dtype: torch.dtype = torch.float32,
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    feature_batch: int = 256,
    assignment: Callable[[np.ndarray], np.ndarray] | None = None,
    bound_rank: int | None = None,
    progress: Progress | None = None,
) -> PairingResult:
    """Delta E of a student's pairing against the teacher's, on shared noise: the finite-N figure
    and a bracket of the population figure.

    Args:
        student: ``(N, ...)`` student samples ``G(z_i)``.
        teacher: ``(N, ...)`` teacher samples ``T(z_i)``, row ``i`` from the same noise (and
            label) as ``student[i]``. Both on the same device; the cost is computed there.
        block_size: largest set solved exactly; beyond it, disjoint contiguous blocks.
        n_boot: bootstrap resamples for the intervals (0 = none: ``ci_*`` and ``bracket_*`` NaN).
        ci: interval level.
        generator: CPU generator for the resampling and the bound's split; ``None`` uses a fixed
            seed (0), so the same inputs give the same figures.
        min_resolution: below this ``(E_ind - E_opt) / E_ind`` the result carries a warning.
        min_population_resolution: below this ``(E_ind - e_opt_lower) / E_ind`` (the most the
            population resolution can be) the result carries a warning.
        max_bracket_width: a wider ``[delta_e_lower, delta_e_upper]`` carries a warning.
        dtype: precision of the cost-matrix products and of the differences behind the deciding
            costs (those are summed in float64 either way); float64 makes every step float64.
        features: optional ``(B, ...) -> (B, F)`` (e.g. an Inception or DINO network) applied to
            both sets, ``feature_batch`` rows at a time under ``torch.no_grad()``; the metric is
            then Delta E in that feature space.
        assignment: exact assignment solver ``cost (n, n) -> perm (n,)``; default LAPJV for
            ``dim >= 8``, scipy below.
        bound_rank: principal directions of the held-out ``W2`` potential (default
            :func:`dmdcopy.w2.default_rank`).
        progress: ``progress(stage, done, total)`` after each unit of work; stages ``"features"``,
            ``"cost"``, ``"assignment"``, ``"bound"``, ``"bootstrap"``. The caller draws.

    Returns: a :class:`PairingResult`.

    >>> t = torch.randn(64, 3)
    >>> pairing_inefficiency(t, t, n_boot=0).delta_e
    0.0
    """
    where = "pairing_inefficiency"
    _check_common(n_boot, ci, where)
    for x, name in ((student, "student"), (teacher, "teacher")):
        _check_tensor(x, name, where)
    if features is not None:
        if not callable(features):
            raise ConfigError(f"{where}: features must be a callable (B, ...) -> (B, F), got {features!r}")
        for x, name in ((student, "student"), (teacher, "teacher")):
            _check_finite(x, name, where)
        total = student.shape[0] + teacher.shape[0]
        student = _apply_features(features, student.detach(), "student", feature_batch, progress, 0, total)
        teacher = _apply_features(features, teacher.detach(), "teacher", feature_batch, progress,
                                  student.shape[0], total)
    s, t = _flatten_pair(student, teacher, ("student", "teacher"), where, check_finite=False)
    n = s.shape[0]
    blocks = _solve_blocks(s, t, block_size, dtype, assignment, where, ("student", "teacher"), progress)
    e_pair, e_opt, e_ind = _pooled(blocks)
    delta_e = _ratio(e_pair - e_opt, e_ind - e_opt)

    generator = _default_generator(generator)
    _report(progress, "bound", 0, 1)
    bound = w2_lower_bound(s, t, rank=bound_rank, generator=generator) if n >= 4 else None
    _report(progress, "bound", 1, 1)
    lower_w2 = bound.value if bound is not None else 0.0
    lower, upper, e_opt_lower = (float(v) for v in _ends(e_pair, e_opt, e_ind, lower_w2))

    ci_low = ci_high = bracket_low = bracket_high = math.nan
    if n_boot > 0:
        pair = np.concatenate([bl.pair_cost for bl in blocks])
        opt = np.concatenate([bl.opt_cost for bl in blocks])
        hajek = np.concatenate([bl.hajek for bl in blocks])
        e_ind_blocks = np.concatenate([np.full(bl.n, bl.e_ind) for bl in blocks])
        terms = bound.terms if bound is not None else np.zeros(n)
        boot = np.empty((3, n_boot))  # finite-N Delta E, lower end, upper end
        done = 0
        for idx in _resamples(blocks, n_boot, generator):
            k = idx.shape[0]
            p, o = pair[idx].mean(1), np.minimum(opt[idx].mean(1), pair[idx].mean(1))
            i = (hajek[idx] - e_ind_blocks[idx]).mean(1)  # linearised E_ind of each resample
            lo_end, hi_end, _ = _ends(p, o, i, terms[idx].mean(1))
            boot[:, done:done + k] = np.stack([_delta(p, o, i), lo_end, hi_end])
            done += k
            _report(progress, "bootstrap", done, n_boot)
        ci_low, ci_high = _interval(boot[0], ci)
        bracket_low = _interval(boot[1], ci)[0]
        bracket_high = _interval(boot[2], ci)[1]

    block_delta = tuple(_ratio(bl.e_pair - bl.e_opt, bl.e_ind - bl.e_opt) for bl in blocks)
    resolution = _ratio(e_ind - e_opt, e_ind) if e_ind > 0 else math.nan
    if not e_ind - e_opt > 1e-12 * e_ind:  # equal up to the round-off of E_ind's moments
        delta_e = ci_low = ci_high = math.nan
        lower = upper = bracket_low = bracket_high = math.nan
    warnings = _warnings(delta_e, resolution, lower, upper, e_ind, e_opt_lower, min_resolution,
                         min_population_resolution, max_bracket_width)
    w = np.array([bl.n for bl in blocks], dtype=np.float64)
    return PairingResult(
        delta_e=delta_e, e_pair=e_pair, e_opt=e_opt, e_ind=e_ind, n=n, dim=s.shape[1],
        block_size=max(bl.n for bl in blocks), n_blocks=len(blocks),
        ci_low=ci_low, ci_high=ci_high, ci=ci, n_boot=n_boot,
        bootstrap="pairs stratified by block; fixed assignment and fitted W2 potential",
        block_delta_e=block_delta, block_std=_std(list(block_delta)), resolution=resolution,
        own_pair_rate=float(w @ [bl.own_pair_rate for bl in blocks] / w.sum()),
        pair_ind_ratio=_ratio(e_pair, e_ind),
        delta_e_lower=lower, delta_e_upper=upper, bracket_low=bracket_low, bracket_high=bracket_high,
        e_opt_lower=e_opt_lower, bound_rank=bound.rank if bound is not None else 0,
        warnings=warnings, warning="; ".join(warnings) if warnings else None,
    )


def transport_inefficiency(
    noise: torch.Tensor,
    samples: torch.Tensor,
    *,
    block_size: int = 10_000,
    n_boot: int = 1000,
    ci: float = 0.95,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    assignment: Callable[[np.ndarray], np.ndarray] | None = None,
) -> TransportResult:
    """How far a model's noise-to-sample coupling is from an optimal transport plan.

    Args:
        noise: ``(N, ...)`` the standard-normal ``z_i`` (not ``sigma_max * z_i``).
        samples: ``(N, ...)`` the model's ``x_i`` from ``z_i``.
        (the other arguments as in :func:`pairing_inefficiency`)

    Returns: a :class:`TransportResult`; ``value = (E_model - E_opt) / E_opt``, 0 when the
    coupling is already optimal.

    >>> z = torch.randn(32, 2)
    >>> transport_inefficiency(z, 2 * z + 1, n_boot=0).value  # a monotone map is optimal
    0.0
    """
    where = "transport_inefficiency"
    _check_common(n_boot, ci, where)
    z, x = _flatten_pair(noise, samples, ("noise", "samples"), where, check_finite=False)
    blocks = _solve_blocks(x, z, block_size, dtype, assignment, where, ("samples", "noise"))
    e_model, e_opt, _ = _pooled(blocks)
    value = _ratio(e_model - e_opt, e_opt)
    ci_low = ci_high = math.nan
    if n_boot > 0:
        pair = np.concatenate([bl.pair_cost for bl in blocks])
        opt = np.concatenate([bl.opt_cost for bl in blocks])
        vals = []
        for idx in _resamples(blocks, n_boot, _default_generator(generator)):
            p = pair[idx].mean(1)
            o = np.minimum(opt[idx].mean(1), p)
            vals.append(np.divide(p - o, o, out=np.where(p == o, 0.0, np.nan), where=o > 0))
        ci_low, ci_high = _interval(np.concatenate(vals), ci)
    block_values = tuple(_ratio(bl.e_pair - bl.e_opt, bl.e_opt) for bl in blocks)
    return TransportResult(
        value=value, e_model=e_model, e_opt=e_opt, n=z.shape[0], dim=z.shape[1],
        block_size=max(bl.n for bl in blocks), n_blocks=len(blocks),
        ci_low=ci_low, ci_high=ci_high, ci=ci, n_boot=n_boot,
        bootstrap="pairs stratified by block, fixed assignment",
        block_values=block_values, block_std=_std(list(block_values)),
    )


# ----------------------------------------------------------------------------------------------
# Accumulator


class PairingInefficiency:
    """Accumulate pairs batch by batch (and across processes), then compute Delta E once.

    ``update(student, teacher)`` stores the batches (detached, on their device);
    ``compute()`` gathers them from every rank when ``torch.distributed`` is initialised (rank
    order, then batch order) and calls :func:`pairing_inefficiency` with the keyword arguments
    given at construction; every rank gets the same result. A rank may hold no pairs (every rank
    must still call ``compute()``); when no rank holds any, every rank raises. ``reset()`` empties
    the store.

    >>> m = PairingInefficiency(n_boot=0)
    >>> t = torch.randn(8, 2)
    >>> m.update(t[:4], t[:4]); m.update(t[4:], t[4:])
    >>> m.compute().delta_e
    0.0
    """

    def __init__(self, **kwargs) -> None:
        import inspect

        allowed = set(inspect.signature(pairing_inefficiency).parameters) - {"student", "teacher"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ConfigError(f"PairingInefficiency: unknown options {unknown}; "
                              f"pairing_inefficiency takes {sorted(allowed)}")
        self.kwargs = kwargs
        self._student: list[torch.Tensor] = []
        self._teacher: list[torch.Tensor] = []

    def update(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        """``student, teacher: (B, ...)``, row ``i`` of both from the same noise."""
        if not isinstance(student, torch.Tensor) or not isinstance(teacher, torch.Tensor) \
                or student.shape != teacher.shape or student.ndim < 2:
            raise ShapeError("PairingInefficiency.update: expected student and teacher of the same "
                             f"shape (B, ...), got {_shape(student)} and {_shape(teacher)}")
        if self._student and student.shape[1:] != self._student[0].shape[1:]:
            raise ShapeError(f"PairingInefficiency.update: per-sample shape {tuple(student.shape[1:])} "
                             f"differs from earlier batches' {tuple(self._student[0].shape[1:])}")
        self._student.append(student.detach())
        self._teacher.append(teacher.detach())

    def reset(self) -> None:
        self._student.clear()
        self._teacher.clear()

    @property
    def n(self) -> int:
        """Pairs held by this process."""
        return sum(x.shape[0] for x in self._student)

    def compute(self) -> PairingResult:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            if not self._student:
                raise ShapeError("PairingInefficiency.compute: no pairs; call update() first")
            return pairing_inefficiency(torch.cat(self._student), torch.cat(self._teacher), **self.kwargs)
        # Agree on the per-sample shape first, so a rank without pairs joins the gather instead of
        # raising alone (which left the other ranks waiting in all_gather for ever).
        local = None
        if self._student:
            local = (tuple(self._student[0].shape[1:]), str(self._student[0].dtype).removeprefix("torch."))
        metas: list = [None] * dist.get_world_size()
        dist.all_gather_object(metas, local)
        known = sorted({m for m in metas if m is not None})
        if not known:
            raise ShapeError("PairingInefficiency.compute: no pairs on any rank; call update() first")
        if len(known) > 1:
            raise ShapeError(f"PairingInefficiency.compute: ranks hold different per-sample shapes or "
                             f"dtypes: {known}")
        shape, dtype = known[0]
        device = _backend_device()
        if self._student:
            s, t = torch.cat(self._student).to(device), torch.cat(self._teacher).to(device)
        else:
            s = t = torch.empty((0, *shape), dtype=getattr(torch, dtype), device=device)
        return pairing_inefficiency(_gather_rows(s), _gather_rows(t), **self.kwargs)


def _backend_device() -> torch.device:
    """Where collective tensors must live for the process group's backend."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _shape(x) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x: (n_r, ...)`` of every rank in rank order (ranks may hold different n_r,
    including 0)."""
    dist = torch.distributed
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_int = [int(v) for v in sizes]
    top = max(sizes_int)
    padded = x.new_zeros((top, *x.shape[1:]))  # all_gather needs equal shapes
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:k] for p, k in zip(parts, sizes_int)])
