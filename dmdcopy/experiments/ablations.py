"""Ablations: which ingredient of DMD2 makes a student copy its teacher's pairing?

One data setting (a kind from :mod:`dmdcopy.experiments.kinds` and a dimension), one
trained teacher, and a list of :class:`Variant` switches, each changing one thing from the baseline
(one-step student initialised from the converged teacher, DMD loss only):

- ``gan``: DMD2's GAN term on (classifier head on fake-score features; real side: exact samples);
- ``regression``: DMD v1's regression loss to stored teacher pairs ``(z, T(z))`` on (pairs drawn on
  seeds disjoint from the evaluation seeds);
- ``init="scratch"``: the student starts from a fresh network instead of the teacher's weights;
- ``teacher_level``: the teacher's EMA weights at a fraction of its training (convergence);
- ``memorising``: the teacher is the exact empirical denoiser of ``num_train`` samples (it
  reproduces its training points), the student starts from scratch and the fake score from the
  trained teacher; compare with the ``scratch`` variant, which differs only in the teacher.
- ``memorising_net``: the teacher is the same MLP trained (``memorise_teacher``) on only
  ``num_train_memorise`` samples until its ODE ends on them (a *network* that memorises), and the
  student starts from its weights and is distilled exactly like the baseline; compare with
  ``baseline``, which differs only in what the teacher was trained on. The record's
  ``memorisation`` says how far the teacher memorised (share of its samples whose nearest training
  point is closer than a third of the second nearest) and how close its ODE map is to the exact
  empirical denoiser's.

Every variant is measured on the same evaluation noises against its own teacher's map.

(About 430 lines: the variants, their presets and the one loop that runs, resumes and records
them; splitting the variants from the loop would separate each switch from what it switches.)
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dmdcopy.distill.config import DistillConfig
from dmdcopy.errors import ConfigError
from dmdcopy.experiments.common import (
    Timer,
    batched,
    check_seeds,
    map_error,
    seed_summary,
    seeded,
    teacher_set,
    toy_distill_config,
    transport_summary,
)
from dmdcopy.experiments.digits import memorisation_stats
from dmdcopy.experiments.kinds import DATA_KINDS
from dmdcopy.experiments.pipeline import (
    STUDENT_INITS,
    CurveCallback,
    distill_student,
    evaluate_student,
    make_student,
)
from dmdcopy.experiments.report import machine_info
from dmdcopy.experiments.resume import ResultsFile, seed_section, seeds_document
from dmdcopy.experiments.teacher_cache import cached_teacher
from dmdcopy.experiments.teacher_training import TeacherConfig, train_teacher
from dmdcopy.measure import measure_student
from dmdcopy.metrics import pairing_inefficiency
from dmdcopy.nets.mlp import MLP
from dmdcopy.noise import noise_for_seeds
from dmdcopy.precond import EDMPrecond
from dmdcopy.samplers import teacher_ode
from dmdcopy.schedules import karras_sigmas
from dmdcopy.teachers import EmpiricalTeacher

__all__ = ["ABLATION_PRESETS", "DEFAULT_VARIANTS", "AblationConfig", "Variant", "ablation_seeds",
           "run_ablations"]

EVAL_SEED_OFFSET = 3_000_000
PAIR_SEED_OFFSET = 4_000_000


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One ablation: the baseline with some switches flipped."""

    name: str
    init: str = "teacher_init"  # "teacher_init" or "scratch"
    gan: bool = False  # DMD2 GAN term
    regression: bool = False  # DMD v1 regression loss to teacher pairs
    teacher_level: float = 1.0  # fraction of the teacher's training (convergence level)
    memorising: bool = False  # exact empirical teacher of num_train samples
    memorising_net: bool = False  # the MLP teacher trained on num_train_memorise samples

    def __post_init__(self) -> None:
        if self.memorising and self.memorising_net:
            raise ConfigError(f"Variant {self.name!r}: memorising and memorising_net exclude each other")
        if self.init not in STUDENT_INITS:
            raise ConfigError(f"Variant {self.name!r}: init must be one of {STUDENT_INITS}, "
                              f"got {self.init!r}")
        if not 0 < self.teacher_level <= 1:
            raise ConfigError(f"Variant {self.name!r}: teacher_level must lie in (0, 1], "
                              f"got {self.teacher_level}")


