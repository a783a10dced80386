"""Closed forms behind the Delta E bracket: gaussian_delta_e, frechet_distance, w2_lower_bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from dmdcopy.errors import ConfigError, ShapeError
from dmdcopy.w2 import frechet_distance, gaussian_delta_e, w2_lower_bound


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _power_law(d: int, seed: int) -> torch.Tensor:
    """``B = Q diag(k^-1/2)``: a Gaussian teacher with power-law variances in a random basis."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=torch.float64))
    return q @ torch.diag(torch.arange(1, d + 1, dtype=torch.float64).rsqrt())


# ---------------------------------------------------------------------------------------------
# gaussian_delta_e against hand-computed cases


def test_identity_is_zero_and_energies_are_exact():
    B = _power_law(6, 0)
    r = gaussian_delta_e(B, B)
    assert r.delta_e == 0.0 and r.e_pair == 0.0 and r.dim == 6
    assert r.e_opt == pytest.approx(0.0, abs=1e-12)
    assert r.e_ind == pytest.approx(2 * float(B.square().sum()) / 6, rel=1e-12)


def test_diagonal_maps_by_coordinates():
    # Diagonal maps: the Bures distance is sum_k (|a_k| - |b_k|)^2, and the shared-noise pairing is
    # optimal exactly when every a_k b_k >= 0 (coordinate-wise monotone).
    a = torch.tensor([[2.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 0.5]], dtype=torch.float64)
    b = torch.diag(torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64))
    r = gaussian_delta_e(a, b)
    e_pair = ((2 - 1) ** 2 + (-1 - 3) ** 2 + 0.0) / 3
    e_opt = ((2 - 1) ** 2 + (1 - 3) ** 2 + 0.0) / 3
    e_ind = (4 + 1 + 0.25 + 1 + 9 + 0.25) / 3
    assert (r.e_pair, r.e_opt, r.e_ind) == pytest.approx((e_pair, e_opt, e_ind), rel=1e-12)
    assert r.delta_e == pytest.approx((e_pair - e_opt) / (e_ind - e_opt), rel=1e-12)
    assert r.delta_e == pytest.approx(1 - (2 - 3 + 0.25) / (2 + 3 + 0.25), rel=1e-12)
    assert gaussian_delta_e(a.abs(), b).delta_e == pytest.approx(0.0, abs=1e-15)


def test_independent_and_mirrored_students():
    B = _power_law(4, 1)
    zero = torch.zeros_like(B)
    # the student reads noise coordinates the teacher ignores: same law, independent pairing
    r = gaussian_delta_e(torch.cat([B, zero], 1), torch.cat([zero, B], 1))
    assert r.delta_e == pytest.approx(1.0, rel=1e-12)
    assert r.e_opt == pytest.approx(0.0, abs=1e-12) and r.e_pair == pytest.approx(r.e_ind, rel=1e-12)
    assert gaussian_delta_e(-B, B).delta_e == pytest.approx(2.0, rel=1e-12)


def test_means_shift_energies_not_delta_e():
    g = _gen(2)
    B = _power_law(5, 2)
    A = B + 0.3 * torch.randn(5, 5, generator=g, dtype=torch.float64)
    ma = torch.randn(5, generator=g, dtype=torch.float64)
    mb = torch.randn(5, generator=g, dtype=torch.float64)
    plain, shifted = gaussian_delta_e(A, B), gaussian_delta_e(A, B, ma, mb)
    shift = float((ma - mb).square().sum()) / 5
    assert shifted.delta_e == pytest.approx(plain.delta_e, rel=1e-12)
    for key in ("e_pair", "e_opt", "e_ind"):
        assert getattr(shifted, key) == pytest.approx(getattr(plain, key) + shift, rel=1e-12)


def test_energies_match_monte_carlo_and_bures_matches_its_matrix_form():
    g = _gen(3)
    d, k = 4, 7  # a rectangular map: more noise dimensions than data dimensions
    A = torch.randn(d, k, generator=g, dtype=torch.float64)
    B = torch.randn(d, k, generator=g, dtype=torch.float64)
    r = gaussian_delta_e(A, B)
    z = torch.randn(400_000, k, generator=g, dtype=torch.float64)
    z2 = torch.randn(400_000, k, generator=g, dtype=torch.float64)
    assert r.e_pair == pytest.approx(float((z @ (A - B).T).square().mean()), rel=0.02)
    assert r.e_ind == pytest.approx(float((z @ A.T - z2 @ B.T).square().mean()), rel=0.02)
    # Bures in its usual matrix form, with scipy's square root
    from scipy.linalg import sqrtm

    sa, sb = (A @ A.T).numpy(), (B @ B.T).numpy()
    root = np.real(sqrtm(sa))
    bures = np.trace(sa + sb - 2 * np.real(sqrtm(root @ sb @ root)))
    assert r.e_opt == pytest.approx(bures / d, rel=1e-8)


