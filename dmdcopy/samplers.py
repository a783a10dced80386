"""Samplers of the probability-flow ODE / SDE over any denoiser ``D(x, sigma, class_labels=None)``.

All samplers work in EDM's parametrisation ``x(sigma) = x0 + sigma n`` (EDM eq. 1, s(t) = 1,
sigma(t) = t), where the probability-flow ODE reads (EDM eq. 4)

    dx / dsigma = (x - D(x; sigma)) / sigma.

Every sampler takes the starting sample ``x`` already at noise level ``sigmas[0]`` and a grid
``sigmas`` (1-D, strictly decreasing, non-negative, usually ending in 0 as the grids of
:mod:`dmdcopy.schedules`). The grid is read once into Python floats, so no step makes a
host-device sync; the ``(B,)`` sigma handed to the denoiser is built with ``torch.full`` on the
device and in the dtype of ``x``. Samplers never switch off autograd and show no progress bar: the
caller decides (wrap in ``torch.no_grad()`` for plain sampling).

``callback``, if given, is called once per step with a dict ``i`` (step index), ``x`` (the state
the step starts from), ``sigma`` (its noise level, a float), ``sigma_next`` and ``denoised`` (the
denoiser's output at ``(x, sigma)``). :func:`edm_stochastic` adds ``sigma_hat``, and there ``x``
and ``sigma`` are the state and level after the churn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor

from dmdcopy.contracts import default_grid, denoise
from dmdcopy.errors import ConfigError, ShapeError

__all__ = ["Denoiser", "dpmpp_2m", "edm_stochastic", "euler", "heun", "teacher_ode"]

Denoiser = Callable[..., Tensor]
"""``D(x, sigma, class_labels=None) -> x0_hat`` with ``x: (B, ...)`` and ``sigma: (B,)``."""

StepCallback = Callable[[dict[str, Any]], Any]
Generators = torch.Generator | Sequence[torch.Generator]


def _check_inputs(x: Tensor, sigmas: Tensor | Sequence[float], where: str) -> list[float]:
    """Validate ``x: (B, ...)`` and the grid; return the grid as Python floats."""
    if not isinstance(x, Tensor) or x.ndim < 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ShapeError(f"{where}: expected x of shape (B, ...) with a batch dim and at least 2 dims, "
                         f"got {shape}")
    if not x.is_floating_point():
        raise ConfigError(f"{where}: x must be a floating-point tensor, got {x.dtype}")
    if isinstance(sigmas, Tensor):
        if sigmas.ndim != 1:
            raise ShapeError(f"{where}: expected sigmas of shape (N + 1,), a 1-D grid, "
                             f"got {tuple(sigmas.shape)}")
        grid = sigmas.detach().to("cpu", torch.float64).tolist()  # the one host read, before any step
    else:
        grid = [float(s) for s in sigmas]
    if len(grid) < 2:
        raise ShapeError(f"{where}: expected sigmas with at least 2 entries (start and end), got {len(grid)}")
    if not all(math.isfinite(s) for s in grid):
        raise ConfigError(f"{where}: sigmas must be finite, got {grid}")
    if grid[-1] < 0:
        raise ConfigError(f"{where}: sigmas must be >= 0, got last entry {grid[-1]}")
    for i in range(len(grid) - 1):
        if not grid[i + 1] < grid[i]:
            raise ConfigError(f"{where}: sigmas must be strictly decreasing, got sigmas[{i}]={grid[i]} "
                              f"and sigmas[{i + 1}]={grid[i + 1]}")
    return grid


def _denoise(D: Denoiser, x: Tensor, sigma: float, class_labels: Tensor | None) -> Tensor:
    s = torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype)
    out = denoise(D, x, s, class_labels)
    if out.shape != x.shape:
        raise ShapeError(f"denoiser returned shape {tuple(out.shape)}, expected the shape of x "
                         f"{tuple(x.shape)}")
    return out.to(x.dtype)  # a no-op under the contract; keeps lerp's operands alike otherwise


def _heun_step(D: Denoiser, x: Tensor, s: float, s_next: float, denoised: Tensor,
               class_labels: Tensor | None) -> Tensor:
    """One step of EDM Algorithm 1 from ``(x, s)`` whose ``denoised = D(x, s)`` is known."""
    # Euler: x + (s_next - s) (x - D) / s  ==  D + (s_next / s) (x - D)
    x_euler = torch.lerp(denoised, x, s_next / s)
    if s_next == 0:
        return x_euler  # EDM: no second-order correction on the step to sigma = 0
    denoised_next = _denoise(D, x_euler, s_next, class_labels)
    # x + h/2 (d + d') with h d = x_euler - x and d' = (x_euler - D') / s_next
    h = s_next - s
    return torch.lerp(x, x_euler, 0.5).add_(x_euler - denoised_next, alpha=0.5 * h / s_next)


def euler(
    D: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    class_labels: Tensor | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Euler's method on the probability-flow ODE: one denoiser call per step.

    Args:
        D: denoiser ``D(x, sigma, class_labels=None)``.
        x: ``(B, ...)`` start, already at noise level ``sigmas[0]``.
        sigmas: ``(N + 1,)`` strictly decreasing grid (N steps).
        class_labels: passed to ``D`` unchanged (``(B,)`` indices or ``(B, label_dim)``).
        callback: called per step with a dict (see the module docstring).

    Returns: ``(B, ...)`` at noise level ``sigmas[-1]``, dtype and device of ``x``.

    >>> D = lambda x, sigma: torch.zeros_like(x)   # data = a point mass at 0
    >>> euler(D, torch.ones(2, 3), [2.0, 1.0, 0.0]).tolist()
    [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    """
    grid = _check_inputs(x, sigmas, "euler")
    for i, (s, s_next) in enumerate(pairwise(grid)):
        denoised = _denoise(D, x, s, class_labels)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=s, sigma_next=s_next, denoised=denoised))
        x = torch.lerp(denoised, x, s_next / s)  # x + (s_next - s) (x - D) / s
    return x