DEFAULT_VARIANTS: tuple[Variant, ...] = (
    Variant(name="baseline"),
    Variant(name="gan_on", gan=True),
    Variant(name="regression_on", regression=True),
    Variant(name="scratch", init="scratch"),
    Variant(name="teacher_level_0.05", teacher_level=0.05),
    Variant(name="teacher_level_0.25", teacher_level=0.25),
    Variant(name="memorising_teacher", memorising=True, init="scratch"),
    Variant(name="memorising_net", memorising_net=True),
)


@dataclass(frozen=True, kw_only=True)
class AblationConfig:
    """The ablation study's setting."""

    kind: str = "power_law_gaussian"  # key of dmdcopy.experiments.kinds.DATA_KINDS
    dim: int = 32
    alpha: float = 1.0
    num_components: int = 8
    variants: tuple[Variant, ...] = DEFAULT_VARIANTS
    hidden: int = 128
    depth: int = 3
    emb_dim: int = 64
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(steps=1500))
    distill: DistillConfig = field(default_factory=lambda: toy_distill_config(250))
    regression_weight: float = 0.25  # weight of the regression loss when a variant turns it on
    gan_feature_module: str = "model.out_norm"  # fake-score submodule the GAN head reads
    num_train: int = 1000  # memorising teacher's data set, and the GAN's real samples
    num_pairs: int = 2000  # stored teacher pairs for the regression loss
    num_train_memorise: int = 32  # training set of the memorising network teacher
    # N = 32 at d = 32: 4000 steps put 85 % of its samples on training points (1500 steps: 26 %)
    memorise_teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(steps=4000, batch=128))
    ode_steps: int = 32  # Heun steps of each teacher's map T(z)
    exact_ode_steps: int = 128  # Heun steps of the exact mixture map (the Gaussian's is closed form)
    num_eval: int = 1000
    n_boot: int = 500
    seed: int = 0  # data, teachers, students and distillation seeds derive from it (ablation_seeds)
    seeds: tuple[int, ...] = ()  # run every variant for each of these seeds (empty: just `seed`)
    eval_every: int = 50  # Delta E curve: measure every this many generator steps (0: no curve)

    def __post_init__(self) -> None:
        object.__setattr__(self, "variants", tuple(self.variants))
        object.__setattr__(self, "seeds", tuple(int(v) for v in self.seeds))
        check_seeds(self.seed, self.seeds, "AblationConfig")
        if self.eval_every < 0:
            raise ConfigError(f"AblationConfig.eval_every must be >= 0, got {self.eval_every}")
        if self.kind not in DATA_KINDS:
            raise ConfigError(f"AblationConfig.kind: unknown data kind {self.kind!r}; "
                              f"known: {sorted(DATA_KINDS)}")
        names = [v.name for v in self.variants]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"AblationConfig.variants need distinct names, got {names}")
        if self.num_eval < 4 or self.num_train < 2 or self.num_pairs < 1 or self.num_train_memorise < 2:
            raise ConfigError("AblationConfig: num_eval >= 4, num_train >= 2, num_train_memorise >= 2 "
                              "and num_pairs >= 1 are needed")

    def run_seeds(self) -> tuple[int, ...]:
        """The seeds the study runs for: ``seeds``, or ``(seed,)`` when it is empty."""
        return self.seeds or (self.seed,)

    def level_steps(self) -> tuple[int, ...]:
        return tuple(sorted({max(1, round(v.teacher_level * self.teacher.steps)) for v in self.variants}))

    def memorise_level_steps(self) -> tuple[int, ...]:
        """Snapshot steps of the memorising network teacher (its own training length)."""
        return tuple(sorted({max(1, round(v.teacher_level * self.memorise_teacher.steps))
                             for v in self.variants if v.memorising_net}))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["variants"] = [dataclasses.asdict(v) for v in self.variants]
        d["teacher"] = dataclasses.asdict(self.teacher)
        d["memorise_teacher"] = dataclasses.asdict(self.memorise_teacher)
        d["distill"] = self.distill.to_dict()
        return d


def _ablation_preset(dim: int, teacher_steps: int, distill_steps: int, hidden: int,
                     num_eval: int, eval_every: int, memorise_steps: int = 4000, **kwargs) -> AblationConfig:
    return AblationConfig(dim=dim, hidden=hidden, num_eval=num_eval, eval_every=eval_every,
                          teacher=TeacherConfig(steps=teacher_steps, batch=256),
                          memorise_teacher=TeacherConfig(steps=memorise_steps, batch=128),
                          distill=toy_distill_config(distill_steps), **kwargs)


