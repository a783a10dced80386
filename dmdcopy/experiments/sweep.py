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

Every point runs for each seed of ``SweepConfig.run_seeds()`` (every draw derives from the seed:
:func:`point_seeds`), each student records Delta E over training
(:class:`~dmdcopy.experiments.pipeline.CurveCallback`), teachers can be cached on disk by
fingerprint (:mod:`dmdcopy.experiments.teacher_cache`), and the results file is written after every
finished student and can be resumed (:mod:`dmdcopy.experiments.resume`).

Everything is returned as one JSON-ready dict; :mod:`dmdcopy.experiments.report` prints and plots it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from dmdcopy.distill.config import DistillConfig
from dmdcopy.errors import ConfigError
from dmdcopy.experiments.common import (
    Timer,
    batched,
    check_seeds,
    delta_e_record,
    map_error,
    seed_summary,
    seeded,
    teacher_set,
    toy_distill_config,
    transport_summary,
)
from dmdcopy.experiments.kinds import DATA_KINDS, DataKind
from dmdcopy.experiments.pipeline import (
    STUDENT_INITS,
    CurveCallback,
    distill_student,
    evaluate_student,
    make_student,
)
from dmdcopy.experiments.report import machine_info
from dmdcopy.experiments.resume import ResultsFile
from dmdcopy.experiments.teacher_cache import cached_teacher
from dmdcopy.experiments.teacher_training import TeacherConfig, train_teacher
from dmdcopy.measure import measure_student
from dmdcopy.metrics import pairing_inefficiency
from dmdcopy.nets.mlp import MLP
from dmdcopy.noise import noise_for_seeds
from dmdcopy.precond import EDMPrecond
from dmdcopy.samplers import teacher_ode
from dmdcopy.schedules import karras_sigmas

__all__ = [
    "DATA_KINDS",
    "SWEEP_PRESETS",
    "SweepConfig",
    "point_seeds",
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
    seed: int = 0  # data, teacher, student and distillation seeds derive from it (point_seeds)
    seeds: tuple[int, ...] = ()  # run every point for each of these seeds (empty: just `seed`)
    eval_every: int = 50  # Delta E curve: measure every this many generator steps (0: no curve)
    pairs_2d: int = 200  # points stored for the d = 2 picture

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "students", tuple(self.students))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
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
        check_seeds(self.seed, self.seeds, "SweepConfig")
        if self.eval_every < 0:
            raise ConfigError(f"SweepConfig.eval_every must be >= 0, got {self.eval_every}")
        if self.teacher.sigma_max != self.distill.sigma_max:
            raise ConfigError("SweepConfig: teacher.sigma_max must equal distill.sigma_max (the student "
                              "starts where the teacher was trained)")

    def run_seeds(self) -> tuple[int, ...]:
        """The seeds every point runs for: ``seeds``, or ``(seed,)`` when it is empty."""
        return self.seeds or (self.seed,)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["teacher"] = dataclasses.asdict(self.teacher)
        d["distill"] = self.distill.to_dict()
        return d


def _preset(steps_teacher: int, steps_distill: int, dims: tuple[int, ...], hidden: int,
            num_eval: int, eval_every: int, **kwargs) -> SweepConfig:
    return SweepConfig(
        dims=dims, hidden=hidden, num_eval=num_eval, eval_every=eval_every,
        teacher=TeacherConfig(steps=steps_teacher, batch=256),
        distill=toy_distill_config(steps_distill), **kwargs,
    )


# The CLI's --quick / default / --full / --long. quick, default and full differ only in scale;
# long is the default's networks distilled 4x longer, on the power-law Gaussian at d = 2, 32, 512,
# for 3 seeds (is a copy transient or persistent?).
SWEEP_PRESETS: dict[str, Callable[[], SweepConfig]] = {
    "quick": lambda: _preset(300, 60, (2, 16, 128), 64, 500, 20),
    "default": lambda: _preset(1200, 250, (2, 8, 32, 128, 512), 128, 1000, 50),
    "full": lambda: _preset(6000, 1500, (2, 8, 32, 128, 512), 256, 2000, 250),
    "long": lambda: _preset(1200, 1000, (2, 32, 512), 128, 1000, 100,
                            kinds=("power_law_gaussian",), seeds=(0, 1, 2)),
}


def point_seeds(kind: str, dim: int, seed: int) -> dict[str, int]:
    """The seeds of every random draw of the sweep point ``(kind, dim)`` of run seed ``seed``.

    ``data`` (the distribution: spectrum basis, mixture means), ``net`` (the teacher's initial
    weights), ``teacher_training`` (its data, noise levels and noise), ``reference`` / ``floor`` (exact
    samples the quality is measured against), ``quality`` (sliced-Wasserstein projections),
    ``student`` (a scratch student's initial weights) and ``distill`` (``DistillConfig.seed``: every
    draw of the distiller, and the CPU generator while it is built). The evaluation noises are the
    same for every seed (``EVAL_SEED_OFFSET``), so seeds differ in what was trained, not in where it
    is measured.
    """
    base = seed * 7919 + dim * 31 + sum(map(ord, kind))  # distinct per (seed, d, kind)
    return dict(data=base, net=base, teacher_training=base + 1, reference=base + 2, floor=base + 3,
                quality=base + 4, student=base + 5, distill=base + 6)


