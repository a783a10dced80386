"""``dmdcopy delta-e``: Delta E of a student checkpoint against its teacher checkpoint.

The teacher is a denoiser ``D(x, sigma, class_labels=None)``: a network with preconditioning, or
one of dmdcopy's exact teachers saved with ``dmdcopy.io.save`` (e.g. the ``teacher.safetensors``
that ``dmdcopy distill`` writes). The student is a generator ``G(z, class_labels=None)`` (a saved
``OneStepStudent`` / ``MultiStepStudent``), or a denoiser, as DMD2 releases its students: a
denoiser is wrapped as ``OneStepStudent(denoiser, sigma_max=--student-sigma)`` (default: its own
``sigma_max`` when finite, else 80), i.e. ``G(z) = D(sigma z, sigma)``. A module whose
``forward`` takes two required arguments ``(x, sigma)`` is a denoiser, one ``(z)`` a generator.

Your own classes: ``--teacher-arch mypkg.nets:build_teacher --teacher-kwargs '{"width": 64}'``
imports ``build_teacher`` from your installed package (or PYTHONPATH), calls it with those
keyword arguments and loads the state dict file given as ``--teacher`` into the module it returns
(.safetensors, .pt/.pth/.bin read with weights_only=True, a dmdcopy checkpoint). The same for
``--student-arch`` / ``--student-kwargs``. Nothing named inside a checkpoint is ever imported.

The measurement is :func:`dmdcopy.delta_e` (teacher pairs from --pairs-cache or in memory, the
student's samples on the same noise, then the metric); the table shows the finite-N Delta E with
its bootstrap interval, the bracket for the population Delta E with its interval, the energies,
the resolution, the own-pair rate, N / block size / blocks, the time and every warning.

Under ``torchrun --nproc_per_node=N -m dmdcopy delta-e ...`` the command starts the process group
from torchrun's variables; rank ``r`` computes its share of the teacher pairs and of the student's
samples, every rank gets the one-process report, and rank 0 prints and writes it.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

from dmdcopy.errors import CheckpointError, ConfigError

__all__ = ["register", "run"]


def _solvers() -> dict:
    from dmdcopy import samplers

    # The one place solver names map to functions (deterministic ODE solvers only: pairs must be
    # a function of the seed).
    return {"euler": samplers.euler, "heun": samplers.heun, "dpmpp_2m": samplers.dpmpp_2m}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "delta-e",
        help="Delta E (pairing inefficiency) of a student against its teacher",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--teacher", required=True, help="teacher denoiser checkpoint")
    p.add_argument("--student", required=True, help="student generator (or denoiser) checkpoint")
    p.add_argument("--teacher-arch", default=None, metavar="MODULE:BUILDER",
                   help="your own teacher class: a callable of your installed package returning the "
                        "nn.Module that --teacher's state dict fills, e.g. mypkg.nets:build_teacher")
    p.add_argument("--teacher-kwargs", default=None, metavar="JSON",
                   help="keyword arguments of --teacher-arch as a JSON object, e.g. '{\"width\": 64}'")
    p.add_argument("--student-arch", default=None, metavar="MODULE:BUILDER",
                   help="your own student class (a generator or a denoiser), as --teacher-arch")
    p.add_argument("--student-kwargs", default=None, metavar="JSON",
                   help="keyword arguments of --student-arch as a JSON object")
    p.add_argument("--sample-shape", default=None, metavar="C,H,W",
                   help="per-sample shape, for a teacher that does not record it (e.g. 3,64,64)")
    p.add_argument("--seeds", default="0-9999", help="seeds, e.g. 0-9999 or 0-99,500 (default 0-9999)")
    p.add_argument("--steps", type=int, default=18, help="teacher ODE steps on a Karras grid (default 18)")
    p.add_argument("--solver", default="heun", choices=sorted(_solvers()), help="teacher ODE solver")
    p.add_argument("--sigma-min", type=float, default=None,
                   help="grid's smallest sigma (default max(0.002, teacher.sigma_min))")
    p.add_argument("--sigma-max", type=float, default=None,
                   help="grid's largest sigma (default min(80, teacher.sigma_max))")
    p.add_argument("--rho", type=float, default=7.0, help="Karras grid exponent (default 7)")
    p.add_argument("--student-sigma", type=float, default=None,
                   help="sigma of the single step when the student checkpoint is a denoiser")
    p.add_argument("--batch", type=int, default=256, help="samples per forward pass (default 256)")
    p.add_argument("--pairs-cache", default=None,
                   help="directory of the teacher pair store (created, resumed, reused for any subset of "
                        "its seeds; default: pairs computed in memory and not kept)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--block-size", type=int, default=10_000,
                   help="largest exactly solved block (default 10000)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000; 0 = none)")
    p.add_argument("--transport", action="store_true",
                   help="also report the teacher-free transport inefficiency of teacher and student")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _device(name: str) -> torch.device:
    from dmdcopy.cli.distill import check_device  # the one device check of the command line

    try:
        return check_device(name)
    except ConfigError as e:
        raise ConfigError(f"--{e}") from None


def _is_denoiser(m: nn.Module) -> bool:
    """``D(x, sigma, ...)`` rather than ``G(z, ...)``: dmdcopy's wrappers by class, other modules
    by the number of required positional arguments of ``forward``."""
    from dmdcopy.precond import Precond
    from dmdcopy.students import MultiStepStudent, OneStepStudent

    if isinstance(m, Precond):
        return True
    if isinstance(m, (OneStepStudent, MultiStepStudent)):
        return False
    try:
        params = inspect.signature(m.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in positional and p.default is p.empty for p in params) >= 2


def _load(path: str, role: str, arch: str | None, kwargs: str | None, device: torch.device) -> nn.Module:
    """The module in ``path``: rebuilt from a dmdcopy file, or your class (``arch``) filled from it."""
    from dmdcopy.io import load
    from dmdcopy.io.user_arch import build_user_module, fill_module

    if arch is None:
        if kwargs is not None:
            raise ConfigError(f"--{role}-kwargs needs --{role}-arch (the builder it is passed to)")
        try:
            return load(path, map_location=device).eval()
        except CheckpointError as e:
            # one line: a strict-load report lists offending keys on lines of their own
            raise CheckpointError(f"--{role}: " + "; ".join(str(e).splitlines())) from e
    try:
        module = build_user_module(arch, kwargs)
    except ConfigError as e:
        raise ConfigError(f"--{role}-arch: {e}") from e
    try:
        fill_module(module, path, name=f"{arch} ({type(module).__name__})")
    except CheckpointError as e:
        raise CheckpointError(f"--{role}: {e}") from e
    return module.to(device).eval()


def _student_generator(student: nn.Module, sigma: float | None, path: str) -> nn.Module:
    from dmdcopy.students import OneStepStudent

    if _is_denoiser(student):
        return OneStepStudent(student, sigma_max=sigma).eval()
    if sigma is not None:
        raise ConfigError(f"--student-sigma applies to a denoiser checkpoint, but {path} holds a "
                          f"{type(student).__name__} (a generator)")
    return student


def _sample_shape(teacher: nn.Module, student: nn.Module, args) -> tuple[int, ...]:
    from dmdcopy import contracts

    if args.sample_shape is not None:
        try:
            shape = tuple(int(s) for s in args.sample_shape.split(","))
        except ValueError:
            raise ConfigError(f"--sample-shape {args.sample_shape!r}: expected integers such as 3,64,64"
                              ) from None
        if not shape or min(shape) < 1:
            raise ConfigError(f"--sample-shape {args.sample_shape!r}: expected positive integers")
    else:
        shape = contracts.sample_shape(teacher)
        if shape is None:
            raise CheckpointError(f"--teacher {args.teacher}: the model does not record its sample shape; "
                                  "pass --sample-shape")
        shape = tuple(shape)
    s_shape = contracts.sample_shape(student)
    if s_shape is not None and tuple(s_shape) != shape:
        raise CheckpointError(f"mismatched checkpoints: teacher samples have shape {shape}, "
                              f"student samples {tuple(s_shape)}")
    t_labels = contracts.label_dim(teacher)
    s_labels = getattr(student, "label_dim", None)
    if s_labels is not None and int(s_labels) != t_labels:
        raise CheckpointError(f"mismatched checkpoints: teacher has label_dim={t_labels}, "
                              f"student label_dim={int(s_labels)}")
    return shape


def _grid(teacher: nn.Module, args) -> torch.Tensor:
    from dmdcopy.contracts import default_grid

    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    return default_grid(teacher, args.steps, rho=args.rho, sigma_min=args.sigma_min, sigma_max=args.sigma_max)


# What each stage of dmdcopy.delta_e's progress(stage, done, total) is called on screen.
_STAGES = {
    "teacher": ("teacher pairs", "pair"), "student": ("student samples", "sample"),
    "features": ("features", "sample"), "cost": ("cost matrix", "row"), "assignment": ("assignment", "block"),
    "bound": ("W2 lower bound", "step"), "bootstrap": ("bootstrap", "resample"),
    "transport": ("transport", "model"),
}


class _StageBars:
    """``progress(stage, done, total)`` -> one tqdm bar per stage, closed when the stage is done.

    Stages nest (the metric opens ``assignment`` and reports ``cost`` rows inside each block), so
    every open stage keeps its own bar. A ticker thread redraws the open bars every second, so the
    elapsed time keeps moving during a step that reports rarely (one exact assignment of 10 000
    pairs takes a minute on a CPU): the command is never silent for long.
    """

    def __init__(self, enabled: bool, tick_s: float = 1.0) -> None:
        self.enabled, self.tick_s = enabled, tick_s
        self.bars: dict[str, object] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        with self.lock:
            bar = self.bars.get(stage)
            if bar is not None and done < bar.n:  # the stage starts again (e.g. the next model)
                bar.close()
                bar = None
            if bar is None:
                desc, unit = _STAGES.get(stage, (stage, "it"))
                bar = self.bars[stage] = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)
            if total != bar.total:
                bar.total = total
            bar.update(done - bar.n)
            if done >= total:
                bar.close()
                del self.bars[stage]
        if self.thread is None:
            self.thread = threading.Thread(target=self._tick, name="dmdcopy-progress", daemon=True)
            self.thread.start()

    def _tick(self) -> None:
        while not self.stop.wait(self.tick_s):
            with self.lock:
                for bar in self.bars.values():
                    bar.refresh()

    def __enter__(self) -> _StageBars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        with self.lock:
            for bar in self.bars.values():
                bar.close()
            self.bars.clear()


def _fmt(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "n/a"
    return f"{v:.4f}" if math.isfinite(v) else str(v)


def _table(report, seconds: float) -> list[tuple[str, str]]:
    r = report.result
    rows = [
        ("Delta E (finite N)", f"{_fmt(r.delta_e)}  [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}] "
                               f"({r.ci:.0%}, {r.n_boot} boot)"),
        ("population Delta E bracket", f"[{_fmt(r.delta_e_lower)}, {_fmt(r.delta_e_upper)}]  "
                                       f"interval [{_fmt(r.bracket_low)}, {_fmt(r.bracket_high)}]"),
        ("E_pair / E_opt / E_ind", f"{r.e_pair:.4g} / {r.e_opt:.4g} / {r.e_ind:.4g}"),
        ("E_opt lower bound (W2^2/dim)", f"{r.e_opt_lower:.4g}"),
        ("resolution (E_ind-E_opt)/E_ind", _fmt(r.resolution)),
        ("own-pair nearest rate", f"{r.own_pair_rate:.4f} (chance {1 / r.block_size:.2g})"),
        ("E_pair / E_ind", _fmt(r.pair_ind_ratio)),
        ("N / block size / blocks", f"{r.n} / {r.block_size} / {r.n_blocks}"
                                    + (f" (block spread {r.block_std:.3g})" if r.n_blocks > 1 else "")),
    ]
    if report.transport is not None:
        for who, tr in report.transport.items():
            rows.append((f"transport inefficiency, {who}",
                         f"{_fmt(tr.value)}  [{_fmt(tr.ci_low)}, {_fmt(tr.ci_high)}]"))
    t = report.time_s
    parts = [f"teacher pairs {t['teacher']:.1f} s", f"student {t['student']:.1f} s",
             f"metric {t['metric']:.1f} s"]
    if report.transport is not None:
        parts.append(f"transport {t['transport']:.1f} s")
    rows.append(("time", f"{seconds:.1f} s ({', '.join(parts)})"))
    return rows


def _check_writable_file(name: str, flag: str) -> None:
    """Refuse, before any work, an output path whose file could not be written at the end."""
    path = Path(name)
    if path.is_dir():
        raise ConfigError(f"{flag} {name}: is a directory; give a file name such as report.json")
    parent = path.parent if str(path.parent) else Path(".")
    existing = next((p for p in (parent, *parent.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise ConfigError(f"{flag} {name}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"{flag} {name}: not writable")


def run(args) -> int:
    from dmdcopy.distill import process_group_from_env

    with process_group_from_env() as info:  # under torchrun: each rank maps its share of the seeds
        return _measure(args, is_main=info.is_main)


def _measure(args, *, is_main: bool) -> int:
    from dmdcopy.measure import delta_e
    from dmdcopy.noise import parse_seeds

    t_start = time.perf_counter()
    device = _device(args.device)
    seeds = parse_seeds(args.seeds)
    if len(seeds) < 2:
        raise ConfigError(f"--seeds {args.seeds!r}: Delta E needs at least 2 seeds")
    if args.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {args.batch}")
    if args.out:
        _check_writable_file(args.out, "--out")
    grid_args_ok = args.rho > 0 and (args.sigma_min is None or args.sigma_min >= 0)
    if not grid_args_ok:
        raise ConfigError(f"--rho must be > 0 and --sigma-min >= 0, got {args.rho} and {args.sigma_min}")
    teacher = _load(args.teacher, "teacher", args.teacher_arch, args.teacher_kwargs, device)
    if not _is_denoiser(teacher):
        raise CheckpointError(f"--teacher {args.teacher}: holds a {type(teacher).__name__}, not a denoiser "
                              "D(x, sigma) (a preconditioned network such as EDMPrecond, or an exact "
                              "teacher)")
    loaded = _load(args.student, "student", args.student_arch, args.student_kwargs, device)
    student = _student_generator(loaded, args.student_sigma, args.student)
    shape = _sample_shape(teacher, student, args)
    grid = _grid(teacher, args)

    with _StageBars(is_main and not args.no_progress) as bars:
        report = delta_e(teacher, student, seeds, pairs=args.pairs_cache, sample_shape=shape, sigmas=grid,
                         solver=_solvers()[args.solver], batch=args.batch, device=device,
                         block_size=args.block_size, n_boot=args.bootstrap, transport=args.transport,
                         progress=bars)
    seconds = time.perf_counter() - t_start

    out = report.to_dict()
    out["time_s"]["command"] = seconds
    out["settings"].update({
        "teacher": str(args.teacher), "student": str(args.student),
        "teacher_arch": args.teacher_arch, "teacher_kwargs": args.teacher_kwargs,
        "student_arch": args.student_arch, "student_kwargs": args.student_kwargs,
        "student_sigma": getattr(student, "sigma_max", None), "seeds": args.seeds,
        "solver": args.solver, "rho": args.rho, "device": str(device), "pairs_cache": args.pairs_cache,
    })
    if not is_main:  # every rank holds the same report; rank 0 prints and writes it
        return 0 if report.result is not None else 1
    if report.result is None:
        print(f"Delta E  not computed: the student's samples are NaN or inf for {report.n_nonfinite} of "
              f"{len(seeds)} seeds")
    else:
        rows = _table(report, seconds)
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
        for w in report.result.warnings:
            print(f"warning: {w}")
    if args.out:
        from dmdcopy.experiments.report import write_json

        print(f"report written to {write_json(args.out, out)}")  # atomic: a crash keeps the old one
    return 0 if report.result is not None else 1
