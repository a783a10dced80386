"""Building blocks of the EDM-compatible UNets (:mod:`dmdcopy.nets.unet`).

Parameter and buffer names follow EDM's ``training/networks.py`` (``weight``, ``bias``,
``resample_filter``, ``freqs``; a block's ``norm0``, ``conv0``, ``affine``, ``norm1``, ``conv1``,
``skip``, ``norm2``, ``qkv``, ``proj``), so that EDM state dicts load with ``strict=True``.

Every layer casts its parameters to the dtype of its input, so a float32 network runs in
float16/bfloat16 when its input is (this is how ``net_dtype=`` of :mod:`dmdcopy.precond`, EDM's
``use_fp16``, works). Attention has two implementations (``attention_impl``): ``"exact"`` (the
default, EDM's: logits and softmax in float32 from an einsum, bit for bit EDM's outputs) and
``"sdpa"`` (:func:`torch.nn.functional.scaled_dot_product_attention`: fused kernels that never hold
the ``(B heads, HW, HW)`` logits; in float32 it agrees with ``"exact"`` to rounding, in
bfloat16 it computes the softmax from bfloat16 inputs; docs/networks.md gives the difference).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn
from torch.nn.functional import silu

from dmdcopy.errors import ConfigError
from dmdcopy.nets.mlp import FourierEmbedding

__all__ = [
    "ATTENTION_IMPLS",
    "Conv2d",
    "FourierEmbedding",
    "GroupNorm",
    "Linear",
    "PositionalEmbedding",
    "UNetBlock",
    "check_attention_impl",
    "weight_init",
]

_INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")
ATTENTION_IMPLS = ("exact", "sdpa")


def check_attention_impl(name: str, value: str) -> str:
    """``value`` if it names an attention implementation (:data:`ATTENTION_IMPLS`), else ConfigError."""
    if value not in ATTENTION_IMPLS:
        raise ConfigError(f"{name}: attention_impl must be one of {ATTENTION_IMPLS}, got {value!r}")
    return value


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random tensor of ``shape`` with the variance of the named scheme (as EDM's init modes).

    ``xavier_*`` have variance ``2 / (fan_in + fan_out)``, ``kaiming_*`` variance ``1 / fan_in``;
    ``*_uniform`` draw from a symmetric uniform law, ``*_normal`` from a normal law.
    """
    if mode not in _INIT_MODES:
        raise ConfigError(f"weight_init: mode must be one of {_INIT_MODES}, got {mode!r}")
    var = 2 / (fan_in + fan_out) if mode.startswith("xavier") else 1 / fan_in
    if mode.endswith("uniform"):
        return math.sqrt(3 * var) * (torch.rand(*shape) * 2 - 1)  # U(-a, a) has variance a^2 / 3
    return math.sqrt(var) * torch.randn(*shape)