# Scales of the ablation study, as the CLI's --quick / default / --full / --long (the default's
# setting distilled 4x longer, 3 seeds).
ABLATION_PRESETS: dict[str, Callable[[], AblationConfig]] = {
    "quick": lambda: _ablation_preset(16, 300, 60, 64, 500, 20, memorise_steps=1000),
    "default": lambda: _ablation_preset(32, 1500, 300, 128, 1000, 50),
    "full": lambda: _ablation_preset(128, 6000, 1500, 256, 2000, 250),
    "long": lambda: _ablation_preset(32, 1500, 1200, 128, 1000, 100, seeds=(0, 1, 2)),
}


def ablation_seeds(dim: int, seed: int) -> dict[str, int]:
    """The seeds of every random draw of the ablations at dimension ``dim`` for run seed ``seed``:
    ``data`` (the distribution), ``net`` (the teachers' initial weights, shared by the memorising
    network), ``train_set``, ``teacher_training``, ``reference``, ``floor`` (exact samples against
    the reference: the quality floor of the Delta E curves), ``quality``, ``student``,
    ``distill`` (``DistillConfig.seed`` and the CPU generator while the distiller is built: the GAN
    head), ``memorise_set`` and ``memorise_training``. Evaluation and regression-pair noises are the
    same for every seed."""
    base = seed * 7919 + dim * 31 + 17
    return dict(data=base, net=base, train_set=base + 1, teacher_training=base + 2, reference=base + 3,
                quality=base + 4, student=base + 5, distill=base + 6, memorise_set=base + 7,
                memorise_training=base + 8, floor=base + 9)


def run_ablations(
    config: AblationConfig = AblationConfig(),
    *,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    teacher_cache: str | os.PathLike | None = None,
) -> dict:
    """Run every variant; return a JSON-ready dict with one record per variant.

    ``variants``, ``data``, ``teacher_train`` and ``memorise_teacher_train`` are those of the first
    run seed; ``more_seeds`` holds the same four for every further seed (by seed, as a string), and
    ``over_seeds`` the per-seed Delta E figures of each variant with their mean, t-interval and
    range. With ``config.eval_every`` each variant's record holds its Delta E ``curve`` over
    training. ``out``, ``resume`` and ``teacher_cache`` as in
    :func:`~dmdcopy.experiments.run_dimension_sweep`; the unit written and skipped is one variant of
    one seed.
    """
    device = torch.device(device)
    t0 = time.perf_counter()
    timer = Timer()
    file = ResultsFile(out, "ablations", config.to_dict(), resume=resume)
    seeds = config.run_seeds()
    head = dict(experiment="ablations", config=config.to_dict(), machine=machine_info(device),
                eval_seeds=[EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + config.num_eval - 1],  # first, last
                regression_pair_seeds=[PAIR_SEED_OFFSET, PAIR_SEED_OFFSET + config.num_pairs - 1],
                seeds=list(seeds))
    sections: dict[int, dict] = {}

    def document() -> dict:
        return seeds_document(head, sections, seeds)

    def on_variant(seed: int, section: dict) -> None:
        sections[seed] = section
        file.write(document(), complete=False)

    for seed in seeds:
        sections[seed] = _run_ablations_seed(
            config, seed, device=device, progress=progress, timer=timer,
            previous=seed_section(file.previous, seed, seeds[0]), teacher_cache=teacher_cache,
            on_variant=lambda sec, seed=seed: on_variant(seed, sec))
    results = document()
    results["over_seeds"] = [
        dict(variant=v.name, seeds=list(seeds),
             **seed_summary([sections[s]["variants"].get(v.name) for s in seeds]))
        for v in config.variants
    ]
    results.update(seconds=time.perf_counter() - t0, timings=timer.seconds)
    file.write(results, complete=True)
    return results


