"""Digits: copying on real (small) images, against teacher convergence and memorisation.

scikit-learn's 8x8 digits (:func:`dmdcopy.data.load_digits`, resized to 8, 16 or 32 px) are split
into a training and a held-out set. A teacher is trained on the training set with the EDM loss;
its EMA weights at several points of training are the *convergence levels*. The *memorising
teacher* is the exact empirical denoiser of the training set
(:class:`dmdcopy.teachers.EmpiricalTeacher`): its ODE sends every noise to a training image.

For every level a one-step student initialised from that teacher is distilled with DMD, and for the
final level and the memorising teacher a student from scratch too; each is measured by Delta E
against its own teacher's map on fixed noises, by the sliced Wasserstein distance to held-out
digits, and by how often its samples sit on a training image (nearest / second-nearest training
distance below 1/3, a common memorisation criterion).

The network is a small :class:`dmdcopy.nets.unet.SongUNet` (``network="unet"``) or an MLP on the
flattened image (``network="mlp"``, much faster on a CPU).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dmdcopy.data.digits import load_digits, split_digits
from dmdcopy.distill.config import DistillConfig
from dmdcopy.errors import ConfigError
from dmdcopy.experiments.common import (
    Timer,
    batched,
    check_seeds,
    seed_summary,
    seeded,
    teacher_set,
    toy_distill_config,
)
from dmdcopy.experiments.pipeline import CurveCallback, distill_student, evaluate_student, make_student
from dmdcopy.experiments.report import machine_info
from dmdcopy.experiments.resume import ResultsFile, seed_section, seeds_document
from dmdcopy.experiments.teacher_cache import cached_teacher
from dmdcopy.experiments.teacher_training import TeacherConfig, train_teacher
from dmdcopy.nets.image_mlp import ImageMLP
from dmdcopy.noise import noise_for_seeds
from dmdcopy.precond import EDMPrecond
from dmdcopy.samplers import teacher_ode
from dmdcopy.schedules import karras_sigmas
from dmdcopy.w2 import sliced_wasserstein

__all__ = ["DIGITS_PRESETS", "DigitsConfig", "digits_seeds", "memorisation_stats", "run_digits"]

EVAL_SEED_OFFSET = 2_000_000


@dataclass(frozen=True, kw_only=True)
class DigitsConfig:
    """The digits experiment."""

    resolution: int = 8  # 8, 16 or 32 px
    network: str = "mlp"  # "mlp" (flattened image) or "unet" (small SongUNet)
    hidden: int = 256  # MLP width
    depth: int = 3  # MLP blocks
    unet_channels: int = 16  # SongUNet model_channels (channel_mult (1, 2), one block per level)
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(steps=2000, batch=128))
    levels: tuple[float, ...] = (0.05, 0.25, 1.0)  # convergence levels: fractions of teacher training
    distill: DistillConfig = field(default_factory=lambda: toy_distill_config(300))
    memorising: bool = True  # also distil from the exact empirical (memorising) teacher
    scratch: bool = True  # also a from-scratch student at the final level and for the memorising teacher
    train_fraction: float = 0.8  # of the 1,797 digits; the rest is held out
    num_eval: int = 500  # evaluation noises
    ode_steps: int = 32  # Heun steps of each teacher's map
    n_boot: int = 500
    seed: int = 0  # data split, teacher, student and distillation seeds derive from it (digits_seeds)
    seeds: tuple[int, ...] = ()  # run the experiment for each of these seeds (empty: just `seed`)
    eval_every: int = 50  # Delta E curve: measure every this many generator steps (0: no curve)

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(float(v) for v in self.levels))
        object.__setattr__(self, "seeds", tuple(int(v) for v in self.seeds))
        check_seeds(self.seed, self.seeds, "DigitsConfig")
        if self.eval_every < 0:
            raise ConfigError(f"DigitsConfig.eval_every must be >= 0, got {self.eval_every}")
        if self.resolution not in (8, 16, 32):
            raise ConfigError(f"DigitsConfig.resolution must be 8, 16 or 32, got {self.resolution}")
        if self.network not in ("mlp", "unet"):
            raise ConfigError(f"DigitsConfig.network must be 'mlp' or 'unet', got {self.network!r}")
        if not self.levels or any(not 0 < v <= 1 for v in self.levels):
            raise ConfigError(f"DigitsConfig.levels must be fractions in (0, 1], got {self.levels}")
        if self.num_eval < 4:
            raise ConfigError(f"DigitsConfig.num_eval must be >= 4, got {self.num_eval}")

    def level_steps(self) -> tuple[int, ...]:
        return tuple(sorted({max(1, round(v * self.teacher.steps)) for v in self.levels}))

    def run_seeds(self) -> tuple[int, ...]:
        """The seeds the experiment runs for: ``seeds``, or ``(seed,)`` when it is empty."""
        return self.seeds or (self.seed,)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["teacher"] = dataclasses.asdict(self.teacher)
        d["distill"] = self.distill.to_dict()
        return d


def _digits_preset(teacher_steps: int, distill_steps: int, levels: tuple[float, ...], num_eval: int,
                   eval_every: int, **kwargs) -> DigitsConfig:
    return DigitsConfig(teacher=TeacherConfig(steps=teacher_steps, batch=128), levels=levels,
                        distill=toy_distill_config(distill_steps), num_eval=num_eval,
                        eval_every=eval_every, **kwargs)


# Scales of the digits experiment, as the CLI's --quick / default / --full / --long (the default's
# setting distilled 4x longer, 3 seeds).
DIGITS_PRESETS: dict[str, Callable[[], DigitsConfig]] = {
    "quick": lambda: _digits_preset(300, 60, (0.1, 1.0), 300, 20, hidden=128),
    "default": lambda: _digits_preset(2000, 300, (0.05, 0.25, 1.0), 500, 50),
    "full": lambda: _digits_preset(6000, 1500, (0.05, 0.25, 1.0), 1000, 250, resolution=16, network="unet",
                                   unet_channels=32),
    "long": lambda: _digits_preset(2000, 1200, (0.05, 0.25, 1.0), 500, 100, seeds=(0, 1, 2)),
}


# Teacher/student image pairs kept per student for the digits picture (``digits_pairs.png``).
PICTURE_PAIRS = 8


def _rounded(x: torch.Tensor) -> list:
    """Images as nested lists with 4 decimals (a picture needs no more; NaN stays NaN)."""
    return torch.round(x.detach().float().cpu(), decimals=4).tolist()


def digits_seeds(seed: int) -> dict[str, int]:
    """The seeds of every random draw of the digits experiment for run seed ``seed``: ``split``
    (training / held-out split), ``net`` (the teacher's initial weights), ``teacher_training``,
    ``student`` (scratch students' initial weights) and ``distill`` (``DistillConfig.seed``). The
    evaluation noises and the sliced-Wasserstein projections are the same for every seed."""
    return dict(split=seed, net=seed, teacher_training=seed + 1, student=seed + 5, distill=seed + 6)


def _make_net(config: DigitsConfig, shape: tuple[int, ...]) -> nn.Module:
    if config.network == "mlp":
        return ImageMLP(shape, hidden=config.hidden, depth=config.depth)
    from dmdcopy.nets.unet import SongUNet

    return SongUNet(config.resolution, 1, 1, model_channels=config.unet_channels, channel_mult=(1, 2),
                    num_blocks=1, attn_resolutions=(), dropout=0.0)


def memorisation_stats(samples: torch.Tensor, train: torch.Tensor, *, ratio: float = 1 / 3) -> dict:
    """How close samples sit to the training set.

    Args:
        samples: ``(N, ...)``; train: ``(M, ...)`` with ``M >= 2``.
        ratio: a sample counts as memorised when its nearest training image is closer than
            ``ratio`` times the second nearest.

    Returns: ``dict(memorised_rate, nearest_rms)``; ``nearest_rms`` is the mean RMS (per pixel)
    distance to the nearest training image.
    """
    s = samples.reshape(samples.shape[0], -1).double()
    t = train.reshape(train.shape[0], -1).double().to(s.device)
    d2 = torch.cdist(s, t).pow(2)  # (N, M)
    two = d2.topk(2, dim=1, largest=False).values.clamp_min(0).sqrt()  # (N, 2)
    rate = float((two[:, 0] < ratio * two[:, 1]).double().mean())
    return dict(memorised_rate=rate, nearest_rms=float((two[:, 0] / s.shape[1] ** 0.5).mean()))


def run_digits(
    config: DigitsConfig = DigitsConfig(),
    *,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    teacher_cache: str | os.PathLike | None = None,
) -> dict:
    """Run the digits experiment; returns a JSON-ready dict (config, machine, teachers, seconds).

    ``results["teachers"]`` has one entry per convergence level (``"step_<n>"``) and, with
    ``memorising``, ``"memorising"``; each holds the teacher's quality and its students' records
    (with a Delta E ``curve`` over training when ``config.eval_every``). These, ``teacher_train``,
    ``held_out_floor`` and ``final_level`` are those of the first run seed; ``more_seeds`` holds the
    same four for every further seed (by seed, as a string), and ``over_seeds`` the per-seed Delta E
    figures of each (teacher, student) with their mean, t-interval and range.

    ``out``, ``resume`` and ``teacher_cache`` as in
    :func:`~dmdcopy.experiments.run_dimension_sweep`; the unit written and skipped is one level
    (one entry of ``teachers``) of one seed.
    """
    device = torch.device(device)
    t0 = time.perf_counter()
    timer = Timer()
    file = ResultsFile(out, "digits", config.to_dict(), resume=resume)
    seeds = config.run_seeds()
    head = dict(experiment="digits", config=config.to_dict(), machine=machine_info(device),
                eval_seeds=[EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + config.num_eval - 1],  # first, last
                seeds=list(seeds))
    sections: dict[int, dict] = {}

    head["note"] = None if config.network == "unet" else "network: MLP on flattened images"

    def document() -> dict:
        return seeds_document(head, sections, seeds)

    def on_level(seed: int, section: dict) -> None:
        sections[seed] = section
        file.write(document(), complete=False)

    for seed in seeds:
        previous = seed_section(file.previous, seed, seeds[0])
        sections[seed] = _run_digits_seed(config, seed, device=device, progress=progress, timer=timer,
                                          previous=previous, teacher_cache=teacher_cache,
                                          on_level=lambda sec, seed=seed: on_level(seed, sec))
    results = document()
    names = list(sections[seeds[0]]["teachers"])
    results["over_seeds"] = [
        dict(teacher=name, student=init, seeds=list(seeds),
             **seed_summary([sections[s]["teachers"].get(name, {}).get("students", {}).get(init)
                             for s in seeds]))
        for name in names for init in sections[seeds[0]]["teachers"][name]["students"]
    ]
    results.update(seconds=time.perf_counter() - t0, timings=timer.seconds)
    file.write(results, complete=True)
    return results


def _run_digits_seed(config: DigitsConfig, seed: int, *, device: torch.device, progress, timer: Timer,
                     previous: dict | None, teacher_cache, on_level: Callable[[dict], None]) -> dict:
    """One seed of :func:`run_digits`: its ``teacher_train``, ``held_out_floor``, ``final_level`` and
    ``teachers``; ``on_level(section)`` after each finished level."""
    say = progress or (lambda _msg: None)
    rng = digits_seeds(seed)
    tag = "" if len(config.run_seeds()) == 1 else f" seed={seed}"
    g = torch.Generator().manual_seed(rng["split"])
    images = load_digits(config.resolution)
    train, held_out = split_digits(images, config.train_fraction, generator=g)
    train, held_out = train.to(device), held_out.to(device)
    shape = tuple(train.shape[1:])

    def sample_train(n: int, gen: torch.Generator | None) -> torch.Tensor:
        idx = torch.randint(train.shape[0], (n,), generator=gen)
        return train[idx.to(device)]

    say(f"digits{tag}: teacher")
    steps = config.level_steps()

    def build() -> EDMPrecond:
        net = seeded(rng["net"], lambda: _make_net(config, shape)).to(device)
        return EDMPrecond(net, sigma_data=config.teacher.sigma_data, sigma_min=config.teacher.sigma_min,
                          sigma_max=config.teacher.sigma_max)

    spec = dict(experiment="digits", resolution=config.resolution, train_fraction=config.train_fraction,
                split_seed=rng["split"],
                net=dict(network=config.network, hidden=config.hidden, depth=config.depth,
                         unet_channels=config.unet_channels, seed=rng["net"]),
                teacher=dataclasses.asdict(config.teacher), generator_seed=rng["teacher_training"],
                snapshot_steps=list(steps))
    with timer("teacher_training"):
        trained, _ = cached_teacher(
            teacher_cache, spec, build=build, config=config.teacher,
            train=lambda: train_teacher(sample_train, build().model, config.teacher, snapshot_steps=steps,
                                        generator=torch.Generator().manual_seed(rng["teacher_training"])))
    eval_seeds = range(EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + config.num_eval)
    z = noise_for_seeds(eval_seeds, shape, device=device)
    ref = held_out[: min(config.num_eval, held_out.shape[0])]
    sig = karras_sigmas(config.ode_steps, config.teacher.sigma_min, config.teacher.sigma_max)

    def quality(x: torch.Tensor) -> dict:
        n = min(x.shape[0], ref.shape[0])
        sw = sliced_wasserstein(x[:n].cpu(), ref[:n].cpu(), generator=torch.Generator().manual_seed(3))
        return dict(sliced_wasserstein_held_out=sw, **memorisation_stats(x, train))

    def sw_only(x: torch.Tensor) -> float:
        n = min(x.shape[0], ref.shape[0])
        return sliced_wasserstein(x[:n].cpu(), ref[:n].cpu(), generator=torch.Generator().manual_seed(3))

    jobs: list[tuple[str, nn.Module | None, list[str]]] = []
    for s in steps:
        inits = ["teacher_init"] + (["scratch"] if config.scratch and s == steps[-1] else [])
        jobs.append((f"step_{s}", None, inits))
    if config.memorising:
        jobs.append(("memorising", None, ["scratch"] if config.scratch else []))

    # real digits against real digits: training images vs the held-out reference, and how often
    # unseen digits pass the memorisation criterion against the training set
    n_ref = ref.shape[0]
    floor = dict(
        sliced_wasserstein_held_out=sliced_wasserstein(train[:n_ref].cpu(), ref.cpu(),
                                                       generator=torch.Generator().manual_seed(3)),
        **memorisation_stats(held_out, train),
    )
    teachers: dict[str, dict] = {}
    section = dict(rng=rng, teacher_train=trained.summary(), held_out_floor=floor,
                   final_level=f"step_{steps[-1]}", teachers=teachers)
    old = (previous or {}).get("teachers") or {}
    dcfg = config.distill.replace(seed=rng["distill"])
    for name, _, inits in jobs:
        if name in old and set(old[name].get("students", {})) == set(inits):
            for stage in ("teacher map", *(f"student {i}" for i in inits)):
                say(f"digits{tag}: {name} {stage} (done)")
            teachers[name] = old[name]
            continue
        if name == "memorising":
            from dmdcopy.teachers import EmpiricalTeacher

            teacher = EmpiricalTeacher(train, sigma_max=config.teacher.sigma_max).to(device)
        else:
            teacher = trained.at_step(int(name.removeprefix("step_"))).to(device)
        say(f"digits{tag}: {name} teacher map")
        with timer(f"map_{name}"), torch.no_grad():
            t_samples = batched(lambda zz, T=teacher: teacher_ode(T, zz, sig), z, 256)
        t_set = teacher_set(eval_seeds, z, t_samples, sigmas=sig)
        rec: dict = dict(quality=quality(t_samples), students={})
        for init in inits:
            say(f"digits{tag}: {name} student {init}")
            base = teacher if isinstance(teacher, EDMPrecond) else trained.denoiser
            G = make_student(base, init, seed=rng["student"])
            # an exact (memorising) teacher has no weights: its fake score starts from the trained one
            fake = None if isinstance(teacher, EDMPrecond) else copy.deepcopy(trained.denoiser)
            curve = None
            if config.eval_every > 0:
                curve = CurveCallback(config.eval_every, t_set, quality=sw_only, batch=256)
                curve.record(0, G)
            with timer(f"distill_{name}_{init}"):
                run = distill_student(teacher, G, dcfg, fake_score=fake, callbacks=(curve,) if curve else (),
                                      seed=rng["distill"])
            G.eval()
            with timer(f"eval_{name}_{init}"):
                st, s_samples = evaluate_student(G, t_set, quality=quality, n_boot=config.n_boot, batch=256)
            # the picture of copying: teacher and student images of the first evaluation noises
            st["pictures"] = dict(seeds=[EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + PICTURE_PAIRS - 1],
                                  teacher=_rounded(t_samples[:PICTURE_PAIRS]),
                                  student=_rounded(s_samples[:PICTURE_PAIRS]))
            st["distill"] = dict(run, seed=rng["distill"])
            if curve is not None:
                st["curve"] = dict(curve.curve, quality_name="sliced_wasserstein_held_out",
                                   quality_floor=floor["sliced_wasserstein_held_out"])
            rec["students"][init] = st
        teachers[name] = rec
        on_level(section)
    return section
