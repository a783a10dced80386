"""The DMD / DMD2 distiller: a training loop that reads top to bottom.

One training *step* is ``config.fake_score_steps`` fake-score updates followed by one generator
update (DMD2's two time-scale rule); ``distiller.step`` counts generator updates. Every random draw
of a step (noise, noise level, class label, pair index, GAN inputs) is a pure function of
``(config.seed, step, sub-step, global sample index)`` through :mod:`dmdcopy._rng`, so

- a run resumed from a checkpoint draws exactly what the uninterrupted run drew, and
- ``N`` processes, each drawing its own slice of the global batch, draw what one process draws.

Callback protocol: every callable in ``callbacks`` is called as ``callback(distiller, step)`` after
each generator update (every step; a callback keeps its own interval, e.g. ``if step % 500: return
None``) on every process. It returns ``None`` or a ``dict[str, float]`` that is merged into that
step's JSONL record (written by rank 0). A callback may read ``distiller.student``,
``distiller.ema_student`` (``None`` without EMA), ``distiller.teacher``, ``distiller.fake_score``,
``distiller.device``, ``distiller.step``, ``distiller.is_main``, ``distiller.rank``,
``distiller.world_size``, ``distiller.sample_shape``, ``distiller.label_dim`` and
``distiller.config``; it runs outside any autograd context the loop sets, so it should wrap its own
sampling in ``torch.no_grad()``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmdcopy import _rng
from dmdcopy.distill import checkpoint as ckpt
from dmdcopy.distill.config import RESUMABLE_CHANGES, DistillConfig
from dmdcopy.distill.dist import all_reduce_mean, all_true, dist_info, wrap_ddp
from dmdcopy.distill.ema import EMA
from dmdcopy.errors import CheckpointError, ConfigError, NonFiniteError, ShapeError
from dmdcopy.losses import (
    ClassifierHead,
    FeatureHook,
    dmd_gradient,
    dmd_surrogate_loss,
    dsm_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    l2_regression_loss,
    pseudo_huber_loss,
)
from dmdcopy.schedules import dmd_sigma_grid, karras_weight
from dmdcopy.students import MultiStepStudent, call_denoiser, call_student

__all__ = ["Callback", "Distiller", "FakeScoreRecord", "GeneratorRecord"]

Callback = Callable[["Distiller", int], "dict[str, float] | None"]

# Random streams of one sub-step (each a separate key, so adding a stream changes no other draw).
_Z, _LABEL, _K, _EPS, _K_GAN, _EPS_GAN, _REAL_IDX, _K_GAN_REAL, _EPS_GAN_REAL, _REG_IDX, _TRAIN_STEP, \
    _RENOISE = range(12)

_REGRESSION_FNS = {"l2": l2_regression_loss, "pseudo_huber": pseudo_huber_loss}


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


@dataclass
class _Window:
    """Records since the last log line."""

    fake: list[FakeScoreRecord] = field(default_factory=list)
    gen: list[GeneratorRecord] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)


def _mean(values: Sequence[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else math.nan


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _bview(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))  # (B,) -> (B, 1, ..., 1)


def _check_unshared(**modules: object) -> None:
    """Teacher, student and fake score must not share a parameter: freezing the teacher would freeze
    the student, and training the fake score would silently train the teacher (pass copies)."""
    owner: dict[int, str] = {}
    for name, module in modules.items():
        if not isinstance(module, nn.Module):
            continue
        for p in module.parameters():
            other = owner.setdefault(id(p), name)
            if other != name:
                raise ConfigError(f"{other} and {name} share parameters; give each its own copy, e.g. "
                                  f"copy.deepcopy(teacher)")


class Distiller:
    """Distil ``teacher`` into ``student`` with DMD / DMD2.

    Args:
        teacher: the real score, a denoiser ``D(x, sigma, class_labels=None)``; frozen here.
        student: a generator ``G(z, class_labels=None)``: :class:`~dmdcopy.students.OneStepStudent`,
            :class:`~dmdcopy.students.MultiStepStudent` (trained with backward simulation) or any
            module built from scratch.
        fake_score: the denoiser trained on student samples; default: a deep copy of the teacher
            (which must then have parameters).
        config: a :class:`DistillConfig`.
        discriminator: GAN head reading the fake score's ``config.gan_feature_module`` output;
            default: a :class:`~dmdcopy.losses.ClassifierHead` sized from one probe forward.
        real_data: ``x`` or ``(x, labels)`` with ``x: (N, *sample_shape)``, ``labels: (N,)`` int;
            the "real" side of the GAN (needed when ``config.gan``).
        regression_pairs: ``(z, x_teacher)`` or ``(z, x_teacher, labels)``, stored teacher pairs
            ``x_teacher = T(z)`` for the regression loss (needed when ``config.regression_weight > 0``).
        class_weights: ``(label_dim,)`` non-negative weights of the training labels of a
            conditional teacher; default uniform.
        callbacks: see the module docstring.
        out_dir: where ``log.jsonl``, checkpoints and TensorBoard files go; ``None`` writes nothing.
        device: default: the device of the student's parameters. Modules are moved there.
        sample_shape: per-sample shape when neither teacher nor student declares ``sample_shape``.

    Under ``torch.distributed`` (e.g. ``torchrun``), student, fake score and discriminator are
    wrapped in DistributedDataParallel, each process draws its slice of the global batch, metrics
    are averaged and only rank 0 writes files.
    """

    def __init__(
        self,
        teacher: nn.Module | Callable[..., torch.Tensor],
        student: nn.Module,
        *,
        config: DistillConfig,
        fake_score: nn.Module | None = None,
        discriminator: nn.Module | None = None,
        real_data: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
        regression_pairs: tuple[torch.Tensor, ...] | None = None,
        class_weights: torch.Tensor | None = None,
        callbacks: Sequence[Callback] = (),
        out_dir: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        sample_shape: Sequence[int] | None = None,
    ) -> None:
        if not isinstance(config, DistillConfig):
            raise ConfigError(f"config must be a DistillConfig, got {type(config).__name__}")
        if not isinstance(student, nn.Module):
            raise ConfigError(f"student must be an nn.Module G(z, class_labels=None), got {type(student)}")
        cfg = self.config = config
        info = dist_info()
        self.rank, self.world_size = info.rank, info.world_size
        self.is_main = info.is_main
        self.device = torch.device(device) if device is not None else _device_of(student)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.callbacks = list(callbacks)

        # --- models ---------------------------------------------------------------------------
        _check_unshared(teacher=teacher, student=student, fake_score=fake_score)
        if isinstance(teacher, nn.Module):
            teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.teacher = teacher
        if fake_score is None:
            if not isinstance(teacher, nn.Module) or not any(True for _ in teacher.parameters()):
                raise ConfigError("fake_score: the teacher has no parameters to copy (an exact teacher "
                                  "such as GaussianMixtureTeacher); pass fake_score=, e.g. "
                                  "EDMPrecond(MLP(dim)) trained from scratch")
            fake_score = copy.deepcopy(teacher)
        self.fake_score = fake_score.to(self.device).train().requires_grad_(True)
        self.student = student.to(self.device).train()
        if not any(p.requires_grad for p in self.student.parameters()):
            raise ConfigError("student: no parameter requires grad; nothing to train")

        self.sample_shape, self.label_dim = self._shapes(sample_shape)
        self.multi_step = isinstance(self.student, MultiStepStudent)
        self._check_batches()
        self.class_weights = self._check_class_weights(class_weights)
        self.real_data = self._check_data(real_data, "real_data")
        self.regression_pairs = self._check_pairs(regression_pairs)
        self._probe_student()

        self._hook: FeatureHook | None = None
        self.discriminator: nn.Module | None = None
        if cfg.gan:
            if self.real_data is None:
                raise ConfigError("gan=True needs real_data= (real samples, optionally with labels)")
            self._hook = FeatureHook(self.fake_score, cfg.gan_feature_module)
            if discriminator is None:
                discriminator = ClassifierHead(self._probe_features())
            self.discriminator = discriminator.to(self.device).train()

        # --- optimisers (built on the unwrapped modules; DDP shares the parameters) -----------
        opt_kw = dict(betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.generator_optimizer = torch.optim.AdamW(
            [p for p in self.student.parameters() if p.requires_grad], lr=cfg.generator_lr, **opt_kw)
        fake_params = [p for p in self.fake_score.parameters() if p.requires_grad]
        if self.discriminator is not None:
            fake_params += [p for p in self.discriminator.parameters() if p.requires_grad]
        self.fake_score_optimizer = torch.optim.AdamW(fake_params, lr=cfg.fake_score_lr, **opt_kw)

        # --- DDP, compile, EMA (EMA after DDP's broadcast of rank 0's weights) ------------------
        self._student_ddp = wrap_ddp(self.student, self.device)
        self._fake_ddp = wrap_ddp(self.fake_score, self.device)
        self._disc_ddp = wrap_ddp(self.discriminator, self.device) if self.discriminator else None
        self._student_call: nn.Module | Callable = self._student_ddp
        self._fake_call: nn.Module | Callable = self._fake_ddp
        if cfg.compile:
            self._student_call = torch.compile(self._student_ddp)
            self._fake_call = torch.compile(self._fake_ddp)
        halflife = cfg.ema_halflife_steps
        self._ema = EMA(self.student, halflife) if halflife else None

        self.grid = dmd_sigma_grid(cfg.num_sigmas, cfg.sigma_min, cfg.sigma_max, cfg.rho,
                                   device=self.device, dtype=torch.float64)
        self._regression_fn = _REGRESSION_FNS[cfg.regression_loss]

        # --- counters (all in checkpoints) -----------------------------------------------------
        self.step = 0
        self.generator_updates = 0
        self.fake_score_updates = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = {"generator": 0, "fake_score": 0}  # consecutive skips per kind
        self._tb = self._tensorboard() if (cfg.tensorboard and self.is_main and self.out_dir) else None

    # --- setup checks ---------------------------------------------------------------------------

    @property
    def ema_student(self) -> nn.Module | None:
        """The EMA copy of the student (eval mode), or ``None`` when EMA is off."""
        return self._ema.module if self._ema is not None else None

    def _shapes(self, sample_shape: Sequence[int] | None) -> tuple[tuple[int, ...], int]:
        t_shape = getattr(self.teacher, "sample_shape", None)
        s_shape = getattr(self.student, "sample_shape", None)
        if t_shape is not None and s_shape is not None and tuple(t_shape) != tuple(s_shape):
            raise ConfigError(f"student.sample_shape {tuple(s_shape)} does not match "
                              f"teacher.sample_shape {tuple(t_shape)}")
        shape = sample_shape or t_shape or s_shape
        if shape is None:
            raise ConfigError("sample_shape: neither teacher nor student declares sample_shape; "
                              "pass sample_shape= to the Distiller")
        t_lab = int(getattr(self.teacher, "label_dim", 0) or 0)
        s_lab = getattr(self.student, "label_dim", None)
        if s_lab is not None and int(s_lab) != t_lab:
            raise ConfigError(f"student.label_dim {s_lab} does not match teacher.label_dim {t_lab}")
        # The fake score sees the student's samples with the teacher's labels: check it before step 1.
        f_shape = getattr(self.fake_score, "sample_shape", None)
        if f_shape is not None and tuple(f_shape) != tuple(shape):
            raise ConfigError(f"fake_score.sample_shape {tuple(f_shape)} does not match the samples' "
                              f"shape {tuple(shape)}")
        f_lab = getattr(self.fake_score, "label_dim", None)
        if f_lab is not None and int(f_lab) != t_lab:
            raise ConfigError(f"fake_score.label_dim {f_lab} does not match teacher.label_dim {t_lab}")
        return tuple(int(s) for s in shape), t_lab

    def _check_batches(self) -> None:
        cfg = self.config
        for name in ("batch_size", "regression_batch_size"):
            v = getattr(cfg, name)
            if v is not None and v % self.world_size:
                raise ConfigError(f"{name}={v} is not divisible by the number of processes "
                                  f"({self.world_size})")
        self.local_batch = cfg.batch_size // self.world_size
        self.local_regression_batch = (cfg.regression_batch_size or cfg.batch_size) // self.world_size

    def _check_class_weights(self, w: torch.Tensor | None) -> torch.Tensor | None:
        if self.label_dim == 0:
            if w is not None:
                raise ConfigError("class_weights given but the teacher is unconditional (label_dim=0)")
            return None
        w = torch.ones(self.label_dim) if w is None else torch.as_tensor(w, dtype=torch.float64)
        if w.shape != (self.label_dim,) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ConfigError(f"class_weights must be ({self.label_dim},) finite, >= 0, not all 0")
        cdf = torch.cumsum(w.double(), 0)
        return (cdf / cdf[-1]).to(self.device)

    def _check_data(self, data, name: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if data is None:
            return None
        x, labels = (data, None) if isinstance(data, torch.Tensor) else (data[0], data[1])
        if tuple(x.shape[1:]) != self.sample_shape or x.shape[0] == 0:
            raise ShapeError(f"{name}: expected x of shape (N, {self.sample_shape}), got {tuple(x.shape)}")
        if self.label_dim and labels is None:
            raise ConfigError(f"{name}: the teacher is conditional; pass (x, labels)")
        if labels is not None:
            if labels.shape != (x.shape[0],) or labels.is_floating_point():
                raise ShapeError(f"{name}: labels must be ({x.shape[0]},) integers, "
                                 f"got {tuple(labels.shape)} {labels.dtype}")
            labels = labels.to(self.device, torch.int64) if self.label_dim else None
        return x.to(self.device, torch.float32), labels

    def _check_pairs(self, pairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        cfg = self.config
        if cfg.regression_weight == 0:
            return None
        if pairs is None:
            raise ConfigError("regression_weight > 0 needs regression_pairs=(z, x_teacher[, labels])")
        if self.multi_step:
            raise ConfigError("regression_weight > 0 needs a one-step student (the regression target "
                              "is the full map z -> T(z))")
        if len(pairs) not in (2, 3):
            raise ConfigError("regression_pairs must be (z, x_teacher) or (z, x_teacher, labels)")
        z = pairs[0]
        if z.shape[1:] != self.sample_shape or pairs[1].shape != z.shape:
            raise ShapeError(f"regression_pairs: expected z and x_teacher of shape (N, {self.sample_shape}), "
                             f"got {tuple(z.shape)} and {tuple(pairs[1].shape)}")
        x, labels = self._check_data((pairs[1], pairs[2]) if len(pairs) == 3 else pairs[1],
                                     "regression_pairs")
        return z.to(self.device, torch.float32), x, labels

    def _probe_student(self) -> None:
        """Run the student on two samples so a shape mismatch fails before the first step."""
        idx = torch.arange(2, device=self.device)
        z = _rng.normal(0, idx, self.sample_shape).to(self.device)
        labels = (torch.zeros(2, dtype=torch.int64, device=self.device) if self.label_dim else None)
        with torch.no_grad(), self._autocast():
            x = call_student(self.student, z, labels)
        if tuple(x.shape) != (2, *self.sample_shape):
            raise ShapeError(f"student output has shape {tuple(x.shape)} for z of shape {tuple(z.shape)}; "
                             f"expected (B, {self.sample_shape}) like the teacher's samples")

    def _probe_features(self) -> tuple[int, ...]:
        idx = torch.arange(2, device=self.device)
        x = _rng.normal(0, idx, self.sample_shape).to(self.device)
        labels = (torch.zeros(2, dtype=torch.int64, device=self.device) if self.label_dim else None)
        with torch.no_grad(), self._autocast():
            call_denoiser(self.fake_score, x, torch.ones(2, device=self.device), labels)
        if self._hook.features is None:
            raise ConfigError(f"gan_feature_module: {self.config.gan_feature_module!r} is never called in "
                              "the fake score's forward (a ModuleList/ModuleDict container?); name a "
                              "module that runs, e.g. a block's last layer")
        return tuple(self._hook.pop().shape[1:])

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError("tensorboard=True needs the tensorboard package: pip install tensorboard"
                              ) from e
        return SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    # --- randomness ---------------------------------------------------------------------------

    def _key(self, substep: int, stream: int) -> int:
        return _rng.derive_key(self.config.seed, self.step, substep, stream)

    def _index(self, local_batch: int) -> torch.Tensor:
        """Global sample indices of this process's slice: ``(local_batch,)``."""
        start = self.rank * local_batch
        return torch.arange(start, start + local_batch, device=self.device)

    def _normal(self, substep: int, stream: int, idx: torch.Tensor, shape=None) -> torch.Tensor:
        return _rng.normal(self._key(substep, stream), idx, shape or self.sample_shape)

    def _sigmas(self, substep: int, stream: int, idx: torch.Tensor, k_range) -> torch.Tensor:
        k = _rng.randint(self._key(substep, stream), idx, *k_range)
        return self.grid[k].to(torch.float32)

    def _labels(self, substep: int, idx: torch.Tensor) -> torch.Tensor | None:
        if self.class_weights is None:
            return None
        u = _rng.uniform(self._key(substep, _LABEL), idx)[:, 0]
        labels = torch.searchsorted(self.class_weights, u.contiguous())
        return labels.clamp_(max=self.label_dim - 1)

    def _autocast(self):
        if self.config.mixed_precision and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- the two updates ----------------------------------------------------------------------

    def _generate(self, G, z: torch.Tensor, labels, substep: int, idx: torch.Tensor) -> torch.Tensor:
        """Student samples; a multi-step student trains one step, chosen per batch (backward
        simulation), with re-injected noise drawn per sample."""
        if not self.multi_step:
            return call_student(G, z, labels)
        J = self.student.num_steps
        train_step = self._key(substep, _TRAIN_STEP) % J  # the same on every process
        noise = self._normal(substep, _RENOISE, idx, (J - 1, *self.sample_shape))  # (B, J-1, ...)
        noise = noise.transpose(0, 1).contiguous()  # (J-1, B, ...), the student's layout
        return call_student(G, z, labels, noise=noise, train_step=train_step)

    def fake_score_step(self, substep: int) -> FakeScoreRecord:
        """One fake-score update on fresh student samples: denoising loss (+ GAN discriminator)."""
        cfg, b = self.config, self.local_batch
        idx = self._index(b)
        labels = self._labels(substep, idx)
        z = self._normal(substep, _Z, idx)
        with torch.no_grad(), self._autocast():
            x = self._generate(self.student, z, labels, substep, idx).float()
        sigma = self._sigmas(substep, _K, idx, cfg.fake_score_k_range)
        x_t = x + _bview(sigma, x) * self._normal(substep, _EPS, idx)
        inputs, sigmas, labs = [x_t], [sigma], [labels]
        if cfg.gan:  # the diffusion GAN sees noisy fakes and noisy reals in the same forward
            x_real, l_real = self._real_batch(substep, idx)
            s_fake = self._sigmas(substep, _K_GAN, idx, cfg.gan_k_range)
            s_real = self._sigmas(substep, _K_GAN_REAL, idx, cfg.gan_k_range)
            inputs += [x + _bview(s_fake, x) * self._normal(substep, _EPS_GAN, idx),
                       x_real + _bview(s_real, x) * self._normal(substep, _EPS_GAN_REAL, idx)]
            sigmas += [s_fake, s_real]
            labs += [labels, l_real]
        all_labels = torch.cat(labs) if labels is not None else None

        self.fake_score_optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            out = call_denoiser(self._fake_call, torch.cat(inputs), torch.cat(sigmas), all_labels)
        dsm = dsm_loss(out[:b], x, sigma, weighting=karras_weight, sigma_data=cfg.sigma_data).mean()
        loss, gan = dsm, None
        if cfg.gan:
            feats = self._hook.pop()[b:]  # (2b, ...): noisy fakes, then noisy reals
            logits = self._disc_ddp(feats)
            gan = gan_discriminator_loss(logits[b:], logits[:b]).mean()
            loss = loss + cfg.gan_discriminator_weight * gan
        loss.backward()
        norm, ok = self._clip_and_check(self.fake_score_optimizer, loss)
        if ok:
            self.fake_score_optimizer.step()
            self.fake_score_updates += 1
        self._after_update(ok, "fake_score")
        vals = torch.stack([loss.detach(), dsm.detach(), (gan if gan is not None else dsm).detach()])
        loss_v, dsm_v, gan_v = vals.float().tolist()
        return FakeScoreRecord(loss_v, dsm_v, gan_v if cfg.gan else None, norm, not ok)

    def generator_step(self) -> GeneratorRecord:
        """One generator update: DMD loss (+ GAN generator loss, + regression to teacher pairs)."""
        cfg, b = self.config, self.local_batch
        substep = cfg.fake_score_steps  # sub-steps 0..F-1 were the fake-score updates
        idx = self._index(b)
        labels = self._labels(substep, idx)
        z = self._normal(substep, _Z, idx)
        zs, labs = [z], [labels]
        if self.regression_pairs is not None:
            z_reg, x_reg, l_reg = self._regression_batch(substep)
            zs.append(z_reg)
            labs.append(l_reg)
        all_labels = torch.cat(labs) if labels is not None else None

        self.generator_optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            x_all = self._generate(self._student_call, torch.cat(zs), all_labels, substep, idx).float()
        x = x_all[:b]
        sigma = self._sigmas(substep, _K, idx, cfg.generator_k_range)
        with torch.no_grad(), self._autocast():
            g = dmd_gradient(x, sigma, self.teacher, self.fake_score, noise=self._normal(substep, _EPS, idx),
                             class_labels=labels, min_normaliser=cfg.min_normaliser)
        dmd = dmd_surrogate_loss(x, g).mean()
        loss, gan, reg = cfg.dmd_weight * dmd, None, None
        if cfg.gan:
            s_gan = self._sigmas(substep, _K_GAN, idx, cfg.gan_k_range)
            x_noisy = x + _bview(s_gan, x) * self._normal(substep, _EPS_GAN, idx)
            with self._frozen(self.fake_score, self.discriminator), self._autocast():
                self._hook.features = None
                call_denoiser(self.fake_score, x_noisy, s_gan, labels)
                logits = self.discriminator(self._hook.pop())
            gan = gan_generator_loss(logits).mean()
            loss = loss + cfg.gan_generator_weight * gan
        if self.regression_pairs is not None:
            reg = self._regression_fn(x_all[b:], x_reg).mean()
            loss = loss + cfg.regression_weight * reg
        loss.backward()
        norm, ok = self._clip_and_check(self.generator_optimizer, loss)
        if ok:
            self.generator_optimizer.step()
            self.generator_updates += 1
            if self._ema is not None:
                self._ema.update(self.student)
        self._after_update(ok, "generator")
        parts = [loss.detach(), dmd.detach()] + [t.detach() for t in (gan, reg) if t is not None]
        vals = torch.stack(parts).float().tolist()
        loss_v, dmd_v, rest = vals[0], vals[1], iter(vals[2:])
        gan_v = next(rest) if gan is not None else None
        reg_v = next(rest) if reg is not None else None
        return GeneratorRecord(loss_v, dmd_v, gan_v, reg_v, norm, not ok)

    # --- helpers of the updates ---------------------------------------------------------------

    def _real_batch(self, substep: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, labels = self.real_data
        j = _rng.randint(self._key(substep, _REAL_IDX), idx, 0, x.shape[0] - 1)
        return x[j], (labels[j] if labels is not None else None)

    def _regression_batch(self, substep: int):
        z, x, labels = self.regression_pairs
        pos = self._index(self.local_regression_batch)
        j = _rng.randint(self._key(substep, _REG_IDX), pos, 0, z.shape[0] - 1)
        return z[j], x[j], (labels[j] if labels is not None else None)

    @contextlib.contextmanager
    def _frozen(self, *modules: nn.Module | None) -> Iterator[None]:
        """Parameters of ``modules`` get no gradient inside (the generator's GAN term)."""
        params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    def _clip_and_check(self, opt: torch.optim.Optimizer, loss: torch.Tensor) -> tuple[float, bool]:
        """Clip the global grad norm; return (norm before clipping, loss and norm finite everywhere)."""
        params = [p for g in opt.param_groups for p in g["params"]]
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        loss_v, norm_v = torch.stack([loss.detach().float(), norm.float()]).tolist()
        ok = all_true(math.isfinite(loss_v) and math.isfinite(norm_v), self.device)
        return norm_v, ok

    def _after_update(self, ok: bool, what: str) -> None:
        """Count a skipped update; the run stops after too many in a row of one kind."""
        if ok:
            self.nonfinite_in_a_row[what] = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_in_a_row[what] += 1
        for opt in (self.generator_optimizer, self.fake_score_optimizer):
            opt.zero_grad(set_to_none=True)
        n = self.nonfinite_in_a_row[what]
        if n >= self.config.max_nonfinite_in_a_row:
            raise NonFiniteError(
                f"step {self.step}: {n} {what} updates in a row had a non-finite loss or gradient "
                f"({self.nonfinite_total} updates skipped in all). Lower the learning rates, check the "
                "teacher's and student's outputs, or raise max_nonfinite_in_a_row")

    # --- the loop -------------------------------------------------------------------------------

    def train(self, *, resume: str | os.PathLike | None = None) -> Distiller:
        """Run until ``config.num_steps`` generator updates; ``resume="latest"`` or a path first
        restores a checkpoint (``"latest"`` starts fresh when ``out_dir`` holds none)."""
        from tqdm.auto import tqdm

        if resume is not None:
            self.resume(resume)
        cfg = self.config
        bar = tqdm(total=cfg.num_steps, initial=self.step, disable=not (self.is_main and cfg.progress_bar),
                   desc="distill", dynamic_ncols=True)
        window = _Window()
        try:
            while self.step < cfg.num_steps:
                fake = [self.fake_score_step(s) for s in range(cfg.fake_score_steps)]
                gen = self.generator_step()
                self.step += 1
                window.fake += fake
                window.gen.append(gen)
                record: dict[str, Any] = {}
                if self.step % cfg.log_every == 0 or self.step == cfg.num_steps:
                    record = self._summary(window)
                    window = _Window()
                    bar.set_postfix(gen=record["generator_loss"], fake=record["fake_score_loss"],
                                    refresh=False)
                for callback in self.callbacks:
                    extra = callback(self, self.step)
                    if extra:
                        record.update(extra)
                if record:
                    self._write_record({"step": self.step, **record})
                bar.update(1)
                if self.out_dir is not None and (self.step % cfg.checkpoint_every == 0
                                                 or self.step == cfg.num_steps):
                    self.save_checkpoint()
        finally:
            bar.close()
            if self._tb is not None:
                self._tb.flush()
        return self

    def _summary(self, w: _Window) -> dict[str, Any]:
        """Means over the window's completed updates, averaged over processes."""
        fg = [r for r in w.gen if not r.skipped]
        ff = [r for r in w.fake if not r.skipped]
        names = ["generator_loss", "dmd_loss", "generator_grad_norm", "fake_score_loss", "dsm_loss",
                 "fake_score_grad_norm"]
        vals = [_mean([r.loss for r in fg]), _mean([r.dmd_loss for r in fg]),
                _mean([r.grad_norm for r in fg]), _mean([r.loss for r in ff]),
                _mean([r.dsm_loss for r in ff]), _mean([r.grad_norm for r in ff])]
        if self.config.gan:
            names += ["gan_generator_loss", "gan_discriminator_loss"]
            vals += [_mean([r.gan_loss for r in fg]), _mean([r.gan_loss for r in ff])]
        if self.regression_pairs is not None:
            names.append("regression_loss")
            vals.append(_mean([r.regression_loss for r in fg]))
        vals = all_reduce_mean(vals, self.device)
        elapsed = time.perf_counter() - w.start
        out: dict[str, Any] = {n: (v if math.isfinite(v) else None) for n, v in zip(names, vals)}
        out.update(
            generator_lr=self.generator_optimizer.param_groups[0]["lr"],
            fake_score_lr=self.fake_score_optimizer.param_groups[0]["lr"],
            samples_per_s=self.config.batch_size * len(w.gen) / max(elapsed, 1e-9),
            fake_score_updates=self.fake_score_updates,
            generator_updates=self.generator_updates,
            nonfinite_skipped=self.nonfinite_total,
        )
        return out

    def _write_record(self, record: dict[str, Any]) -> None:
        if not self.is_main or self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # strict JSON: a NaN or inf figure (e.g. a non-finite Delta E measurement) is written as null
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, self.step)

    # --- checkpoints ----------------------------------------------------------------------------

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything a resume needs: flat tensors and a JSON-able dict."""
        tensors: dict[str, torch.Tensor] = {}
        for prefix, module in (("student", self.student), ("ema", self.ema_student),
                               ("fake_score", self.fake_score), ("discriminator", self.discriminator)):
            if module is not None:
                tensors.update({f"{prefix}/{k}": v for k, v in module.state_dict().items()})
        optim = {}
        for name, opt in (("generator", self.generator_optimizer), ("fake_score", self.fake_score_optimizer)):
            t, meta = ckpt.flatten_optimizer(opt, f"optim/{name}")
            tensors.update(t)
            optim[name] = meta
        tensors["rng/torch_cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng/cuda"] = torch.cuda.get_rng_state(self.device)
        state = dict(step=self.step, generator_updates=self.generator_updates,
                     fake_score_updates=self.fake_score_updates, nonfinite_total=self.nonfinite_total,
                     nonfinite_in_a_row=dict(self.nonfinite_in_a_row), optim=optim,
                     config=self.config.to_dict(), world_size=self.world_size)
        return tensors, state

    def save_checkpoint(self) -> Path | None:
        """Write ``out_dir/checkpoint-<step>.safetensors`` (rank 0) and keep the newest K."""
        if self.out_dir is None:
            raise ConfigError("out_dir: the distiller has no output directory to write checkpoints to")
        path = self.out_dir / ckpt.checkpoint_name(self.step)
        tensors, state = self.state_tensors()
        if self.is_main:
            ckpt.write_checkpoint(path, tensors, state)
            ckpt.prune_checkpoints(self.out_dir, self.config.keep_checkpoints)
        return path

    def resume(self, source: str | os.PathLike) -> Path | None:
        """Restore from ``"latest"`` (newest valid checkpoint in ``out_dir``; none: no-op) or a path."""
        if str(source) == "latest":
            if self.out_dir is None:
                raise ConfigError("resume='latest' needs out_dir")
            path = ckpt.latest_checkpoint(self.out_dir)
            if path is None:  # a run stopped before its first checkpoint starts again from step 0
                self._trim_log()
                return None
        else:
            path = Path(source)
        self.load_checkpoint(path)
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load weights, optimiser states, counters and RNG states from a checkpoint file."""
        tensors, state = ckpt.read_checkpoint(path)
        saved = state.get("config", {})
        now = self.config.to_dict()
        changed = sorted(k for k in set(saved) | set(now)
                         if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
        if changed:
            raise CheckpointError(f"{path}: the checkpoint was written with different settings for "
                                  f"{changed}; resume with the same config (only {sorted(RESUMABLE_CHANGES)} "
                                  "may change)")

        def part(prefix: str) -> dict[str, torch.Tensor]:
            head = prefix + "/"
            return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}

        for prefix, module in (("student", self.student), ("ema", self.ema_student),
                               ("fake_score", self.fake_score), ("discriminator", self.discriminator)):
            if module is None:
                continue
            sd = part(prefix)
            try:
                module.load_state_dict(sd, strict=True)
            except RuntimeError as e:
                raise CheckpointError(f"{path}: the {prefix} weights do not fit the model: {e}") from e
        for name, opt in (("generator", self.generator_optimizer), ("fake_score", self.fake_score_optimizer)):
            opt.load_state_dict(ckpt.unflatten_optimizer(tensors, state["optim"][name], f"optim/{name}"))
        torch.set_rng_state(tensors["rng/torch_cpu"])
        if self.device.type == "cuda" and "rng/cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng/cuda"], self.device)
        self.step = int(state["step"])
        self.generator_updates = int(state["generator_updates"])
        self.fake_score_updates = int(state["fake_score_updates"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.nonfinite_in_a_row = {k: int(v) for k, v in state["nonfinite_in_a_row"].items()}
        self._trim_log()

    def _trim_log(self) -> None:
        """Drop log records written after the restored step (they will be written again)."""
        if not self.is_main or self.out_dir is None or not (self.out_dir / "log.jsonl").exists():
            return
        log = self.out_dir / "log.jsonl"
        keep = []
        for line in log.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= self.step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the interruption
        tmp = log.with_name(".log.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, log)
