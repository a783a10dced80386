"""The DMD / DMD2 trainer: builds the run, then loops ``fake_score_step`` x F, ``generator_step``.

The method (what one update computes) is :mod:`dmdcopy.distill.method`; the per-sample draws are
:class:`~dmdcopy.distill.draws.Draws`; what a checkpoint holds is registered once in
:class:`~dmdcopy.distill.checkpoint.RunState`; the checks run before step 1 are
:mod:`dmdcopy.distill.setup`. This module is the trainer around them: optimisers, DDP, autocast,
skipping non-finite updates, EMA, logs, callbacks and checkpoints.

One training *step* is ``config.fake_score_steps`` fake-score updates followed by one generator
update (DMD2's two time-scale rule). ``distiller.step`` counts steps, including a step whose
updates were skipped for a non-finite loss; ``generator_updates`` and ``fake_score_updates``
count the updates applied.

Callback protocol: every callable in ``callbacks`` is called as ``callback(distiller, step)`` after
each generator update (every step; a callback keeps its own interval, e.g. ``if step % 500: return
None``) on every process. It returns ``None`` or a ``dict[str, float]`` that is merged into that
step's JSONL record (written by rank 0). A callback may read ``distiller.student``,
``distiller.ema_student`` (``None`` without EMA), ``distiller.teacher``, ``distiller.fake_score``,
``distiller.device``, ``distiller.step``, ``distiller.is_main``, ``distiller.rank``,
``distiller.world_size``, ``distiller.sample_shape``, ``distiller.label_dim`` and
``distiller.config``; it runs outside any autograd context the loop sets, so it should wrap its own
sampling in ``torch.no_grad()``.

(About 690 lines, a third of them the callback protocol's and the constructor's docstrings: the
trainer loop and its run-safety steps read top to bottom in one place; the speed options live in
:mod:`~dmdcopy.distill.speed` and :mod:`~dmdcopy.distill.fsdp`.)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import signal
import sys
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from dmdcopy import _rng
from dmdcopy.contracts import denoise
from dmdcopy.distill import fsdp, method, rundir, speed
from dmdcopy.distill import setup as checks
from dmdcopy.distill.checkpoint import Counters, RunState, check_identity, check_resumable, run_fingerprint
from dmdcopy.distill.config import DistillConfig
from dmdcopy.distill.dist import all_reduce_mean, all_true, check_launch, dist_info, wrap_ddp
from dmdcopy.distill.draws import Draws, Stream
from dmdcopy.distill.ema import EMA
from dmdcopy.distill.method import FakeScoreRecord, GeneratorRecord
from dmdcopy.distill.runlog import RunLog, Window
from dmdcopy.errors import CheckpointError, ConfigError, NonFiniteError, RunInterrupted
from dmdcopy.io import run_checkpoint as ckpt
from dmdcopy.losses import ClassifierHead, FeatureHook, l2_regression_loss, pseudo_huber_loss
from dmdcopy.schedules import dmd_sigma_grid
from dmdcopy.students import MultiStepStudent

__all__ = ["Callback", "Distiller", "FakeScoreRecord", "GeneratorRecord"]

Callback = Callable[["Distiller", int], "dict[str, float] | None"]

# Key (with the config seed) of the default discriminator head's initial weights; no training
# draw uses a one-part suffix, so it is apart from all of them.
_DISCRIMINATOR_INIT_KEY = 0xD15C
_REGRESSION_FNS = {"l2": l2_regression_loss, "pseudo_huber": pseudo_huber_loss}


def _delta_e_postfix(record: dict[str, Any], step: int) -> dict[str, str]:
    """Progress-bar fields for the Delta E figures a callback logged at ``step``: the finite-N
    value, the bracket's interval when there is one, and the step, e.g. ``0.412 [0.30, 0.55] @1200``."""
    out = {}
    for key, value in record.items():
        if not key.endswith("delta_e") or not isinstance(value, float):
            continue
        prefix = key[: -len("delta_e")]
        low, high = record.get(prefix + "bracket_low"), record.get(prefix + "bracket_high")
        bracket = (f" [{low:.2f}, {high:.2f}]" if isinstance(low, float) and isinstance(high, float)
                   and math.isfinite(low) and math.isfinite(high) else "")
        out[key] = f"{value:.3f}{bracket} @{step}"
    return out


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


