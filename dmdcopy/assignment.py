"""Exact assignment of paired sample sets, block by block: the machinery under Delta E.

``C_ij = ||a_i - b_j||^2 / dim`` is built with torch in row chunks on the inputs' device (centred at
the teacher mean, products in ``dtype``); the exact assignment is solved on the host (LAPJV for
``dim >= 8``, scipy below, or any solver passed); the costs that decide the figures are recomputed
per pair, directly, with float64 sums. Each block keeps only per-pair terms, so the energies and
every bootstrap resample are means of those terms. :mod:`dmdcopy.metrics` turns them into figures.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from dmdcopy.errors import ConfigError, ShapeError

__all__ = ["lapjv_assignment", "optimal_assignment", "pairwise_cost", "scipy_assignment"]

Progress = Callable[[str, int, int], None]

# Bytes of one cost chunk before it leaves the device (bounds peak memory).
_CHUNK_BYTES = 256 * 2**20
# LAPJV beats scipy from this dimension on (2-10x at d = 8..12288); at d = 2 scipy was 3-6x faster.
_LAPJV_MIN_DIM = 8


def _report(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def _check_tensor(x, name: str, where: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ShapeError(f"{where}: {name} must be a tensor (N, ...), got {type(x).__name__}")
    if x.ndim < 2:
        raise ShapeError(f"{where}: {name} must have shape (N, ...) with at least 2 dims, "
                         f"got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ShapeError(f"{where}: {name} must be a floating-point tensor, got {x.dtype}")


def _check_finite(x: torch.Tensor, name: str, where: str) -> None:
    bad = ~torch.isfinite(x).flatten(1).all(dim=1)  # (N,) rows with a NaN or inf
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()
        raise ShapeError(f"{where}: {name} has non-finite values (NaN or inf) in "
                         f"{rows.numel()} of {x.shape[0]} samples, first at index {int(rows[0])}")


def _mean64(x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Column means of ``x: (n, dim)`` accumulated in float64, chunk by chunk: ``(dim,)``."""
    return sum(x[lo:lo + chunk].double().sum(0) for lo in range(0, x.shape[0], chunk)) / x.shape[0]


