"""One path from a teacher and a student to a reported Delta E.

::

    report = dmdcopy.delta_e(teacher, student, range(10_000), pairs="pairs/")
    report.result.delta_e, report.result.delta_e_lower, report.result.delta_e_upper

is :func:`teacher_samples` (the teacher's pairs ``z_i -> T(z_i)`` on per-seed noise, from a pair
store or computed in memory) followed by :func:`measure_student` (the student's samples
``G(z_i)`` on the same noise and labels, then :func:`dmdcopy.metrics.pairing_inefficiency`).
The command ``dmdcopy delta-e``, the training callback and the experiments all go through it.

- Non-finite student samples do not raise: the report has ``result=None`` and says how many
  samples were non-finite (a student that diverged is a finding, not a crash).
- Under ``torch.distributed`` (initialised), rank ``r`` of ``W`` maps the ``r``-th contiguous
  share of the seeds and :class:`dmdcopy.metrics.PairingInefficiency` gathers the pairs in seed
  order, so every rank gets the report one process would compute.
- Progress is reported, never drawn: ``progress(stage, done, total)`` with the stages
  ``"teacher"`` (pairs), ``"student"`` (samples), the metric's (``"features"``, ``"cost"``,
  ``"assignment"``, ``"bound"``, ``"bootstrap"``) and ``"transport"``.

(About 540 lines, most of them docstrings: the records, the two steps and the one call are the
path every measurement takes, kept in one place on purpose.)
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dmdcopy import contracts
from dmdcopy.contracts import dist_rank_world, generate
from dmdcopy.errors import ConfigError, ShapeError
from dmdcopy.metrics import (
    PairingInefficiency,
    PairingResult,
    TransportResult,
    pairing_inefficiency,
    transport_inefficiency,
)
from dmdcopy.noise import labels_for_seeds, noise_for_seeds
from dmdcopy.pairs import (
    PairStore,
    _seed_runs,
    _solver_name,
    default_sigmas,
    generate_pairs,
    teacher_fingerprint,
)
from dmdcopy.samplers import heun, teacher_ode

__all__ = ["DeltaEReport", "TeacherSamples", "delta_e", "measure_student", "teacher_samples"]

Progress = Callable[[str, int, int], None]


# ----------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class TeacherSamples:
    """The teacher's pairs on per-seed noise: row ``i`` of ``z``, ``x`` and ``labels`` is seed ``seeds[i]``.

    Attributes:
        seeds: ``N`` seeds, in row order.
        z: ``(N, ...)`` standard-normal noise, :func:`dmdcopy.noise.noise_for_seeds` of the seeds.
        x: ``(N, ...)`` the teacher's samples ``T(z_i)`` (same device as ``z``).
        labels: ``(N,)`` int64 class labels, or ``None`` for an unconditional teacher.
        sigmas: ``(steps + 1,)`` float64 grid of the teacher ODE, ending in 0.
        solver: qualified name of the ODE solver.
        fingerprint: :func:`dmdcopy.pairs.teacher_fingerprint` of the teacher (``None`` for a
            plain callable).
    """

    seeds: list[int]
    z: Tensor
    x: Tensor
    labels: Tensor | None
    sigmas: Tensor
    solver: str
    fingerprint: str | None

    def __post_init__(self) -> None:
        n = len(self.seeds)
        if not (isinstance(self.z, Tensor) and isinstance(self.x, Tensor)) or self.z.ndim < 2 \
                or self.z.shape != self.x.shape or self.z.shape[0] != n:
            raise ShapeError(f"TeacherSamples: expected z and x of shape (N, ...) with N = {n} seeds, got "
                             f"{_shape(self.z)} and {_shape(self.x)}")
        if self.z.device != self.x.device:
            raise ShapeError(f"TeacherSamples: z is on {self.z.device} but x on {self.x.device}")
        if self.labels is not None and (not isinstance(self.labels, Tensor) or self.labels.shape != (n,)
                                        or self.labels.is_floating_point()):
            raise ShapeError(f"TeacherSamples: expected integer labels of shape ({n},), "
                             f"got {_shape(self.labels)}")

    def __len__(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class DeltaEReport:
    """Delta E of a student, with what it took to get it.

    Attributes:
        result: the :class:`~dmdcopy.metrics.PairingResult` (finite-N ``delta_e``, its bootstrap
            interval, the population bracket ``[delta_e_lower, delta_e_upper]`` with its interval
            ``[bracket_low, bracket_high]``, energies, resolution, warnings), or ``None`` when
            some student samples were not finite.
        n_nonfinite: student samples with a NaN or inf (0 when ``result`` is set).
        transport: ``{"teacher": TransportResult, "student": TransportResult}`` when asked for
            (and the student's samples are finite), else ``None``.
        time_s: seconds spent on ``teacher`` samples (0 when they were given), ``student``
            samples, the ``metric``, ``transport`` and in ``total``.
        settings: what was measured and how (JSON-ready).
        student_samples: the student's samples of the first ``keep_samples`` seeds (CPU), on the
            main process, when :func:`measure_student` was asked for them; else ``None``.
    """

    result: PairingResult | None
    n_nonfinite: int
    transport: dict[str, TransportResult] | None
    time_s: dict[str, float]
    settings: dict[str, Any]
    student_samples: Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"delta_e": result.to_dict() or None, "n_nonfinite", "transport",
        "time_s", "settings"}`` (NaN and inf become ``None``), the layout of
        ``dmdcopy delta-e --out``."""
        transport = None
        if self.transport is not None:
            transport = {who: r.to_dict() for who, r in self.transport.items()}
        return {
            "delta_e": None if self.result is None else self.result.to_dict(),
            "n_nonfinite": int(self.n_nonfinite),
            "transport": transport,
            "time_s": {k: float(v) for k, v in self.time_s.items()},
            "settings": dict(self.settings),
        }


# ----------------------------------------------------------------------------------------------
# Helpers


def _shape(x: Any) -> object:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def _seed_list(seeds: Iterable[int] | Tensor, where: str) -> list[int]:
    out = seeds.tolist() if isinstance(seeds, Tensor) else [int(s) for s in seeds]
    if len(out) < 2:
        raise ConfigError(f"{where}: Delta E needs at least 2 seeds, got {len(out)}")
    if len(set(out)) != len(out) or min(out) < 0:
        raise ConfigError(f"{where}: seeds must be distinct non-negative integers")
    return out


def _positive_int(value: Any, name: str, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: {name} must be a positive int, got {value!r}")


def _module_device(m: Any, default: torch.device | str = "cpu") -> torch.device:
    """Where a module's weights live (``default`` for a module without any, or a plain callable)."""
    if isinstance(m, nn.Module):
        for t in itertools.chain(m.parameters(), m.buffers()):
            return t.device
    return torch.device(default)


def _share(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of rank ``rank``: contiguous shares, so rank order is seed order."""
    return n * rank // world, n * (rank + 1) // world


def _gather_shares(x: Tensor, n: int, world: int) -> Tensor:
    """The ``(n, ...)`` concatenation of every rank's share ``x: (hi - lo, ...)``, in rank order."""
    sizes = [_share(n, r, world)[1] - _share(n, r, world)[0] for r in range(world)]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))  # all_gather needs equal shapes
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded.contiguous())
    return torch.cat([p[:k] for p, k in zip(parts, sizes)])


