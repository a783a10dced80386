"""EDM2's magnitude-preserving UNet and its preconditioning with a learned uncertainty head.

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2),
config G: every layer keeps the expected magnitude (RMS) of its activations at 1. Weights are
normalised in the forward pass, so their own scale never matters (eqs. 47, 66); sums,
concatenations and the SiLU are rescaled so that unit-RMS inputs give unit-RMS outputs (eqs. 81,
88, 103); the noise level enters through cosine Fourier features of ``c_noise`` (eq. 75).

:class:`EDM2UNet` and :class:`EDM2Precond` take the options of EDM2's ``UNet`` and ``Precond``
(``training/networks_edm2.py``) under the same names, and build parameters under the same
names and shapes, so an EDM2 state dict (``unet.*``, ``logvar_fourier.*``, ``logvar_linear.*``)
loads with ``strict=True``. EDM2 passes the block options through ``**block_kwargs`` /
``**unet_kwargs``; here they are explicit keyword options, so that ``init_kwargs`` records them
and the pickle importer can allow exactly these names.

    >>> import torch
    >>> D = EDM2Precond(8, 3, label_dim=0, model_channels=16, channel_mult=[1, 2], num_blocks=1,
    ...                 attn_resolutions=[4], channels_per_head=8, logvar_channels=8)
    >>> D(torch.randn(2, 3, 8, 8), torch.full((2,), 1.0)).shape
    torch.Size([2, 3, 8, 8])

The ImageNet-64 presets of the paper (S, M, L, XL) are :func:`edm2_img64`.

(One module of a little over 400 lines: its parts are used only together, as in EDM2's own file.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from dmdcopy._checks import check_labels, check_sample_shape, check_x_sigma
from dmdcopy._record import records_init_kwargs
from dmdcopy.contracts import broadcast
from dmdcopy.errors import ConfigError, ShapeError

__all__ = ["Block", "EDM2Precond", "EDM2UNet", "MPConv", "MPFourier", "edm2_img64", "mp_cat", "mp_silu",
           "mp_sum", "normalize", "resample"]

# E[silu(x)^2] = 0.596^2 for x ~ N(0, 1): dividing by it keeps unit RMS (EDM2 eq. 81).
_SILU_RMS = 0.596


def normalize(x: torch.Tensor, dim: int | Sequence[int] | None = None, eps: float = 1e-4) -> torch.Tensor:
    """``x`` divided by its RMS over ``dim`` (all but the first by default), plus ``eps``.

    The norm is taken in float32; the result keeps ``x``'s dtype.
    """
    dims = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
    rms = norm * math.sqrt(norm.numel() / x.numel())  # norm / sqrt(elements per normalised slice)
    return x / (eps + rms).to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled back to unit RMS for unit-variance Gaussian input (EDM2 eq. 81)."""
    return F.silu(x) / _SILU_RMS


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """``(1 - t) a + t b`` rescaled to unit RMS for independent unit-RMS ``a``, ``b`` (eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation along ``dim`` where ``b`` contributes a share ``t`` of the total magnitude
    and ``a`` the rest, the whole keeping unit RMS (EDM2 eq. 103)."""
    n_a, n_b = a.shape[dim], b.shape[dim]
    scale = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (scale * (1 - t) / math.sqrt(n_a)), b * (scale * t / math.sqrt(n_b))], dim=dim)


def resample(x: torch.Tensor, f: Sequence[float] = (1, 1), mode: str = "keep") -> torch.Tensor:
    """Halve (``"down"``) or double (``"up"``) the resolution of ``x: (B, C, H, W)`` with the separable
    FIR filter ``f`` (normalised to unit sum; ``(1, 1)`` is box down / nearest up), or keep it."""
    if mode == "keep":
        return x
    taps = torch.as_tensor(f, dtype=torch.float32, device=x.device)
    kernel = torch.outer(taps, taps) / taps.sum() ** 2
    channels = x.shape[1]
    pad = (len(f) - 1) // 2
    if mode == "down":
        kernel = kernel.to(x.dtype).expand(channels, 1, -1, -1)  # (C, 1, k, k): one filter per channel
        return F.conv2d(x, kernel, groups=channels, stride=2, padding=pad)
    kernel = (kernel * 4).to(x.dtype).expand(channels, 1, -1, -1)  # 4 = gain of stride-2 upsampling
    return F.conv_transpose2d(x, kernel, groups=channels, stride=2, padding=pad)


