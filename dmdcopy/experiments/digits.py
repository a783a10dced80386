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
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dmdcopy.data.digits import load_digits, split_digits
from dmdcopy.distill.config import DistillConfig
from dmdcopy.errors import ConfigError
from dmdcopy.experiments.common import Timer, batched, seeded, teacher_set, toy_distill_config
from dmdcopy.experiments.pipeline import distill_student, evaluate_student, make_student
from dmdcopy.experiments.report import machine_info
from dmdcopy.experiments.teacher_training import TeacherConfig, train_teacher
from dmdcopy.nets.image_mlp import ImageMLP
from dmdcopy.noise import noise_for_seeds
from dmdcopy.precond import EDMPrecond
from dmdcopy.samplers import teacher_ode
from dmdcopy.schedules import karras_sigmas
from dmdcopy.w2 import sliced_wasserstein

__all__ = ["DIGITS_PRESETS", "DigitsConfig", "memorisation_stats", "run_digits"]

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
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(float(v) for v in self.levels))
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

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["teacher"] = dataclasses.asdict(self.teacher)
        d["distill"] = self.distill.to_dict()
        return d


def _digits_preset(teacher_steps: int, distill_steps: int, levels: tuple[float, ...], num_eval: int,
                   **kwargs) -> DigitsConfig:
    return DigitsConfig(teacher=TeacherConfig(steps=teacher_steps, batch=128), levels=levels,
                        distill=toy_distill_config(distill_steps), num_eval=num_eval,
                        **kwargs)


# Scales of the digits experiment, as the CLI's --quick / default / --full.
DIGITS_PRESETS: dict[str, Callable[[], DigitsConfig]] = {
    "quick": lambda: _digits_preset(300, 60, (0.1, 1.0), 300, hidden=128),
    "default": lambda: _digits_preset(2000, 300, (0.05, 0.25, 1.0), 500),
    "full": lambda: _digits_preset(6000, 1500, (0.05, 0.25, 1.0), 1000, resolution=16, network="unet",
                                   unet_channels=32),
}


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
) -> dict:
    """Run the digits experiment; returns a JSON-ready dict (config, machine, teachers, seconds).

    ``results["teachers"]`` has one entry per convergence level (``"step_<n>"``) and, with
    ``memorising``, ``"memorising"``; each holds the teacher's quality and its students' records.
    """
    device = torch.device(device)
    say = progress or (lambda _msg: None)
    timer = Timer()
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(config.seed)
    images = load_digits(config.resolution)
    train, held_out = split_digits(images, config.train_fraction, generator=g)
    train, held_out = train.to(device), held_out.to(device)
    shape = tuple(train.shape[1:])

    def sample_train(n: int, gen: torch.Generator | None) -> torch.Tensor:
        idx = torch.randint(train.shape[0], (n,), generator=gen)
        return train[idx.to(device)]

    say("digits: teacher")
    net = seeded(config.seed, lambda: _make_net(config, shape)).to(device)
    steps = config.level_steps()
    with timer("teacher_training"):
        trained = train_teacher(sample_train, net, config.teacher, snapshot_steps=steps,
                                generator=torch.Generator().manual_seed(config.seed + 1))
    eval_seeds = range(EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + config.num_eval)
    z = noise_for_seeds(eval_seeds, shape, device=device)
    ref = held_out[: min(config.num_eval, held_out.shape[0])]
    sig = karras_sigmas(config.ode_steps, config.teacher.sigma_min, config.teacher.sigma_max)

    def quality(x: torch.Tensor) -> dict:
        n = min(x.shape[0], ref.shape[0])
        sw = sliced_wasserstein(x[:n].cpu(), ref[:n].cpu(), generator=torch.Generator().manual_seed(3))
        return dict(sliced_wasserstein_held_out=sw, **memorisation_stats(x, train))

    teachers: dict[str, dict] = {}
    jobs: list[tuple[str, nn.Module, list[str]]] = []
    for s in steps:
        inits = ["teacher_init"] + (["scratch"] if config.scratch and s == steps[-1] else [])
        jobs.append((f"step_{s}", trained.at_step(s).to(device), inits))
    if config.memorising:
        from dmdcopy.teachers import EmpiricalTeacher

        memo = EmpiricalTeacher(train, sigma_max=config.teacher.sigma_max).to(device)
        jobs.append(("memorising", memo, ["scratch"] if config.scratch else []))

    # real digits against real digits: training images vs the held-out reference, and how often
    # unseen digits pass the memorisation criterion against the training set
    n_ref = ref.shape[0]
    floor = dict(
        sliced_wasserstein_held_out=sliced_wasserstein(train[:n_ref].cpu(), ref.cpu(),
                                                       generator=torch.Generator().manual_seed(3)),
        **memorisation_stats(held_out, train),
    )
    for name, teacher, inits in jobs:
        say(f"digits: {name} teacher map")
        with timer(f"map_{name}"), torch.no_grad():
            t_samples = batched(lambda zz, T=teacher: teacher_ode(T, zz, sig), z, 256)
        t_set = teacher_set(eval_seeds, z, t_samples, sigmas=sig)
        rec: dict = dict(quality=quality(t_samples), students={})
        for init in inits:
            say(f"digits: {name} student {init}")
            base = teacher if isinstance(teacher, EDMPrecond) else trained.denoiser
            G = make_student(base, init, seed=config.seed + 5)
            # an exact (memorising) teacher has no weights: its fake score starts from the trained one
            fake = None if isinstance(teacher, EDMPrecond) else copy.deepcopy(trained.denoiser)
            with timer(f"distill_{name}_{init}"):
                run = distill_student(teacher, G, config.distill, fake_score=fake)
            G.eval()
            with timer(f"eval_{name}_{init}"):
                st, _ = evaluate_student(G, t_set, quality=quality, n_boot=config.n_boot, batch=256)
            st["distill"] = run
            rec["students"][init] = st
        teachers[name] = rec
    final = f"step_{steps[-1]}"
    return dict(
        experiment="digits", config=config.to_dict(), machine=machine_info(device),
        eval_seeds=[EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + config.num_eval - 1],  # first, last
        teacher_train=trained.summary(), held_out_floor=floor, final_level=final, teachers=teachers,
        seconds=time.perf_counter() - t0, timings=timer.seconds,
        note=None if config.network == "unet" else "network: MLP on flattened images",
    )