class _EvalMode:
    """``module.eval()`` inside the block, its own mode restored after (plain callables: nothing)."""

    def __init__(self, module: Any) -> None:
        self.module = module if isinstance(module, nn.Module) else None
        self.was_training = False

    def __enter__(self) -> None:
        if self.module is not None:
            self.was_training = self.module.training
            self.module.eval()

    def __exit__(self, *exc: object) -> None:
        if self.module is not None:
            self.module.train(self.was_training)


def _grid(sigmas: Tensor | Sequence[float]) -> Tensor:
    grid = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    if grid.ndim != 1 or grid.numel() < 2 or float(grid[-1]) != 0.0:
        raise ConfigError(f"sigmas must be a 1-D grid ending in 0, got {grid.tolist()}")
    return grid


def _check_finite_teacher(x: Tensor, seeds: list[int]) -> None:
    bad = torch.nonzero(~torch.isfinite(x).flatten(1).all(dim=1)).flatten()
    if bad.numel():
        raise ConfigError(f"teacher_samples: the teacher produced NaN or inf for {bad.numel()} of "
                          f"{len(seeds)} seeds (first seed {seeds[int(bad[0])]})")


# ----------------------------------------------------------------------------------------------
# The teacher's side


def _from_store(
    store: PairStore, seeds: list[int], *, sample_shape, sigmas, solver, device, check_settings: bool
) -> TeacherSamples:
    manifest = store.manifest
    if check_settings:
        if sample_shape is not None and tuple(int(s) for s in sample_shape) != store.sample_shape:
            raise ShapeError(f"{store.directory}: the store holds samples of shape {store.sample_shape}, "
                             f"sample_shape={tuple(sample_shape)} was asked for")
        if sigmas is not None and _grid(sigmas).tolist() != manifest["sigmas"]:
            raise ConfigError(f"{store.directory}: the store was made on another sigma grid "
                              f"({manifest['steps']} steps, {manifest['sigmas'][:3]}...)")
        if solver is not None and _solver_name(solver) != manifest["solver"]:
            raise ConfigError(f"{store.directory}: the store was made with solver {manifest['solver']}, "
                              f"not {_solver_name(solver)}")
    _, x, labels = store.load(seeds, device=device)
    z = store.load_noise(seeds, device=device).to(x.dtype)
    return TeacherSamples(seeds=seeds, z=z, x=x, labels=labels,
                          sigmas=torch.tensor(manifest["sigmas"], dtype=torch.float64),
                          solver=str(manifest["solver"]), fingerprint=str(manifest["teacher"]))


