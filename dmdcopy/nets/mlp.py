"""A small MLP network for vector data, to sit behind a preconditioning wrapper."""

from __future__ import annotations

import math

import torch
from torch import nn

from dmdcopy._checks import check_sample_shape
from dmdcopy._record import records_init_kwargs
from dmdcopy.errors import ShapeError

__all__ = ["MLP", "FourierEmbedding"]


class FourierEmbedding(nn.Module):
    """Random Fourier features of the scalar ``c_noise`` (as EDM's ``FourierEmbedding``)."""

    def __init__(self, num_channels: int, scale: float = 16.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B,) -> (B, num_channels)``."""
        x = x.outer((2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


@records_init_kwargs
class MLP(nn.Module):
    """Residual MLP ``F(x_in, c_noise, class_labels) -> (B, dim)`` for vectors ``x_in: (B, dim)``.

    The noise embedding (Fourier features of ``c_noise``, then a 2-layer MLP) and the optional
    class embedding are added to every hidden block, as the time embedding of a UNet.

    Args:
        dim: data dimension.
        hidden: width of the hidden layers.
        depth: number of residual blocks.
        emb_dim: width of the noise embedding.
        label_dim: number of classes (0 = unconditional).
        dropout: dropout probability inside blocks.

    >>> from dmdcopy.precond import EDMPrecond
    >>> D = EDMPrecond(MLP(2, hidden=32, depth=2))
    >>> D(torch.zeros(4, 2), torch.full((4,), 1.0)).shape
    torch.Size([4, 2])
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 3,
        emb_dim: int = 64,
        label_dim: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim, self.label_dim = int(dim), int(label_dim)
        self.sample_shape = (self.dim,)
        self.map_noise = FourierEmbedding(emb_dim)
        self.map_emb = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.map_label = nn.Linear(label_dim, hidden, bias=False) if label_dim else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                dict(
                    norm=nn.LayerNorm(hidden),
                    fc1=nn.Linear(hidden, hidden),
                    emb=nn.Linear(hidden, hidden),
                    fc2=nn.Linear(hidden, hidden),
                )
            )
            for _ in range(depth)
        )
        self.dropout = nn.Dropout(dropout)
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x: (B, dim)``, ``noise_labels: (B,)``, ``class_labels: (B, label_dim)`` or None."""
        check_sample_shape(x, self.sample_shape, "MLP")
        emb = self.map_emb(self.map_noise(noise_labels))
        if self.map_label is not None:
            if class_labels is None:
                raise ShapeError("MLP: the network is conditional; pass class_labels (B, label_dim)")
            emb = emb + self.map_label(class_labels.to(emb.dtype))
        h = self.inp(x)
        for block in self.blocks:
            r = block["fc1"](nn.functional.silu(block["norm"](h)))
            r = r + block["emb"](nn.functional.silu(emb))
            r = block["fc2"](self.dropout(nn.functional.silu(r)))
            h = h + r
        return self.out(nn.functional.silu(self.out_norm(h)))