def heun(
    D: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    class_labels: Tensor | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Heun's 2nd-order method, EDM Algorithm 1: ``2N - 1`` denoiser calls for N steps.

    Each step is an Euler predictor and a trapezoidal corrector; the last step, to ``sigma = 0``,
    is Euler only (the ODE's slope is undefined at 0). Arguments and return as :func:`euler`.

    >>> D = lambda x, sigma: torch.zeros_like(x)
    >>> heun(D, torch.ones(1, 2), [2.0, 1.0, 0.0]).tolist()
    [[0.0, 0.0]]
    """
    grid = _check_inputs(x, sigmas, "heun")
    for i, (s, s_next) in enumerate(pairwise(grid)):
        denoised = _denoise(D, x, s, class_labels)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=s, sigma_next=s_next, denoised=denoised))
        x = _heun_step(D, x, s, s_next, denoised, class_labels)
    return x


def _churn_noise(x: Tensor, generator: Generators | None) -> Tensor:
    """Standard-normal noise like ``x``, drawn in float32 then cast (same bits in every dtype)."""
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else x.device
        eps = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
    else:
        if len(generator) != x.shape[0]:
            raise ConfigError(f"edm_stochastic: got {len(generator)} generators for a batch of "
                              f"{x.shape[0]}; pass one per sample or a single generator")
        # one stream per sample, as EDM's StackedRandomGenerator: sample b's noise is its own
        eps = torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device, dtype=torch.float32)
                           for g in generator])
    return eps.to(device=x.device, dtype=x.dtype)


def edm_stochastic(
    D: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    class_labels: Tensor | None = None,
    callback: StepCallback | None = None,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    generator: Generators | None = None,
) -> Tensor:
    """EDM's stochastic sampler, Algorithm 2: churn then a Heun step.

    At each step with ``S_min <= sigma_i <= S_max`` the sample is lifted to
    ``sigma_hat = sigma_i (1 + gamma)``, ``gamma = min(S_churn / N, sqrt(2) - 1)``, by adding fresh
    noise of std ``S_noise sqrt(sigma_hat^2 - sigma_i^2)``; then a Heun step (Algorithm 1) runs
    from ``sigma_hat`` to ``sigma_{i+1}``. With ``S_churn = 0`` no noise is drawn and the result is
    exactly :func:`heun`'s.

    Args:
        D, x, sigmas, class_labels, callback: as :func:`euler`.
        S_churn, S_min, S_max, S_noise: EDM's churn parameters (EDM Table 5 names).
        generator: the churn noise's source: ``None`` (global RNG), one ``torch.Generator``
            (noise for the whole batch), or a sequence of ``B`` generators, one per sample, so a
            sample's path depends on its own generator only, whatever the batch it runs in.
            Noise is drawn in float32 on the generator's device, then moved and cast to ``x``.

    Returns: ``(B, ...)`` at noise level ``sigmas[-1]``.
    """
    grid = _check_inputs(x, sigmas, "edm_stochastic")
    if S_churn < 0 or S_noise < 0 or S_min < 0 or S_max < S_min:
        raise ConfigError(f"edm_stochastic: need S_churn >= 0, S_noise >= 0, 0 <= S_min <= S_max; got "
                          f"S_churn={S_churn}, S_noise={S_noise}, S_min={S_min}, S_max={S_max}")
    n_steps = len(grid) - 1
    for i, (s, s_next) in enumerate(pairwise(grid)):
        gamma = min(S_churn / n_steps, math.sqrt(2) - 1) if S_min <= s <= S_max else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            eps = _churn_noise(x, generator)
            x = x + eps * (S_noise * math.sqrt(s_hat**2 - s**2))  # EDM Alg. 2, line 5
        denoised = _denoise(D, x, s_hat, class_labels)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=s_hat, sigma_hat=s_hat, sigma_next=s_next, denoised=denoised))
        x = _heun_step(D, x, s_hat, s_next, denoised, class_labels)
    return x


def dpmpp_2m(
    D: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    class_labels: Tensor | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), multistep 2nd order, one denoiser call per step.

    In ``t = -log sigma`` with ``h = t_{i+1} - t_i``, each step is exact for the linear part:
    ``x_{i+1} = (sigma_{i+1} / sigma_i) x_i - expm1(-h) D_hat``, where ``D_hat`` is the current
    denoised output on the first step and on the step to ``sigma = 0``, and otherwise its linear
    extrapolation ``(1 + 1/(2r)) D_i - 1/(2r) D_{i-1}`` with ``r = h_{i-1} / h_i`` (k-diffusion's
    ``sample_dpmpp_2m``). Arguments and return as :func:`euler`.
    """
    grid = _check_inputs(x, sigmas, "dpmpp_2m")
    old_denoised: Tensor | None = None
    for i, (s, s_next) in enumerate(pairwise(grid)):
        denoised = _denoise(D, x, s, class_labels)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=s, sigma_next=s_next, denoised=denoised))
        target = denoised
        if old_denoised is not None and s_next > 0:
            h = math.log(s / s_next)
            h_last = math.log(grid[i - 1] / s)
            r = h_last / h
            target = torch.lerp(denoised, old_denoised, -1 / (2 * r))  # (1 + 1/2r) D_i - 1/2r D_{i-1}
        # (s_next / s) x - expm1(-h) D_hat, and -expm1(-h) = 1 - s_next / s
        x = torch.lerp(target, x, s_next / s)
        old_denoised = denoised
    return x


