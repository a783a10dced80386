"""EDM-compatible image networks: ``SongUNet`` (DDPM++ / NCSN++) and ``DhariwalUNet`` (ADM).

Both take the constructor options of EDM's ``training/networks.py`` and build parameters with the
same names, shapes and registration order, so the state dict of an EDM ``EDMPrecond`` (keys
``model.*``) loads into ``dmdcopy.precond.EDMPrecond(SongUNet(...))`` with ``strict=True`` and
gives the same outputs. Both are raw networks ``F(x_in, noise_labels, class_labels)``: put them
behind a preconditioning wrapper to get a denoiser::

    >>> import torch
    >>> from dmdcopy.precond import EDMPrecond
    >>> net = SongUNet(img_resolution=8, in_channels=3, out_channels=3, model_channels=16,
    ...                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    >>> D = EDMPrecond(net)
    >>> D(torch.randn(2, 3, 8, 8), torch.full((2,), 1.0)).shape
    torch.Size([2, 3, 8, 8])

Each network records its options in ``init_kwargs`` (a JSON-able dict bound from the constructor's
signature by :func:`~dmdcopy._record.records_init_kwargs`; ``type(net)(**net.init_kwargs)``
rebuilds it) and exposes ``label_dim`` and ``sample_shape = (in_channels, img_resolution,
img_resolution)``, which the wrappers read. Set ``net.gradient_checkpointing = True`` to recompute
block activations in the backward pass (less memory, more compute; a runtime switch, not an
architecture option). Half precision is the wrapper's job (``net_dtype=``, EDM's ``use_fp16``):
the layers cast their float32 parameters to the input's dtype.

(About 460 lines: the two EDM networks, kept parameter-name-compatible with EDM's code and
compared with it line by line, so they stay side by side as EDM has them.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.functional import silu
from torch.utils.checkpoint import checkpoint

from dmdcopy._record import records_init_kwargs
from dmdcopy.errors import ConfigError, ShapeError
from dmdcopy.nets.layers import (
    Conv2d,
    FourierEmbedding,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    UNetBlock,
    check_attention_impl,
)

__all__ = ["DhariwalUNet", "SongUNet", "set_attention_impl"]


def _check_options(name: str, channel_mult: Sequence[int], **positive: int) -> None:
    """Raise ConfigError unless every ``positive`` option is >= 1 and the levels fit the resolution."""
    for field, value in positive.items():
        if int(value) < 1:
            raise ConfigError(f"{name}: {field} must be >= 1, got {value}")
    if not channel_mult:
        raise ConfigError(f"{name}: channel_mult must have at least one entry")
    factor = 2 ** (len(channel_mult) - 1)
    if positive["img_resolution"] % factor:
        raise ConfigError(
            f"{name}: img_resolution={positive['img_resolution']} must be divisible by "
            f"2^(len(channel_mult) - 1) = {factor} (one halving per level)"
        )


class _UNetBase(nn.Module):
    """Input checks and the block loop shared by both networks."""

    in_channels: int
    label_dim: int
    augment_dim: int
    levels: int
    gradient_checkpointing: bool

    def _check_inputs(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None,
    ) -> None:
        name = type(self).__name__
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ShapeError(
                f"{name}: expected x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        factor = 2 ** (self.levels - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ShapeError(f"{name}: H and W must be divisible by {factor}, got {tuple(x.shape)}")
        if noise_labels.shape != (x.shape[0],):
            raise ShapeError(
                f"{name}: expected noise_labels of shape ({x.shape[0]},), got {tuple(noise_labels.shape)}"
            )
        if self.label_dim:
            if class_labels is None:
                raise ShapeError(
                    f"{name}: the network is conditional (label_dim={self.label_dim}); "
                    f"pass class_labels of shape (B, {self.label_dim})"
                )
            if class_labels.ndim != 2 or class_labels.shape[1] != self.label_dim or (
                class_labels.shape[0] not in (1, x.shape[0])
            ):
                raise ShapeError(
                    f"{name}: expected class_labels of shape ({x.shape[0]}, {self.label_dim}), "
                    f"got {tuple(class_labels.shape)}"
                )
        elif class_labels is not None:
            raise ShapeError(f"{name}: got class_labels but the network is unconditional (label_dim=0)")
        if self.augment_dim and augment_labels is not None and (
            augment_labels.shape != (x.shape[0], self.augment_dim)
        ):
            raise ShapeError(
                f"{name}: expected augment_labels of shape ({x.shape[0]}, {self.augment_dim}), "
                f"got {tuple(augment_labels.shape)}"
            )

    def _drop_labels(self, class_labels: torch.Tensor, batch: int) -> torch.Tensor:
        """Zero each sample's label with probability ``label_dropout`` while training (CFG).

        ``class_labels: (B or 1, label_dim) -> (B or 1 when not training, label_dim)``.
        """
        if not (self.training and self.label_dropout):
            return class_labels
        keep = torch.rand(batch, 1, device=class_labels.device) >= self.label_dropout
        return class_labels * keep.to(class_labels.dtype)

    def _block(self, block: UNetBlock, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, emb, use_reentrant=False)
        return block(x, emb)


@records_init_kwargs
class SongUNet(_UNetBase):
    """DDPM++ / NCSN++ UNet (Song et al. 2021, as reimplemented in EDM).

    ``forward(x, noise_labels, class_labels, augment_labels=None)``: ``x: (B, in_channels, H, W)``,
    ``noise_labels: (B,)`` (``c_noise``), ``class_labels: (B, label_dim)`` or ``None`` when
    ``label_dim == 0``, ``augment_labels: (B, augment_dim)`` or ``None`` (ignored when
    ``augment_dim == 0``). Returns ``(B, out_channels, H, W)``.

    Args (EDM's names and defaults):
        img_resolution: image side at input and output.
        in_channels, out_channels: colour channels at input and output.
        label_dim: number of classes, 0 = unconditional.
        augment_dim: dimension of augmentation labels, 0 = none.
        model_channels: base channel count.
        channel_mult: per-level channel multipliers (level ``l`` runs at ``img_resolution / 2^l``).
        channel_mult_emb: embedding width = ``model_channels * channel_mult_emb``.
        num_blocks: residual blocks per level in the encoder (``+1`` in the decoder).
        attn_resolutions: resolutions whose blocks have self-attention.
        dropout: dropout probability inside the blocks.
        label_dropout: probability of zeroing a sample's label while training (for CFG).
        embedding_type: ``"positional"`` (DDPM++) or ``"fourier"`` (NCSN++) noise embedding.
        channel_mult_noise: noise embedding width = ``model_channels * channel_mult_noise``
            (1 for DDPM++, 2 for NCSN++).
        encoder_type: ``"standard"`` (DDPM++), ``"skip"`` or ``"residual"`` (NCSN++).
        decoder_type: ``"standard"`` or ``"skip"``.
        resample_filter: FIR taps of the resampling filter, ``[1, 1]`` (DDPM++) or
            ``[1, 3, 3, 1]`` (NCSN++).
        attention_impl: dmdcopy's option, not EDM's: ``"exact"`` (EDM's float32 einsum, bit for
            bit EDM's outputs) or ``"sdpa"`` (``scaled_dot_product_attention``, faster on GPUs; see
            :mod:`dmdcopy.nets.layers`). It changes no parameter, so weights load either way.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
        attention_impl: str = "exact",
    ) -> None:
        check_attention_impl("SongUNet", attention_impl)
        for field, value, allowed in (
            ("embedding_type", embedding_type, ("fourier", "positional")),
            ("encoder_type", encoder_type, ("standard", "skip", "residual")),
            ("decoder_type", decoder_type, ("standard", "skip")),
        ):
            if value not in allowed:
                raise ConfigError(f"SongUNet: {field} must be one of {allowed}, got {value!r}")
        _check_options(
            "SongUNet", channel_mult, img_resolution=img_resolution,
            in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
            channel_mult_emb=channel_mult_emb, channel_mult_noise=channel_mult_noise,
        )
        super().__init__()
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.augment_dim = int(label_dim), int(augment_dim)
        self.sample_shape = (in_channels, img_resolution, img_resolution)
        self.label_dropout = float(label_dropout)
        self.levels = len(channel_mult)
        self.gradient_checkpointing = False

        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn, attention_impl=attention_impl,
        )

        # Mapping: noise (+ label, + augmentation) embedding -> two-layer MLP.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder. `aux` is the input image path of the NCSN++ skip/residual encoders.
        self.enc = nn.ModuleDict()
        c_out = c_aux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                c_out = model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(in_channels, c_out, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(c_out, c_out, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(
                        c_aux, c_aux, kernel=0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(c_aux, c_out, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        c_aux, c_out, kernel=3, down=True, resample_filter=resample_filter,
                        fused_resample=True, **init,
                    )
                    c_aux = c_out
            for idx in range(num_blocks):
                c_in, c_out = c_out, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    c_in, c_out, attention=res in attn_resolutions, **block
                )
        skips = [m.out_channels for name, m in self.enc.items() if "aux" not in name]

        # Decoder: blocks named `*_block<i>` take the matching encoder output concatenated.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(c_out, c_out, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(c_out, c_out, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(c_out, c_out, up=True, **block)
            for idx in range(num_blocks + 1):
                c_in, c_out = c_out + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    c_in, c_out, attention=idx == num_blocks and res in attn_resolutions, **block
                )
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(c_out, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(c_out, out_channels, kernel=3, **init_zero)

    def embedding(
        self,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The conditioning vector every block receives, ``(B,) -> (B, model_channels * channel_mult_emb)``.

        ``silu(map_layer1(silu(map_layer0([sin | cos](noise) + map_label(sqrt(label_dim) y)
        + map_augment(a)))))``; inputs are not checked here (``forward`` does).
        """
        emb = self.map_noise(noise_labels)  # (B, noise_channels) = [cos | sin]
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # -> [sin | cos]
        if self.map_label is not None:
            labels = self._drop_labels(class_labels.to(emb.dtype), noise_labels.shape[0])
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        return silu(self.map_layer1(silu(self.map_layer0(emb))))

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_inputs(x, noise_labels, class_labels, augment_labels)
        emb = self.embedding(noise_labels, class_labels, augment_labels)

        skips, aux = [], x
        for name, layer in self.enc.items():
            if name.endswith("aux_down"):
                aux = layer(aux)
            elif name.endswith("aux_skip"):
                x = skips[-1] = x + layer(aux)
            elif name.endswith("aux_residual"):
                x = skips[-1] = aux = (x + layer(aux)) / math.sqrt(2)
            elif isinstance(layer, UNetBlock):
                x = self._block(layer, x, emb)
                skips.append(x)
            else:
                x = layer(x)
                skips.append(x)

        out = h = None  # out: the image-space output path; h: its normalised features
        for name, layer in self.dec.items():
            if name.endswith("aux_up"):
                out = layer(out)
            elif name.endswith("aux_norm"):
                h = layer(x)
            elif name.endswith("aux_conv"):
                h = layer(silu(h))
                out = h if out is None else h + out
            else:
                if "_block" in name:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = self._block(layer, x, emb)
        return out


@records_init_kwargs
class DhariwalUNet(_UNetBase):
    """ADM UNet (Dhariwal & Nichol 2021, as reimplemented in EDM).

    ``forward(x, noise_labels, class_labels, augment_labels=None)`` with the shapes of
    :class:`SongUNet`. Attention blocks have ``out_channels // 64`` heads; a block with fewer
    than 64 channels has no attention (as in EDM).

    Args (EDM's names and defaults): ``img_resolution``, ``in_channels``, ``out_channels``,
    ``label_dim``, ``augment_dim``, ``model_channels`` (192), ``channel_mult`` ([1, 2, 3, 4]),
    ``channel_mult_emb`` (4), ``num_blocks`` (3), ``attn_resolutions`` ([32, 16, 8]),
    ``dropout`` (0.1), ``label_dropout`` (0), with the meanings of :class:`SongUNet`, and
    dmdcopy's ``attention_impl`` (``"exact"`` or ``"sdpa"``, as :class:`SongUNet`).
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (32, 16, 8),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        attention_impl: str = "exact",
    ) -> None:
        check_attention_impl("DhariwalUNet", attention_impl)
        _check_options(
            "DhariwalUNet", channel_mult, img_resolution=img_resolution,
            in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
            channel_mult_emb=channel_mult_emb,
        )
        super().__init__()
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.augment_dim = int(label_dim), int(augment_dim)
        self.sample_shape = (in_channels, img_resolution, img_resolution)
        self.label_dropout = float(label_dropout)
        self.levels = len(channel_mult)
        self.gradient_checkpointing = False

        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block = dict(
            emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
            init_zero=init_zero, attention_impl=attention_impl,
        )

        # Mapping: positional noise embedding (+ augmentation) -> MLP; the label enters after it.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = (
            Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        )
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (
            Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                   init_weight=math.sqrt(label_dim))
            if label_dim else None
        )

        self.enc = nn.ModuleDict()
        c_out = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                c_out = model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(in_channels, c_out, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(c_out, c_out, down=True, **block)
            for idx in range(num_blocks):
                c_in, c_out = c_out, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    c_in, c_out, attention=res in attn_resolutions, **block
                )
        skips = [m.out_channels for m in self.enc.values()]

        # Decoder: blocks named `*_block<i>` take the matching encoder output concatenated.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(c_out, c_out, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(c_out, c_out, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(c_out, c_out, up=True, **block)
            for idx in range(num_blocks + 1):
                c_in, c_out = c_out + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    c_in, c_out, attention=res in attn_resolutions, **block
                )
        self.out_norm = GroupNorm(c_out)
        self.out_conv = Conv2d(c_out, out_channels, kernel=3, **init_zero)

    def embedding(
        self,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The conditioning vector every block receives, ``(B,) -> (B, model_channels * channel_mult_emb)``.

        ``silu(map_layer1(silu(map_layer0([cos | sin](noise) + map_augment(a)))) + map_label(y))``;
        inputs are not checked here (``forward`` does).
        """
        emb = self.map_noise(noise_labels)  # (B, model_channels) = [cos | sin]
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = self.map_layer1(silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = self._drop_labels(class_labels.to(emb.dtype), noise_labels.shape[0])
            emb = emb + self.map_label(labels)
        return silu(emb)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_inputs(x, noise_labels, class_labels, augment_labels)
        emb = self.embedding(noise_labels, class_labels, augment_labels)

        skips = []
        for layer in self.enc.values():
            x = self._block(layer, x, emb) if isinstance(layer, UNetBlock) else layer(x)
            skips.append(x)
        for name, layer in self.dec.items():
            if "_block" in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = self._block(layer, x, emb)
        return self.out_conv(silu(self.out_norm(x)))


def set_attention_impl(net: nn.Module, impl: str) -> nn.Module:
    """Switch every attention block of ``net`` (a SongUNet / DhariwalUNet, or any module holding
    them, e.g. an ``EDMPrecond`` or a student) to ``impl`` (``"exact"`` or ``"sdpa"``) in place,
    keeping the recorded ``init_kwargs`` in step so a saved file rebuilds the same choice. Returns
    ``net``. Parameters are untouched: the switch is for networks built or loaded with the other one.
    """
    check_attention_impl("set_attention_impl", impl)
    for m in net.modules():
        if isinstance(m, UNetBlock):
            m.attention_impl = impl
        elif isinstance(m, (SongUNet, DhariwalUNet)):
            m.init_kwargs["attention_impl"] = impl
    return net