class MPFourier(nn.Module):
    """``c_noise: (B,) -> (B, num_channels)``: ``sqrt(2) cos(2 pi (f c_noise + phi))`` with frozen
    random ``f ~ N(0, bandwidth^2)``, ``phi ~ U[0, 1)`` (buffers ``freqs``, ``phases``; eq. 75)."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (``kernel=[k, k]``) or linear layer (``kernel=[]``).

    The stored ``weight: (out, in, *kernel)`` is normalised per output channel to unit RMS and
    scaled by ``gain / sqrt(fan_in)`` in every call (eq. 47), so the output has the input's RMS
    times ``gain``. While training, the stored weight is also overwritten by its normalised copy
    before each use (forced weight normalisation, eq. 66), as EDM2 trains.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = self.weight.to(torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(nn.Module):
    """An encoder (``flavor="enc"``) or decoder (``"dec"``) block of EDM2's UNet (Figure 21).

    Encoder blocks resample, project to ``out_channels`` and pixel-normalise the main path before
    the residual branch; decoder blocks project the main path after it (their input carries the
    concatenated skip). The residual branch is modulated by ``1 + emb_linear(emb, gain=emb_gain)``
    and joined with weight ``res_balance``; self-attention (``num_heads = out_channels //
    channels_per_head``, none when that is 0, as in EDM2) normalises q, k, v per head and pixel and
    is joined with weight ``attn_balance``. Activations are clipped to ``+-clip_act``.
    """

    def __init__(
        self,
        in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
        resample_mode: str = "keep", resample_filter: Sequence[float] = (1, 1), attention: bool = False,
        channels_per_head: int = 64, dropout: float = 0.0, res_balance: float = 0.3,
        attn_balance: float = 0.3, clip_act: float | None = 256,
    ) -> None:
        super().__init__()
        if flavor not in ("enc", "dec") or resample_mode not in ("keep", "up", "down"):
            raise ConfigError(f"Block: flavor {flavor!r} / resample_mode {resample_mode!r} unknown")
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance = dropout, res_balance, attn_balance
        self.clip_act = clip_act
        # parameters in EDM2's order and names
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, [3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, [])
        self.conv_res1 = MPConv(out_channels, out_channels, [3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, [1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, [1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, [1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_filter, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm: unit RMS over channels at each pixel

        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1  # (B, C_out), 1 at initialisation
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            B, C, H, W = x.shape
            # qkv channels are laid out (head, channel, q/k/v): (B, heads, C / heads, 3, H W)
            qkv = self.attn_qkv(x).reshape(B, self.num_heads, -1, 3, H * W)
            q, k, v = normalize(qkv, dim=2).unbind(3)  # each (B, heads, c, HW), unit RMS over c
            attn = torch.einsum("bhcq,bhck->bhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum("bhqk,bhck->bhcq", attn, v).reshape(B, C, H, W)
            x = mp_sum(x, self.attn_proj(y), t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


def _check_edm2_options(label_dim: int, channel_mult: Sequence[int], **positive: int) -> None:
    for name, value in positive.items():
        if int(value) < 1:
            raise ConfigError(f"EDM2UNet: {name} must be >= 1, got {value}")
    if int(label_dim) < 0:
        raise ConfigError(f"EDM2UNet: label_dim must be >= 0, got {label_dim}")
    img_resolution = positive["img_resolution"]
    if not channel_mult or any(int(m) < 1 for m in channel_mult):
        raise ConfigError(f"EDM2UNet: channel_mult must be positive multipliers, got {list(channel_mult)}")
    if img_resolution % 2 ** (len(channel_mult) - 1):
        raise ConfigError(f"EDM2UNet: img_resolution={img_resolution} must be divisible by "
                          f"2^(len(channel_mult) - 1) = {2 ** (len(channel_mult) - 1)}")


@records_init_kwargs
class EDM2UNet(nn.Module):
    """EDM2's UNet, a raw network ``F(x_in, c_noise, class_labels)``.

    ``forward(x, noise_labels, class_labels=None)``: ``x: (B, img_channels, H, W)``,
    ``noise_labels: (B,)``, ``class_labels: (B, label_dim)`` (``None`` when unconditional); returns
    ``(B, img_channels, H, W)``. Parameters are named as EDM2's (``enc.64x64_conv.weight``,
    ``dec.8x8_in0.attn_qkv.weight``, ``out_gain``, ...).

    Args (EDM2's names and defaults):
        img_resolution, img_channels: image side and channels; label_dim: classes, 0 = none.
        model_channels: base width; level ``l`` has ``model_channels * channel_mult[l]`` channels.
        channel_mult_noise, channel_mult_emb: widths of the Fourier features and of the embedding
            in units of ``model_channels`` (``None``: the first and the largest level's).
        num_blocks: blocks per level in the encoder (``+1`` in the decoder).
        attn_resolutions: resolutions whose blocks have self-attention (and always the
            decoder's first block).
        label_balance: share of the class embedding against the noise embedding.
        concat_balance: share of the main path against the skip in each decoder concatenation.
        resample_filter, channels_per_head, dropout, res_balance, attn_balance, clip_act: the
            options of every :class:`Block` (EDM2's ``**block_kwargs``).
    """

    def __init__(
        self,
        img_resolution: int, img_channels: int, label_dim: int = 0, model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None, num_blocks: int = 3, attn_resolutions: Sequence[int] = (16, 8),
        label_balance: float = 0.5, concat_balance: float = 0.5,
        # the Block options (EDM2's **block_kwargs)
        resample_filter: Sequence[float] = (1, 1), channels_per_head: int = 64, dropout: float = 0.0,
        res_balance: float = 0.3, attn_balance: float = 0.3, clip_act: float | None = 256,
    ) -> None:
        _check_edm2_options(label_dim, channel_mult, img_resolution=img_resolution, img_channels=img_channels,
                            model_channels=model_channels, num_blocks=num_blocks)
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, int(label_dim)
        self.sample_shape = (img_channels, img_resolution, img_resolution)
        self.levels = len(channel_mult)
        block = dict(resample_filter=resample_filter, channels_per_head=channels_per_head, dropout=dropout,
                     res_balance=res_balance, attn_balance=attn_balance, clip_act=clip_act)
        widths = [model_channels * m for m in channel_mult]
        c_noise = model_channels * channel_mult_noise if channel_mult_noise is not None else widths[0]
        c_emb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(widths)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))  # the output starts at 0 (F = 0: D = c_skip x)

        self.emb_fourier = MPFourier(c_noise)
        self.emb_noise = MPConv(c_noise, c_emb, [])
        self.emb_label = MPConv(label_dim, c_emb, []) if label_dim else None

        self.enc = nn.ModuleDict()
        c = img_channels + 1  # the input gets a constant channel of ones
        for level, width in enumerate(widths):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(c, width, [3, 3])
                c = width
            else:
                self.enc[f"{res}x{res}_down"] = Block(c, c, c_emb, "enc", "down", **block)
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = Block(c, width, c_emb, "enc",
                                                          attention=res in attn_resolutions, **block)
                c = width

        self.dec = nn.ModuleDict()
        skips = [m.out_channels for m in self.enc.values()]
        for level in reversed(range(len(widths))):
            res, width = img_resolution >> level, widths[level]
            if level == len(widths) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(c, c, c_emb, "dec", attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = Block(c, c, c_emb, "dec", **block)
            else:
                self.dec[f"{res}x{res}_up"] = Block(c, c, c_emb, "dec", "up", **block)
            for i in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{i}"] = Block(c + skips.pop(), width, c_emb, "dec",
                                                          attention=res in attn_resolutions, **block)
                c = width
        self.out_conv = MPConv(c, img_channels, [3, 3])

    def _check_inputs(self, x: torch.Tensor, noise_labels: torch.Tensor,
                      class_labels: torch.Tensor | None) -> None:
        factor = 2 ** (self.levels - 1)
        if x.ndim != 4 or x.shape[1] != self.img_channels or x.shape[2] % factor or x.shape[3] % factor:
            raise ShapeError(f"EDM2UNet: expected x of shape (B, {self.img_channels}, H, W) with H and W "
                             f"divisible by {factor}, got {tuple(x.shape)}")
        if noise_labels.shape != (x.shape[0],):
            raise ShapeError(f"EDM2UNet: expected noise_labels of shape ({x.shape[0]},), "
                             f"got {tuple(noise_labels.shape)}")
        want = (x.shape[0], self.label_dim) if self.label_dim else None
        got = None if class_labels is None else tuple(class_labels.shape)
        if got != want:
            raise ShapeError(f"EDM2UNet: expected class_labels of shape {want} "
                             f"(label_dim={self.label_dim}), got {got}")

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(x, noise_labels, class_labels)
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            # one-hot labels have RMS 1 / sqrt(label_dim): scaled to unit RMS first
            emb = mp_sum(emb, self.emb_label(class_labels * math.sqrt(self.label_dim)), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)


@records_init_kwargs
class EDM2Precond(nn.Module):
    """EDM2's ``Precond``: EDM preconditioning of an :class:`EDM2UNet` (attribute ``unet``) plus
    the learned uncertainty ``u(sigma)`` of EDM2 eq. 21 (``logvar_fourier``, ``logvar_linear``).

    A denoiser ``D(x, sigma, class_labels=None) -> x0_hat`` (dmdcopy's contract): ``x: (B, C, H, W)``,
    ``sigma: (B,)``, ``class_labels: (B,)`` class indices or ``(B, label_dim)`` (required when
    conditional; EDM2 silently uses all-zero labels when given none, here pass zeros yourself).
    ``return_logvar=True`` returns ``(x0_hat, logvar)`` with ``logvar: (B, 1, 1, 1)``, as EDM2's;
    :meth:`logvar` gives it alone as ``(B,)``. The output has ``x``'s dtype; the UNet runs in
    float32, or float16 when ``use_fp16`` and ``x`` is on CUDA (EDM2's rule; the default here is
    ``False``, EDM2's is ``True``). The UNet options are :class:`EDM2UNet`'s.
    """

    def __init__(
        self,
        img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
        sigma_data: float = 0.5, logvar_channels: int = 128,
        # the EDM2UNet options (EDM2's **unet_kwargs)
        model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_noise: int | None = None, channel_mult_emb: int | None = None, num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8), label_balance: float = 0.5, concat_balance: float = 0.5,
        resample_filter: Sequence[float] = (1, 1), channels_per_head: int = 64, dropout: float = 0.0,
        res_balance: float = 0.3, attn_balance: float = 0.3, clip_act: float | None = 256,
    ) -> None:
        super().__init__()
        if not sigma_data > 0 or int(logvar_channels) < 1:
            raise ConfigError(f"EDM2Precond: sigma_data must be > 0 and logvar_channels >= 1, got "
                              f"{sigma_data}, {logvar_channels}")
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, int(label_dim)
        self.use_fp16, self.sigma_data = bool(use_fp16), float(sigma_data)
        self.sample_shape = (img_channels, img_resolution, img_resolution)
        self.sigma_min, self.sigma_max = 0.0, math.inf  # EDM2 declares no range
        self.unet = EDM2UNet(
            img_resolution, img_channels, label_dim, model_channels=model_channels,
            channel_mult=channel_mult, channel_mult_noise=channel_mult_noise,
            channel_mult_emb=channel_mult_emb, num_blocks=num_blocks, attn_resolutions=attn_resolutions,
            label_balance=label_balance, concat_balance=concat_balance, resample_filter=resample_filter,
            channels_per_head=channels_per_head, dropout=dropout, res_balance=res_balance,
            attn_balance=attn_balance, clip_act=clip_act,
        )
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, [])

    def logvar(self, sigma: torch.Tensor) -> torch.Tensor:
        """``u(sigma): (B,)``, the log-variance of the denoising error the network expects (eq. 21)."""
        c_noise = sigma.to(torch.float32).log() / 4
        return self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1).to(sigma.dtype)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None,
                return_logvar: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        check_x_sigma(x, sigma, "EDM2Precond")
        check_sample_shape(x, self.sample_shape, "EDM2Precond")
        labels = check_labels(class_labels, x.shape[0], self.label_dim, "EDM2Precond")
        net_dtype = torch.float16 if self.use_fp16 and x.device.type == "cuda" else torch.float32
        sigma = sigma.to(x.dtype)
        sd = self.sigma_data
        # EDM Table 1, as EDM2 uses it
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        x_in = (broadcast(c_in, x) * x).to(net_dtype)
        F_x = self.unet(x_in, c_noise.to(torch.float32), None if labels is None else labels.to(torch.float32))
        D_x = broadcast(c_skip, x) * x + broadcast(c_out, x) * F_x.to(x.dtype)
        if return_logvar:
            return D_x, broadcast(self.logvar(sigma), x)
        return D_x

    def extra_repr(self) -> str:
        return f"label_dim={self.label_dim}, sample_shape={self.sample_shape}, sigma_data={self.sigma_data}"


# EDM2's ImageNet-64 training presets (train_edm2.py, edm2-img64-*): model width and dropout;
# every other option is the UNet's default (channel_mult (1, 2, 3, 4), 3 blocks, attention at 16, 8).
_IMG64 = {"s": (192, 0.0), "m": (256, 0.10), "l": (320, 0.10), "xl": (384, 0.10)}


def edm2_img64(size: str = "s", *, dropout: float | None = None) -> dict:
    """Options of :class:`EDM2Precond` for EDM2's class-conditional ImageNet-64 network ``size``
    (``"s"``, ``"m"``, ``"l"``, ``"xl"``; about 280M, 498M, 777M and 1.1G parameters).

    ``dropout``: the preset's training dropout (0 for S, 0.1 otherwise) unless given; it does not
    change the parameters. EDM2 trained with ``use_fp16=True``, left to the caller here.

    >>> edm2_img64("m")["model_channels"]
    256
    """
    key = size.lower()
    if key not in _IMG64:
        raise ConfigError(f"edm2_img64: size must be one of {sorted(_IMG64)}, got {size!r}")
    channels, preset_dropout = _IMG64[key]
    return dict(img_resolution=64, img_channels=3, label_dim=1000, model_channels=channels,
                dropout=preset_dropout if dropout is None else float(dropout))
