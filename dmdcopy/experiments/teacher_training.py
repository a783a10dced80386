"""Train a teacher denoiser with the EDM loss over the *whole* noise range, and check its ODE.

A DMD student starts at ``sigma_max`` (``G(z) = D(sigma_max z, sigma_max)``), so a teacher never
trained near ``sigma_max`` hands it a meaningless start. EDM's log-normal (``P_mean=-1.2,
P_std=1.2``) almost never draws ``sigma > 20``; here a share of every batch is drawn log-uniform on
``[sigma_min, sigma_max]`` so every level the sampler and the distiller visit is trained.

The loss is EDM's (eq. 8 with Table 1's ``lambda``), :func:`dmdcopy.losses.dsm_loss` with
:func:`dmdcopy.schedules.edm_weight`::

    L = E_{x, sigma, n} lambda(sigma) || D(x + sigma n, sigma) - x ||^2 / d

the weights are averaged by :class:`dmdcopy.distill.ema.EMA` (with a warm-up), and
:func:`ode_map_error` compares the trained teacher's probability-flow map with the exact map of
data whose denoiser is known (a Gaussian's closed form, or a mixture's exact denoiser integrated
with the same solver), so teacher error and solver error are told apart.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from dmdcopy.contracts import broadcast, denoise
from dmdcopy.distill.ema import EMA
from dmdcopy.errors import ConfigError
from dmdcopy.experiments.common import map_error
from dmdcopy.losses import dsm_loss
from dmdcopy.precond import EDMPrecond
from dmdcopy.samplers import teacher_ode
from dmdcopy.schedules import edm_weight, karras_sigmas

__all__ = [
    "TeacherConfig",
    "TrainedTeacher",
    "mixed_training_sigmas",
    "ode_map_error",
    "train_teacher",
]


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    """How to train a teacher denoiser (EDM loss, Adam, EMA of the weights)."""

    steps: int = 2000  # optimiser steps
    batch: int = 256  # fresh data samples per step
    lr: float = 2e-3  # Adam learning rate, cosine-decayed to lr_final_fraction * lr
    lr_final_fraction: float = 0.05
    warmup: int = 50  # linear warm-up steps
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    ema_halflife: float = 50.0  # EMA half-life in steps (0 = no EMA)
    sigma_min: float = 0.002  # smallest training noise level
    sigma_max: float = 80.0  # largest training noise level (= the student's sigma_max)
    sigma_data: float = 0.5  # EDM preconditioning constant
    P_mean: float = -1.2  # EDM log-normal location
    P_std: float = 1.2  # EDM log-normal scale
    uniform_fraction: float = 0.5  # share of each batch drawn log-uniform on [sigma_min, sigma_max]

    def __post_init__(self) -> None:
        for name in ("steps", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TeacherConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"TeacherConfig.lr must be > 0, got {self.lr}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError(f"TeacherConfig needs 0 < sigma_min < sigma_max, got "
                              f"{self.sigma_min}, {self.sigma_max}")
        if not 0 <= self.uniform_fraction <= 1:
            raise ConfigError(f"TeacherConfig.uniform_fraction must lie in [0, 1], "
                              f"got {self.uniform_fraction}")
        if self.warmup < 0 or self.ema_halflife < 0 or self.grad_clip < 0:
            raise ConfigError("TeacherConfig.warmup, ema_halflife and grad_clip must be >= 0")


@dataclass
class TrainedTeacher:
    """A trained denoiser and its training record.

    Attributes:
        denoiser: the EDM-preconditioned network with the EMA weights (a denoiser ``D(x, sigma)``).
        losses: the training loss at every step.
        snapshots: ``{step: state_dict}`` of the EMA denoiser at the requested steps (convergence
            levels), on the CPU.
        seconds: wall time of training.
    """

    denoiser: EDMPrecond
    config: TeacherConfig
    losses: list[float] = field(default_factory=list)
    snapshots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    seconds: float = 0.0

    def at_step(self, step: int) -> EDMPrecond:
        """A copy of the denoiser with the weights snapshotted at ``step``."""
        if step not in self.snapshots:
            raise ConfigError(f"no snapshot at step {step}; have {sorted(self.snapshots)}")
        d = copy.deepcopy(self.denoiser)
        d.load_state_dict(self.snapshots[step])
        return d

    def summary(self) -> dict:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return dict(config=asdict(self.config), final_loss=float(sum(tail) / len(tail)),
                    seconds=self.seconds, snapshot_steps=sorted(self.snapshots))


def mixed_training_sigmas(
    batch: int,
    config: TeacherConfig,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Training noise levels ``(batch,)``: EDM log-normal, a share replaced by log-uniform draws.

    The log-normal is clamped into ``[sigma_min, sigma_max]``; the log-uniform share covers the range
    evenly in ``log sigma`` so the top of the range (where a one-step student starts) is trained.
    Both are drawn and mixed in ``log sigma`` (not from :func:`dmdcopy.schedules.lognormal_sigmas`,
    which clamps nothing and returns ``sigma``).
    """
    gen_device = generator.device if generator is not None else "cpu"
    n = torch.randn(batch, generator=generator, device=gen_device)
    u = torch.rand(batch, generator=generator, device=gen_device)
    pick = torch.rand(batch, generator=generator, device=gen_device) < config.uniform_fraction
    lo, hi = math.log(config.sigma_min), math.log(config.sigma_max)
    log_sigma = torch.where(pick, lo + u * (hi - lo), (config.P_mean + config.P_std * n).clamp(lo, hi))
    return log_sigma.exp().to(device=device, dtype=dtype)


