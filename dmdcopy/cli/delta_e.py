"""``dmdcopy delta-e``: Delta E of a student checkpoint against its teacher checkpoint.

The teacher is a denoiser. The student is a generator ``G(z, class_labels=None)`` (a saved
``OneStepStudent`` / ``MultiStepStudent``), or a denoiser, as DMD2 releases its students: a
denoiser is wrapped as ``OneStepStudent(denoiser, sigma_max=--student-sigma)`` (default: its own
``sigma_max`` when finite, else 80), i.e. ``G(z) = D(sigma z, sigma)``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
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
                   help="directory of the teacher pair store (reused and resumed; default: a temporary one)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--block-size", type=int, default=10_000,
                   help="largest exactly solved block (default 10000)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000; 0 = none)")
    p.add_argument("--transport", action="store_true",
                   help="also report the teacher-free transport inefficiency of teacher and student")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return device


def _is_denoiser(m: nn.Module) -> bool:
    from dmdcopy.precond import Precond

    return isinstance(m, Precond)


def _load(path: str, role: str, device: torch.device) -> nn.Module:
    from dmdcopy.io import load

    try:
        return load(path, map_location=device).eval()
    except CheckpointError as e:
        raise CheckpointError(f"--{role}: {e}") from e


def _student_generator(student: nn.Module, sigma: float | None, path: str) -> nn.Module:
    from dmdcopy.students import OneStepStudent

    if _is_denoiser(student):
        return OneStepStudent(student, sigma_max=sigma).eval()
    if sigma is not None:
        raise ConfigError(f"--student-sigma applies to a denoiser checkpoint, but {path} holds a "
                          f"{type(student).__name__} (a generator)")
    return student


def _check_match(teacher: nn.Module, student: nn.Module, args) -> tuple[int, ...]:
    t_shape = getattr(teacher, "sample_shape", None)
    s_shape = getattr(student, "sample_shape", None)
    if t_shape is None:
        raise CheckpointError(f"--teacher {args.teacher}: the model does not record its sample shape")
    if s_shape is not None and tuple(s_shape) != tuple(t_shape):
        raise CheckpointError(f"mismatched checkpoints: teacher samples have shape {tuple(t_shape)}, "
                              f"student samples {tuple(s_shape)}")
    t_labels, s_labels = int(getattr(teacher, "label_dim", 0)), int(getattr(student, "label_dim", 0))
    if t_labels != s_labels:
        raise CheckpointError(f"mismatched checkpoints: teacher has label_dim={t_labels}, "
                              f"student label_dim={s_labels}")
    return tuple(t_shape)


def _grid(teacher: nn.Module, args) -> torch.Tensor:
    from dmdcopy.schedules import karras_sigmas

    sigma_min = args.sigma_min if args.sigma_min is not None else max(
        0.002, float(getattr(teacher, "sigma_min", 0.0)))
    sigma_max = args.sigma_max if args.sigma_max is not None else min(
        80.0, float(getattr(teacher, "sigma_max", math.inf)))
    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    return karras_sigmas(args.steps, sigma_min, sigma_max, args.rho)


class _Progress:
    """tqdm bar driven by ``generate_pairs``'s ``progress(done, total)`` calls."""

    def __init__(self, enabled: bool, desc: str) -> None:
        self.enabled, self.desc, self.bar = enabled, desc, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="pair")
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "n/a"
    return f"{v:.4f}" if math.isfinite(v) else str(v)


