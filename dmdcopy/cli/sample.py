"""``dmdcopy sample CHECKPOINT --seeds 0-63 --out grid.png``: a grid of a student's images.

With ``--teacher``, the teacher's image from the same noise (and label) stands left of each
student image: the picture of copying. Checkpoints load as for ``dmdcopy delta-e`` (a denoiser
student is wrapped as ``G(z) = D(sigma z, sigma)``).
"""

from __future__ import annotations

import argparse

import torch

from dmdcopy.errors import ConfigError

__all__ = ["register", "run"]


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="an image grid of a student's samples (optionally beside "
                              "its teacher's)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="student generator (or denoiser) checkpoint")
    p.add_argument("--seeds", default="0-63", help="seeds, e.g. 0-63 (default)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--teacher", default=None, help="teacher checkpoint: pair each image with the teacher's")
    p.add_argument("--steps", type=int, default=18, help="teacher ODE steps (Heun, Karras grid; default 18)")
    p.add_argument("--student-sigma", type=float, default=None, help="sigma of a denoiser student's step")
    p.add_argument("--ncol", type=int, default=None, help="tiles per row")
    p.add_argument("--range", type=float, nargs=2, default=(-1.0, 1.0), metavar=("LOW", "HIGH"),
                   help="value range mapped to black..white (default -1 1, EDM's)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dmdcopy import contracts
    from dmdcopy.cli.delta_e import _device, _load, _student_generator
    from dmdcopy.noise import labels_for_seeds, noise_for_seeds, parse_seeds
    from dmdcopy.samplers import heun, teacher_ode
    from dmdcopy.viz import save_image_grid

    seeds = parse_seeds(args.seeds, limit=4096)
    device = _device(args.device)
    student = _student_generator(_load(args.checkpoint, "checkpoint", None, None, device),
                                 args.student_sigma, args.checkpoint)
    teacher = _load(args.teacher, "teacher", None, None, device) if args.teacher else None
    shape = contracts.sample_shape(student) or (contracts.sample_shape(teacher) if teacher else None)
    if shape is None or len(shape) != 3 or shape[0] not in (1, 3):
        raise ConfigError(f"{args.checkpoint}: samples of shape {shape} are not images (C, H, W), C in 1, 3")
    labels = None
    if contracts.label_dim(student):
        labels = labels_for_seeds(seeds, contracts.label_dim(student), device=device)
    z = noise_for_seeds(seeds, shape, device=device)
    with torch.no_grad():
        x = contracts.generate(student, z, labels)
        paired = None
        if teacher is not None:
            grid = contracts.default_grid(teacher, args.steps)
            paired = teacher_ode(teacher, z, grid, heun, class_labels=labels)
    if not bool(torch.isfinite(x).all()):
        raise ConfigError(f"{args.checkpoint}: the student's samples are NaN or inf")
    path = save_image_grid(args.out, x, pair_with=paired, ncol=args.ncol, value_range=tuple(args.range))
    print(f"wrote {path} ({len(seeds)} {'pairs' if paired is not None else 'samples'})")
    return 0