class Linear(nn.Module):
    """Fully connected layer ``y = x W^T + b``; ``x: (B, in_features) -> (B, out_features)``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.linear(x, self.weight.to(x.dtype), b)


class Conv2d(nn.Module):
    """Same-padded 2-D convolution with optional 2x up- or downsampling by a separable FIR filter.

    ``kernel=0`` gives a parameter-free resampler. The filter ``f f^T / (sum f)^2`` is stored as the
    buffer ``resample_filter`` (shape ``(1, 1, k, k)``) only when resampling. With
    ``fused_resample`` the convolution runs at the higher resolution side (before downsampling or
    after upsampling), as EDM's NCSN++ residual encoder does.

    ``x: (B, in_channels, H, W) -> (B, out_channels, H', W')`` with ``H' = 2H`` (up),
    ``H / 2`` (down) or ``H``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        fused_resample: bool = False,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ) -> None:
        if up and down:
            raise ConfigError("Conv2d: up and down cannot both be set")
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.up, self.down, self.fused_resample = bool(up), bool(down), bool(fused_resample)
        fans = dict(mode=init_mode, fan_in=in_channels * kernel**2, fan_out=out_channels * kernel**2)
        self.weight = (
            nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
            if kernel else None
        )
        self.bias = (
            nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        )
        f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum() ** 2  # (1, 1, k, k), sums to 1
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv2d, conv_t = nn.functional.conv2d, nn.functional.conv_transpose2d
        w = self.weight.to(x.dtype) if self.weight is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        c_in, c_out = self.in_channels, self.out_channels
        if self.fused_resample and self.up and w is not None:
            # x4: a stride-2 transposed conv spreads each input over 4 outputs; keep the mean.
            x = conv_t(x, (4 * f).tile(c_in, 1, 1, 1), groups=c_in, stride=2, padding=max(f_pad - w_pad, 0))
            x = conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = conv2d(x, w, padding=w_pad + f_pad)
            x = conv2d(x, f.tile(c_out, 1, 1, 1), groups=c_out, stride=2)
        else:
            if self.up:
                x = conv_t(x, (4 * f).tile(c_in, 1, 1, 1), groups=c_in, stride=2, padding=f_pad)
            if self.down:
                x = conv2d(x, f.tile(c_in, 1, 1, 1), groups=c_in, stride=2, padding=f_pad)
            if w is not None:
                x = conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).view(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with ``min(num_groups, num_channels // min_channels_per_group)`` groups.

    ``x: (B, num_channels, H, W)``.
    """

    def __init__(
        self,
        num_channels: int,
        num_groups: int = 32,
        min_channels_per_group: int = 4,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        if self.num_groups < 1 or num_channels % self.num_groups:
            raise ConfigError(
                f"GroupNorm: {num_channels} channels cannot be split into "
                f"min({num_groups}, {num_channels} // {min_channels_per_group}) = {self.num_groups} "
                "equal groups; choose model_channels / channel_mult so that every block's channel count "
                "(decoder inputs include the concatenated skip) splits evenly"
            )
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.group_norm(
            x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps
        )


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding ``[cos(x w_j), sin(x w_j)]``, ``w_j = max_positions^(-j / d)``.

    ``d = num_channels / 2`` (``- 1`` with ``endpoint``, so the last frequency is
    ``1 / max_positions``). ``x: (B,) -> (B, num_channels)``.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False) -> None:
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = int(num_channels), max_positions, endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        j = torch.arange(half, dtype=torch.float32, device=x.device)
        freqs = (1 / self.max_positions) ** (j / (half - int(self.endpoint)))
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class UNetBlock(nn.Module):
    """Residual block of DDPM++ / NCSN++ / ADM, with optional 2x resampling and self-attention.

    ``h = conv1(dropout(silu(norm1(conv0(silu(norm0(x)))) <- emb)))``, where ``<- emb`` adds the
    projected embedding (``adaptive_scale=False``) or applies ``(1 + scale) * . + shift``
    (``adaptive_scale=True``, ADM). Output ``(h + skip(x)) * skip_scale``, then, with attention,
    ``(out + proj(attn(norm2(out)))) * skip_scale``.

    ``x: (B, in_channels, H, W)``, ``emb: (B, emb_channels) -> (B, out_channels, H', W')``.

    Args:
        num_heads: attention heads; default ``out_channels // channels_per_head``. With
            ``attention`` and zero heads (too few channels) the block has no attention at all,
            as in EDM.
        resample_proj: give the skip path a 1x1 convolution even when channels are unchanged.
        init, init_zero, init_attn: keyword arguments of the layers' initialisation
            (``init_zero`` for ``conv1`` and ``proj``, ``init_attn`` for ``qkv``).
        attention_impl: ``"exact"`` (EDM's float32 einsum) or ``"sdpa"`` (fused
            ``scaled_dot_product_attention``); see the module docstring.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int | None = None,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        skip_scale: float = 1.0,
        eps: float = 1e-5,
        resample_filter: Sequence[float] = (1, 1),
        resample_proj: bool = False,
        adaptive_scale: bool = True,
        init: dict | None = None,
        init_zero: dict | None = None,
        init_attn: dict | None = None,
        attention_impl: str = "exact",
    ) -> None:
        super().__init__()
        self.attention_impl = check_attention_impl("UNetBlock", attention_impl)
        init = init or {}
        init_zero = init_zero if init_zero is not None else dict(init_weight=0)
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout, self.skip_scale, self.adaptive_scale = float(dropout), float(skip_scale), adaptive_scale

        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample, **init)
        n_affine = out_channels * (2 if adaptive_scale else 1)  # (scale, shift) or shift only
        self.affine = Linear(emb_channels, n_affine, **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, **resample, **init)

        if self.num_heads:
            if out_channels % self.num_heads:
                raise ConfigError(
                    f"UNetBlock: out_channels={out_channels} is not divisible by num_heads={self.num_heads}"
                )
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, 3 * out_channels, kernel=1, **(init_attn or init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)  # (B, n_affine, 1, 1)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = silu(self.norm1(h + params))
        h = self.conv1(nn.functional.dropout(h, p=self.dropout, training=self.training))
        h = (h + (self.skip(x) if self.skip is not None else x)) * self.skip_scale
        if self.num_heads:
            h = (self.proj(self._attention(self.norm2(h))) + h) * self.skip_scale
        return h

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over the ``H * W`` positions; ``x: (B, C, H, W)``.

        EDM's ``qkv`` layout: output channel ``3 * c + i`` of head ``n`` (``C / heads`` channels per
        head, ``i`` = 0, 1, 2 for q, k, v) sits at ``n * 3 C / heads + 3 * c + i``.
        """
        if self.attention_impl == "sdpa":
            q, k, v = rearrange(self.qkv(x), "b (heads c three) h w -> three b heads (h w) c",
                                heads=self.num_heads, three=3)  # each (B, heads, HW, C / heads)
            out = nn.functional.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C / heads)
            return rearrange(out, "b heads (h w) c -> b (heads c) h w", h=x.shape[2])
        qkv = rearrange(self.qkv(x), "b (heads c three) h w -> (b heads) c three (h w)",
                        heads=self.num_heads, three=3)
        q, k, v = qkv.unbind(2)  # each (B * heads, C / heads, H * W)
        logits = torch.einsum("ncq,nck->nqk", q.float(), k.float()) / math.sqrt(k.shape[1])
        weights = logits.softmax(dim=2).to(x.dtype)  # (B * heads, HW_query, HW_key)
        out = torch.einsum("nqk,nck->ncq", weights, v)
        return rearrange(out, "(b heads) c (h w) -> b (heads c) h w", heads=self.num_heads, h=x.shape[2])