def _cost_rows(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, chunk: int | None,
               progress: Progress | None = None, center: torch.Tensor | None = None):
    """Yield ``(lo, hi, C[lo:hi])`` of ``C_ij = ||a_i - b_j||^2 / dim`` as float64 numpy rows."""
    a = a.detach().flatten(1)
    b = b.detach().flatten(1).to(a.device)
    if center is None:
        center = _mean64(b)  # C is translation invariant; centring limits cancellation
    a, b = a.to(dtype) - center.to(dtype), b.to(dtype) - center.to(dtype)
    a_sq, b_sq = a.square().sum(dim=1), b.square().sum(dim=1)  # (N,), (M,)
    n, m, dim = a.shape[0], b.shape[0], a.shape[1]
    if chunk is None:
        chunk = max(1, _CHUNK_BYTES // (8 * max(m, 1)))
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        c = a_sq[lo:hi, None] + b_sq[None, :] - 2 * (a[lo:hi] @ b.T)  # (chunk, M)
        yield lo, hi, (c.clamp_min_(0) / dim).to(device="cpu", dtype=torch.float64).numpy()
        _report(progress, "cost", hi, n)


def pairwise_cost(
    a: torch.Tensor, b: torch.Tensor, *, dtype: torch.dtype = torch.float64, chunk: int | None = None
) -> np.ndarray:
    """The cost matrix ``C_ij = ||a_i - b_j||^2 / dim`` as a float64 numpy array.

    Args:
        a: ``(N, ...)``; b: ``(M, ...)`` with the same per-sample shape.
        dtype: the precision of the torch products (float32 halves the time at about 1e-6
            relative error in the costs).
        chunk: rows per chunk; by default about 256 MiB of cost per chunk.

    Returns: ``(N, M)`` float64, non-negative. The matrix is computed on ``a``'s device, one
    chunk of rows at a time, then copied to host memory.

    >>> pairwise_cost(torch.zeros(1, 2), torch.tensor([[3.0, 4.0]])).tolist()
    [[12.5]]
    """
    if a.ndim < 2 or b.ndim < 2 or a.shape[1:] != b.shape[1:]:
        raise ShapeError(f"pairwise_cost: expected a (N, ...) and b (M, ...) with the same "
                         f"per-sample shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.float64)
    for lo, hi, rows in _cost_rows(a, b, dtype, chunk):
        out[lo:hi] = rows
    return out


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    """``|x_i|^2`` of the rows of ``x: (n, dim)``, accumulated in float64: ``(n,)``."""
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).square()


def _work_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """Precision of differences and centring: float64 when asked for (``dtype=``) or given, else
    float32. Every sum that decides a figure accumulates in float64 either way (float32
    differences put a relative error of about 1e-7 on the costs)."""
    return torch.float64 if torch.float64 in (x.dtype, dtype) else torch.float32


def _direct_cost(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float64,
                 chunk: int = 1024) -> torch.Tensor:
    """``||a_i - b_i||^2 / dim`` row by row, without the expansion, float64: ``(N,)``."""
    wd = _work_dtype(a, dtype)
    out = [_sq_norms(a[lo:lo + chunk].to(wd) - b[lo:lo + chunk].to(wd)) for lo in range(0, a.shape[0], chunk)]
    return (torch.cat(out) / a.shape[1]).cpu()


def scipy_assignment(cost: np.ndarray) -> np.ndarray:
    """Exact assignment with :func:`scipy.optimize.linear_sum_assignment`: ``perm: (N,)``."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(cost.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm


def lapjv_assignment(cost: np.ndarray) -> np.ndarray:
    """Exact assignment with the Jonker-Volgenant solver of the ``lap`` package: ``perm: (N,)``."""
    import lap

    _, x, _ = lap.lapjv(np.ascontiguousarray(cost, dtype=np.float64), extend_cost=False)
    return np.asarray(x, dtype=np.int64)


def _auto_assignment(dim: int) -> Callable[[np.ndarray], np.ndarray]:
    if dim >= _LAPJV_MIN_DIM:
        try:
            import lap  # noqa: F401
        except ImportError:  # pragma: no cover - lap is a dependency; stay exact without it
            return scipy_assignment
        return lapjv_assignment
    return scipy_assignment


def optimal_assignment(
    cost: np.ndarray, *, solver: Callable[[np.ndarray], np.ndarray] = scipy_assignment
) -> np.ndarray:
    """Exact minimum-cost perfect matching of a square cost matrix.

    Args:
        cost: ``(N, N)``.
        solver: :func:`scipy_assignment` (default) or :func:`lapjv_assignment` (same optimum).

    Returns: ``perm: (N,)`` int64 with ``sum_i cost[i, perm[i]]`` minimal.

    >>> optimal_assignment(np.array([[1.0, 0.0], [0.0, 1.0]])).tolist()
    [1, 0]
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ShapeError(f"optimal_assignment: expected a square (N, N) cost, got {cost.shape}")
    perm = np.asarray(solver(cost), dtype=np.int64)
    if perm.shape != (cost.shape[0],) or not np.array_equal(np.sort(perm), np.arange(cost.shape[0])):
        raise ShapeError(f"optimal_assignment: the solver returned no permutation of {cost.shape[0]} items")
    return perm


# ----------------------------------------------------------------------------------------------
# One block, solved exactly


@dataclass
class _Block:
    """One block's exact solution, as per-pair terms (internal). Every energy is a mean of terms,
    so the stratified bootstrap is a resample of term indices."""

    lo: int  # the block's first pair in the whole set
    pair_cost: np.ndarray  # (n,) C_ii
    opt_cost: np.ndarray  # (n,) C_i,perm(i)
    hajek: np.ndarray  # (n,) r_i + c_i (row mean + column mean of C), for E_ind of resamples
    e_ind: float  # mean_ij C_ij
    own_pair_rate: float  # share of rows whose nearest column is their own pair

    @property
    def n(self) -> int:
        return len(self.pair_cost)

    @property
    def e_pair(self) -> float:
        return float(self.pair_cost.mean())

    @property
    def e_opt(self) -> float:
        return float(self.opt_cost.mean())


def _row_terms(a: torch.Tensor, b: torch.Tensor, center: torch.Tensor, dtype: torch.dtype, chunk: int = 1024):
    """One pass over the pairs ``a, b: (n, dim)``, centred at ``center`` (the teacher mean):
    ``(pair_cost, e_ind, hajek)``. ``pair_cost_i = ||a_i - b_i||^2 / dim`` directly (no expansion),
    ``E_ind = mean_ij ||a_i - b_j||^2 / dim`` from moments (no matrix), and the Hajek terms
    ``r_i + c_i`` (row mean of ``C`` at ``i`` plus column mean at ``i``), all ``(n,)`` numpy."""
    dim = a.shape[1]
    wd = _work_dtype(a, dtype)
    a_mean = _mean64(a) - center  # mean of the centred student rows; the centred teacher's is 0
    c, am = center.to(wd), a_mean.to(wd)
    pair, a_sq, b_sq, b_dot = [], [], [], []
    for lo in range(0, a.shape[0], chunk):
        a_rows, b_rows = a[lo:lo + chunk].to(wd), b[lo:lo + chunk].to(wd)
        pair.append(_sq_norms(a_rows - b_rows))  # uncentred: the same whatever the block
        x, y = a_rows - c, b_rows - c
        a_sq.append(_sq_norms(x))
        b_sq.append(_sq_norms(y))
        b_dot.append((y @ am).double())
    pair_t, a_sq_t, b_sq_t, b_dot_t = (torch.cat(v) for v in (pair, a_sq, b_sq, b_dot))
    rows = a_sq_t + b_sq_t.mean()  # r_i * dim = |a_i|^2 + mean|b|^2 - 2 a_i . mean(b), mean(b) = 0
    cols = a_sq_t.mean() + b_sq_t - 2 * b_dot_t  # c_j * dim
    e_ind = float(a_sq_t.mean() + b_sq_t.mean()) / dim
    return (pair_t / dim).cpu().numpy(), e_ind, ((rows + cols) / dim).cpu().numpy()


def _solve_block(a: torch.Tensor, b: torch.Tensor, lo: int, dtype: torch.dtype, solver,
                 progress: Progress | None, center: torch.Tensor, row_terms) -> _Block:
    """``a, b: (n, dim)``; rows ``i`` of both form pair ``i``. The ``(n, n)`` cost matrix lives only
    inside this call, so blocks are solved one after the other in bounded memory."""
    n = a.shape[0]
    cost = np.empty((n, n), dtype=np.float64)
    for r0, r1, rows in _cost_rows(a, b, dtype, None, progress, center=center):
        cost[r0:r1] = rows
    nearest = cost.argmin(axis=1)
    perm = optimal_assignment(cost, solver=solver)
    del cost
    pair_cost, e_ind, hajek = row_terms
    identity = np.arange(n)
    opt_cost = pair_cost
    if not np.array_equal(perm, identity):
        moved = np.flatnonzero(perm != identity)  # only the re-paired rows need a new cost
        opt_cost = pair_cost.copy()
        rows = torch.as_tensor(moved, device=b.device)
        partners = torch.as_tensor(perm[moved], device=b.device)
        opt_cost[moved] = _direct_cost(a[rows], b[partners], dtype).numpy()
    # The identity is one of the permutations, so E_opt <= E_pair; enforce it against the
    # round-off between the expanded matrix (which chose perm) and the direct costs.
    if opt_cost.mean() >= pair_cost.mean():
        opt_cost = pair_cost
    return _Block(lo=lo, pair_cost=pair_cost, opt_cost=opt_cost, hajek=hajek, e_ind=e_ind,
                  own_pair_rate=float((nearest == identity).mean()))


def _block_bounds(n: int, block_size: int) -> list[tuple[int, int]]:
    """Cut ``range(n)`` into ``ceil(n / block_size)`` contiguous blocks of near-equal size."""
    n_blocks = -(-n // block_size)
    edges = [round(k * n / n_blocks) for k in range(n_blocks + 1)]
    return list(itertools.pairwise(edges))


def _solve_blocks(a, b, block_size, dtype, solver, where, names, progress=None) -> list[_Block]:
    """Solve every block of the pairs ``a, b: (N, dim)``; raise on non-finite rows first."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 2:
        raise ConfigError(f"{where}: block_size must be an int >= 2, got {block_size!r}")
    solver = solver if solver is not None else _auto_assignment(a.shape[1])
    bounds = _block_bounds(a.shape[0], block_size)
    centers = [_mean64(b[lo:hi]) for lo, hi in bounds]
    terms = [_row_terms(a[lo:hi], b[lo:hi], c, dtype) for (lo, hi), c in zip(bounds, centers)]
    # A NaN or inf anywhere in a row makes its pair cost non-finite: check the rows only then,
    # for the message (naming the set and the first bad row), before any expensive work.
    if not all(np.isfinite(t[0]).all() for t in terms):
        for x, name in zip((a, b), names):
            _check_finite(x, name, where)
    blocks = []
    for k, ((lo, hi), c, t) in enumerate(zip(bounds, centers, terms)):
        _report(progress, "assignment", k, len(bounds))
        blocks.append(_solve_block(a[lo:hi], b[lo:hi], lo, dtype, solver, progress, c, t))
    _report(progress, "assignment", len(bounds), len(bounds))
    return blocks


def _pooled(blocks: list[_Block]) -> tuple[float, float, float]:
    """Block-size-weighted means of (E_pair, E_opt, E_ind)."""
    w = np.array([bl.n for bl in blocks], dtype=np.float64)
    w /= w.sum()
    e = np.array([[bl.e_pair, bl.e_opt, bl.e_ind] for bl in blocks])  # (n_blocks, 3)
    return tuple(float(v) for v in w @ e)


def _resamples(blocks: list[_Block], n_boot: int, generator: torch.Generator, chunk: int = 250):
    """Yield ``(k, N)`` global pair indices of ``k`` stratified resamples (each block resampled
    within itself, with replacement)."""
    for lo in range(0, n_boot, chunk):
        k = min(chunk, n_boot - lo)
        yield np.concatenate([bl.lo + torch.randint(bl.n, (k, bl.n), generator=generator).numpy()
                              for bl in blocks], axis=1)


