"""Sigma grids, training-sigma distributions and loss weightings against their formulas."""

import math

import numpy as np
import pytest
import torch

from dmdcopy.errors import ConfigError
from dmdcopy.schedules import (
    dmd_sigma_grid,
    edm_weight,
    karras_sigmas,
    lognormal_sigmas,
    sample_grid_sigmas,
    snr_weight,
    uniform_weight,
    ve_sigmas,
    vp_sigma,
    vp_sigma_inv,
    vp_sigmas,
)


def _karras_eq5(i: int, n: int, sigma_min=0.002, sigma_max=80.0, rho=7.0) -> float:
    """EDM eq. 5, written out in Python floats."""
    return (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


@pytest.mark.parametrize("n", [2, 5, 18, 40, 256])
def test_karras_grid_is_eq5_and_monotone(n):
    s = karras_sigmas(n)
    assert s.shape == (n + 1,) and s.dtype == torch.float64
    assert s[0].item() == 80.0 and s[n - 1].item() == 0.002 and s[n].item() == 0.0
    for i in range(n):
        assert s[i].item() == pytest.approx(_karras_eq5(i, n), rel=1e-12)
    assert (s[1:] < s[:-1]).all()


def test_karras_grid_other_parameters_device_dtype():
    s = karras_sigmas(10, 0.01, 5.0, rho=3.0, dtype=torch.float32, device="cpu")
    assert s.dtype == torch.float32 and s.device.type == "cpu"
    expected = [_karras_eq5(i, 10, 0.01, 5.0, 3.0) for i in range(10)] + [0.0]
    torch.testing.assert_close(s, torch.tensor(expected, dtype=torch.float32))
    # rho = 1 is a linear grid
    linear = torch.linspace(5, 1, 5, dtype=torch.float64)
    torch.testing.assert_close(karras_sigmas(5, 1.0, 5.0, rho=1.0)[:-1], linear)
    assert karras_sigmas(1).tolist() == [80.0, 0.0]


def test_ve_grid_is_geometric():
    n, smin, smax = 12, 0.02, 100.0
    s = ve_sigmas(n, smin, smax)
    assert s.shape == (n + 1,) and s[-1] == 0
    for i in range(n):
        # EDM Table 1, VE: sigma_i^2 = t_i = sigma_max^2 (sigma_min^2 / sigma_max^2)^(i / (n-1))
        t_i = smax**2 * (smin**2 / smax**2) ** (i / (n - 1))
        assert s[i].item() == pytest.approx(math.sqrt(t_i), rel=1e-12)
    ratios = s[1:n] / s[: n - 1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, (smin / smax) ** (1 / (n - 1))))


def test_vp_grid_matches_formula():
    n, beta_d, beta_min, eps_s = 9, 19.9, 0.1, 1e-3
    s = vp_sigmas(n, beta_d, beta_min, eps_s)
    assert s.shape == (n + 1,) and s[-1] == 0
    for i in range(n):
        t = 1 + i / (n - 1) * (eps_s - 1)
        expected = math.sqrt(math.exp(0.5 * beta_d * t**2 + beta_min * t) - 1)  # EDM Table 1, VP
        assert s[i].item() == pytest.approx(expected, rel=1e-12)
    assert (s[1:] < s[:-1]).all()


def test_vp_sigma_inverse():
    t = torch.linspace(1e-5, 1, 50, dtype=torch.float64)
    torch.testing.assert_close(vp_sigma_inv(vp_sigma(t)), t, rtol=1e-10, atol=1e-12)


def test_grid_errors():
    with pytest.raises(ConfigError, match="sigma_min < sigma_max"):
        karras_sigmas(10, 1.0, 0.5)
    for bad in (0, -3, 2.0, True, "18"):
        with pytest.raises(ConfigError, match="positive int"):
            karras_sigmas(bad)
    # integers that are not Python ints (numpy, 0-d tensors) are step counts all the same
    for n in (np.int64(5), torch.tensor(5)):
        assert torch.equal(karras_sigmas(n), karras_sigmas(5))
        assert torch.equal(ve_sigmas(n), ve_sigmas(5)) and torch.equal(vp_sigmas(n), vp_sigmas(5))
    with pytest.raises(ConfigError, match="eps_s"):
        vp_sigmas(10, eps_s=0.0)


def test_dmd_grid_indexing():
    g = dmd_sigma_grid()
    assert g.shape == (1000,)
    assert g[0].item() == 0.002 and g[-1].item() == 80.0
    assert (g[1:] > g[:-1]).all()
    torch.testing.assert_close(g.flip(0), karras_sigmas(1000)[:-1])
    k, s = sample_grid_sigmas(5000, g, generator=torch.Generator().manual_seed(0))
    assert k.min() >= 20 and k.max() <= 980 and k.dtype == torch.int64
    assert torch.equal(s, g[k])
    # both ends are reachable: 5000 draws over 961 values
    assert k.min() == 20 and k.max() == 980
    with pytest.raises(ConfigError, match="low <= high"):
        sample_grid_sigmas(4, g, 10, 1000)


def test_lognormal_sigmas_statistics():
    s = lognormal_sigmas(20000, generator=torch.Generator().manual_seed(0))
    assert s.shape == (20000,) and (s > 0).all() and s.dtype == torch.float32
    # mean of ln sigma has standard error 1.2 / sqrt(20000) ~ 0.0085
    assert s.log().mean().item() == pytest.approx(-1.2, abs=0.04)
    assert s.log().std().item() == pytest.approx(1.2, abs=0.04)
    a = lognormal_sigmas(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, lognormal_sigmas(8, generator=torch.Generator().manual_seed(3)))


def test_weightings():
    sigma = torch.tensor([0.01, 0.5, 2.0, 80.0], dtype=torch.float64)
    sd = 0.5
    torch.testing.assert_close(edm_weight(sigma, sd), (sigma**2 + sd**2) / (sigma * sd) ** 2)
    torch.testing.assert_close(edm_weight(sigma, sd), 1 / sigma**2 + 1 / sd**2)  # DMD2's 'karras' form
    torch.testing.assert_close(snr_weight(sigma, sd), sd**2 / sigma**2)
    assert torch.equal(uniform_weight(sigma), torch.ones_like(sigma))
    # EDM's lambda makes the effective weight lambda c_out^2 equal to 1 at every sigma
    c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
    torch.testing.assert_close(edm_weight(sigma, sd) * c_out**2, torch.ones_like(sigma))
