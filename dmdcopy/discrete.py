"""Discrete-time VP models (the DDPM and diffusers world) as denoisers ``D(x, sigma)``.

A model trained with a discrete variance-preserving schedule sees ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t)
eps`` at integer timesteps ``t = 0..T-1`` (``a_t = alphas_cumprod[t]``) and predicts ``eps`` (epsilon
prediction) or ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0`` (v prediction). In dmdcopy's variance-exploding
form ``x = x0 + sigma eps`` the same state is ``x_t = x / sqrt(1 + sigma^2)`` with

    sigma_t = sqrt((1 - a_t) / a_t)

so a wrapper needs only to pick the timestep for ``sigma``, scale the input and convert the
output (the same construction as k-diffusion's external wrappers; written here from the formulas):

    c_in = 1 / sqrt(sigma^2 + 1)
    epsilon prediction:  D(x, sigma) = x - sigma * eps(c_in x, t)
    v prediction:        D(x, sigma) = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v(c_in x, t)

``t`` is the timestep whose ``sigma_t`` is nearest to ``sigma`` in ``log sigma`` (``interpolate=False``,
for models that only know integer timesteps), or the fractional timestep found by linear
interpolation of ``log sigma_t`` (``interpolate=True``, for models that accept float timesteps). Run
the teacher ODE on :meth:`DiscreteVPDenoiser.discrete_grid` to evaluate the model only at its own
timesteps.

The schedules: :func:`linear_alphas_cumprod` (DDPM), :func:`scaled_linear_alphas_cumprod` (Stable
Diffusion's) and :func:`cosine_alphas_cumprod` (improved DDPM).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dmdcopy._checks import check_sample_shape, check_x_sigma
from dmdcopy.contracts import broadcast
from dmdcopy.errors import ConfigError, ShapeError

__all__ = [
    "DiscreteVPDenoiser",
    "EpsDenoiser",
    "VDenoiser",
    "cosine_alphas_cumprod",
    "linear_alphas_cumprod",
    "scaled_linear_alphas_cumprod",
]


def _check_steps(n: int, where: str) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise ConfigError(f"{where}: the number of timesteps must be an int >= 2, got {n!r}")


def linear_alphas_cumprod(n: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> Tensor:
    """DDPM's schedule: ``beta_t`` linear from ``beta_start`` to ``beta_end``; ``(n,)`` float64
    ``prod_{s <= t} (1 - beta_s)``."""
    _check_steps(n, "linear_alphas_cumprod")
    betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def scaled_linear_alphas_cumprod(
    n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """Stable Diffusion's schedule: ``sqrt(beta_t)`` linear; ``(n,)`` float64."""
    _check_steps(n, "scaled_linear_alphas_cumprod")
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def cosine_alphas_cumprod(n: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Improved DDPM's cosine schedule, ``alpha_bar(u) = cos^2((u + s) / (1 + s) pi / 2)`` with the
    betas clipped at ``max_beta``; ``(n,)`` float64."""
    _check_steps(n, "cosine_alphas_cumprod")
    u = torch.arange(n + 1, dtype=torch.float64) / n
    bar = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - bar[1:] / bar[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, 0)


class DiscreteVPDenoiser(nn.Module):
    """Base wrapper: a model ``model(x_t, t, class_labels=None)`` of a discrete VP schedule as a
    denoiser ``D(x, sigma, class_labels=None)``. Subclasses convert the model's output to ``x0``.

    Args:
        model: called as ``model(x_t, t)`` (``class_labels=`` added only when given, integer
            ``(B,)`` as diffusers takes them); ``t: (B,)`` int64 timesteps, or float with
            ``interpolate=True``. It may return a tensor or an object with ``.sample`` (diffusers).
        alphas_cumprod: ``(T,)`` decreasing values in ``(0, 1]``, as trained.
        interpolate: fractional timesteps by log-sigma interpolation instead of the nearest one.
        sample_shape, label_dim: the optional attributes of the denoiser contract.
    """

    def __init__(
        self,
        model: Any,
        alphas_cumprod: Tensor | Sequence[float],
        *,
        interpolate: bool = False,
        sample_shape: Sequence[int] | None = None,
        label_dim: int = 0,
    ) -> None:
        super().__init__()
        acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        name = type(self).__name__
        if acp.ndim != 1 or acp.numel() < 2:
            raise ConfigError(f"{name}: alphas_cumprod must be a 1-D tensor of >= 2 values, got "
                              f"shape {tuple(acp.shape)}")
        if not bool(torch.isfinite(acp).all()) or bool((acp <= 0).any()) or bool((acp > 1).any()):
            raise ConfigError(f"{name}: alphas_cumprod must lie in (0, 1]")
        if not bool((acp[1:] < acp[:-1]).all()):
            raise ConfigError(f"{name}: alphas_cumprod must be strictly decreasing in t")
        self.model = model
        self.interpolate = bool(interpolate)
        self.sample_shape = tuple(int(s) for s in sample_shape) if sample_shape is not None else None
        self.label_dim = int(label_dim)
        sigmas = ((1 - acp) / acp).sqrt()  # (T,) increasing with t
        self.register_buffer("sigmas", sigmas, persistent=False)
        self.register_buffer("log_sigmas", sigmas.clamp_min(1e-300).log(), persistent=False)
        self.sigma_min, self.sigma_max = float(sigmas[0]), float(sigmas[-1])

    def timestep(self, sigma: Tensor) -> Tensor:
        """``sigma: (B,)`` -> the model's timestep ``t: (B,)`` (int64, or float64 when interpolating)."""
        log_s = sigma.to(torch.float64).clamp_min(1e-300).log()
        ls = self.log_sigmas.to(log_s.device)
        if not self.interpolate:
            return (log_s[:, None] - ls[None]).abs().argmin(1)
        log_s = log_s.clamp(ls[0], ls[-1])
        hi = torch.searchsorted(ls, log_s).clamp(1, ls.numel() - 1)  # ls[hi - 1] <= log_s <= ls[hi]
        w = (log_s - ls[hi - 1]) / (ls[hi] - ls[hi - 1])
        return (hi - 1).to(torch.float64) + w

    def discrete_grid(self, n: int) -> Tensor:
        """``(n + 1,)`` float64: ``n`` of the model's own sigmas, from ``sigma_max`` down to
        ``sigma_min`` at evenly spaced timesteps, then 0 (a grid for :func:`dmdcopy.teacher_ode`)."""
        if not isinstance(n, int) or n < 1 or n > self.sigmas.numel():
            raise ConfigError(f"discrete_grid: n must be an int in 1..{self.sigmas.numel()}, got {n!r}")
        t = torch.linspace(self.sigmas.numel() - 1, 0, n, dtype=torch.float64).round().long()
        return torch.cat([self.sigmas[t.unique_consecutive()], self.sigmas.new_zeros(1)])

    def _call(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None) -> Tensor:
        out = self.model(x_t, t) if class_labels is None else self.model(x_t, t, class_labels=class_labels)
        out = getattr(out, "sample", out)  # diffusers returns an output object
        if not isinstance(out, Tensor) or out.shape != x_t.shape:
            raise ShapeError(f"{type(self).__name__}: the model returned "
                             f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}, "
                             f"expected a tensor of the input's shape {tuple(x_t.shape)}")
        return out.to(x_t.dtype)

    def _to_x0(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """``x: (B, ...)``, ``sigma: (B,)`` -> ``x0_hat``, same shape and dtype as ``x``."""
        name = type(self).__name__
        check_x_sigma(x, sigma, name)
        check_sample_shape(x, self.sample_shape, name)
        s = broadcast(sigma.to(x.dtype), x)
        t = self.timestep(sigma).to(x.device)
        out = self._call(x / (s**2 + 1).sqrt(), t if self.interpolate else t.long(), class_labels)
        return self._to_x0(x, s, out)


class EpsDenoiser(DiscreteVPDenoiser):
    """An epsilon-prediction model as a denoiser: ``D(x, sigma) = x - sigma eps(c_in x, t)``."""

    def _to_x0(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        return x - sigma * out


class VDenoiser(DiscreteVPDenoiser):
    """A v-prediction model as a denoiser:
    ``D(x, sigma) = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) v(c_in x, t)``."""

    def _to_x0(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        return x / (sigma**2 + 1) - sigma / (sigma**2 + 1).sqrt() * out
