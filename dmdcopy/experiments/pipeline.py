"""The steps every copying experiment repeats: build a one-step student, distil it with DMD, and
measure its pairing against the teacher's on shared noise.

A student is ``G(z) = D_theta(sigma_max z, sigma_max)`` (:class:`dmdcopy.students.OneStepStudent`)
whose denoiser is either a copy of the teacher (DMD2's initialisation) or a fresh network of the
same architecture ("scratch"). :func:`distill_student` is the one place the experiments call the
distiller, and :func:`evaluate_student` the one place they measure a student
(:func:`dmdcopy.measure.measure_student`, the path of :func:`dmdcopy.delta_e` and ``dmdcopy delta-e``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch import nn

from dmdcopy.distill.callbacks import DeltaECallback
from dmdcopy.errors import ConfigError
from dmdcopy.experiments.common import batched, delta_e_record, seeded, transport_summary
from dmdcopy.measure import TeacherSamples, measure_student
from dmdcopy.precond import EDMPrecond
from dmdcopy.students import OneStepStudent

__all__ = ["STUDENT_INITS", "CurveCallback", "distill_student", "evaluate_student", "make_student"]

# How a student's weights start: a copy of the teacher (DMD2) or a fresh network.
STUDENT_INITS = ("teacher_init", "scratch")


def make_student(
    teacher: EDMPrecond,
    init: str,
    *,
    net_factory: Callable[[], nn.Module] | None = None,
    sigma_max: float | None = None,
    seed: int = 0,
) -> OneStepStudent:
    """A one-step student for ``teacher``.

    Args:
        teacher: the trained teacher: an :class:`EDMPrecond` around a raw network, or a denoiser
            that records its own constructor (``init_kwargs``, e.g. ``EDM2Precond``).
        init: ``"teacher_init"`` (deep copy of the teacher, DMD2) or ``"scratch"`` (a new network
            from ``net_factory`` behind the same preconditioning, or a new denoiser of the
            teacher's class and settings, initialised with ``seed``).
        net_factory: builds the raw network; default: the teacher network's class with its
            ``init_kwargs``.
    """
    if init not in STUDENT_INITS:
        raise ConfigError(f"student init must be one of {STUDENT_INITS}, got {init!r}")
    param = next(teacher.parameters())
    if init == "teacher_init":
        denoiser = copy.deepcopy(teacher)
    elif net_factory is None and not isinstance(getattr(teacher, "model", None), nn.Module) \
            and getattr(teacher, "init_kwargs", None) is not None:
        # a denoiser that is one recorded network, preconditioning included (e.g. EDM2Precond)
        denoiser = seeded(seed, lambda: type(teacher)(**teacher.init_kwargs))
        denoiser = denoiser.to(device=param.device, dtype=param.dtype)
    else:
        if net_factory is None:
            kwargs = getattr(teacher.model, "init_kwargs", None)
            if kwargs is None:
                raise ConfigError("make_student: pass net_factory; the teacher network has no init_kwargs")

            def net_factory() -> nn.Module:
                return type(teacher.model)(**kwargs)

        net = seeded(seed, net_factory)
        net = net.to(device=param.device, dtype=param.dtype)
        denoiser = EDMPrecond(net, sigma_data=getattr(teacher, "sigma_data", 0.5),
                              sigma_min=teacher.sigma_min, sigma_max=teacher.sigma_max,
                              label_dim=teacher.label_dim)
    denoiser.train().requires_grad_(True)
    return OneStepStudent(denoiser, sigma_max=sigma_max)


def distill_student(
    teacher: nn.Module,
    student: OneStepStudent,
    config,
    *,
    fake_score: nn.Module | None = None,
    real_data: torch.Tensor | None = None,
    regression_pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    callbacks: tuple = (),
    seed: int = 0,
) -> dict:
    """Distil ``student`` from ``teacher`` with DMD (:class:`dmdcopy.distill.Distiller`).

    Args:
        teacher: the real score ``D_real`` (frozen).
        student: trained in place.
        config: a :class:`dmdcopy.distill.DistillConfig`; ``num_steps`` generator updates.
        fake_score: default: a copy of the teacher (an exact teacher needs one passed).
        real_data: ``(N, ...)`` real samples, the GAN's real side (when ``config.gan``).
        regression_pairs: ``(z, T(z))`` for the regression loss (when ``config.regression_weight > 0``).
        callbacks: distiller callbacks.
        seed: seeds the CPU generator while the distiller is built and run (the GAN head's
            initialisation draws from it; the distiller's own draws derive from ``config.seed``);
            the caller's generator state is restored afterwards.

    Returns: ``dict(seconds, generator_updates, fake_score_updates, nonfinite_skipped)``.
    """
    from dmdcopy.distill import Distiller

    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        distiller = Distiller(teacher, student, config=config, fake_score=fake_score, real_data=real_data,
                              regression_pairs=regression_pairs, callbacks=callbacks)
        distiller.train()
    return dict(seconds=time.perf_counter() - t0, generator_updates=distiller.generator_updates,
                fake_score_updates=distiller.fake_score_updates,
                nonfinite_skipped=distiller.nonfinite_total)


def evaluate_student(
    G: Callable[..., torch.Tensor],
    teacher: TeacherSamples,
    *,
    exact: TeacherSamples | None = None,
    quality: Callable[[torch.Tensor], dict] | None = None,
    n_boot: int = 500,
    batch: int = 1024,
) -> tuple[dict, torch.Tensor]:
    """Measure a student on the noises of ``teacher`` with :func:`dmdcopy.measure.measure_student`.

    Args:
        G: the student ``z -> x``.
        teacher: the trained teacher's map ``T(z)`` of the evaluation noises
            (:func:`~dmdcopy.experiments.common.teacher_set`).
        exact: the exact teacher's map of the same noises, when known.
        quality: ``samples -> dict`` of distribution-quality figures against the exact data.

    Returns: ``(summary, samples)``: ``summary`` holds ``finite``, ``n``, ``n_nonfinite``,
    ``delta_e`` (against the trained teacher) and ``delta_e_vs_exact``
    (:func:`~dmdcopy.experiments.common.delta_e_record`), ``transport`` (teacher-free) and
    ``quality``, the last four ``None`` when the student's samples are not finite; ``samples`` is
    ``G(z)`` on the CPU.
    """
    report = measure_student(G, teacher, batch=batch, n_boot=n_boot)
    with torch.no_grad():
        s = batched(G, teacher.z, batch).detach()
    out: dict = dict(finite=report.result is not None, n=len(teacher.seeds), n_nonfinite=report.n_nonfinite)
    if report.result is None:
        out.update(delta_e=None, delta_e_vs_exact=None, transport=None, quality=None)
        return out, s.cpu()
    out["delta_e"] = delta_e_record(report)
    if exact is not None:
        out["delta_e_vs_exact"] = delta_e_record(measure_student(G, exact, batch=batch, n_boot=n_boot))
    out["transport"] = transport_summary(teacher.z, s, n_boot=n_boot)
    out["quality"] = quality(s) if quality is not None else {}
    return out, s.cpu()


# The figures a training curve keeps at each measurement (PairingResult fields, n_boot = 0).
CURVE_FIELDS = ("delta_e", "delta_e_lower", "delta_e_upper", "resolution")


class CurveCallback(DeltaECallback):
    """Delta E over training: the bracket and the finite-N figure of the student every ``every``
    generator steps (through :class:`~dmdcopy.distill.callbacks.DeltaECallback`, on the
    experiment's own teacher samples), and the student's distribution quality at the same steps.

    Args:
        every: measure when ``step % every == 0``.
        teacher: the teacher's map of the evaluation noises (the experiment's ``teacher_set``).
        quality: ``samples -> float``, e.g. the sliced Wasserstein distance to exact data.

    :attr:`curve` is a dict of equal-length lists: ``step``, ``delta_e`` (finite-N),
    ``delta_e_lower`` / ``delta_e_upper`` (the bracket's point estimates; no bootstrap, to keep a
    measurement cheap), ``resolution``, ``quality`` and ``nonfinite`` (non-finite student samples;
    the figures are ``None`` then). :meth:`record` adds a point by hand (step 0, before training).
    """

    def __init__(self, every: int, teacher: TeacherSamples, *,
                 quality: Callable[[torch.Tensor], float] | None = None, batch: int = 1024) -> None:
        super().__init__(every, teacher.seeds, teacher=teacher, batch=batch, n_boot=0)
        self.quality = quality
        self.curve: dict[str, list] = {k: [] for k in ("step", *CURVE_FIELDS, "quality", "nonfinite")}

    def record(self, step: int, G: Callable[..., torch.Tensor]) -> None:
        """Measure the student ``G`` now and append it to the curve as step ``step``."""
        ts = self._teacher
        report = measure_student(G, ts, batch=self.batch, n_boot=0)
        self._append(step, report, G)

    def _append(self, step: int, report, G) -> None:
        r = report.result
        self.curve["step"].append(int(step))
        for key in CURVE_FIELDS:
            self.curve[key].append(None if r is None else getattr(r, key))
        q = None
        if r is not None and self.quality is not None:
            module = G if isinstance(G, nn.Module) else None
            was_training = module.training if module is not None else False
            if module is not None:
                module.eval()  # as measure_student runs it
            try:
                with torch.no_grad():
                    q = self.quality(batched(G, self._teacher.z, self.batch).detach())
            finally:
                if module is not None:
                    module.train(was_training)
        self.curve["quality"].append(q)
        self.curve["nonfinite"].append(int(report.n_nonfinite))

    def __call__(self, distiller, step: int) -> None:
        if step % self.every != 0:
            return None
        ema = getattr(distiller, "ema_student", None)
        G = ema if (self.use_ema and ema is not None) else distiller.student
        self._append(step, self.measure(distiller), G)
        return None