def run_sweep_point(
    kind: str,
    dim: int,
    config: SweepConfig,
    *,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    data_kinds: Mapping[str, type[DataKind]] = DATA_KINDS,
    progress: Callable[[str], None] | None = None,
    teacher_cache: str | os.PathLike | None = None,
    previous: dict | None = None,
    on_student: Callable[[dict, str, dict], None] | None = None,
) -> tuple[dict, dict]:
    """One (data kind, d, seed) point of the sweep.

    Args:
        seed: the run seed (default: ``config.run_seeds()[0]``); every draw derives from it
            (:func:`point_seeds`).
        teacher_cache: folder of cached teachers (:func:`~dmdcopy.experiments.teacher_cache.cached_teacher`).
        previous: this point's record from an earlier, interrupted run with the same config: its
            teacher record is kept and its finished students are not run again.
        on_student: called as ``on_student(point, init, samples)`` after each student finishes,
            with ``samples`` as returned (the caller writes its results file there).

    Returns: ``(point, samples)`` with ``point`` JSON-ready (teacher record, one record per
    student) and ``samples`` the CPU tensors ``z``, ``teacher``, ``exact`` and one per student run
    here.
    """
    device = torch.device(device)
    say = progress or (lambda _msg: None)
    timer = Timer()
    seed = config.run_seeds()[0] if seed is None else int(seed)
    rng = point_seeds(kind, dim, seed)
    data = data_kinds[kind](dim, alpha=config.alpha, num_components=config.num_components,
                            generator=torch.Generator().manual_seed(rng["data"]))

    # 1. teacher
    say(f"{kind} d={dim} seed={seed}: teacher")

    def build() -> EDMPrecond:
        net = seeded(rng["net"], lambda: MLP(dim, hidden=config.hidden, depth=config.depth,
                                             emb_dim=config.emb_dim)).to(device)
        return EDMPrecond(net, sigma_data=config.teacher.sigma_data, sigma_min=config.teacher.sigma_min,
                          sigma_max=config.teacher.sigma_max)

    spec = dict(experiment="dimension_sweep", kind=kind, dim=dim, alpha=config.alpha,
                num_components=config.num_components, data_seed=rng["data"],
                net=dict(cls="MLP", hidden=config.hidden, depth=config.depth, emb_dim=config.emb_dim,
                         seed=rng["net"]),
                teacher=dataclasses.asdict(config.teacher), generator_seed=rng["teacher_training"],
                snapshot_steps=[])
    with timer("teacher_training"):
        trained, _ = cached_teacher(
            teacher_cache, spec, build=build, config=config.teacher,
            train=lambda: train_teacher(lambda n, gen: data.sample(n, generator=gen), build().model,
                                        config.teacher,
                                        generator=torch.Generator().manual_seed(rng["teacher_training"])))
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
    reference = data.sample(config.num_eval, generator=torch.Generator().manual_seed(rng["reference"]))
    floor_ref = data.sample(config.num_eval, generator=torch.Generator().manual_seed(rng["floor"]))

    def quality(x: torch.Tensor) -> dict:
        return data.quality(x, reference, seed=rng["quality"])

    if previous is not None:
        teacher_rec = previous["teacher"]
    else:
        with timer("teacher_eval"):
            teacher_rec = dict(
                train=trained.summary(),
                # the same z through the trained and the exact map: the teacher's error, in sigma_data units
                ode_error=map_error(t_samples, x_exact, config.teacher.sigma_data),
                delta_e_vs_exact=delta_e_record(pairing_inefficiency(t_samples, x_exact,
                                                                     n_boot=config.n_boot)),
                transport=transport_summary(z, t_samples, n_boot=config.n_boot),
                quality=quality(t_samples),
                quality_floor=quality(floor_ref),  # exact samples: what finite N alone gives
                exact_quality=quality(x_exact),  # the exact map's own samples (solver error only)
            )
    samples = dict(z=z.cpu(), teacher=t_samples.cpu(), exact=x_exact.cpu())
    students: dict[str, dict] = dict((previous or {}).get("students") or {})
    point = dict(kind=kind, dim=dim, seed=seed, rng=rng, data=data.describe(), teacher=teacher_rec,
                 students=students, seconds=timer.seconds)
    dcfg = config.distill.replace(seed=rng["distill"])
    for init in config.students:
        if init in students:
            say(f"{kind} d={dim} seed={seed}: student {init} (done)")
            continue
        say(f"{kind} d={dim} seed={seed}: student {init}")
        G = make_student(teacher, init, seed=rng["student"])
        curve = None
        if config.eval_every > 0:
            curve = CurveCallback(config.eval_every, trained_set,
                                  quality=lambda x: quality(x)["sliced_wasserstein"])
            curve.record(0, G)
        with torch.no_grad():
            de_init = measure_student(G, trained_set, n_boot=0).result
        with timer(f"distill_{init}"):
            run = distill_student(teacher, G, dcfg, callbacks=(curve,) if curve else (),
                                  seed=rng["distill"])
        G.eval()
        with timer(f"eval_{init}"):
            rec, s = evaluate_student(G, trained_set, exact=exact_set, quality=quality, n_boot=config.n_boot)
        rec["delta_e_at_init"] = de_init.delta_e if de_init is not None else None
        rec["distill"] = dict(run, seed=rng["distill"])
        if curve is not None:
            rec["curve"] = dict(curve.curve, quality_name="sliced_wasserstein",
                                quality_floor=teacher_rec["quality_floor"]["sliced_wasserstein"])
        students[init] = rec
        samples[init] = s
        if on_student is not None:
            on_student(point, init, samples)
    return point, samples


