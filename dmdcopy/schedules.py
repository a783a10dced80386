"""Noise levels: sampling grids, training-sigma distributions and loss weightings.

Every grid is a pure function returning a 1-D tensor of decreasing sigmas that ends in 0
(as k-diffusion's ``get_sigmas_*``); float64 by default because the last steps of a Karras
grid differ in the fourth significant digit and ODE error analysis needs them exact.
"""

from __future__ import annotations

import math
import operator

import torch

from dmdcopy.errors import ConfigError

__all__ = [
    "dmd_sigma_grid",
    "edm_weight",
    "karras_sigmas",
    "lognormal_sigmas",
    "sample_grid_sigmas",
    "snr_weight",
    "uniform_weight",
    "ve_sigmas",
    "vp_sigma",
    "vp_sigma_inv",
    "vp_sigmas",
]


def _ramp(n: int) -> torch.Tensor:
    """``i / (n - 1)`` for ``i = 0..n-1`` in float64 (a single 0 when ``n == 1``)."""
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    return torch.linspace(0, 1, n, dtype=torch.float64)


def _check_n(n: int) -> int:
    """``n`` as a Python int (numpy and 0-d tensor integers are accepted too) if it is >= 1."""
    try:
        value = operator.index(n)  # ints of any kind; refuses floats such as 18.0
    except TypeError:
        value = None
    if value is None or isinstance(n, bool) or value < 1:
        raise ConfigError(f"n must be a positive int (number of steps), got {n!r}")
    return value


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not (0 < sigma_min < sigma_max):
        raise ConfigError(
            f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )


def karras_sigmas(
    n: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Karras et al. (2022) grid, EDM eq. 5: ``n`` decreasing sigmas then a final 0.

    ``sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``.

    Returns: ``(n + 1,)``; ``[0] == sigma_max``, ``[n-1] == sigma_min``, ``[n] == 0``.

    >>> karras_sigmas(18)[[0, 17, 18]].tolist()
    [80.0, 0.002, 0.0]
    """
    n = _check_n(n)
    _check_range(sigma_min, sigma_max)
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
        raise ConfigError(f"karras_sigmas: rho must be a positive number, got {rho!r}")
    if n == 1:
        return torch.tensor([sigma_max, 0.0], device=device, dtype=dtype)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # exact ends despite pow round-off
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device=device, dtype=dtype)


def ve_sigmas(
    n: int,
    sigma_min: float = 0.02,
    sigma_max: float = 100.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Variance-exploding grid of EDM Table 1 (Song et al. 2021): geometric in sigma.

    ``t_i = sigma_max^2 (sigma_min^2 / sigma_max^2)^(i/(n-1))`` and ``sigma = sqrt(t)``, so
    ``sigma_i = sigma_max (sigma_min / sigma_max)^(i/(n-1))``. Returns ``(n + 1,)`` ending in 0.
    """
    n = _check_n(n)
    _check_range(sigma_min, sigma_max)
    ramp = _ramp(n)
    t = sigma_max**2 * (sigma_min**2 / sigma_max**2) ** ramp
    sigmas = t.sqrt()
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device=device, dtype=dtype)


def vp_sigma(t: torch.Tensor | float, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """VP noise level of EDM Table 1: ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.expm1(0.5 * beta_d * t**2 + beta_min * t).sqrt()


def vp_sigma_inv(sigma: torch.Tensor, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """Inverse of :func:`vp_sigma`: the VP time ``t`` with ``vp_sigma(t) == sigma``."""
    sigma = torch.as_tensor(sigma)
    return ((beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)).sqrt() - beta_min) / beta_d


def vp_sigmas(
    n: int,
    beta_d: float = 19.9,
    beta_min: float = 0.1,
    eps_s: float = 1e-3,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Variance-preserving grid of EDM Table 1: ``t_i = 1 + i/(n-1) (eps_s - 1)``, sigma(t_i).

    Returns ``(n + 1,)`` ending in 0.
    """
    n = _check_n(n)
    if not 0 < eps_s < 1:
        raise ConfigError(f"eps_s must lie in (0, 1), got {eps_s}")
    ramp = _ramp(n)
    t = 1 + ramp * (eps_s - 1)
    sigmas = vp_sigma(t, beta_d, beta_min)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device=device, dtype=dtype)


# --- training-sigma distributions -------------------------------------------------------------


def lognormal_sigmas(
    batch: int,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """EDM training distribution ``ln sigma ~ N(P_mean, P_std^2)`` (EDM Table 1); ``(batch,)``."""
    gen_device = generator.device if generator is not None else device
    z = torch.randn(batch, generator=generator, device=gen_device, dtype=torch.float32)
    return (z * P_std + P_mean).exp().to(device=device, dtype=dtype)


def dmd_sigma_grid(
    n: int = 1000,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """DMD2's training grid: the ``n``-point Karras grid in *increasing* order, without the 0.

    Index ``k`` of this grid is DMD2's timestep ``k``: 0 is ``sigma_min``, ``n-1`` is ``sigma_max``.
    Returns ``(n,)``.
    """
    return karras_sigmas(n, sigma_min, sigma_max, rho, device=device, dtype=dtype)[:-1].flip(0)


def sample_grid_sigmas(
    batch: int,
    grid: torch.Tensor,
    low: int = 20,
    high: int = 980,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``k ~ U{low..high}`` (ends included); return ``(k, grid[k])``, each ``(batch,)``.

    With the 1000-point :func:`dmd_sigma_grid`, ``low=20, high=980`` is DMD2's generator-step
    range (2 % to 98 % of the grid) and ``low=0, high=999`` its fake-score range.
    """
    if not 0 <= low <= high < grid.numel():
        raise ConfigError(f"need 0 <= low <= high < len(grid) = {grid.numel()}, got {low}, {high}")
    gen_device = generator.device if generator is not None else grid.device
    k = torch.randint(low, high + 1, (batch,), generator=generator, device=gen_device)
    k = k.to(grid.device)
    return k, grid[k]


# --- loss weightings: functions of (sigma, sigma_data) -----------------------------------------


def edm_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (EDM Table 1).

    This equals ``sigma^-2 + sigma_data^-2``, the weighting DMD2 calls 'karras' and uses for its
    fake score (the two forms differ only in float rounding).
    """
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def snr_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """Signal-to-noise weighting ``sigma_data^2 / sigma^2`` (epsilon-prediction MSE in x0 units)."""
    return sigma_data**2 / sigma**2


def uniform_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """Weight 1 at every noise level (plain x0-prediction MSE)."""
    del sigma_data
    return torch.ones_like(sigma)


