"""An MLP on flattened images: the fast CPU network of the digits experiment."""

from __future__ import annotations

import math

import torch
from torch import nn

from dmdcopy._record import records_init_kwargs
from dmdcopy.nets.mlp import MLP

__all__ = ["ImageMLP"]


@records_init_kwargs
class ImageMLP(nn.Module):
    """:class:`dmdcopy.nets.MLP` on flattened images: ``x: (B, C, H, W) -> (B, C, H, W)``.

    Args:
        sample_shape: per-sample shape ``(C, H, W)`` (any shape; it is flattened).
        hidden, depth, emb_dim, label_dim: as :class:`~dmdcopy.nets.MLP`.
    """

    def __init__(self, sample_shape: tuple[int, ...], hidden: int = 256, depth: int = 3,
                 emb_dim: int = 64, label_dim: int = 0) -> None:
        super().__init__()
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.label_dim = int(label_dim)
        self.mlp = MLP(math.prod(self.sample_shape), hidden=hidden, depth=depth, emb_dim=emb_dim,
                       label_dim=label_dim)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)  # (B, C*H*W)
        return self.mlp(flat, noise_labels, class_labels).reshape(x.shape)