class Distiller:
    """Distil ``teacher`` into ``student`` with DMD / DMD2.

    Args:
        teacher: the real score, a denoiser ``D(x, sigma, class_labels=None)``; frozen here (once
            every check has passed). It is test-called once on two samples.
        student: a generator ``G(z, class_labels=None)``: :class:`~dmdcopy.students.OneStepStudent`,
            :class:`~dmdcopy.students.MultiStepStudent` (trained with backward simulation) or any
            module built from scratch. ``class_labels`` are ``(B,)`` int64 class indices (a
            :class:`~dmdcopy.precond.EDMPrecond` inside turns them into one-hot vectors).
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
            It belongs to one run: a fresh ``train()`` refuses a directory holding another run's
            checkpoints or log, and a second writer is refused while a run holds it.
        overwrite: a fresh ``train()`` in an ``out_dir`` holding another run moves that run into
            ``out_dir/previous-<UTC time>/`` instead of refusing (nothing is deleted).
        device: default: the device of the student's parameters. Modules are moved there.
        sample_shape: per-sample shape when neither teacher nor student declares ``sample_shape``.

    The run computes in float32, or in float64 when the student's parameters are all float64
    (fake score and teacher must then accept float64 inputs; the test calls say so if not).

    Under ``torch.distributed`` (e.g. ``torchrun``), student, fake score and discriminator are
    wrapped in DistributedDataParallel (or, with ``config.sharding="fsdp"``, sharded with FSDP2
    together with the EMA copy and a UNet teacher), each process draws its slice of the global
    batch, metrics are averaged and only rank 0 writes files.
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
        overwrite: bool = False,
    ) -> None:
        if not isinstance(config, DistillConfig):
            raise ConfigError(f"config must be a DistillConfig, got {type(config).__name__}")
        if not isinstance(student, nn.Module):
            raise ConfigError(f"student must be an nn.Module G(z, class_labels=None), got {type(student)}")
        cfg = self.config = config
        info = dist_info()
        check_launch(info)
        self.rank, self.world_size = info.rank, info.world_size
        self.is_main = info.is_main
        budget = cfg.budget_warning()
        if budget and self.is_main:
            warnings.warn(f"DistillConfig: {budget}", UserWarning, stacklevel=2)
        self.device = torch.device(device) if device is not None else _device_of(student)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.overwrite = bool(overwrite)
        self.run_id = uuid.uuid4().hex  # a resume adopts the checkpoint's
        self._stop_signal: int | None = None
        self._claimed = False  # out_dir already claimed by an earlier train() of this Distiller
        self.callbacks = list(callbacks)
        self.counters = Counters()
        checks.check_unshared(teacher=teacher, student=student, fake_score=fake_score)
        with checks.restored_on_error(teacher, student, fake_score):
            self._build_models(teacher, student, fake_score, discriminator, real_data, regression_pairs,
                               class_weights, sample_shape)
            self.log = RunLog(self.out_dir, is_main=self.is_main, tensorboard=cfg.tensorboard)
        # What the run is, before any update: a resume must continue the same run.
        self.fingerprint = run_fingerprint(teacher=self.teacher, student=self.student,
                                           fake_score=self.fake_score, discriminator=self.discriminator,
                                           world_size=self.world_size)
        # Every check passed: only now is the teacher frozen.
        if isinstance(self.teacher, nn.Module):
            self.teacher.eval().requires_grad_(False)
        self._levers()

        # --- optimisers, then DDP / FSDP, compile, EMA ---------------------------------------------
        sharded = cfg.sharding == "fsdp"
        if sharded:  # shard first: the optimisers hold the shards; the EMA is a sharded copy
            self._shard()
        self.generator_optimizer = self._adamw(cfg.generator_lr, self.student)
        self.fake_score_optimizer = self._adamw(cfg.fake_score_lr, self.fake_score, self.discriminator)
        # (optimisers built on the unwrapped modules; DDP shares the parameters)
        student_ddp = self.student if sharded else wrap_ddp(self.student, self.device)
        fake_ddp = self.fake_score if sharded else wrap_ddp(self.fake_score, self.device)
        disc_ddp = (self.discriminator if sharded else wrap_ddp(self.discriminator, self.device)
                    ) if self.discriminator else None
        compiled = functools.partial(torch.compile, mode=cfg.compile_mode)
        self.nets = method.Networks(
            teacher=self._teacher_call, student=self.student,
            student_call=compiled(student_ddp) if cfg.compile else student_ddp,
            fake_score=self.fake_score, fake_score_call=compiled(fake_ddp) if cfg.compile else fake_ddp,
            discriminator=self.discriminator, discriminator_call=disc_ddp, hook=self._hook)
        if not sharded:  # after DDP's broadcast of rank 0's weights
            halflife = cfg.ema_halflife_steps
            self._ema = EMA(self.student, halflife) if halflife else None

        self.grid = dmd_sigma_grid(cfg.num_sigmas, cfg.sigma_min, cfg.sigma_max, cfg.rho,
                                   device=self.device, dtype=torch.float64)
        self._regression_fn = _REGRESSION_FNS[cfg.regression_loss]
        # Everything a checkpoint holds, in one place (saving and loading both walk it).
        self.run_state = RunState(
            networks={"student": self.student, "ema": self.ema_student, "fake_score": self.fake_score,
                      "discriminator": self.discriminator},
            optimizers={"generator": self.generator_optimizer, "fake_score": self.fake_score_optimizer},
            counters=self.counters, device=self.device, sharded=sharded)
        # Whether the loop saves checkpoints: where rank 0 has an out_dir. A sharded run gathers the
        # state on every process, so all of them learn rank 0's choice (the others write nothing).
        self._checkpointing = self.out_dir is not None
        if sharded:
            self._checkpointing = not all_true(not (self.is_main and self.out_dir is not None),
                                               self.device)

    def _levers(self) -> None:
        """The speed options of the config that change the networks (docs/performance.md)."""
        cfg = self.config
        if cfg.channels_last:
            for module in (self.student, self.fake_score, self.teacher):
                speed.to_channels_last(module)
        self._teacher_call = self.teacher
        if cfg.teacher_dtype is not None:
            self._teacher_call = speed.LowPrecisionTeacher(self.teacher, getattr(torch, cfg.teacher_dtype),
                                                           inference_mode=cfg.sharding != "fsdp")
            probe = (self.sample_shape, self.label_dim, self.device, self.dtype, self._autocast)
            checks.probe_denoiser(self._teacher_call, f"teacher (in {cfg.teacher_dtype})", *probe)

    def _adamw(self, lr: float, *modules: nn.Module | None) -> torch.optim.Optimizer:
        cfg = self.config
        params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
        return speed.adamw(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                           fused=cfg.fused_optimizer)

    def _shard(self) -> None:
        """FSDP2: rank 0's weights everywhere, an EMA copy, then every network sharded
        (:mod:`dmdcopy.distill.fsdp`). The architectures are kept on the meta device for export."""
        modules = [m for m in (self.student, self.fake_score, self.discriminator) if m is not None]
        if isinstance(self.teacher, nn.Module) and fsdp.fsdp_units(self.teacher):
            # a block network (UNet) is sharded; an exact or MLP teacher stays whole (and keeps its
            # class, which FSDP would swap, so that it saves as itself)
            modules.append(self.teacher)
        for m in modules:
            fsdp.broadcast_from_rank0(m)
        self._templates = {"student": fsdp.meta_copy(self.student)}
        halflife = self.config.ema_halflife_steps
        self._ema = EMA(self.student, halflife) if halflife else None
        if self._ema is not None:
            modules.append(self._ema.module)
        for m in modules:
            fsdp.shard(m, self.device)

    def _build_models(self, teacher, student, fake_score, discriminator, real_data, regression_pairs,
                      class_weights, sample_shape) -> None:
        """Check the setup and move the models to the device; change no ``requires_grad`` flag of
        the teacher (the caller freezes it once this has passed)."""
        cfg = self.config
        if not any(p.requires_grad for p in student.parameters()):
            raise ConfigError(
                "student: no parameter requires grad; nothing to train. A student built on a frozen "
                "network (e.g. OneStepStudent(copy.deepcopy(teacher)) of a teacher with "
                "requires_grad=False) is frozen too: call student.requires_grad_(True) first")
        if fake_score is None:
            if not isinstance(teacher, nn.Module) or not any(True for _ in teacher.parameters()):
                raise ConfigError("fake_score: the teacher has no parameters to copy (an exact teacher "
                                  "such as GaussianMixtureTeacher); pass fake_score=, e.g. "
                                  "EDMPrecond(MLP(dim)) trained from scratch")
            fake_score = copy.deepcopy(teacher)
        self.sample_shape, self.label_dim = checks.sample_shapes(teacher, student, fake_score, sample_shape)
        self.multi_step = isinstance(student, MultiStepStudent)
        for name in ("batch_size", "regression_batch_size"):
            v = getattr(cfg, name)
            if v is not None and v % self.world_size:
                raise ConfigError(f"{name}={v} is not divisible by the number of processes "
                                  f"({self.world_size})")
        self.local_batch = cfg.batch_size // self.world_size
        self.local_regression_batch = (cfg.regression_batch_size or cfg.batch_size) // self.world_size
        self.dtype = checks.run_dtype(student)
        self.class_weights = checks.label_cdf(class_weights, self.label_dim, self.device)
        self.real_data = self._data(real_data, "real_data")
        self.regression_pairs = None
        if cfg.regression_weight > 0:
            self.regression_pairs = checks.check_pairs(regression_pairs, sample_shape=self.sample_shape,
                                                       multi_step=self.multi_step, data=self._data)

        self.teacher = teacher.to(self.device) if isinstance(teacher, nn.Module) else teacher
        self.student = student.to(self.device).train()
        probe = (self.sample_shape, self.label_dim, self.device, self.dtype, self._autocast)
        checks.probe_denoiser(self.teacher, "teacher", *probe)
        checks.probe_denoiser(fake_score.to(self.device), "fake_score", *probe)
        self.fake_score = fake_score.train().requires_grad_(True)
        checks.probe_student(self.student, *probe)

        self._hook: FeatureHook | None = None
        self.discriminator: nn.Module | None = None
        if cfg.gan:
            if self.real_data is None:
                raise ConfigError("gan=True needs real_data= (real samples, optionally with labels)")
            self._hook = FeatureHook(self.fake_score, cfg.gan_feature_module)
            try:
                if discriminator is None:
                    features = self._probe_features()
                    # Seeded from the run's seed (and not from the global RNG), so two runs of one
                    # config start from the same head and a resume can check it.
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(_rng.derive_key(cfg.seed, _DISCRIMINATOR_INIT_KEY))
                        discriminator = ClassifierHead(features)
            except BaseException:
                self._hook.remove()
                raise
            self.discriminator = discriminator.to(self.device).train()

    # --- setup helpers --------------------------------------------------------------------------

    # The counters live in ``self.counters`` (saved in checkpoints); these read them.
    step = property(lambda self: self.counters.step, doc="Training steps done (see the module doc).")
    generator_updates = property(lambda self: self.counters.generator_updates)
    fake_score_updates = property(lambda self: self.counters.fake_score_updates)
    nonfinite_total = property(lambda self: self.counters.nonfinite_total)
    nonfinite_in_a_row = property(lambda self: self.counters.nonfinite_in_a_row)

    @property
    def ema_student(self) -> nn.Module | None:
        """The EMA copy of the student (eval mode), or ``None`` when EMA is off."""
        return self._ema.module if self._ema is not None else None

    def unsharded_students(self) -> dict[str, nn.Module | None]:
        """``{"student": G, "student_ema": G_ema or None}`` as plain modules to save or measure.

        Without FSDP these are the run's own modules. With ``sharding="fsdp"`` every process must
        call (the shards are gathered); rank 0 gets plain CPU copies with the full weights, the
        others ``None`` for each. ``dmdcopy distill`` exports these for ``dmdcopy delta-e``.
        """
        if not fsdp.is_sharded(self.student):
            return {"student": self.student, "student_ema": self.ema_student}
        out: dict[str, nn.Module | None] = {}
        for name, module in (("student", self.student), ("student_ema", self.ema_student)):
            if module is None:
                out[name] = None
                continue
            state = fsdp.full_state(module)
            copy_ = fsdp.unsharded_copy(self._templates["student"], state) if self.is_main else None
            if copy_ is not None and name == "student_ema":
                copy_.eval().requires_grad_(False)
            out[name] = copy_
        return out

    def _data(self, data, name: str):
        return checks.check_data(data, name, self.sample_shape, self.label_dim, self.device, self.dtype)

    def _probe_features(self) -> tuple[int, ...]:
        x, labels = checks.probe_inputs(self.sample_shape, self.label_dim, self.device, self.dtype)
        with torch.no_grad(), self._autocast():
            denoise(self.fake_score, x, torch.ones(2, device=self.device, dtype=self.dtype), labels)
        if self._hook.features is None:
            raise ConfigError(f"gan_feature_module: {self.config.gan_feature_module!r} is never called in "
                              "the fake score's forward (a ModuleList/ModuleDict container?); name a "
                              "module that runs, e.g. a block's last layer")
        return tuple(self._hook.pop().shape[1:])

    def _autocast(self):
        """bfloat16 autocast with ``config.mixed_precision`` on CUDA (and on CPU with
        ``config.autocast_on_cpu``); no-op otherwise."""
        cfg = self.config
        if cfg.mixed_precision and (self.device.type == "cuda"
                                    or (self.device.type == "cpu" and cfg.autocast_on_cpu)):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- the two updates ----------------------------------------------------------------------

    def draws(self, substep: int, *, step: int | None = None) -> Draws:
        """The random draws of sub-step ``substep`` (``0..F-1``: fake-score updates, ``F``: the
        generator update) of ``step`` (default: the current one) for this process's samples."""
        start = self.rank * self.local_batch
        index = torch.arange(start, start + self.local_batch, device=self.device)
        return Draws(self.config.seed, self.step if step is None else step, substep, index,
                     self.sample_shape, self.grid, self.class_weights, self.dtype)

    def fake_score_step(self, substep: int) -> FakeScoreRecord:
        """One fake-score update on fresh student samples: denoising loss (+ GAN discriminator)."""
        cfg, draws = self.config, self.draws(substep)
        real = None
        if cfg.gan:
            x, labels = self.real_data
            j = draws.indices(Stream.REAL_INDEX, x.shape[0])
            real = x[j], (labels[j] if labels is not None else None)
        self.fake_score_optimizer.zero_grad(set_to_none=True)
        losses = method.fake_score_loss(self.nets, draws, cfg, real=real, autocast=self._autocast)
        losses.loss.backward()
        norm, ok = self._clip_and_check(self.fake_score_optimizer, losses.loss)
        if ok:
            self.fake_score_optimizer.step()
            self.counters.fake_score_updates += 1
        self._after_update(ok, "fake_score")
        gan = losses.gan
        vals = torch.stack([losses.loss.detach(), losses.dsm.detach(),
                            (gan if gan is not None else losses.dsm).detach()])
        loss_v, dsm_v, gan_v = vals.float().tolist()
        return FakeScoreRecord(loss_v, dsm_v, gan_v if cfg.gan else None, norm, not ok)

    def generator_step(self) -> GeneratorRecord:
        """One generator update: DMD loss (+ GAN generator loss, + regression to teacher pairs)."""
        cfg = self.config
        draws = self.draws(cfg.fake_score_steps)  # sub-steps 0..F-1 were the fake-score updates
        regression = None
        if self.regression_pairs is not None:
            z, x, labels = self.regression_pairs
            start = self.rank * self.local_regression_batch
            pos = torch.arange(start, start + self.local_regression_batch, device=self.device)
            j = draws.indices(Stream.REGRESSION_INDEX, z.shape[0], index=pos)
            regression = z[j], x[j], (labels[j] if labels is not None else None)
        self.generator_optimizer.zero_grad(set_to_none=True)
        losses = method.generator_loss(self.nets, draws, cfg, regression=regression,
                                       regression_fn=self._regression_fn, autocast=self._autocast)
        losses.loss.backward()
        norm, ok = self._clip_and_check(self.generator_optimizer, losses.loss, losses.teacher_finite)
        if ok:
            self.generator_optimizer.step()
            self.counters.generator_updates += 1
            if self._ema is not None:
                self._ema.update(self.student)
        self._after_update(ok, "generator")
        gan, reg = losses.gan, losses.regression
        parts = [losses.loss, losses.dmd] + [t for t in (gan, reg) if t is not None]
        vals = torch.stack([t.detach() for t in parts]).float().tolist()
        loss_v, dmd_v, rest = vals[0], vals[1], iter(vals[2:])
        gan_v = next(rest) if gan is not None else None
        reg_v = next(rest) if reg is not None else None
        return GeneratorRecord(loss_v, dmd_v, gan_v, reg_v, norm, not ok)

    def _clip_and_check(self, opt: torch.optim.Optimizer, loss: torch.Tensor,
                        teacher_finite: torch.Tensor | None = None) -> tuple[float, bool]:
        """Clip the global grad norm; return (norm before clipping, loss and norm finite everywhere,
        and the teacher's outputs finite)."""
        params = [p for g in opt.param_groups for p in g["params"]]
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if isinstance(norm, DTensor):  # FSDP: the norm over every shard, the same on each process
            norm = norm.full_tensor()
        flags = [loss.detach().float(), norm.float()]
        if teacher_finite is not None:
            flags.append(teacher_finite.float())
        loss_v, norm_v, *teacher_ok = torch.stack(flags).tolist()
        ok = all_true(math.isfinite(loss_v) and math.isfinite(norm_v) and all(teacher_ok), self.device)
        return norm_v, ok

    def _after_update(self, ok: bool, what: str) -> None:
        """Count a skipped update; the run stops after too many in a row of one kind."""
        c = self.counters
        if ok:
            c.nonfinite_in_a_row[what] = 0
            return
        c.nonfinite_total += 1
        c.nonfinite_in_a_row[what] += 1
        for opt in (self.generator_optimizer, self.fake_score_optimizer):
            opt.zero_grad(set_to_none=True)
        n = c.nonfinite_in_a_row[what]
        if n >= self.config.max_nonfinite_in_a_row:
            raise NonFiniteError(
                f"step {c.step}: {n} {what} updates in a row had a non-finite loss or gradient"
                f"{' or teacher output' if what == 'generator' else ''} "
                f"({c.nonfinite_total} updates skipped in all). Lower the learning rates, check the "
                "teacher's and student's outputs, or raise max_nonfinite_in_a_row")

    # --- the loop -------------------------------------------------------------------------------

    def train(self, *, resume: str | os.PathLike | None = None, allow_new_init: bool = False) -> Distiller:
        """Run until ``config.num_steps`` steps are done; ``resume="latest"`` or a path first
        restores a checkpoint (``"latest"`` starts fresh when ``out_dir`` holds none; see
        :meth:`resume` for ``allow_new_init``).

        With ``out_dir``, rank 0 holds the directory's writer lock for the whole call, removes
        temp files of interrupted writes and, without ``resume``, refuses (or with ``overwrite``
        moves aside) another run's files. SIGINT / SIGTERM (in the main thread) end the current
        step, write a checkpoint and raise :class:`~dmdcopy.errors.RunInterrupted`.
        """
        with self._own_out_dir(fresh=resume is None), self._signals_stop():
            if resume is not None:
                self.resume(resume, allow_new_init=allow_new_init)
            self._loop()
        return self

    @contextlib.contextmanager
    def _own_out_dir(self, *, fresh: bool):
        """Rank 0 locks and claims ``out_dir``; every process learns whether that succeeded (other
        ranks may have no ``out_dir``, so all take part in the check)."""
        with contextlib.ExitStack() as stack:
            error: BaseException | None = None
            if self.is_main and self.out_dir is not None:
                try:
                    stack.enter_context(rundir.writer_lock(self.out_dir))
                    rundir.remove_temp_files(self.out_dir)
                    fresh = fresh and not self._claimed  # a second train() continues this run
                    if fresh and self.overwrite:
                        moved = rundir.move_aside(self.out_dir)
                        if moved is not None:
                            print(f"dmdcopy: moved the earlier run in {self.out_dir} to {moved}",
                                  file=sys.stderr)
                            if self.config.tensorboard:  # its writer's folder moved with the old run
                                self.log.close()
                                self.log = RunLog(self.out_dir, is_main=True, tensorboard=True)
                    elif fresh:
                        rundir.check_fresh(self.out_dir)
                except ConfigError as e:
                    error = e
                except OSError as e:
                    error = ConfigError(f"out_dir {self.out_dir}: cannot write there ({e})")
                self._claimed = error is None
            if not all_true(error is None, self.device):
                raise error if error is not None else ConfigError(
                    f"{self.out_dir}: rank 0 refused the output directory (see its error)")
            yield

    @contextlib.contextmanager
    def _signals_stop(self):
        """SIGINT / SIGTERM ask the loop to stop after the current step (a second one stops at once)."""
        def handler(signum, frame):
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum

        self._stop_signal = None
        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: signals are not ours to take
            pass
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _loop(self) -> None:
        from tqdm.auto import tqdm

        cfg = self.config
        bar = tqdm(total=cfg.num_steps, initial=self.step, disable=not (self.is_main and cfg.progress_bar),
                   desc="distill", dynamic_ncols=True)
        window = Window()
        postfix: dict[str, str] = {}
        try:
            while self.step < cfg.num_steps:
                window.fake += [self.fake_score_step(s) for s in range(cfg.fake_score_steps)]
                window.gen.append(self.generator_step())
                self.counters.step += 1
                record: dict[str, Any] = {}
                if self.step % cfg.log_every == 0 or self.step == cfg.num_steps:
                    record = self._summary(window)
                    window = Window()
                    postfix.update({name: f"{v:.4g}" if isinstance(v, float) else str(v) for name, v in
                                    (("gen", record["generator_loss"]), ("fake", record["fake_score_loss"]))})
                for callback in self.callbacks:
                    record.update(callback(self, self.step) or {})
                if record:
                    postfix.update(_delta_e_postfix(record, self.step))
                    bar.set_postfix(postfix, refresh=False)
                    self.log.write({"step": self.step, **record})
                bar.update(1)
                stop = self._stop_requested()
                if self._checkpointing and (self.step % cfg.checkpoint_every == 0
                                            or self.step == cfg.num_steps or stop):
                    self.save_checkpoint()
                if stop:
                    self._interrupted()
        finally:
            bar.close()
            self.log.flush()

    def _stop_requested(self) -> bool:
        return not all_true(self._stop_signal is None, self.device)

    def _interrupted(self) -> None:
        signum = self._stop_signal or signal.SIGINT
        name = signal.Signals(signum).name
        where = (f"checkpoint written to {self.out_dir}; resume with train(resume='latest') or "
                 "`dmdcopy distill CONFIG --resume`" if self.out_dir is not None
                 else "no out_dir, so no checkpoint was written")
        raise RunInterrupted(f"{name} at step {self.step} of {self.config.num_steps}: {where}",
                             signum=int(signum), step=self.step)

    def _summary(self, window: Window) -> dict[str, Any]:
        """The window's means, averaged over processes, and the run's rates and counters."""
        means = window.means(gan=self.config.gan, regression=self.regression_pairs is not None)
        vals = all_reduce_mean(list(means.values()), self.device)
        out: dict[str, Any] = {n: (v if math.isfinite(v) else None) for n, v in zip(means, vals)}
        out.update(
            generator_lr=self.generator_optimizer.param_groups[0]["lr"],
            fake_score_lr=self.fake_score_optimizer.param_groups[0]["lr"],
            samples_per_s=self.config.batch_size * len(window.gen) / max(window.seconds(), 1e-9),
            fake_score_updates=self.fake_score_updates,
            generator_updates=self.generator_updates,
            nonfinite_skipped=self.nonfinite_total,
        )
        return out

    # --- checkpoints ----------------------------------------------------------------------------

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything a resume needs: flat tensors and a JSON-able dict (see :class:`RunState`)."""
        return self.run_state.state(config=self.config.to_dict(), world_size=self.world_size,
                                    run_id=self.run_id, fingerprint=self.fingerprint)

    def save_checkpoint(self) -> Path | None:
        """Write ``out_dir/checkpoint-<step>.safetensors`` (rank 0) and keep this run's newest K
        (checkpoints of another run, or newer than this step, are never deleted)."""
        if self.out_dir is None and not (self._checkpointing and not self.is_main):
            raise ConfigError("out_dir: the distiller has no output directory to write checkpoints to")
        tensors, state = self.state_tensors()  # sharded (FSDP): a collective, every process calls
        if self.out_dir is None:
            return None
        path = self.out_dir / ckpt.checkpoint_name(self.step)
        if self.is_main:
            ckpt.write_checkpoint(path, tensors, state)
            ckpt.prune_checkpoints(self.out_dir, self.config.keep_checkpoints, run_id=self.run_id,
                                   up_to=self.step)
        return path

    def resume(self, source: str | os.PathLike, *, allow_new_init: bool = False) -> Path | None:
        """Restore from ``"latest"`` (newest valid checkpoint in ``out_dir``; none: no-op) or a path.

        A checkpoint of another run (teacher, architectures, initial weights, process count, or a
        config field other than the lengths and intervals) is refused, naming what differs.
        ``allow_new_init=True`` accepts networks initialised differently from the run's (their
        trained weights are loaded over them): for scripts that build networks unseeded.

        ``"latest"`` skips (and reports on stderr) a damaged or corrupt checkpoint for the newest
        one that reads back whole and matches its digest; when checkpoints exist but none does, it
        raises rather than start again from step 0.
        """
        if str(source) != "latest":
            path = Path(source)
            self.load_checkpoint(path, allow_new_init=allow_new_init)
            return path
        if self.out_dir is None:
            raise ConfigError("resume='latest' needs out_dir")
        found = ckpt.list_checkpoints(self.out_dir)
        if not found:  # a run stopped before its first checkpoint starts again from step 0
            self.log.trim(self.step)
            return None
        for _, path in reversed(found):
            try:
                read = ckpt.read_checkpoint(path)
            except CheckpointError as e:
                if self.is_main:
                    print(f"dmdcopy: skipping {path.name}: {e}", file=sys.stderr)
                continue
            self._load(read, path, allow_new_init=allow_new_init)
            return path
        raise CheckpointError(f"{self.out_dir}: none of its {len(found)} checkpoint(s) reads back whole "
                              "(see above); resume from a copy, or start afresh with overwrite=True "
                              "(`--overwrite`), which moves them aside")

    def load_checkpoint(self, path: str | os.PathLike, *, allow_new_init: bool = False) -> None:
        """Load weights, optimiser states, counters and RNG states from a checkpoint file (of this
        run: see :meth:`resume`)."""
        self._load(ckpt.read_checkpoint(path), Path(path), allow_new_init=allow_new_init)

    def _load(self, read: tuple[dict[str, torch.Tensor], dict[str, Any]], path: Path, *,
              allow_new_init: bool = False) -> None:
        tensors, state = read
        check_resumable(state.get("config", {}), self.config, str(path))
        self.run_state.check(tensors, state, source=str(path))
        check_identity(state.get("fingerprint"), self.fingerprint, str(path), allow_new_init=allow_new_init)
        self.run_state.load(tensors, state, source=str(path))
        if state.get("run_id"):
            self.run_id = str(state["run_id"])
        self.log.trim(self.step)
        if self.is_main:
            print(f"dmdcopy: resumed from step {self.step} ({path.name})", file=sys.stderr)