def _run_ablations_seed(config: AblationConfig, seed: int, *, device: torch.device, progress,
                        timer: Timer, previous: dict | None, teacher_cache,
                        on_variant: Callable[[dict], None]) -> dict:
    """One seed of :func:`run_ablations`: ``data``, ``teacher_train``, ``memorise_teacher_train`` and
    ``variants``; ``on_variant(section)`` after each finished variant."""
    say = progress or (lambda _msg: None)
    tag = "" if len(config.run_seeds()) == 1 else f" seed={seed}"
    rng = ablation_seeds(config.dim, seed)
    data = DATA_KINDS[config.kind](config.dim, alpha=config.alpha, num_components=config.num_components,
                                   generator=torch.Generator().manual_seed(rng["data"]))

    def build() -> EDMPrecond:  # the teacher's architecture, with the teacher's initial weights
        net = seeded(rng["net"], lambda: MLP(config.dim, hidden=config.hidden, depth=config.depth,
                                             emb_dim=config.emb_dim)).to(device)
        return EDMPrecond(net, sigma_data=config.teacher.sigma_data, sigma_min=config.teacher.sigma_min,
                          sigma_max=config.teacher.sigma_max)

    def spec(**extra) -> dict:
        return dict(experiment="ablations", kind=config.kind, dim=config.dim, alpha=config.alpha,
                    num_components=config.num_components, data_seed=rng["data"],
                    net=dict(cls="MLP", hidden=config.hidden, depth=config.depth, emb_dim=config.emb_dim,
                             seed=rng["net"]), **extra)

    train_set = data.sample(config.num_train,
                            generator=torch.Generator().manual_seed(rng["train_set"])).to(device)

    say(f"ablations{tag}: teacher")
    with timer("teacher_training"):
        trained, _ = cached_teacher(
            teacher_cache, spec(teacher=dataclasses.asdict(config.teacher),
                                generator_seed=rng["teacher_training"],
                                snapshot_steps=list(config.level_steps())),
            build=build, config=config.teacher,
            train=lambda: train_teacher(lambda n, gen: data.sample(n, generator=gen), build().model,
                                        config.teacher, snapshot_steps=config.level_steps(),
                                        generator=torch.Generator().manual_seed(rng["teacher_training"])))
    trained_mem = mem_set = None
    if any(v.memorising_net for v in config.variants):
        say(f"ablations{tag}: memorising network teacher")
        mem_set = data.sample(config.num_train_memorise,
                              generator=torch.Generator().manual_seed(rng["memorise_set"])).to(device)

        def sample_mem(n: int, gen: torch.Generator | None) -> torch.Tensor:
            idx = torch.randint(0, mem_set.shape[0], (n,), generator=gen)
            return mem_set[idx.to(mem_set.device)]

        with timer("memorising_net_training"):
            trained_mem, _ = cached_teacher(
                teacher_cache, spec(teacher=dataclasses.asdict(config.memorise_teacher),
                                    generator_seed=rng["memorise_training"],
                                    snapshot_steps=list(config.memorise_level_steps()),
                                    memorise_set=dict(n=config.num_train_memorise, seed=rng["memorise_set"])),
                build=build, config=config.memorise_teacher,
                train=lambda: train_teacher(sample_mem, build().model, config.memorise_teacher,
                                            snapshot_steps=config.memorise_level_steps(),
                                            generator=torch.Generator().manual_seed(rng["memorise_training"])))

    shape = (config.dim,)
    eval_seeds = range(EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + config.num_eval)
    z = noise_for_seeds(eval_seeds, shape, device=device)
    pair_seeds = range(PAIR_SEED_OFFSET, PAIR_SEED_OFFSET + config.num_pairs)
    z_pairs = noise_for_seeds(pair_seeds, shape, device=device)
    sig = karras_sigmas(config.ode_steps, config.teacher.sigma_min, config.teacher.sigma_max)
    reference = data.sample(config.num_eval, generator=torch.Generator().manual_seed(rng["reference"]))
    floor_ref = data.sample(config.num_eval, generator=torch.Generator().manual_seed(rng["floor"]))

    def quality(x: torch.Tensor) -> dict:
        return data.quality(x, reference, seed=rng["quality"])

    sw_floor = quality(floor_ref)["sliced_wasserstein"]  # exact samples: what finite N alone gives
    with torch.no_grad():
        exact_set = data.exact_set(eval_seeds, z, sigma_min=config.teacher.sigma_min,
                                   sigma_max=config.teacher.sigma_max, num_steps=config.exact_ode_steps)
    x_exact = exact_set.x

    records: dict[str, dict] = {}
    section = dict(rng=rng, data=data.describe(), teacher_train=trained.summary(), variants=records,
                   memorise_teacher_train=trained_mem.summary() if trained_mem is not None else None)
    old = (previous or {}).get("variants") or {}
    for v in config.variants:
        if v.name in old:
            say(f"ablations{tag}: {v.name} (done)")
            records[v.name] = old[v.name]
            continue
        say(f"ablations{tag}: {v.name}")
        level_step = max(1, round(v.teacher_level * config.teacher.steps))
        trained_level = trained.at_step(level_step).to(device)
        if v.memorising_net:  # the student starts from, and the fake score copies, this network
            level_step = max(1, round(v.teacher_level * config.memorise_teacher.steps))
            trained_level = trained_mem.at_step(level_step).to(device)
        if v.memorising:
            teacher = EmpiricalTeacher(train_set, sigma_max=config.teacher.sigma_max).to(device)
        else:
            teacher = trained_level
        with timer(f"map_{v.name}"), torch.no_grad():
            t_samples = batched(lambda zz, T=teacher: teacher_ode(T, zz, sig), z)
            t_set = teacher_set(eval_seeds, z, t_samples, sigmas=sig)
            pairs = None
            if v.regression:
                pairs = (z_pairs, batched(lambda zz, T=teacher: teacher_ode(T, zz, sig), z_pairs))
        dcfg = config.distill.replace(
            gan=v.gan, gan_feature_module=config.gan_feature_module if v.gan else None,
            regression_weight=config.regression_weight if v.regression else 0.0, seed=rng["distill"],
        )
        G = make_student(trained_level, v.init, seed=rng["student"])
        fake = None
        if v.memorising:
            fake = copy.deepcopy(trained_level)
        curve = None
        if config.eval_every > 0:
            curve = CurveCallback(config.eval_every, t_set,
                                  quality=lambda x: quality(x)["sliced_wasserstein"])
            curve.record(0, G)
        with torch.no_grad():  # before any DMD step: how much of the pairing the initialisation already has
            de_init = measure_student(G, t_set, n_boot=0).result
        with timer(f"distill_{v.name}"):
            run = distill_student(teacher, G, dcfg, fake_score=fake, real_data=train_set if v.gan else None,
                                  regression_pairs=pairs, callbacks=(curve,) if curve else (),
                                  seed=rng["distill"])
        G.eval()
        with timer(f"eval_{v.name}"):
            rec, _ = evaluate_student(G, t_set, exact=exact_set, quality=quality, n_boot=config.n_boot)
        rec.update(variant=dataclasses.asdict(v), distill=dict(run, seed=rng["distill"]),
                   teacher_step=level_step,
                   delta_e_at_init=de_init.delta_e if de_init is not None else None,
                   teacher_quality=quality(t_samples),
                   teacher_transport=transport_summary(z, t_samples, n_boot=0)["value"],
                   teacher_ode_error=map_error(t_samples, x_exact,
                                               config.teacher.sigma_data)["relative_rmse"],
                   teacher_delta_e_vs_exact=pairing_inefficiency(t_samples, x_exact, n_boot=0).delta_e)
        if curve is not None:
            rec["curve"] = dict(curve.curve, quality_name="sliced_wasserstein", quality_floor=sw_floor)
        if v.memorising_net and rec["finite"]:
            rec["memorisation"] = _memorisation_record(teacher, G, mem_set, z, t_samples, sig,
                                                       config.memorise_teacher.sigma_data)
        records[v.name] = rec
        on_variant(section)
    return section


