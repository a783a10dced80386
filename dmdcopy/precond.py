"""Preconditioning wrappers: a raw network ``F(x_in, c_noise, class_labels)`` -> a denoiser.

The wrapped network sits in the attribute ``model``, as in EDM's ``EDMPrecond``, so an EDM
state dict (keys ``model.*``) loads with ``strict=True``. A raw network may declare
``sample_shape`` (per-sample shape, e.g. ``(3, 64, 64)``) and ``label_dim``; the wrapper then
checks its inputs against them.

Every wrapper computes (EDM eq. 7)
``D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dmdcopy._checks import check_labels, check_sample_shape, check_x_sigma
from dmdcopy.contracts import broadcast
from dmdcopy.schedules import vp_sigma_inv

__all__ = ["EDMPrecond", "Precond", "VEPrecond", "VPPrecond"]


def _param_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the network's first floating-point parameter (``None`` without any)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


class Precond(nn.Module):
    """Base wrapper; subclasses map ``sigma`` to ``(c_skip, c_out, c_in, c_noise)``.

    Args:
        model: the raw network, called as ``model(x_in, c_noise, class_labels=...)`` where
            ``c_noise`` is ``(B,)`` and ``class_labels`` is ``(B, label_dim)`` or ``None``.
        label_dim: number of classes (0 = unconditional); defaults to ``model.label_dim`` or 0.
        sample_shape: per-sample shape; defaults to ``model.sample_shape`` if it has one.
        sigma_min, sigma_max: the range the network supports (informational, used by samplers
            and students as defaults).
        net_dtype: dtype the network runs in (e.g. ``torch.float16``); the skip path and the
            output stay in the input's precision, as EDM's ``use_fp16``. ``None``: the dtype of the
            network's parameters (the input's dtype for a network without any), so float64 inputs
            reach a float32 network as float32 and come back as float64.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        label_dim: int | None = None,
        sample_shape: Sequence[int] | None = None,
        sigma_min: float = 0.0,
        sigma_max: float = math.inf,
        net_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.label_dim = int(label_dim if label_dim is not None else getattr(model, "label_dim", 0))
        shape = sample_shape if sample_shape is not None else getattr(model, "sample_shape", None)
        self.sample_shape = tuple(int(s) for s in shape) if shape is not None else None
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.net_dtype = net_dtype

    def coefficients(
        self, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x: (B, ...)``, ``sigma: (B,)``, ``class_labels: (B,)`` ints or ``(B, label_dim)``."""
        name = type(self).__name__
        check_x_sigma(x, sigma, name)
        check_sample_shape(x, self.sample_shape, name)
        labels = check_labels(class_labels, x.shape[0], self.label_dim, name)
        sigma = sigma.to(x.dtype)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        net_dtype = self.net_dtype or _param_dtype(self.model) or x.dtype  # the network's own precision
        x_in = (broadcast(c_in, x) * x).to(net_dtype)
        if labels is not None:
            labels = labels.to(net_dtype)
        F_x = self.model(x_in, c_noise.to(net_dtype), class_labels=labels)
        return broadcast(c_skip, x) * x + broadcast(c_out, x) * F_x.to(x.dtype)

    def extra_repr(self) -> str:
        return f"label_dim={self.label_dim}, sample_shape={self.sample_shape}"


class EDMPrecond(Precond):
    """EDM preconditioning (Karras et al. 2022, Table 1), ``sigma_data`` 0.5 by default."""

    def __init__(self, model: nn.Module, *, sigma_data: float = 0.5, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma: torch.Tensor):
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


class VEPrecond(Precond):
    """Variance-exploding preconditioning (Song et al. 2021; EDM Table 1)."""

    def __init__(
        self, model: nn.Module, *, sigma_min: float = 0.02, sigma_max: float = 100.0, **kwargs: Any
    ) -> None:
        super().__init__(model, sigma_min=sigma_min, sigma_max=sigma_max, **kwargs)

    def coefficients(self, sigma: torch.Tensor):
        one = torch.ones_like(sigma)
        return one, sigma, one, (0.5 * sigma).log()


class VPPrecond(Precond):
    """Variance-preserving preconditioning (DDPM++; EDM Table 1), ``c_noise = (M - 1) t(sigma)``."""

    def __init__(
        self,
        model: nn.Module,
        *,
        beta_d: float = 19.9,
        beta_min: float = 0.1,
        M: int = 1000,
        epsilon_t: float = 1e-5,
        **kwargs: Any,
    ) -> None:
        from dmdcopy.schedules import vp_sigma

        kwargs.setdefault("sigma_min", float(vp_sigma(epsilon_t, beta_d, beta_min)))
        kwargs.setdefault("sigma_max", float(vp_sigma(1.0, beta_d, beta_min)))
        super().__init__(model, **kwargs)
        self.beta_d, self.beta_min, self.M = float(beta_d), float(beta_min), int(M)

    def coefficients(self, sigma: torch.Tensor):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.M - 1) * vp_sigma_inv(sigma, self.beta_d, self.beta_min)
        return c_skip, c_out, c_in, c_noise
