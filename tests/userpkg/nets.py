"""User-defined networks, built by import path from the command line (never from a checkpoint).

- :func:`build_teacher` returns a denoiser ``D(x, sigma, class_labels=None)`` of a class of its own
  (its own EDM-style preconditioning around a small MLP);
- :func:`build_student` returns a generator ``G(z, class_labels=None)`` of a class of its own.
"""

from __future__ import annotations

import torch
from torch import nn

WIDTH = 16  # not callable: `--teacher-arch userpkg.nets:WIDTH` must be refused


class Denoiser(nn.Module):
    """``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` (EDM's preconditioning, sigma_data 0.5)."""

    sigma_data = 0.5

    def __init__(self, dim: int = 2, width: int = WIDTH) -> None:
        super().__init__()
        self.sample_shape, self.label_dim = (dim,), 0
        self.sigma_min, self.sigma_max = 0.002, 80.0
        self.net = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None) -> torch.Tensor:
        s = sigma.to(x.dtype).reshape(-1, 1)
        sd2 = self.sigma_data**2
        c_skip, c_out = sd2 / (s**2 + sd2), s * self.sigma_data / (s**2 + sd2).sqrt()
        c_in, c_noise = 1 / (s**2 + sd2).sqrt(), s.log() / 4
        return c_skip * x + c_out * self.net(torch.cat([c_in * x, c_noise], dim=1))


class Generator(nn.Module):
    """``G(z) = z + F(z)``: a one-step student built from scratch."""

    def __init__(self, dim: int = 2, width: int = WIDTH) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, z: torch.Tensor, class_labels=None) -> torch.Tensor:
        return z + self.net(z)


def build_teacher(width: int = WIDTH, dim: int = 2) -> Denoiser:
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    return Denoiser(dim, width)


def build_student(width: int = WIDTH, dim: int = 2) -> Generator:
    return Generator(dim, width)