def test_gaussian_delta_e_bad_inputs():
    B = torch.eye(3)
    with pytest.raises(ShapeError, match="same shape"):
        gaussian_delta_e(torch.eye(3), torch.eye(4))
    with pytest.raises(ShapeError, match="2-D"):
        gaussian_delta_e(torch.ones(3), B)
    with pytest.raises(ShapeError, match="non-finite"):
        gaussian_delta_e(torch.full((3, 3), math.nan), B)
    with pytest.raises(ShapeError, match="means"):
        gaussian_delta_e(B, B, torch.zeros(4))
    assert math.isnan(gaussian_delta_e(torch.zeros(3, 3), B).delta_e)  # a constant student: 0 / 0


# ---------------------------------------------------------------------------------------------
# Frechet distance through the N x N Gram matrix


def test_frechet_matches_dim_by_dim_formula_and_is_biased_up_when_n_is_small():
    g = _gen(4)
    a = torch.randn(300, 6, generator=g, dtype=torch.float64) * 2 + 1
    b = torch.randn(300, 6, generator=g, dtype=torch.float64)
    from scipy.linalg import sqrtm

    xa, xb = a.numpy(), b.numpy()
    sa, sb = np.cov(xa, rowvar=False, bias=True), np.cov(xb, rowvar=False, bias=True)
    root = np.real(sqrtm(sa))
    direct = ((xa.mean(0) - xb.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * np.real(sqrtm(root @ sb @ root)))
    assert frechet_distance(a, b) == pytest.approx(direct / 6, rel=1e-8)
    # N < dim, the same law: the plug-in figure is far above the population value 0
    same = frechet_distance(torch.randn(50, 500, generator=g), torch.randn(50, 500, generator=g))
    assert same > 0.5


# ---------------------------------------------------------------------------------------------
# The held-out lower bound of W2^2


def test_lower_bound_of_gaussians_approaches_bures_from_below():
    d = 6
    B = _power_law(d, 5)
    A = torch.cat([B, 0.4 * torch.eye(d, dtype=torch.float64)], 1)  # a noisy copy: Sigma + 0.16 I
    W = gaussian_delta_e(A, torch.cat([B, torch.zeros(d, d, dtype=torch.float64)], 1)).e_opt
    values = []
    for seed in range(10):
        z = torch.randn(4000, 2 * d, generator=_gen(100 + seed), dtype=torch.float64)
        values.append(w2_lower_bound(z @ A.T, z[:, :d] @ B.T, generator=_gen(seed)).value)
    mean, se = float(np.mean(values)), float(np.std(values) / math.sqrt(len(values)))
    assert mean <= W + 3 * se  # a lower bound, without an upward bias
    assert mean >= 0.9 * W  # and a tight one for Gaussian laws


def test_lower_bound_holds_for_non_gaussian_laws_in_1d():
    # Uniform(-a, a) against N(0, 1): W2^2 is the integral of the squared quantile difference.
    a = math.sqrt(3.0)  # equal variances: the Gelbrich bound is 0, W2^2 is not
    u = np.linspace(0, 1, 200_001)[1:-1]
    w2_exact = float(np.mean((a * (2 * u - 1) - norm.ppf(u)) ** 2))
    values = []
    for seed in range(10):
        g = _gen(seed)
        x = (torch.rand(3000, 1, generator=g, dtype=torch.float64) * 2 - 1) * a
        y = torch.randn(3000, 1, generator=g, dtype=torch.float64)
        values.append(w2_lower_bound(x, y, generator=g).value)
    assert float(np.mean(values)) <= w2_exact
    assert float(np.mean(values)) < 0.01  # a quadratic potential sees only the moments


def test_lower_bound_of_equal_laws_is_about_zero_in_high_dimension():
    g = _gen(6)
    d, n = 512, 600  # n < dim: the map is fitted on 37 principal directions
    B = _power_law(d, 6)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    z2 = torch.randn(n, d, generator=g, dtype=torch.float64)
    r = w2_lower_bound(z1 @ B.T, z2 @ B.T, generator=g)
    scale = 2 * float(B.square().sum()) / d  # E_ind of the two sets
    assert r.rank == 37 and r.terms.shape == (n,)
    assert r.value == pytest.approx(float(r.terms.mean()), rel=1e-12)
    assert r.value < 0.01 * scale
    # the plug-in Frechet distance of the same sets is far above 0 (N < dim)
    assert frechet_distance(z1 @ B.T, z2 @ B.T) > 0.05 * scale


def test_lower_bound_sees_a_shift_and_a_collapse():
    g = _gen(7)
    y = torch.randn(1000, 3, generator=g, dtype=torch.float64)
    shifted = w2_lower_bound(y + torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64), y, generator=g).value
    assert shifted == pytest.approx(9.0 / 3, rel=0.05)
    point = w2_lower_bound(torch.zeros(1000, 3, dtype=torch.float64), y, generator=g).value
    assert point == pytest.approx(float(y.square().mean()), rel=0.05)  # W2^2 to a point mass


def test_lower_bound_bad_inputs():
    x = torch.randn(10, 3)
    with pytest.raises(ShapeError, match="at least 4"):
        w2_lower_bound(x[:3], x[:3])
    with pytest.raises(ShapeError, match="equal sample counts"):
        w2_lower_bound(x, x[:5])
    with pytest.raises(ShapeError, match="same per-sample shape"):
        w2_lower_bound(x, torch.randn(10, 4))
    with pytest.raises(ConfigError, match="rank"):
        w2_lower_bound(x, x, rank=-1)