def teacher_ode(
    D: Denoiser,
    z: Tensor,
    sigmas: Tensor | Sequence[float] | None = None,
    solver: Callable[..., Tensor] = heun,
    *,
    class_labels: Tensor | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """The teacher's deterministic map ``z -> T(z)``: the probability-flow ODE from ``sigmas[0] z``.

    Args:
        D: denoiser. If it has ``sigma_min`` / ``sigma_max`` attributes the default grid is clamped
            to them, as EDM's sampler does.
        z: ``(B, ...)`` standard-normal noise (e.g. :func:`dmdcopy.noise.noise_for_seeds`).
        sigmas: ``(N + 1,)`` grid ending in 0; default ``karras_sigmas(18)`` between
            ``max(0.002, D.sigma_min)`` and ``min(80, D.sigma_max)`` (35 evaluations with Heun).
        solver: any sampler of this module (or one with its signature).
        class_labels: passed to ``D``; ``callback``: passed to ``solver``.

    Returns: ``(B, ...)``, dtype and device of ``z``. Deterministic for the ODE solvers.

    >>> D = lambda x, sigma: torch.zeros_like(x)
    >>> teacher_ode(D, torch.randn(3, 2)).abs().max().item()
    0.0
    """
    if sigmas is None:
        sigmas = default_grid(D)
    grid = _check_inputs(z, sigmas, "teacher_ode")
    return solver(D, z * grid[0], grid, class_labels=class_labels, callback=callback)
