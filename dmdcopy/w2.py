"""Squared 2-Wasserstein quantities behind Delta E's population bracket.

Three things, all per dimension (``/ dim``) like the rest of :mod:`dmdcopy.metrics`:

- :func:`gaussian_delta_e`: the population Delta E of an affine student ``G(z) = A z + a`` against
  an affine teacher ``T(z) = B z + b`` with ``z ~ N(0, I_k)``, in closed form. With
  ``Sigma_A = A A^T`` the Bures-Wasserstein distance is
  ``W2^2 = |a - b|^2 + |A|_F^2 + |B|_F^2 - 2 |A^T B|_*`` (the fidelity term
  ``tr (Sigma_A^1/2 Sigma_B Sigma_A^1/2)^1/2`` equals the nuclear norm of the ``k x k`` matrix
  ``A^T B``), hence ``Delta E = 1 - tr(A^T B) / |A^T B|_*``.
- :func:`frechet_distance`: the plug-in Frechet (Gaussian) distance between two sample sets through
  the ``N x N`` Gram route ``(|X_a|^2 + |X_b|^2 - 2 |X_a X_b^T|_*) / N`` (no ``dim x dim`` square
  root). Biased upwards at finite ``N``, like FID.
- :func:`w2_lower_bound`: a lower bound of the population ``W2^2`` between the laws of two sample
  sets, estimated **without an upward finite-N bias**. It is Kantorovich duality with a quadratic
  potential fitted on one half of the samples and evaluated on the other (cross-fitted): for every
  convex ``phi`` (Fenchel-Young: ``phi(x) + phi*(y) >= x.y``)::

      W2^2(P, Q) >= E_P |X|^2 + E_Q |Y|^2 - 2 E_P phi(X) - 2 E_Q phi*(Y).

  The right side is a sum of two marginal expectations of fixed functions, so its held-out sample
  mean is unbiased for a valid bound, whatever the distributions. The quadratic ``phi`` whose
  gradient is the Gaussian optimal map between the fitted moments makes the bound approach the
  Gelbrich bound ``|m_P - m_Q|^2 + Bures^2(S_P, S_Q)`` as the fit improves; in high dimension
  the map is fitted on ``rank`` leading principal directions of the pooled fit half and as an
  isotropic scaling on their complement, so nothing of size ``dim x dim`` is ever formed.

Besides these, :func:`sliced_wasserstein` (in the data's units, not per dimension) is the library's
one sliced distance; the experiments, tests and examples all use it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from dmdcopy.assignment import _mean64, _work_dtype  # float32 products, or float64 when given
from dmdcopy.errors import ConfigError, ShapeError

__all__ = [
    "GaussianDeltaE",
    "W2LowerBound",
    "frechet_distance",
    "gaussian_delta_e",
    "sliced_wasserstein",
    "w2_lower_bound",
]

# Rows per chunk when held-out terms are evaluated in float64 (bounds peak memory).
_CHUNK = 2048
# Ridge added to fitted covariances, relative to their mean eigenvalue: keeps the fitted map
# positive definite (a collapsed student has a zero covariance) at no cost to validity.
_RIDGE = 1e-9


# ----------------------------------------------------------------------------------------------
# Closed forms for affine maps of Gaussian noise


@dataclass(frozen=True)
class GaussianDeltaE:
    """Population Delta E of two affine maps of standard-normal noise, with its energies.

    Energies are per dimension. ``e_opt`` is the squared Bures-Wasserstein distance between the
    two Gaussians, ``e_pair = E|G(z) - T(z)|^2``, ``e_ind = E|G(z) - T(z')|^2`` (``z, z'``
    independent).
    """

    delta_e: float  # (e_pair - e_opt) / (e_ind - e_opt) = 1 - tr(A^T B) / |A^T B|_*
    e_pair: float
    e_opt: float
    e_ind: float
    dim: int

    def to_dict(self) -> dict:
        return asdict(self)


def gaussian_delta_e(
    A: torch.Tensor,
    B: torch.Tensor,
    mean_a: torch.Tensor | None = None,
    mean_b: torch.Tensor | None = None,
) -> GaussianDeltaE:
    """Population Delta E of the student ``G(z) = A z + mean_a`` against the teacher
    ``T(z) = B z + mean_b``, ``z ~ N(0, I_k)``.

    Args:
        A, B: ``(d, k)`` real matrices (``k`` may differ from ``d``: a noisy student
            ``B z + s eps`` is ``A = [B, s I]`` against ``[B, 0]`` on ``k = 2d`` noise dims).
        mean_a, mean_b: ``(d,)`` offsets (default 0). They shift all three energies equally and
            leave Delta E unchanged.

    Returns: a :class:`GaussianDeltaE` (computed in float64 on the inputs' device).

    >>> B = torch.diag(torch.tensor([2.0, 1.0]))
    >>> gaussian_delta_e(B, B).delta_e
    0.0
    >>> round(gaussian_delta_e(-B, B).delta_e, 6)  # the mirrored student: a systematic remap
    2.0
    """
    for x, name in ((A, "A"), (B, "B")):
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            raise ShapeError(f"gaussian_delta_e: {name} must be a 2-D tensor (d, k), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not bool(torch.isfinite(x).all()):
            raise ShapeError(f"gaussian_delta_e: {name} has non-finite entries")
    if A.shape != B.shape:
        raise ShapeError(f"gaussian_delta_e: A and B must have the same shape (d, k), "
                         f"got {tuple(A.shape)} and {tuple(B.shape)}")
    d = A.shape[0]
    A, B = A.double(), B.to(device=A.device, dtype=torch.float64)
    shift = 0.0
    if mean_a is not None or mean_b is not None:
        ma = torch.zeros(d, dtype=torch.float64, device=A.device) if mean_a is None else mean_a
        mb = torch.zeros(d, dtype=torch.float64, device=A.device) if mean_b is None else mean_b
        ma, mb = torch.as_tensor(ma).double().to(A.device), torch.as_tensor(mb).double().to(A.device)
        if ma.shape != (d,) or mb.shape != (d,):
            raise ShapeError(f"gaussian_delta_e: means must have shape ({d},), "
                             f"got {tuple(ma.shape)} and {tuple(mb.shape)}")
        shift = float((ma - mb).square().sum())
    cross = A.T @ B  # (k, k)
    nuclear = float(torch.linalg.svdvals(cross).sum())
    trace = float(torch.trace(cross))
    sq_a, sq_b = float(A.square().sum()), float(B.square().sum())
    e_pair = (float((A - B).square().sum()) + shift) / d
    e_ind = (sq_a + sq_b + shift) / d
    e_opt = max(sq_a + sq_b - 2 * nuclear, 0.0) / d + shift / d
    if e_pair == 0.0:
        delta = 0.0  # A == B: exactly the teacher's pairing (no round-off from the two norms)
    else:
        delta = 1.0 - trace / nuclear if nuclear > 0 else math.nan
    return GaussianDeltaE(delta_e=delta, e_pair=e_pair, e_opt=e_opt, e_ind=e_ind, dim=d)


# ----------------------------------------------------------------------------------------------
# Sample estimates


def _flat(a: torch.Tensor, b: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise ShapeError(f"{where}: expected tensors (N, ...)")
    if a.ndim < 2 or a.shape[1:] != b.shape[1:]:
        raise ShapeError(f"{where}: expected (N, ...) and (M, ...) with the same per-sample shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    return a.detach().flatten(1), b.detach().flatten(1).to(a.device)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Plug-in Frechet distance between Gaussian fits of two sample sets, per dimension.

    ``(|m_a - m_b|^2 + (|X_a|_F^2 + |X_b|_F^2 - 2 |X_a X_b^T|_*) / N) / dim`` with ``X`` the
    centred ``(N, dim)`` sample matrices (biased covariances, ``1/N``). The nuclear norm of the
    ``N x N`` cross-Gram matrix equals ``tr (S_a^1/2 S_b S_a^1/2)^1/2``, so no ``dim x dim``
    square root is formed. Like FID it is biased upwards at finite ``N`` (strongly when
    ``N < dim``); for a bound without that bias use :func:`w2_lower_bound`.

    Args:
        a, b: ``(N, ...)`` samples with the same shape.

    >>> x = torch.randn(50, 3)
    >>> abs(frechet_distance(x, x)) < 1e-12
    True
    """
    a2, b2 = _flat(a, b, "frechet_distance")
    if a2.shape[0] != b2.shape[0]:
        raise ShapeError(f"frechet_distance: needs equal sample counts, got {a2.shape[0]} and {b2.shape[0]}")
    n, dim = a2.shape
    a2, b2 = a2.double(), b2.double()
    ma, mb = a2.mean(0), b2.mean(0)
    xa, xb = a2 - ma, b2 - mb
    nuclear = float(torch.linalg.svdvals(xa @ xb.T).sum())
    value = float((ma - mb).square().sum()) + (float(xa.square().sum()) + float(xb.square().sum())
                                                - 2 * nuclear) / n
    return max(value, 0.0) / dim


def sliced_wasserstein(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    num_projections: int = 256,
    generator: torch.Generator | None = None,
) -> float:
    """Sliced 2-Wasserstein distance between two equal-size sample sets, in the data's units.

    ``SW_2 = sqrt(mean_u W_2^2(u.a, u.b))`` over ``num_projections`` random unit directions ``u``
    (float64, drawn from ``generator`` on the CPU); each 1-D ``W_2`` is the sorted matching. Not per
    dimension, unlike the rest of this module.

    Args:
        a, b: ``(N, ...)`` samples with the same per-sample shape and the same ``N``.

    >>> x = torch.randn(100, 3)
    >>> sliced_wasserstein(x, x)
    0.0
    """
    a2, b2 = _flat(a, b, "sliced_wasserstein")
    if a2.shape[0] != b2.shape[0]:
        raise ShapeError(f"sliced_wasserstein: needs equal sample counts, "
                         f"got {a2.shape[0]} and {b2.shape[0]}")
    a2, b2 = a2.double(), b2.double()
    u = torch.randn(a2.shape[1], num_projections, generator=generator, dtype=torch.float64)
    u = (u / u.norm(dim=0, keepdim=True)).to(a2.device)
    pa, _ = (a2 @ u).sort(0)  # (N, P)
    pb, _ = (b2 @ u).sort(0)
    return float((pa - pb).pow(2).mean().sqrt())


@dataclass(frozen=True)
class W2LowerBound:
    """A held-out lower bound of ``W2^2 / dim`` between the laws behind two sample sets.

    ``value`` is the mean of ``terms`` (one per sample pair, each evaluated with the potential
    fitted on the other half), an unbiased estimate of a quantity that is ``<= W2^2 / dim``. It
    may be negative (a poorly fitted potential gives a weak bound); ``max(value, 0)`` is the
    usable bound. ``rank`` is the number of principal directions the map was fitted on.
    """

    value: float
    terms: np.ndarray  # (N,) per-pair held-out terms; value == terms.mean()
    rank: int


def _psd_sqrt(m: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    w, v = torch.linalg.eigh(0.5 * (m + m.T))
    w = w.clamp_min(w.max().clamp_min(0) * 1e-15 + torch.finfo(m.dtype).tiny)
    root = w.rsqrt() if inverse else w.sqrt()
    return (v * root) @ v.T


def _ridge(cov: torch.Tensor) -> torch.Tensor:
    k = cov.shape[0]
    scale = float(torch.trace(cov)) / k if k else 0.0
    return cov + (_RIDGE * scale + 1e-300) * torch.eye(k, dtype=cov.dtype, device=cov.device)


@dataclass
class _Rows:
    """Sample rows shifted by a common point (the teacher mean: the bound is translation invariant,
    and the shift keeps the float32 products below accurate), with their squared norms."""

    x: torch.Tensor  # (n, dim), work precision
    sq: torch.Tensor  # (n,) float64 |x_i|^2

    @classmethod
    def of(cls, x: torch.Tensor, rows: torch.Tensor, shift: torch.Tensor) -> _Rows:
        """Rows ``rows`` of ``x: (N, dim)``, shifted."""
        x = x.index_select(0, rows.to(x.device)).to(_work_dtype(x, x.dtype))  # a fresh copy: shift in place
        x.sub_(shift.to(x.dtype))
        return cls(x, x.square().sum(1).double())  # float32 rows: pairwise sums, ~1e-7 relative

    def mean(self) -> torch.Tensor:
        """``(dim,)`` float64 column means."""
        return _mean64(self.x, _CHUNK)

    def project(self, m: torch.Tensor, U: torch.Tensor, v: torch.Tensor):
        """For the rows centred at ``m``, ``x' = x - m``: ``(x' U (n, r), |x'|^2 (n,), x'.v (n,))``,
        float64, from one product with ``[U, m, v]`` (``m`` is small after the common shift, so
        ``|x'|^2 = |x|^2 - 2 x.m + |m|^2`` loses nothing to cancellation)."""
        r = U.shape[1]
        out = (self.x @ torch.cat([U, m[:, None], v[:, None]], 1).to(self.x.dtype)).double()  # (n, r + 2)
        return out[:, :r] - m @ U, self.sq - 2 * out[:, r] + m.dot(m), out[:, r + 1] - m.dot(v)


@dataclass
class _Potential:
    """``phi(x) = x'^T M x' / 2 + m_b . x`` with ``x' = x - m_a`` and
    ``M = U K U^T + c (I - U U^T)`` (a quadratic potential whose gradient maps the ``a`` law onto
    the ``b`` law when both are Gaussian with the fitted moments)."""

    m_a: torch.Tensor  # (dim,) float64
    m_b: torch.Tensor  # (dim,)
    U: torch.Tensor  # (dim, r) orthonormal
    K: torch.Tensor  # (r, r) positive definite
    K_inv: torch.Tensor
    c: float  # > 0

    def terms(self, a: _Rows, b: _Rows) -> torch.Tensor:
        """``(n,)`` values of ``|x|^2 + |y|^2 - 2 phi(x) - 2 phi*(y)`` for rows ``x = a_i``,
        ``y = b_i`` (only their sum over rows matters; the pairing of rows does not)."""
        delta = self.m_a - self.m_b
        px, x_sq, x_lin = a.project(self.m_a, self.U, delta)  # (n, r), (n,), (n,)
        py, y_sq, y_lin = b.project(self.m_b, self.U, delta)
        px_sq, py_sq = px.square().sum(1), py.square().sum(1)
        xMx = ((px @ self.K) * px).sum(1) + self.c * (x_sq - px_sq)
        yMy = ((py @ self.K_inv) * py).sum(1) + (y_sq - py_sq) / self.c
        # phi*(y) = m_a . (y - m_b) + y'^T M^-1 y' / 2 (conjugate of the quadratic above);
        # x - y = x' - y' + delta
        return x_sq + y_sq - xMx - yMy + delta.square().sum() + 2 * (x_lin - y_lin)


def _fit_potential(a: _Rows, b: _Rows, rank: int, generator: torch.Generator) -> _Potential:
    """Fit the Gaussian optimal map from the law of the rows ``a`` to that of ``b``."""
    m_a, m_b = a.mean(), b.mean()
    n, dim = a.x.shape
    if rank >= dim:
        U = torch.eye(dim, dtype=torch.float64, device=a.x.device)
    else:
        # (2m, dim): the directions where either law has variance. m rows of each suffice to find
        # them (any subspace gives a valid bound; a good one a tight bound).
        m = min(n, max(8 * rank, 512))
        pooled = torch.cat([a.x[:m].float() - m_a.float(), b.x[:m].float() - m_b.float()])
        with torch.random.fork_rng(devices=[]):  # svd_lowrank draws from the global generator
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            _, _, V = torch.svd_lowrank(pooled, q=min(rank + 8, *pooled.shape), niter=1)
        del pooled
        U, _ = torch.linalg.qr(V[:, :rank].double())  # (dim, r), orthonormal in float64
    px, x_sq, _ = a.project(m_a, U, m_a - m_b)
    py, y_sq, _ = b.project(m_b, U, m_a - m_b)
    cov_a, cov_b = px.T @ px, py.T @ py
    res_a = float(x_sq.sum() - px.square().sum())
    res_b = float(y_sq.sum() - py.square().sum())
    K = K_inv = cov_a  # (0, 0) when no principal direction is fitted
    if U.shape[1] > 0:
        cov_a, cov_b = _ridge(cov_a / n), _ridge(cov_b / n)
        # Gaussian optimal map N(0, S_a) -> N(0, S_b): K = S_a^-1/2 (S_a^1/2 S_b S_a^1/2)^1/2 S_a^-1/2
        root_a, inv_root_a = _psd_sqrt(cov_a), _psd_sqrt(cov_a, inverse=True)
        middle = _ridge(root_a @ cov_b @ root_a)
        K = inv_root_a @ _psd_sqrt(middle) @ inv_root_a
        K_inv = root_a @ _psd_sqrt(middle, inverse=True) @ root_a
    tiny = 1e-300
    c = math.sqrt(max(res_b, tiny) / max(res_a, tiny)) if U.shape[1] < dim else 1.0
    return _Potential(m_a=m_a, m_b=m_b, U=U, K=0.5 * (K + K.T), K_inv=0.5 * (K_inv + K_inv.T), c=c)


def default_rank(n: int, dim: int) -> int:
    """Principal directions the potential is fitted on: all of them when ``dim <= n_fit / 8``,
    else ``min(64, n_fit / 8)`` (``n_fit = n / 2``); about 8 fit samples per fitted direction keep
    the map's estimation error, which only loosens the bound, small."""
    per_half = n // 2
    return dim if dim <= per_half // 8 else max(0, min(64, per_half // 8))


def w2_lower_bound(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    rank: int | None = None,
    generator: torch.Generator | None = None,
) -> W2LowerBound:
    """Held-out lower bound of ``W2^2 / dim`` between the laws of ``a`` and ``b``.

    The rows are split at random into two halves; a quadratic Kantorovich potential (the Gaussian
    optimal map between the fitted means and covariances, see the module docstring) is fitted on
    each half and evaluated on the other. Every term is an unbiased estimate of a lower bound of
    the population ``W2^2 / dim``, whatever the two distributions are; it is tight when both are
    Gaussian and the fit is good (it then approaches the Gelbrich bound).

    Args:
        a, b: ``(N, ...)`` samples of the two laws, ``N >= 4`` (rows may be paired; pairing is
            not used).
        rank: principal directions of the fitted map (default :func:`default_rank`).
        generator: CPU generator for the split and the randomised SVD (default seed 0).

    Returns: a :class:`W2LowerBound`.
    """
    a2, b2 = _flat(a, b, "w2_lower_bound")
    n, dim = a2.shape
    if b2.shape[0] != n:
        raise ShapeError(f"w2_lower_bound: needs equal sample counts, got {n} and {b2.shape[0]}")
    if n < 4:
        raise ShapeError(f"w2_lower_bound: needs at least 4 samples, got {n}")
    if rank is None:
        rank = default_rank(n, dim)
    if not isinstance(rank, int) or rank < 0:
        raise ConfigError(f"w2_lower_bound: rank must be an int >= 0, got {rank!r}")
    rank = min(rank, dim)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    order = torch.randperm(n, generator=generator)
    shift = b2[: min(n, 4096)].double().mean(0)  # any common point will do; near the data is best
    rows = [_Rows.of(x, order[half], shift) for half in (slice(0, n // 2), slice(n // 2, n))
            for x in (a2, b2)]  # a, b of the first half, then of the second
    halves = ((rows[0], rows[1], order[: n // 2]), (rows[2], rows[3], order[n // 2:]))
    terms = torch.empty(n, dtype=torch.float64)
    for (fit_a, fit_b, _), (ev_a, ev_b, ev_rows) in (halves, halves[::-1]):
        phi = _fit_potential(fit_a, fit_b, rank, generator)
        terms[ev_rows] = phi.terms(ev_a, ev_b).cpu() / dim
    return W2LowerBound(value=float(terms.mean()), terms=terms.numpy(), rank=rank)
