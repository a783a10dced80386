"""Dimension sweep: does a DMD student copy its teacher's pairing, as a function of dimension?

For each data kind (power-law Gaussian, Gaussian mixture; :mod:`dmdcopy.experiments.kinds`) and
each dimension ``d``:

1. train an MLP teacher with the EDM loss over the whole sigma range
   (:func:`~dmdcopy.experiments.teacher_training.train_teacher`) and compare its probability-flow
   map with the exact one (closed form for the Gaussian, the exact denoiser integrated finely for
   the mixture);
2. distil one-step students with DMD (1:5 fake-score rule), one initialised from the teacher
   (DMD2) and one from scratch;
3. on fixed evaluation seeds, measure Delta E of each student against the trained teacher's map
   (and against the exact map), the teacher-free transport inefficiency, and the distribution
   quality of teacher and students against fresh exact samples (sliced Wasserstein, and for the
   Gaussian the Fréchet distance), each beside the floor that exact samples themselves reach.

Everything is returned as one JSON-ready dict; :mod:`dmdcopy.experiments.report` prints and plots it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from dmdcopy.distill.config import DistillConfig
from dmdcopy.errors import ConfigError
from dmdcopy.experiments.common import (
    Timer,
    batched,
    delta_e_record,
    map_error,
    seeded,
    teacher_set,
    toy_distill_config,
    transport_summary,
)
from dmdcopy.experiments.kinds import DATA_KINDS, DataKind
from dmdcopy.experiments.pipeline import STUDENT_INITS, distill_student, evaluate_student, make_student
from dmdcopy.experiments.report import machine_info
from dmdcopy.experiments.teacher_training import TeacherConfig, train_teacher
from dmdcopy.measure import measure_student
from dmdcopy.metrics import pairing_inefficiency
from dmdcopy.nets.mlp import MLP
from dmdcopy.noise import noise_for_seeds
from dmdcopy.samplers import teacher_ode
from dmdcopy.schedules import karras_sigmas

__all__ = [
    "DATA_KINDS",
    "SWEEP_PRESETS",
    "SweepConfig",
    "run_dimension_sweep",
    "run_sweep_point",
]

# Evaluation seeds start here, far from anything a training loop draws.
EVAL_SEED_OFFSET = 1_000_000


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """A dimension sweep. ``teacher`` and ``distill`` are used at every point."""

    dims: tuple[int, ...] = (2, 8, 32, 128, 512)  # data dimensions d
    kinds: tuple[str, ...] = ("power_law_gaussian", "gaussian_mixture")  # keys of DATA_KINDS
    students: tuple[str, ...] = STUDENT_INITS  # "teacher_init" and/or "scratch"
    alpha: float = 1.0  # power-law decay of the spectrum (both kinds)
    num_components: int = 8  # mixture components
    hidden: int = 128  # MLP width (teacher, student and fake score share the architecture)
    depth: int = 3  # MLP residual blocks
    emb_dim: int = 64  # MLP noise-embedding width
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(steps=1200))
    distill: DistillConfig = field(default_factory=lambda: toy_distill_config(250))
    ode_steps: int = 32  # Heun steps of the trained teacher's map T(z)
    exact_ode_steps: int = 128  # Heun steps of the exact mixture map (the Gaussian's is closed form)
    num_eval: int = 1000  # evaluation noises (one assignment block)
    n_boot: int = 500  # bootstrap resamples for intervals
    seed: int = 0  # data, teacher and student seeds derive from it
    pairs_2d: int = 200  # points stored for the d = 2 picture

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "students", tuple(self.students))
        if not self.dims or any(d < 1 for d in self.dims):
            raise ConfigError(f"SweepConfig.dims must be positive ints, got {self.dims}")
        for k in self.kinds:
            if k not in DATA_KINDS:
                raise ConfigError(f"SweepConfig.kinds: unknown data kind {k!r}; known: {sorted(DATA_KINDS)}")
        for s in self.students:
            if s not in STUDENT_INITS:
                raise ConfigError(f"SweepConfig.students: unknown student {s!r}; known: {STUDENT_INITS}")
        if self.num_eval < 4:
            raise ConfigError(f"SweepConfig.num_eval must be >= 4, got {self.num_eval}")
        if self.teacher.sigma_max != self.distill.sigma_max:
            raise ConfigError("SweepConfig: teacher.sigma_max must equal distill.sigma_max (the student "
                              "starts where the teacher was trained)")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["teacher"] = dataclasses.asdict(self.teacher)
        d["distill"] = self.distill.to_dict()
        return d


def _preset(steps_teacher: int, steps_distill: int, dims: tuple[int, ...], hidden: int,
            num_eval: int) -> SweepConfig:
    return SweepConfig(
        dims=dims, hidden=hidden, num_eval=num_eval,
        teacher=TeacherConfig(steps=steps_teacher, batch=256),
        distill=toy_distill_config(steps_distill),
    )


# The CLI's --quick / default / --full; they differ only in scale.
SWEEP_PRESETS: dict[str, Callable[[], SweepConfig]] = {
    "quick": lambda: _preset(300, 60, (2, 16, 128), 64, 500),
    "default": lambda: _preset(1200, 250, (2, 8, 32, 128, 512), 128, 1000),
    "full": lambda: _preset(6000, 1500, (2, 8, 32, 128, 512), 256, 2000),
}


def run_sweep_point(
    kind: str,
    dim: int,
    config: SweepConfig,
    *,
    device: torch.device | str = "cpu",
    data_kinds: Mapping[str, type[DataKind]] = DATA_KINDS,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict, dict]:
    """One (data kind, d) point of the sweep.

    Returns: ``(point, samples)`` with ``point`` JSON-ready (teacher record, one record per
    student) and ``samples`` the CPU tensors ``z``, ``teacher``, ``exact`` and one per student.
    """
    device = torch.device(device)
    say = progress or (lambda _msg: None)
    timer = Timer()
    point_seed = config.seed * 7919 + dim * 31 + sum(map(ord, kind))  # distinct per (seed, d, kind)
    data = data_kinds[kind](dim, alpha=config.alpha, num_components=config.num_components,
                            generator=torch.Generator().manual_seed(point_seed))

    # 1. teacher
    say(f"{kind} d={dim}: teacher")
    net = seeded(point_seed, lambda: MLP(dim, hidden=config.hidden, depth=config.depth,
                                         emb_dim=config.emb_dim)).to(device)
    with timer("teacher_training"):
        trained = train_teacher(lambda n, gen: data.sample(n, generator=gen), net, config.teacher,
                                generator=torch.Generator().manual_seed(point_seed + 1))
    teacher = trained.denoiser

    seeds = range(EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + config.num_eval)
    z = noise_for_seeds(seeds, (dim,), device=device)
    sigma_max = config.teacher.sigma_max
    with timer("teacher_maps"), torch.no_grad():
        sig = karras_sigmas(config.ode_steps, config.teacher.sigma_min, sigma_max)
        t_samples = batched(lambda zz: teacher_ode(teacher, zz, sig), z)
        exact_set = data.exact_set(seeds, z, sigma_min=config.teacher.sigma_min, sigma_max=sigma_max,
                                   num_steps=config.exact_ode_steps)
        x_exact = exact_set.x
    trained_set = teacher_set(seeds, z, t_samples, sigmas=sig)
    reference = data.sample(config.num_eval, generator=torch.Generator().manual_seed(point_seed + 2))
    floor_ref = data.sample(config.num_eval, generator=torch.Generator().manual_seed(point_seed + 3))

    def quality(x: torch.Tensor) -> dict:
        return data.quality(x, reference, seed=point_seed + 4)

    with timer("teacher_eval"):
        teacher_rec = dict(
            train=trained.summary(),
            # the same z through the trained and the exact map: the teacher's error, in sigma_data units
            ode_error=map_error(t_samples, x_exact, config.teacher.sigma_data),
            delta_e_vs_exact=delta_e_record(pairing_inefficiency(t_samples, x_exact, n_boot=config.n_boot)),
            transport=transport_summary(z, t_samples, n_boot=config.n_boot),
            quality=quality(t_samples),
            quality_floor=quality(floor_ref),  # exact samples: what finite N alone gives
            exact_quality=quality(x_exact),  # the exact map's own samples (solver error only)
        )
    samples = dict(z=z.cpu(), teacher=t_samples.cpu(), exact=x_exact.cpu())
    students: dict[str, dict] = {}
    for init in config.students:
        say(f"{kind} d={dim}: student {init}")
        G = make_student(teacher, init, seed=point_seed + 5)
        with torch.no_grad():
            de_init = measure_student(G, trained_set, n_boot=0).result
        with timer(f"distill_{init}"):
            run = distill_student(teacher, G, config.distill)
        G.eval()
        with timer(f"eval_{init}"):
            rec, s = evaluate_student(G, trained_set, exact=exact_set, quality=quality, n_boot=config.n_boot)
        rec["delta_e_at_init"] = de_init.delta_e if de_init is not None else None
        rec["distill"] = run
        students[init] = rec
        samples[init] = s
    point = dict(kind=kind, dim=dim, data=data.describe(), teacher=teacher_rec, students=students,
                 seconds=timer.seconds)
    return point, samples


def run_dimension_sweep(
    config: SweepConfig = SweepConfig(),
    *,
    device: torch.device | str = "cpu",
    data_kinds: Mapping[str, type[DataKind]] = DATA_KINDS,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run every (kind, d) point of ``config``; return the results as a JSON-ready dict.

    ``progress(message)`` is called at the start of each stage (teacher, each student) of each
    point; the total number of stages is ``len(kinds) * len(dims) * (1 + len(students))``.
    The result holds ``config``, ``machine``, ``eval_seeds`` (first and last evaluation seed, the
    noises every Delta E is measured on), ``points`` (one per kind and d), ``pairs_2d`` (for
    d = 2: the first ``pairs_2d`` teacher and student samples of the same noise) and ``seconds``.
    """
    t0 = time.perf_counter()
    points, pairs_2d = [], {}
    for kind in config.kinds:
        for dim in config.dims:
            point, samples = run_sweep_point(kind, dim, config, device=device,
                                             data_kinds=data_kinds, progress=progress)
            points.append(point)
            if dim == 2:
                k = config.pairs_2d
                pairs_2d[kind] = {"z": samples["z"][:k], "teacher": samples["teacher"][:k]}
                for init in config.students:
                    pairs_2d[kind][f"student_{init}"] = samples[init][:k]
    return dict(
        experiment="dimension_sweep", config=config.to_dict(), machine=machine_info(device),
        eval_seeds=[EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + config.num_eval - 1],  # first, last
        points=points, pairs_2d=pairs_2d, seconds=time.perf_counter() - t0,
    )
