"""Epsilon- and v-prediction wrappers of discrete VP models against a Gaussian's closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dmdcopy.discrete import (
    EpsDenoiser,
    VDenoiser,
    cosine_alphas_cumprod,
    linear_alphas_cumprod,
    scaled_linear_alphas_cumprod,
)
from dmdcopy.errors import ConfigError, ShapeError
from dmdcopy.samplers import heun, teacher_ode
from dmdcopy.teachers import GaussianTeacher

MEAN = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
VAR = torch.tensor([1.0, 0.25, 4.0], dtype=torch.float64)


class ExactVP(nn.Module):
    """The exact eps- or v-prediction of data N(MEAN, diag(VAR)) at the wrapper's timesteps:
    with x_t = a x0 + s eps, E[x0 | x_t] = m + a v (x_t - a m) / (a^2 v + s^2) per coordinate,
    E[eps | x_t] = (x_t - a E[x0 | x_t]) / s and E[v | x_t] = a E[eps | x_t] - s E[x0 | x_t]."""

    def __init__(self, wrapper_sigmas: torch.Tensor, kind: str) -> None:
        super().__init__()
        self.log_sigmas, self.kind = wrapper_sigmas.log(), kind

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():  # the same log-sigma interpolation the wrapper inverts
            lo = t.floor().long().clamp(max=self.log_sigmas.numel() - 2)
            w = t - lo
            return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[lo + 1]).exp()
        return self.log_sigmas[t].exp()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma(t)[:, None]
        a, s = 1 / (1 + sigma**2).sqrt(), sigma / (1 + sigma**2).sqrt()
        x_t = x_t.double()
        x0 = MEAN + a * VAR * (x_t - a * MEAN) / (a**2 * VAR + s**2)
        eps = (x_t - a * x0) / s
        return (eps if self.kind == "eps" else a * eps - s * x0).to(torch.float64)


def _wrapped(kind: str, acp: torch.Tensor, interpolate: bool = False):
    cls = EpsDenoiser if kind == "eps" else VDenoiser
    probe = cls(lambda x, t: x, acp)  # the wrapper's sigmas, for the exact model
    return cls(ExactVP(probe.sigmas, kind), acp, interpolate=interpolate, sample_shape=(3,))


@pytest.mark.parametrize("kind", ["eps", "v"])
@pytest.mark.parametrize("schedule",
                         [linear_alphas_cumprod, scaled_linear_alphas_cumprod, cosine_alphas_cumprod])
def test_wrapped_exact_model_is_the_exact_denoiser_at_its_timesteps(kind, schedule):
    acp = schedule(1000)
    D = _wrapped(kind, acp)
    exact = GaussianTeacher(MEAN, torch.diag(VAR))
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (64,), generator=g)
    sigma = D.sigmas[t]
    x = MEAN + (VAR.sqrt() + sigma[:, None]) * torch.randn(64, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(D(x, sigma), exact(x, sigma), rtol=1e-9, atol=1e-9)
    assert D.sigma_min == pytest.approx(float(((1 - acp[0]) / acp[0]).sqrt()))


@pytest.mark.parametrize("kind", ["eps", "v"])
def test_interpolated_timesteps_are_exact_between_grid_points(kind):
    D = _wrapped(kind, linear_alphas_cumprod(1000), interpolate=True)
    exact = GaussianTeacher(MEAN, torch.diag(VAR))
    g = torch.Generator().manual_seed(1)
    sigma = torch.exp(torch.empty(32, dtype=torch.float64).uniform_(-3.5, 4.5, generator=g))
    x = MEAN + (VAR.sqrt() + sigma[:, None]) * torch.randn(32, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(D(x, sigma), exact(x, sigma), rtol=1e-9, atol=1e-9)
    t = D.timestep(D.sigmas[[0, 17, 999]])
    torch.testing.assert_close(t, torch.tensor([0.0, 17.0, 999.0], dtype=torch.float64))


@pytest.mark.parametrize("kind", ["eps", "v"])
def test_ode_map_of_the_wrapped_model_converges_to_the_exact_map_at_second_order(kind):
    D = _wrapped(kind, linear_alphas_cumprod(1000))
    exact = GaussianTeacher(MEAN, torch.diag(VAR))
    z = torch.randn(256, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    errors = []
    for n in (25, 50, 100):
        grid = D.discrete_grid(n)
        x = teacher_ode(D, z, grid, heun)
        # exact: from sigma_max z down to the smallest grid sigma, then Heun's last step to 0 is Euler
        x_ref = teacher_ode(exact, z, grid, heun)
        assert torch.isfinite(x).all()
        errors.append(float((x - exact.ode_map_from(z * grid[0], float(grid[0]), 0.0)).abs().max()))
        torch.testing.assert_close(x, x_ref, rtol=1e-7, atol=1e-7)  # the wrapper is the denoiser
    assert errors[2] < errors[1] < errors[0]
    assert errors[0] / errors[1] > 2.5 and errors[1] / errors[2] > 2.5  # Heun: about 4x per halving


def test_quantised_timesteps_are_nearest_in_log_sigma():
    D = EpsDenoiser(lambda x, t: torch.zeros_like(x), linear_alphas_cumprod(10))
    mid = (D.log_sigmas[3] * 0.4 + D.log_sigmas[4] * 0.6).exp()
    assert D.timestep(torch.stack([D.sigmas[3], mid, D.sigmas[9] * 10])).tolist() == [3, 4, 9]
    grid = D.discrete_grid(4)
    assert grid[-1] == 0 and torch.isin(grid[:-1], D.sigmas).all() and (grid[:-1].diff() < 0).all()


def test_diffusers_style_outputs_and_labels_pass_through():
    class Out:
        def __init__(self, sample):
            self.sample = sample

    seen = {}

    def model(x, t, class_labels=None):
        seen["labels"], seen["t"] = class_labels, t
        return Out(torch.zeros_like(x))

    D = EpsDenoiser(model, linear_alphas_cumprod(100), label_dim=5)
    x = torch.randn(4, 2)
    labels = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(D(x, torch.ones(4), class_labels=labels), x)
    assert seen["labels"] is labels and seen["t"].dtype == torch.int64


def test_bad_schedules_and_outputs_are_refused():
    with pytest.raises(ConfigError, match="decreasing"):
        EpsDenoiser(lambda x, t: x, torch.tensor([0.5, 0.9]))
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        EpsDenoiser(lambda x, t: x, torch.tensor([1.0, 0.0]))
    with pytest.raises(ConfigError, match="timesteps"):
        linear_alphas_cumprod(1)
    D = VDenoiser(lambda x, t: x[:, :1], linear_alphas_cumprod(10))
    with pytest.raises(ShapeError, match="model returned"):
        D(torch.randn(2, 3), torch.ones(2))
    with pytest.raises(ConfigError, match="discrete_grid"):
        D.discrete_grid(11)