def teacher_samples(
    teacher: Callable[..., Tensor],
    seeds: Iterable[int] | Tensor,
    *,
    pairs: PairStore | str | Path | None = None,
    sample_shape: Sequence[int] | None = None,
    sigmas: Tensor | Sequence[float] | None = None,
    solver: Callable[..., Tensor] | None = None,
    batch: int = 256,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> TeacherSamples:
    """The teacher's pairs ``z_i -> T(z_i)`` for ``seeds``.

    Args:
        teacher: a denoiser ``D(x, sigma, class_labels=None)`` (any callable when ``pairs`` is
            None; an ``nn.Module`` runs in eval mode, its own mode restored after).
        seeds: ``N >= 2`` distinct non-negative seeds; ``z_i = noise_for_seeds([seed_i])``.
        pairs: ``None``: integrate the teacher ODE in memory. A directory: the pair store there,
            created, resumed or reused (also for a subset of the seeds it holds) with
            :func:`dmdcopy.pairs.generate_pairs`. A :class:`~dmdcopy.pairs.PairStore`: read it as
            it is (its teacher fingerprint is checked; it must hold the seeds).
        sample_shape: per-sample shape; default ``teacher.sample_shape``.
        sigmas: ``(steps + 1,)`` ODE grid ending in 0; default
            :func:`dmdcopy.pairs.default_sigmas` (a given store: its own; if passed, it must match).
        solver: a deterministic sampler of :mod:`dmdcopy.samplers`; default Heun (a given store:
            its own; if passed, it must match).
        batch: samples per teacher call (does not change the result).
        device: where the teacher runs and the samples live; default the teacher's device.
        progress: ``progress("teacher", done, total)`` in pairs.

    Returns: :class:`TeacherSamples`. The class labels of a conditional teacher
    (``teacher.label_dim > 0``) are :func:`dmdcopy.noise.labels_for_seeds` (or the store's).
    Under ``torch.distributed`` each rank computes a share and every rank gets all ``N`` pairs.
    """
    where = "teacher_samples"
    seed_list = _seed_list(seeds, where)
    _positive_int(batch, "batch", where)
    device = _module_device(teacher) if device is None else torch.device(device)
    if isinstance(pairs, PairStore):
        if isinstance(teacher, nn.Module):
            pairs.check_teacher(teacher)
        samples = _from_store(pairs, seed_list, sample_shape=sample_shape, sigmas=sigmas, solver=solver,
                              device=device, check_settings=True)
        if progress is not None:
            progress("teacher", len(seed_list), len(seed_list))
        return samples
    if pairs is not None:
        bar = None if progress is None else (lambda done, total: progress("teacher", done, total))
        with _EvalMode(teacher):
            store = generate_pairs(teacher, seed_list, pairs, sample_shape=sample_shape, sigmas=sigmas,
                                   solver=solver or heun, batch=batch, device=device, progress=bar)
        # generate_pairs compared every setting with the store's manifest
        return _from_store(store, seed_list, sample_shape=None, sigmas=None, solver=None, device=device,
                           check_settings=False)

    if sample_shape is None:
        sample_shape = contracts.sample_shape(teacher)
        if sample_shape is None:
            raise ConfigError(f"{where}: pass sample_shape= (the teacher has no sample_shape)")
    shape = tuple(int(s) for s in sample_shape)
    grid = default_sigmas(teacher) if sigmas is None else _grid(sigmas)
    solver = solver or heun
    label_dim = contracts.label_dim(teacher)
    n = len(seed_list)
    rank, world = dist_rank_world()
    lo, hi = _share(n, rank, world)
    mine = seed_list[lo:hi]
    xs = [torch.empty((0, *shape), device=device)]
    with torch.no_grad(), _EvalMode(teacher):
        for b in range(0, len(mine), batch):
            chunk = mine[b : b + batch]
            z = noise_for_seeds(chunk, shape, device=device)
            y = labels_for_seeds(chunk, label_dim, device=device) if label_dim else None
            xs.append(teacher_ode(teacher, z, grid, solver, class_labels=y))
            if progress is not None:
                progress("teacher", b + len(chunk), len(mine))
    x = torch.cat(xs)
    if world > 1:
        x = _gather_shares(x, n, world)
    _check_finite_teacher(x, seed_list)
    return TeacherSamples(
        seeds=seed_list,
        z=noise_for_seeds(seed_list, shape, device=device, dtype=x.dtype),
        x=x,
        labels=labels_for_seeds(seed_list, label_dim, device=device) if label_dim else None,
        sigmas=grid.to(torch.float64).cpu(),
        solver=_solver_name(solver),
        fingerprint=teacher_fingerprint(teacher) if isinstance(teacher, nn.Module) else None,
    )


# ----------------------------------------------------------------------------------------------
# The student's side


def _check_student(student: Any, teacher: TeacherSamples) -> None:
    shape = contracts.sample_shape(student)
    if shape is not None and tuple(shape) != tuple(teacher.x.shape[1:]):
        raise ShapeError(f"measure_student: the student makes samples of shape {tuple(shape)}, the teacher's "
                         f"are {tuple(teacher.x.shape[1:])}")
    label_dim = getattr(student, "label_dim", None)
    if label_dim is None:
        return
    if teacher.labels is not None and int(label_dim) == 0:
        raise ConfigError("measure_student: the teacher samples are class-conditional but the student has "
                          "label_dim = 0")
    if teacher.labels is None and int(label_dim) > 0:
        raise ConfigError(f"measure_student: the student is class-conditional (label_dim = {int(label_dim)}) "
                          "but the teacher samples carry no labels")


def _student_samples(
    student: Any, teacher: TeacherSamples, lo: int, hi: int, batch: int, progress: Progress | None
) -> Tensor:
    """``G(z_i, y_i)`` for rows ``[lo, hi)``: ``(hi - lo, ...)`` on the teacher samples' device and
    in their dtype; the student runs on its own device, in eval mode, without autograd."""
    device = _module_device(student, teacher.z.device)
    out = [teacher.x.new_empty((0, *teacher.x.shape[1:]))]
    with torch.no_grad(), _EvalMode(student):
        for b in range(lo, hi, batch):
            e = min(b + batch, hi)
            z = teacher.z[b:e].to(device)
            y = teacher.labels[b:e].to(device) if teacher.labels is not None else None
            x = generate(student, z, y)
            if not isinstance(x, Tensor) or tuple(x.shape) != tuple(z.shape):
                raise ShapeError(f"measure_student: the student mapped z of shape {tuple(z.shape)} to "
                                 f"{_shape(x)}; expected the same shape")
            out.append(x.to(device=teacher.x.device, dtype=teacher.x.dtype))
            if progress is not None:
                progress("student", e - lo, hi - lo)
    return torch.cat(out)


def _features_name(features: Callable | None) -> str | None:
    if features is None:
        return None
    name = getattr(features, "__qualname__", None) or type(features).__qualname__
    return f"{getattr(features, '__module__', None) or type(features).__module__}.{name}"


def measure_student(
    student: Callable[..., Tensor],
    teacher: TeacherSamples,
    *,
    batch: int = 256,
    features: Callable[[Tensor], Tensor] | None = None,
    block_size: int = 10_000,
    n_boot: int = 1000,
    ci: float = 0.95,
    transport: bool = False,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
    keep_samples: int = 0,
) -> DeltaEReport:
    """Delta E of ``student`` against the teacher's pairs.

    Args:
        student: a generator ``G(z, class_labels=None) -> x`` (an ``nn.Module`` runs in eval mode
            on its own device, its training mode restored after; labels are passed only when the
            teacher samples have them).
        teacher: the teacher's pairs (:func:`teacher_samples`).
        batch: samples per student call.
        features: optional ``(B, ...) -> (B, F)`` applied to both sample sets before the metric
            (e.g. an Inception or DINO network).
        block_size, n_boot, ci, generator: passed to
            :func:`~dmdcopy.metrics.pairing_inefficiency` (and to the transport figures).
        transport: also the teacher-free transport inefficiency of teacher and student
            (:func:`~dmdcopy.metrics.transport_inefficiency` of ``(z, x)``).
        progress: ``progress(stage, done, total)``: ``"student"``, the metric's stages,
            ``"transport"``.
        keep_samples: keep the student's samples of the first this many seeds in the report's
            ``student_samples`` (e.g. for a picture beside the teacher's ``teacher.x[:k]``).

    Returns: a :class:`DeltaEReport`; ``result`` is ``None`` and ``n_nonfinite > 0`` when some
    student samples are not finite. The metric runs on the teacher samples' device.
    """
    t_start = time.perf_counter()
    where = "measure_student"
    if not isinstance(teacher, TeacherSamples):
        raise ConfigError(f"{where}: teacher must be TeacherSamples (see teacher_samples), "
                          f"got {type(teacher).__name__}")
    _positive_int(batch, "batch", where)
    if not isinstance(keep_samples, int) or isinstance(keep_samples, bool) or keep_samples < 0:
        raise ConfigError(f"{where}: keep_samples must be an int >= 0, got {keep_samples!r}")
    _check_student(student, teacher)
    n = len(teacher)
    rank, world = dist_rank_world()
    lo, hi = _share(n, rank, world)
    x_mine = _student_samples(student, teacher, lo, hi, batch, progress)  # (hi - lo, ...)
    bad = torch.tensor([int((~torch.isfinite(x_mine).flatten(1).all(dim=1)).sum())], device=x_mine.device)
    if world > 1:
        torch.distributed.all_reduce(bad)  # every rank takes the same branch below
    n_nonfinite = int(bad.item())
    t_student = time.perf_counter()

    metric: dict[str, Any] = dict(block_size=block_size, n_boot=n_boot, ci=ci, generator=generator)
    if features is not None:
        metric["features"] = features
    if progress is not None:
        metric["progress"] = progress
    result = None
    if n_nonfinite == 0:
        if world > 1:
            acc = PairingInefficiency(**metric)
            acc.update(x_mine, teacher.x[lo:hi])
            result = acc.compute()
        else:
            result = pairing_inefficiency(x_mine, teacher.x, **metric)
    t_metric = time.perf_counter()

    transport_results = None
    if transport and result is not None:
        x_student = _gather_shares(x_mine, n, world) if world > 1 else x_mine
        z = teacher.z.to(teacher.x.dtype)
        options = dict(block_size=block_size, n_boot=n_boot, ci=ci, generator=generator)
        transport_results = {}
        for i, (who, x) in enumerate((("teacher", teacher.x), ("student", x_student))):
            if progress is not None:
                progress("transport", i, 2)
            transport_results[who] = transport_inefficiency(z, x, **options)
        if progress is not None:
            progress("transport", 2, 2)
    t_end = time.perf_counter()

    settings = {
        "n": n,
        "sample_shape": list(teacher.x.shape[1:]),
        "seeds": _seed_runs(teacher.seeds),
        "conditional": teacher.labels is not None,
        "solver": teacher.solver,
        "steps": int(teacher.sigmas.numel()) - 1,
        "sigmas": [float(s) for s in teacher.sigmas],
        "teacher_fingerprint": teacher.fingerprint,
        "student_class": type(student).__name__,
        "batch": batch,
        "block_size": block_size,
        "n_boot": n_boot,
        "ci": ci,
        "features": _features_name(features),
        "transport": bool(transport),
        "world_size": world,
        "device": str(teacher.x.device),
    }
    time_s = {"teacher": 0.0, "student": t_student - t_start, "metric": t_metric - t_student,
              "transport": t_end - t_metric, "total": t_end - t_start}
    kept = x_mine[:keep_samples].detach().cpu() if keep_samples and rank == 0 else None
    return DeltaEReport(result=result, n_nonfinite=n_nonfinite, transport=transport_results,
                        time_s=time_s, settings=settings, student_samples=kept)


def delta_e(
    teacher: Callable[..., Tensor],
    student: Callable[..., Tensor],
    seeds: Iterable[int] | Tensor,
    *,
    pairs: PairStore | str | Path | None = None,
    sample_shape: Sequence[int] | None = None,
    sigmas: Tensor | Sequence[float] | None = None,
    solver: Callable[..., Tensor] | None = None,
    batch: int = 256,
    device: torch.device | str | None = None,
    features: Callable[[Tensor], Tensor] | None = None,
    block_size: int = 10_000,
    n_boot: int = 1000,
    ci: float = 0.95,
    transport: bool = False,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
) -> DeltaEReport:
    """Delta E of ``student`` against ``teacher`` on ``seeds``: :func:`teacher_samples` then
    :func:`measure_student` (the arguments are theirs), the same path as ``dmdcopy delta-e``.

    >>> import torch
    >>> from dmdcopy.teachers import GaussianTeacher
    >>> from dmdcopy.samplers import teacher_ode
    >>> T = GaussianTeacher(torch.zeros(2), torch.eye(2))
    >>> copy = lambda z, class_labels=None: teacher_ode(T, z)  # a student that copies its teacher
    >>> delta_e(T, copy, range(64), n_boot=0).result.delta_e
    0.0
    """
    t_start = time.perf_counter()
    samples = teacher_samples(teacher, seeds, pairs=pairs, sample_shape=sample_shape, sigmas=sigmas,
                              solver=solver, batch=batch, device=device, progress=progress)
    t_teacher = time.perf_counter()
    report = measure_student(student, samples, batch=batch, features=features, block_size=block_size,
                             n_boot=n_boot, ci=ci, transport=transport, generator=generator,
                             progress=progress)
    time_s = {**report.time_s, "teacher": t_teacher - t_start, "total": time.perf_counter() - t_start}
    store = pairs.directory if isinstance(pairs, PairStore) else pairs
    settings = {**report.settings, "pairs": None if store is None else str(store)}
    return replace(report, time_s=time_s, settings=settings)
