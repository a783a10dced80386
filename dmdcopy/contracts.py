"""The two contracts every part of dmdcopy speaks, said once: the denoiser and the generator.

- **Denoiser** ``D(x, sigma, class_labels=None) -> x0_hat`` with ``x: (B, ...)``, ``sigma: (B,)``
  of ``x``'s dtype and device. Every teacher, fake score and preconditioned network is one.
- **Generator** ``G(z, class_labels=None) -> x`` with ``z: (B, ...)`` standard normal. Every
  student is one.

Both may carry the optional attributes ``sample_shape`` (per-sample shape), ``label_dim`` (number
of classes, 0 = unconditional), ``sigma_min``, ``sigma_max`` and ``sigma_data``; read them with the
accessors below, never with scattered ``getattr`` probes. Labels are passed in exactly one way:
``class_labels=`` only when there are labels (:func:`denoise`, :func:`generate`), so a plain
``D(x, sigma)`` callable is a valid unconditional denoiser.

This module is on the bottom floor: it imports only torch and :mod:`dmdcopy.schedules`.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from dmdcopy.schedules import karras_sigmas

__all__ = [
    "Denoiser",
    "Generator",
    "broadcast",
    "default_grid",
    "denoise",
    "dist_rank_world",
    "generate",
    "label_dim",
    "sample_shape",
    "sigma_range",
]

# EDM's sampling range: the teacher ODE runs from at most 80 down to at least 0.002.
EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0


@runtime_checkable
class Denoiser(Protocol):
    """``D(x, sigma, class_labels=None) -> x0_hat``, ``x: (B, ...)``, ``sigma: (B,)``."""

    def __call__(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor: ...


@runtime_checkable
class Generator(Protocol):
    """``G(z, class_labels=None) -> x``, ``z: (B, ...)`` standard normal."""

    def __call__(self, z: Tensor, class_labels: Tensor | None = None) -> Tensor: ...


def denoise(D: Any, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
    """``D(x, sigma)``, passing ``class_labels=`` only when there are labels (any denoiser works).

    >>> denoise(lambda x, s: x / (1 + s[:, None] ** 2), torch.ones(2, 3), torch.zeros(2)).shape
    torch.Size([2, 3])
    """
    return D(x, sigma) if class_labels is None else D(x, sigma, class_labels=class_labels)


def generate(G: Any, z: Tensor, class_labels: Tensor | None = None, **kwargs: Any) -> Tensor:
    """``G(z)``, passing ``class_labels=`` only when there are labels (any generator works)."""
    return G(z, **kwargs) if class_labels is None else G(z, class_labels=class_labels, **kwargs)


def sample_shape(m: Any) -> tuple[int, ...] | None:
    """The per-sample shape ``m`` declares (``m.sample_shape``), or ``None``."""
    shape = getattr(m, "sample_shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def label_dim(m: Any) -> int:
    """Number of classes ``m`` is conditioned on (``m.label_dim``); 0 when unconditional."""
    return int(getattr(m, "label_dim", 0) or 0)


def sigma_range(m: Any) -> tuple[float, float]:
    """``(sigma_min, sigma_max)`` of ``m``; ``(0, inf)`` where it declares none (EDM's default)."""
    return float(getattr(m, "sigma_min", 0.0)), float(getattr(m, "sigma_max", math.inf))


def default_grid(
    D: Any, n: int = 18, *, rho: float = 7.0, sigma_min: float | None = None, sigma_max: float | None = None
) -> Tensor:
    """The teacher-ODE grid dmdcopy uses unless told otherwise: ``karras_sigmas(n)`` between
    ``max(0.002, D.sigma_min)`` and ``min(80, D.sigma_max)`` (EDM's sampling range clamped to the
    denoiser's own); float64 ``(n + 1,)`` ending in 0. ``sigma_min`` / ``sigma_max`` override.

    >>> default_grid(lambda x, s: x, 4).shape
    torch.Size([5])
    """
    lo, hi = sigma_range(D)
    sigma_min = max(EDM_SIGMA_MIN, lo) if sigma_min is None else sigma_min
    sigma_max = min(EDM_SIGMA_MAX, hi) if sigma_max is None else sigma_max
    return karras_sigmas(n, sigma_min, sigma_max, rho)


def broadcast(v: Tensor, like: Tensor) -> Tensor:
    """``v: (B,)`` viewed as ``(B, 1, ..., 1)`` to broadcast over ``like: (B, ...)``."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` unless ``torch.distributed`` is
    initialised. The one place the library asks "which rank, how many"."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
