"""The DMD / DMD2 method: the losses of one fake-score update and of one generator update.

This module holds the method and nothing of the trainer (optimisers, DDP, checkpoints, logs live
in :mod:`dmdcopy.distill.distiller`), after FastGen's method/trainer split. Each function takes
the networks, the sub-step's :class:`~dmdcopy.distill.draws.Draws` and the config, and returns a
typed record of loss tensors; the trainer calls ``.loss.backward()`` on it.

Fake-score update: ``x = sg(G(z))``, ``k ~ U{0..999}``, ``x_t = x + sigma_k eps``,
minimise ``(sigma^-2 + sigma_data^-2) ||D_fake(x_t) - x||^2`` (+ the diffusion-GAN discriminator
loss on noisy fakes and noisy reals, read from the fake score's features).

Generator update (the distribution matching gradient of DMD): ``x = G(z)``, ``k ~ U{20..980}``,
``g = (D_fake(x_t) - D_real(x_t)) / mean|x - D_real(x_t)|``, minimise ``0.5 ||x - sg(x - g)||^2``
(+ the GAN generator loss, + regression to stored teacher pairs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from dmdcopy import contracts
from dmdcopy.contracts import broadcast, denoise
from dmdcopy.distill.config import DistillConfig
from dmdcopy.distill.draws import Draws, Stream
from dmdcopy.losses import (
    FeatureHook,
    dmd_gradient,
    dmd_surrogate_loss,
    dsm_loss,
    gan_discriminator_loss,
    gan_generator_loss,
)
from dmdcopy.schedules import edm_weight
from dmdcopy.students import MultiStepStudent

__all__ = [
    "FakeScoreLosses",
    "FakeScoreRecord",
    "GeneratorLosses",
    "GeneratorRecord",
    "Networks",
    "fake_score_loss",
    "generate",
    "generator_loss",
]

Autocast = Callable[[], AbstractContextManager]


@dataclass(frozen=True)
class Networks:
    """The networks of a run. ``*_call`` is what the forward pass that trains a network calls (the
    DistributedDataParallel and/or compiled wrapper of the plain module, or the module itself)."""

    teacher: Callable[..., torch.Tensor]  # the real score D_real, frozen
    student: nn.Module                    # G, plain: samples for the fake score, without grad
    student_call: Callable[..., torch.Tensor]
    fake_score: nn.Module                 # D_fake, plain: read by the generator update
    fake_score_call: Callable[..., torch.Tensor]
    discriminator: nn.Module | None = None       # GAN head on the fake score's features
    discriminator_call: Callable[..., torch.Tensor] | None = None
    hook: FeatureHook | None = None       # keeps the fake score's features for the head


@dataclass(frozen=True)
class FakeScoreLosses:
    """Loss tensors of one fake-score update (this process's batch means)."""

    loss: torch.Tensor         # total, minimised
    dsm: torch.Tensor          # weighted denoising loss on generator samples
    gan: torch.Tensor | None   # discriminator softplus loss (None without GAN)


@dataclass(frozen=True)
class GeneratorLosses:
    """Loss tensors of one generator update (this process's batch means)."""

    loss: torch.Tensor
    dmd: torch.Tensor                 # surrogate 0.5 mean ||x - sg(x - g)||^2
    gan: torch.Tensor | None          # generator softplus loss (None without GAN)
    regression: torch.Tensor | None   # regression to teacher pairs (None when off)
    teacher_finite: torch.Tensor | None = None  # () bool: every teacher output was finite


@dataclass(frozen=True)
class FakeScoreRecord:
    """Metrics of one fake-score update (losses are this process's batch means)."""

    loss: float                 # total loss minimised
    dsm_loss: float             # weighted denoising loss on generator samples
    gan_loss: float | None      # discriminator softplus loss (None without GAN)
    grad_norm: float            # global grad norm before clipping
    skipped: bool               # non-finite loss or gradient: no update made


@dataclass(frozen=True)
class GeneratorRecord:
    """Metrics of one generator update."""

    loss: float
    dmd_loss: float             # surrogate 0.5 mean ||x - sg(x - g)||^2
    gan_loss: float | None      # generator softplus loss (None without GAN)
    regression_loss: float | None  # regression to teacher pairs (None when off)
    grad_norm: float
    skipped: bool


@contextlib.contextmanager
def _frozen(*modules: nn.Module | None) -> Iterator[None]:
    """Parameters of ``modules`` get no gradient inside (the generator's GAN term)."""
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def generate(G: Callable[..., torch.Tensor], student: nn.Module, z: torch.Tensor,
             labels: torch.Tensor | None, draws: Draws) -> torch.Tensor:
    """Student samples ``G(z)``, ``z: (B, ...)``. A :class:`MultiStepStudent` (``student``, the
    plain module behind ``G``) trains one step, the same for the whole batch (DMD2's backward
    simulation), with its re-injected noise drawn per sample."""
    if not isinstance(student, MultiStepStudent):
        return contracts.generate(G, z, labels)
    J = student.num_steps
    noise = draws.noise(Stream.RENOISE, (J - 1, *draws.sample_shape))  # (B, J-1, ...)
    noise = noise.transpose(0, 1).contiguous()  # (J-1, B, ...), the student's layout
    return contracts.generate(G, z, labels, noise=noise, train_step=draws.train_step(J))


def fake_score_loss(
    nets: Networks, draws: Draws, config: DistillConfig, *, autocast: Autocast,
    real: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> FakeScoreLosses:
    """The fake score's denoising loss on fresh student samples (+ GAN discriminator loss).

    Args:
        real: ``(x_real: (B, ...), labels: (B,) or None)``, the GAN's real samples (with ``config.gan``).
    """
    cfg = config
    labels = draws.labels()
    z = draws.z()
    with torch.no_grad(), autocast():
        x = generate(nets.student, nets.student, z, labels, draws).to(draws.dtype)  # sg(G(z))
    b = x.shape[0]
    sigma = draws.sigma(Stream.K, cfg.fake_score_k_range)
    x_t = x + broadcast(sigma, x) * draws.noise(Stream.EPS)
    inputs, sigmas, labs = [x_t], [sigma], [labels]
    if cfg.gan:  # the diffusion GAN sees noisy fakes and noisy reals in the same forward
        x_real, l_real = real
        s_fake = draws.sigma(Stream.K_GAN, cfg.gan_k_range)
        s_real = draws.sigma(Stream.K_GAN_REAL, cfg.gan_k_range)
        inputs += [x + broadcast(s_fake, x) * draws.noise(Stream.EPS_GAN),
                   x_real + broadcast(s_real, x) * draws.noise(Stream.EPS_GAN_REAL)]
        sigmas += [s_fake, s_real]
        labs += [labels, l_real]
    all_labels = torch.cat(labs) if labels is not None else None

    with autocast():
        out = denoise(nets.fake_score_call, torch.cat(inputs), torch.cat(sigmas), all_labels)
    # denoising loss weighted by lambda(sigma) = sigma^-2 + sigma_data^-2 (EDM, DMD2)
    dsm = dsm_loss(out[:b], x, sigma, weighting=edm_weight, sigma_data=cfg.sigma_data).mean()
    loss, gan = dsm, None
    if cfg.gan:
        feats = nets.hook.pop()[b:]  # (2b, ...): noisy fakes, then noisy reals
        logits = nets.discriminator_call(feats)
        gan = gan_discriminator_loss(logits[b:], logits[:b]).mean()
        loss = loss + cfg.gan_discriminator_weight * gan
    return FakeScoreLosses(loss, dsm, gan)


def generator_loss(
    nets: Networks, draws: Draws, config: DistillConfig, *, autocast: Autocast,
    regression: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    regression_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> GeneratorLosses:
    """The generator's DMD loss (+ GAN generator loss, + regression to stored teacher pairs).

    Args:
        regression: ``(z: (R, ...), x_teacher: (R, ...), labels: (R,) or None)``, stored pairs
            ``x_teacher = T(z)``; their student samples come from the same forward pass.
        regression_fn: per-sample loss ``(x, x_teacher) -> (R,)``.
    """
    cfg = config
    labels = draws.labels()
    z = draws.z()
    b = z.shape[0]
    zs, labs = [z], [labels]
    if regression is not None:
        z_reg, x_reg, l_reg = regression
        zs.append(z_reg)
        labs.append(l_reg)
    all_labels = torch.cat(labs) if labels is not None else None

    with autocast():
        x_all = generate(nets.student_call, nets.student, torch.cat(zs), all_labels, draws).to(draws.dtype)
    x = x_all[:b]
    sigma = draws.sigma(Stream.K, cfg.generator_k_range)
    finite: list[torch.Tensor] = []

    def teacher(*args, **kwargs) -> torch.Tensor:
        # dmd_direction would turn a non-finite teacher output into a zero gradient: flag it
        out = nets.teacher(*args, **kwargs)
        finite.append(torch.isfinite(out).all())
        return out

    with torch.no_grad(), autocast():
        g = dmd_gradient(x, sigma, teacher, nets.fake_score, noise=draws.noise(Stream.EPS),
                         class_labels=labels, min_normaliser=cfg.min_normaliser)
    dmd = dmd_surrogate_loss(x, g).mean()  # d dmd / d x = g / numel
    loss, gan, reg = cfg.dmd_weight * dmd, None, None
    if cfg.gan:
        s_gan = draws.sigma(Stream.K_GAN, cfg.gan_k_range)
        x_noisy = x + broadcast(s_gan, x) * draws.noise(Stream.EPS_GAN)
        with _frozen(nets.fake_score, nets.discriminator), autocast():
            nets.hook.features = None
            denoise(nets.fake_score, x_noisy, s_gan, labels)
            logits = nets.discriminator(nets.hook.pop())
        gan = gan_generator_loss(logits).mean()
        loss = loss + cfg.gan_generator_weight * gan
    if regression is not None:
        reg = regression_fn(x_all[b:], x_reg).mean()
        loss = loss + cfg.regression_weight * reg
    teacher_finite = torch.stack(finite).all() if finite else None
    return GeneratorLosses(loss, dmd, gan, reg, teacher_finite)