def _memorisation_record(teacher, G, train: torch.Tensor, z: torch.Tensor, t_samples: torch.Tensor,
                         sigmas: torch.Tensor, sigma_data: float) -> dict:
    """How far a network teacher memorised ``train: (N, d)``, measured on noises ``z: (M, d)``.

    ``teacher_memorised_rate`` / ``student_memorised_rate``: share of ``T(z)`` / ``G(z)`` whose nearest
    training point is closer than a third of the second nearest. ``teacher_ode_vs_empirical``: RMS of
    ``T(z) - T_emp(z)`` over ``sigma_data``, with ``T_emp`` the exact empirical denoiser's ODE map
    (same Heun steps); ``same_point_as_empirical``: share of ``z`` whose nearest training point is the
    same for both maps.
    """
    with torch.no_grad():
        emp = EmpiricalTeacher(train, sigma_max=teacher.sigma_max).to(train.device)
        e_samples = batched(lambda zz: teacher_ode(emp, zz.double(), sigmas).float(), z)
        s_samples = batched(G, z)
    t_mem = memorisation_stats(t_samples, train)
    t2 = t_samples.reshape(t_samples.shape[0], -1).double()
    e2 = e_samples.reshape(e_samples.shape[0], -1).double()
    tr = train.reshape(train.shape[0], -1).double()
    same = (torch.cdist(t2, tr).argmin(1) == torch.cdist(e2, tr).argmin(1)).double().mean()
    return dict(
        num_train=int(train.shape[0]),
        teacher_memorised_rate=t_mem["memorised_rate"], teacher_nearest_rms=t_mem["nearest_rms"],
        student_memorised_rate=memorisation_stats(s_samples, train)["memorised_rate"],
        empirical_memorised_rate=memorisation_stats(e_samples, train)["memorised_rate"],
        teacher_ode_vs_empirical=map_error(t_samples, e_samples, sigma_data)["relative_rmse"],
        same_point_as_empirical=float(same),
    )