def run_dimension_sweep(
    config: SweepConfig = SweepConfig(),
    *,
    device: torch.device | str = "cpu",
    data_kinds: Mapping[str, type[DataKind]] = DATA_KINDS,
    progress: Callable[[str], None] | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    teacher_cache: str | os.PathLike | None = None,
) -> dict:
    """Run every (kind, d, seed) point of ``config``; return the results as a JSON-ready dict.

    Args:
        out: the results file; after every finished student the document so far is written there
            atomically (``complete: false``), and the whole one at the end (``complete: true``).
        resume: skip the students ``out`` already holds (same config only, see
            :class:`~dmdcopy.experiments.resume.ResultsFile`); a crash loses at most the student in
            progress.
        teacher_cache: folder of trained teachers by fingerprint, shared by reruns and experiments.

    ``progress(message)`` is called at the start of each stage (teacher, each student) of each
    point; the total number of stages is ``len(seeds) * len(kinds) * len(dims) * (1 + len(students))``.
    The result holds ``config``, ``machine``, ``eval_seeds`` (first and last evaluation seed, the
    noises every Delta E is measured on), ``seeds`` (the run seeds), ``points`` (one per kind, d and
    seed, in that order), ``over_seeds`` (per kind, d and student: the per-seed Delta E figures and
    their mean, t-interval and range, :func:`~dmdcopy.experiments.common.over_seeds`), ``pairs_2d``
    (for d = 2 and the first seed: the first ``pairs_2d`` teacher and student samples of the same
    noise) and ``seconds``.
    """
    t0 = time.perf_counter()
    file = ResultsFile(out, "dimension_sweep", config.to_dict(), resume=resume)
    prev = file.previous or {}
    old = {(p["kind"], p["dim"], p.get("seed", config.seed)): p for p in prev.get("points", [])}
    pairs_2d: dict = dict(prev.get("pairs_2d") or {})
    seeds = config.run_seeds()
    order = [(kind, dim, seed) for kind in config.kinds for dim in config.dims for seed in seeds]
    done: dict[tuple, dict] = {}
    head = dict(experiment="dimension_sweep", config=config.to_dict(), machine=machine_info(device),
                eval_seeds=[EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + config.num_eval - 1],  # first, last
                seeds=list(seeds))

    def document() -> dict:
        return dict(head, points=[done[k] for k in order if k in done], pairs_2d=pairs_2d)

    for seed in seeds:  # every d of one seed before the next seed: a usable picture early
        for kind in config.kinds:
            for dim in config.dims:
                key = (kind, dim, seed)
                previous = old.get(key)
                if previous is not None and all(s in previous["students"] for s in config.students):
                    done[key] = previous
                    if progress is not None:
                        for stage in ("teacher", *config.students):
                            progress(f"{kind} d={dim} seed={seed}: {stage} (done)")
                    continue

                def on_student(point: dict, init: str, samples: dict, key=key) -> None:
                    done[key] = point
                    if key[1] == 2 and key[2] == seeds[0]:
                        k = config.pairs_2d
                        pic = pairs_2d.setdefault(key[0], {})
                        pic["z"], pic["teacher"] = samples["z"][:k], samples["teacher"][:k]
                        pic[f"student_{init}"] = samples[init][:k]
                    file.write(document(), complete=False)

                point, _ = run_sweep_point(kind, dim, config, seed=seed, device=device, data_kinds=data_kinds,
                                           progress=progress, teacher_cache=teacher_cache,
                                           previous=previous, on_student=on_student)
                done[key] = point
    results = document()
    results["over_seeds"] = [
        dict(kind=kind, dim=dim, student=init, seeds=list(seeds),
             **seed_summary([done[(kind, dim, s)]["students"].get(init) for s in seeds]))
        for kind in config.kinds for dim in config.dims for init in config.students
    ]
    results["seconds"] = time.perf_counter() - t0
    file.write(results, complete=True)
    return results
