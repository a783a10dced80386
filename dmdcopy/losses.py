"""The DMD / DMD2 losses as pure functions of tensors and denoisers.

Every loss returns one value per sample, shape ``(B,)``; its ``.mean()`` is the loss a training
step minimises (and, averaged over processes, the loss of the global batch).

- :func:`dsm_loss`: the denoising loss that trains the fake score on generator samples.
- :func:`dmd_gradient` / :func:`dmd_direction`: the distribution-matching gradient
  ``g = (D_fake(x_t) - D_real(x_t)) / w`` with the per-sample normaliser ``w = mean |x - D_real(x_t)|``
  (DMD eq. 8, DMD2's implementation), and :func:`dmd_surrogate_loss`, ``0.5 ||x - sg(x - g)||^2``,
  whose gradient with respect to ``x`` is ``g`` divided by the number of elements.
- :func:`gan_discriminator_loss` / :func:`gan_generator_loss`: non-saturating softplus losses of
  DMD2, on logits of a :class:`ClassifierHead` that reads features of the fake score through a
  :class:`FeatureHook` on a named submodule.
- :func:`l2_regression_loss` / :func:`pseudo_huber_loss`: the regression loss of DMD v1 against
  stored teacher pairs ``(z, T(z))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from dmdcopy._checks import check_x_sigma
from dmdcopy.contracts import broadcast, denoise
from dmdcopy.errors import ConfigError, ShapeError
from dmdcopy.schedules import edm_weight

__all__ = [
    "ClassifierHead",
    "FeatureHook",
    "dmd_direction",
    "dmd_gradient",
    "dmd_surrogate_loss",
    "dsm_loss",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "l2_regression_loss",
    "pseudo_huber_loss",
]

Weighting = Callable[[torch.Tensor, float], torch.Tensor]


def _per_sample_mean(t: torch.Tensor) -> torch.Tensor:
    """``(B, ...) -> (B,)``: mean over every non-batch dim."""
    return t.reshape(t.shape[0], -1).mean(dim=1)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Losses accumulate in at least float32 (bf16/fp16 inputs under autocast are upcast)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _same_shape(a: torch.Tensor, b: torch.Tensor, names: str, where: str) -> None:
    if a.shape != b.shape:
        raise ShapeError(f"{where}: {names} must have the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


def dsm_loss(
    denoised: torch.Tensor,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    *,
    weighting: Weighting = edm_weight,
    sigma_data: float = 0.5,
) -> torch.Tensor:
    """Weighted denoising loss ``lambda(sigma) mean ||D(x0 + sigma n; sigma) - x0||^2`` (EDM eq. 2).

    Args:
        denoised: ``(B, ...)``, the denoiser's output at ``x0 + sigma * n``.
        x0: ``(B, ...)``, the clean samples (generator outputs for DMD's fake score).
        sigma: ``(B,)`` noise levels.
        weighting: ``lambda(sigma, sigma_data) -> (B,)``; DMD2's fake score uses
            :func:`dmdcopy.schedules.edm_weight`, ``sigma^-2 + sigma_data^-2`` (DMD2's 'karras').

    Returns: ``(B,)``.

    >>> x0 = torch.zeros(2, 3)
    >>> dsm_loss(x0 + 1, x0, torch.ones(2), weighting=lambda s, sd: torch.ones_like(s)).tolist()
    [1.0, 1.0]
    """
    _same_shape(denoised, x0, "denoised and x0", "dsm_loss")
    check_x_sigma(x0, sigma, "dsm_loss")
    err = _per_sample_mean((_acc(denoised) - _acc(x0)) ** 2)
    return weighting(sigma.to(err.dtype), sigma_data) * err


def dmd_direction(
    x: torch.Tensor,
    real_denoised: torch.Tensor,
    fake_denoised: torch.Tensor,
    *,
    min_normaliser: float = 1e-6,
) -> torch.Tensor:
    """``g = (D_fake - D_real) / w`` with ``w = mean_over_non_batch |x - D_real|`` per sample.

    ``w`` is clamped below at ``min_normaliser``; NaN and infinite entries of ``g`` become 0 (a
    non-finite ``x`` still makes the surrogate loss non-finite, so the step is caught and skipped).
    All inputs ``(B, ...)``; returns ``(B, ...)``, detached.

    >>> x = torch.ones(2, 4)
    >>> dmd_direction(x, torch.zeros(2, 4), torch.zeros(2, 4)).abs().max().item()
    0.0
    """
    _same_shape(x, real_denoised, "x and real_denoised", "dmd_direction")
    _same_shape(x, fake_denoised, "x and fake_denoised", "dmd_direction")
    x, real, fake = _acc(x.detach()), _acc(real_denoised.detach()), _acc(fake_denoised.detach())
    w = _per_sample_mean((x - real).abs()).clamp(min=min_normaliser)  # (B,) per-sample normaliser
    g = (fake - real) / broadcast(w, x)
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_gradient(
    x: torch.Tensor,
    sigma: torch.Tensor,
    real: Callable[..., torch.Tensor],
    fake: Callable[..., torch.Tensor],
    *,
    noise: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    min_normaliser: float = 1e-6,
) -> torch.Tensor:
    """The DMD gradient at generator samples ``x``: noise them, then :func:`dmd_direction`.

    ``x_t = x + sigma * noise``, ``g = (fake(x_t) - real(x_t)) / mean|x - real(x_t)|``.

    Args:
        x: ``(B, ...)`` generator samples (detached here).
        sigma: ``(B,)`` noise levels; ``noise``: ``(B, ...)`` standard normal.
        real, fake: denoisers ``D(x, sigma, class_labels=None)`` (teacher and fake score).

    Returns: ``(B, ...)`` detached. Call it under ``torch.no_grad()`` so no graph is kept through
    the fake score's parameters.
    """
    check_x_sigma(x, sigma, "dmd_gradient")
    _same_shape(x, noise, "x and noise", "dmd_gradient")
    x = x.detach()
    x_t = x + broadcast(sigma.to(x.dtype), x) * noise.to(x.dtype)
    real_x0 = denoise(real, x_t, sigma, class_labels)
    fake_x0 = denoise(fake, x_t, sigma, class_labels)
    return dmd_direction(x, real_x0, fake_x0, min_normaliser=min_normaliser)


def dmd_surrogate_loss(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``0.5 mean ||x - sg(x - g)||^2`` per sample: ``(B, ...) -> (B,)``.

    The gradient of its batch mean with respect to ``x`` is ``g / x.numel()``, so the optimiser
    sees the DMD gradient whatever scale the loss value has.

    >>> x = torch.ones(2, 3, requires_grad=True)
    >>> g = torch.full((2, 3), 6.0)
    >>> dmd_surrogate_loss(x, g).mean().backward()
    >>> x.grad.unique().item()
    1.0
    """
    _same_shape(x, g, "x and g", "dmd_surrogate_loss")
    target = (x - g.to(x.dtype)).detach()
    return 0.5 * _per_sample_mean((_acc(x) - _acc(target)) ** 2)


# --- GAN (DMD2) -------------------------------------------------------------------------------


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating discriminator loss ``softplus(l_fake) + softplus(-l_real)``, per sample ``(B,)``.

    Logits ``(B,)`` or ``(B, 1)``; the real and fake batches must have the same size.
    """
    lr, lf = logits_real.reshape(logits_real.shape[0], -1), logits_fake.reshape(logits_fake.shape[0], -1)
    _same_shape(lr, lf, "logits_real and logits_fake", "gan_discriminator_loss")
    return (F.softplus(_acc(lf)) + F.softplus(-_acc(lr))).mean(dim=1)


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``softplus(-l_fake)``, per sample ``(B,)``."""
    return F.softplus(-_acc(logits_fake.reshape(logits_fake.shape[0], -1))).mean(dim=1)


class FeatureHook:
    """Keeps the latest output of ``model.get_submodule(name)`` through a forward hook.

    Works for any module tree: for an ``EDMPrecond(MLP)`` a name like ``"model.blocks.1"``, for a
    UNet its bottleneck block. A tuple output keeps its first element. ``features`` holds the output
    of the most recent forward call; ``remove()`` detaches the hook.

    >>> net = nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 1))
    >>> hook = FeatureHook(net, "0")
    >>> _ = net(torch.zeros(3, 2))
    >>> hook.features.shape
    torch.Size([3, 4])
    """

    def __init__(self, model: nn.Module, name: str) -> None:
        try:
            module = model.get_submodule(name)
        except AttributeError as e:
            names = [n for n, _ in model.named_modules() if n][:20]
            raise ConfigError(f"gan_feature_module: {type(model).__name__} has no submodule {name!r}; "
                              f"some that exist: {names}") from e
        self.name = name
        self.features: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: object, output: object) -> None:
        self.features = output[0] if isinstance(output, (tuple, list)) else output

    def pop(self) -> torch.Tensor:
        """The kept features, clearing the slot (so stale features are never read twice)."""
        if self.features is None:
            raise RuntimeError(f"FeatureHook({self.name!r}): no forward call since the last pop()")
        out, self.features = self.features, None
        return out

    def remove(self) -> None:
        self._handle.remove()


class ClassifierHead(nn.Module):
    """A small discriminator head ``features (B, ...) -> logits (B,)``, sized from one feature shape.

    Image-like features ``(B, C, H, W)`` get a 3x3 conv, GroupNorm, SiLU, a global average pool and a
    linear layer (DMD2 puts a conv head on the UNet bottleneck); vectors ``(B, C)`` get a 2-layer MLP;
    anything else is flattened first.

    Args:
        feature_shape: the per-sample feature shape, e.g. ``(256,)`` or ``(512, 8, 8)``.
        hidden: width of the hidden layer (default: the channel count, at most 512).
    """

    def __init__(self, feature_shape: tuple[int, ...], hidden: int | None = None) -> None:
        super().__init__()
        self.feature_shape = tuple(int(s) for s in feature_shape)
        if not self.feature_shape:
            raise ShapeError("ClassifierHead: features must have at least one non-batch dim")
        C = self.feature_shape[0]
        if len(self.feature_shape) == 3:
            h = hidden or min(C, 512)
            groups = math.gcd(32, h)
            self.net = nn.Sequential(
                nn.Conv2d(C, h, 3, padding=1), nn.GroupNorm(groups, h), nn.SiLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(h, 1),
            )
        else:
            n = math.prod(self.feature_shape)
            h = hidden or min(n, 512)
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(n, h), nn.SiLU(), nn.Linear(h, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features: (B, *feature_shape) -> (B,)`` logits (features cast to the head's dtype)."""
        if tuple(features.shape[1:]) != self.feature_shape:
            raise ShapeError(f"ClassifierHead: expected features (B, {self.feature_shape}), "
                             f"got {tuple(features.shape)}")
        weight_dtype = next(self.parameters()).dtype
        return self.net(features.to(weight_dtype)).squeeze(1)


# --- regression to teacher pairs (DMD v1) ---------------------------------------------------------


def l2_regression_loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean ||G(z) - T(z)||^2`` per sample: ``(B, ...) -> (B,)``."""
    _same_shape(x, target, "x and target", "l2_regression_loss")
    return _per_sample_mean((_acc(x) - _acc(target)) ** 2)


def pseudo_huber_loss(x: torch.Tensor, target: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """Pseudo-Huber ``sqrt(||x - y||^2 + c^2) - c`` per sample: ``(B, ...) -> (B,)``.

    ``c`` defaults to ``0.00054 sqrt(d)`` with ``d`` the per-sample dimension (Song & Dhariwal 2023).
    Quadratic (``||x - y||^2 / 2c``) for small errors, linear for large ones.
    """
    _same_shape(x, target, "x and target", "pseudo_huber_loss")
    d = x[0].numel() if x.shape[0] else 1
    c = 0.00054 * math.sqrt(d) if c is None else float(c)
    if c <= 0:
        raise ConfigError(f"pseudo_huber_loss: c must be > 0, got {c}")
    sq = ((_acc(x) - _acc(target)) ** 2).reshape(x.shape[0], -1).sum(dim=1)
    return (sq + c * c).sqrt() - c