def run(args) -> int:
    from dmdcopy.metrics import pairing_inefficiency, transport_inefficiency
    from dmdcopy.noise import noise_for_seeds, parse_seeds
    from dmdcopy.pairs import generate_pairs

    t_start = time.perf_counter()
    device = _device(args.device)
    seeds = parse_seeds(args.seeds)
    if len(seeds) < 2:
        raise ConfigError(f"--seeds {args.seeds!r}: Delta E needs at least 2 seeds")
    if args.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {args.batch}")
    teacher = _load(args.teacher, "teacher", device)
    if not _is_denoiser(teacher):
        raise CheckpointError(f"--teacher {args.teacher}: holds a {type(teacher).__name__}, not a denoiser "
                              "(a preconditioned network such as EDMPrecond)")
    student = _student_generator(_load(args.student, "student", device), args.student_sigma, args.student)
    shape = _check_match(teacher, student, args)
    grid = _grid(teacher, args)
    solver = _solvers()[args.solver]

    with tempfile.TemporaryDirectory(prefix="dmdcopy-pairs-") as tmp:
        cache = Path(args.pairs_cache) if args.pairs_cache else Path(tmp)
        bar = _Progress(not args.no_progress, "teacher pairs")
        try:
            store = generate_pairs(teacher, seeds, cache, sample_shape=shape, sigmas=grid, solver=solver,
                                   batch=args.batch, device=device, progress=bar)
        finally:
            bar.close()
        t_pairs = time.perf_counter()
        _, x_teacher, labels = store.load(seeds, device=device)

    xs, zs = [], []
    with torch.no_grad():
        for lo in range(0, len(seeds), args.batch):
            z = noise_for_seeds(seeds[lo : lo + args.batch], shape, device=device)
            y = labels[lo : lo + args.batch] if labels is not None else None
            xs.append(student(z) if y is None else student(z, class_labels=y))
            if args.transport:
                zs.append(z)
    x_student = torch.cat(xs).to(x_teacher.dtype)
    t_student = time.perf_counter()

    result = pairing_inefficiency(x_student, x_teacher, block_size=args.block_size, n_boot=args.bootstrap)
    t_metric = time.perf_counter()
    transport = None
    if args.transport:
        z = torch.cat(zs)
        transport = {
            "teacher": transport_inefficiency(z, x_teacher, block_size=args.block_size,
                                              n_boot=args.bootstrap).to_dict(),
            "student": transport_inefficiency(z, x_student, block_size=args.block_size,
                                              n_boot=args.bootstrap).to_dict(),
        }
    t_end = time.perf_counter()

    report = {
        "delta_e": result.to_dict(),
        "transport": transport,
        "settings": {
            "teacher": str(args.teacher), "student": str(args.student),
            "student_class": type(student).__name__, "student_sigma": getattr(student, "sigma_max", None),
            "seeds": args.seeds, "n": len(seeds), "steps": args.steps, "solver": args.solver,
            "sigmas": [float(s) for s in grid], "device": str(device), "pairs_cache": args.pairs_cache,
            "teacher_fingerprint": store.manifest["teacher"],
        },
        "time_s": {"pairs": t_pairs - t_start, "student": t_student - t_pairs, "metric": t_metric - t_student,
                   "transport": t_end - t_metric, "total": t_end - t_start},
    }
    r = result
    rows = [
        ("Delta E", f"{_fmt(r.delta_e)}  [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}] "
                    f"({r.ci:.0%}, {r.n_boot} boot)"),
        ("E_pair / E_opt / E_ind", f"{r.e_pair:.4g} / {r.e_opt:.4g} / {r.e_ind:.4g}"),
        ("resolution (E_ind-E_opt)/E_ind", _fmt(r.resolution)),
        ("own-pair nearest rate", f"{r.own_pair_rate:.4f} (chance {1 / r.block_size:.2g})"),
        ("E_pair / E_ind", _fmt(r.pair_ind_ratio)),
        ("N / block size / blocks", f"{r.n} / {r.block_size} / {r.n_blocks}"
                                    + (f" (block spread {r.block_std:.3g})" if r.n_blocks > 1 else "")),
    ]
    if transport is not None:
        for who in ("teacher", "student"):
            tr = transport[who]
            rows.append((f"transport inefficiency, {who}",
                         f"{_fmt(tr['value'])}  [{_fmt(tr['ci_low'])}, {_fmt(tr['ci_high'])}]"))
    rows.append(("time", f"{t_end - t_start:.1f} s (pairs {t_pairs - t_start:.1f} s)"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if r.warning:
        print(f"warning: {r.warning}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        print(f"report written to {out}")
    return 0