def _lr_at(step: int, config: TeacherConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    floor = config.lr_final_fraction
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # x, or (x, class_labels)


def _split(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    x, labels = batch
    return x, labels


def train_teacher(
    sample_data: Callable[[int, torch.Generator | None], Batch],
    net: nn.Module,
    config: TeacherConfig = TeacherConfig(),
    *,
    generator: torch.Generator | None = None,
    snapshot_steps: tuple[int, ...] = (),
    callback: Callable[[int, float], None] | None = None,
) -> TrainedTeacher:
    """Train ``EDMPrecond(net)`` as a denoiser of the data ``sample_data`` draws.

    Args:
        sample_data: ``(n, generator) -> x: (n, ...)`` training data (fresh samples from a known
            distribution, or a random batch of a finite set), on any device; moved to ``net``'s.
            For a conditional ``net`` it returns ``(x, class_labels)`` with ``class_labels: (n,)``
            class indices or ``(n, label_dim)``.
        net: raw network ``F(x_in, c_noise, class_labels=None)`` (e.g. :class:`dmdcopy.nets.MLP`);
            conditional when it declares ``label_dim > 0``.
        config: :class:`TeacherConfig`.
        generator: randomness of data draws, noise levels and noise (a CPU generator).
        snapshot_steps: steps (1-based, counting finished steps) at which the EMA weights are kept
            as convergence levels; ``config.steps`` is always kept.
        callback: called as ``callback(step, loss)`` after every step (progress display).

    Returns: :class:`TrainedTeacher`. Training runs with autograd on; the returned denoiser is in
    eval mode with ``requires_grad`` off.
    """
    for s in snapshot_steps:
        if not 1 <= s <= config.steps:
            raise ConfigError(f"snapshot step {s} outside 1..{config.steps}")
    param = next(net.parameters())
    device, dtype = param.device, param.dtype
    D = EDMPrecond(net, sigma_data=config.sigma_data, sigma_min=config.sigma_min,
                   sigma_max=config.sigma_max)
    D.train()
    # ema_halflife 0 means no averaging: beta 0 makes the "average" the latest weights
    ema = EMA(D, halflife=config.ema_halflife if config.ema_halflife > 0 else 1.0)
    beta = ema.beta if config.ema_halflife > 0 else 0.0
    opt = torch.optim.Adam(D.parameters(), lr=config.lr)
    result = TrainedTeacher(denoiser=ema.module, config=config)
    keep = set(snapshot_steps) | {config.steps}
    gen_device = generator.device if generator is not None else "cpu"
    t0 = time.perf_counter()
    for step in range(config.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, config)
        x, labels = _split(sample_data(config.batch, generator))
        x = x.to(device=device, dtype=dtype)
        labels = labels.to(device) if labels is not None else None
        sigma = mixed_training_sigmas(x.shape[0], config, generator=generator, device=device, dtype=dtype)
        noise = torch.randn(x.shape, generator=generator, device=gen_device).to(device=device, dtype=dtype)
        denoised = denoise(D, x + broadcast(sigma, x) * noise, sigma, labels)
        loss = dsm_loss(denoised, x, sigma, weighting=edm_weight, sigma_data=config.sigma_data).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(D.parameters(), config.grad_clip)
        opt.step()
        ema.beta = min(beta, step / (step + 1))  # EMA warm-up: the first steps are averaged evenly
        ema.update(D)
        value = float(loss.detach())
        result.losses.append(value)
        if step + 1 in keep:
            state = ema.module.state_dict()
            result.snapshots[step + 1] = {k: v.detach().cpu().clone() for k, v in state.items()}
        if callback is not None:
            callback(step + 1, value)
    result.seconds = time.perf_counter() - t0
    return result


def ode_map_error(
    denoiser: Callable[..., torch.Tensor],
    exact_map: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    *,
    num_steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    scale: float = 0.5,
) -> dict:
    """How far the denoiser's probability-flow map is from the exact one, on noises ``z``.

    Both maps send ``sigma_max z`` to ``sigma = 0``; the learned one is integrated with
    :func:`dmdcopy.samplers.teacher_ode` (Heun, ``num_steps`` Karras steps).

    Args:
        denoiser: the trained teacher ``D(x, sigma)``.
        exact_map: ``z -> T_exact(z)``, both ``(N, ...)``.
        z: ``(N, ...)`` standard-normal noise.
        scale: the data scale the error is divided by (``sigma_data``).

    Returns: ``dict(rmse, relative_rmse, num_steps)``, :func:`~dmdcopy.experiments.common.map_error`
    of the two maps (float64).
    """
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max)
    learned = teacher_ode(denoiser, z, sigmas)
    return dict(**map_error(learned, exact_map(z), scale), num_steps=num_steps)
