"""``dmdcopy demo``: the dimension sweep that shows (or fails to show) copying, on built-in data.

Trains small teachers on power-law Gaussians and Gaussian mixtures in several dimensions,
distils one-step DMD students (from the teacher and from scratch), prints Delta E per dimension
(the finite-N figure with its interval, the bracket for the population Delta E, and the metric's
warnings), and writes ``results.json`` and ``sweep.png`` to ``--out``. ``--experiment digits`` runs the
digits study (teacher convergence levels, memorising teacher; ``digits.json``, ``digits.png``,
``digits_pairs.png``),
``--experiment ablations`` the ablation switches (``ablations.json``, ``ablations.png``),
``--experiment all`` the three.

Each finished point is written to the results file as it completes; ``--resume`` skips the points
an earlier run with the same settings already wrote. Trained teachers are cached under
``--teacher-cache`` (default: ``<out>/teachers``) and reused. ``--seeds 0,1,2`` (or
``--num-seeds 3``) runs every point for several seeds and adds intervals over seeds; every student
records Delta E over training every ``--eval-every`` generator steps (``curves.png``).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

# The results file each experiment writes in --out.
RESULT_FILES = {"sweep": "results.json", "digits": "digits.json", "ablations": "ablations.json"}

__all__ = ["register", "run"]


def _dims(text: str) -> tuple[int, ...]:
    from dmdcopy.errors import ConfigError

    try:
        dims = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise ConfigError(f"--dims takes comma-separated positive ints, e.g. 2,8,32; got {text!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise ConfigError(f"--dims takes comma-separated positive ints, e.g. 2,8,32; got {text!r}")
    return dims


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="dimension sweep: does a DMD student copy its teacher's pairing? (no downloads)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--quick", dest="preset", action="store_const", const="quick",
                       help="tiny run, about 30 s on one CPU core (the CI check)")
    scale.add_argument("--full", dest="preset", action="store_const", const="full",
                       help="longer training, larger networks and more evaluation noises")
    scale.add_argument("--long", dest="preset", action="store_const", const="long",
                       help="the default's networks distilled 4x longer, 3 seeds; sweep: power-law "
                            "Gaussian at d = 2, 32, 512 (about 20 min on one core; docs/experiments.md)")
    p.set_defaults(preset="default")
    p.add_argument("--experiment", choices=("sweep", "digits", "ablations", "all"), default="sweep",
                   help="what to run (default: the dimension sweep)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--out", default="dmdcopy-demo", help="output folder (default: ./dmdcopy-demo)")
    p.add_argument("--dims", default=None,
                   help="comma-separated dimensions (default: the preset's; ablations use the first)")
    p.add_argument("--kinds", default=None,
                   help="comma-separated data kinds: power_law_gaussian,gaussian_mixture "
                        "(ablations use the first)")
    p.add_argument("--students", default=None, help="comma-separated: teacher_init,scratch")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of data, teachers, students and distillation (default: 0, or the "
                        "preset's seeds)")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", default=None,
                       help="comma-separated seeds: run every point for each (overrides --seed)")
    seeds.add_argument("--num-seeds", type=int, default=None,
                       help="run every point for seeds --seed, --seed + 1, ... (N seeds)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="Delta E curve: measure every N generator steps, 0 for none (preset's)")
    p.add_argument("--resume", action="store_true",
                   help="skip the points the results file in --out already holds (same settings only)")
    p.add_argument("--teacher-cache", default=None,
                   help="folder of trained teachers, reused across runs (default: OUT/teachers)")
    p.add_argument("--no-teacher-cache", action="store_true", help="train every teacher, cache none")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher training steps (preset's)")
    p.add_argument("--distill-steps", type=int, default=None, help="DMD generator updates (preset's)")
    p.add_argument("--lr", type=float, default=None, help="DMD learning rate of student and fake score")
    p.add_argument("--num-eval", type=int, default=None, help="evaluation noises per point (preset's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--resolution", type=int, default=None, help="digits: 8, 16 or 32 px (preset's)")
    p.add_argument("--network", choices=("mlp", "unet"), default=None, help="digits: teacher network")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar advanced by stage messages; returns ``(callback, close)``."""
    bar = None
    if enabled:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="stage")
    state = {"started": 0}

    def progress(message: str) -> None:
        if bar is not None:
            if state["started"]:
                bar.update(1)
            bar.set_postfix_str(message)
        state["started"] += 1

    def close() -> None:
        if bar is not None:
            bar.update(max(0, total - bar.n))
            bar.close()

    return progress, close


def _distill_changes(args: argparse.Namespace, distill) -> dict:
    changes = {}
    if args.distill_steps is not None:
        changes["num_steps"] = args.distill_steps
    if args.lr is not None:
        changes.update(generator_lr=args.lr, fake_score_lr=args.lr)
    return {"distill": distill.replace(**changes)} if changes else {}


def _seeds(args: argparse.Namespace) -> tuple[int, ...]:
    from dmdcopy.errors import ConfigError

    if args.num_seeds is not None:
        if args.num_seeds < 1:
            raise ConfigError(f"--num-seeds must be >= 1, got {args.num_seeds}")
        base = args.seed or 0
        return tuple(range(base, base + args.num_seeds))
    if args.seeds is None:
        return ()
    try:
        seeds = tuple(int(t) for t in args.seeds.replace(" ", "").split(",") if t)
    except ValueError:
        seeds = ()
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds takes distinct comma-separated non-negative ints, e.g. 0,1,2; "
                          f"got {args.seeds!r}")
    return seeds


def _common_changes(args: argparse.Namespace, config) -> dict:
    from dmdcopy.errors import ConfigError

    changes: dict = _distill_changes(args, config.distill)
    if args.seed is not None:
        if args.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {args.seed}")
        changes.update(seed=args.seed, seeds=())  # --seed S alone runs S only, whatever the preset
    seeds = _seeds(args)
    if seeds:
        changes["seeds"] = seeds
    if args.eval_every is not None:
        if args.eval_every < 0:
            raise ConfigError(f"--eval-every must be >= 0, got {args.eval_every}")
        changes["eval_every"] = args.eval_every
    if args.teacher_steps is not None:
        if args.teacher_steps < 1:
            raise ConfigError(f"--teacher-steps must be >= 1, got {args.teacher_steps}")
        changes["teacher"] = dataclasses.replace(config.teacher, steps=args.teacher_steps)
    if args.num_eval is not None:
        changes["num_eval"] = args.num_eval
    return changes


def _run_sweep(args: argparse.Namespace, device, out: Path) -> dict:
    from dmdcopy.experiments.report import (
        format_seed_table,
        format_sweep_table,
        plot_curves,
        plot_sweep,
        write_json,
    )
    from dmdcopy.experiments.sweep import SWEEP_PRESETS, run_dimension_sweep

    config = SWEEP_PRESETS[args.preset]()
    changes = _common_changes(args, config)
    if args.dims:
        changes["dims"] = _dims(args.dims)
    if args.kinds:
        changes["kinds"] = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if args.students:
        changes["students"] = tuple(k.strip() for k in args.students.split(",") if k.strip())
    config = dataclasses.replace(config, **changes)
    total = len(config.run_seeds()) * len(config.kinds) * len(config.dims) * (1 + len(config.students))
    progress, close = _progress_bar(total, not args.no_progress, "sweep")
    json_path = out / RESULT_FILES["sweep"]
    try:
        results = run_dimension_sweep(config, device=device, progress=progress, out=json_path,
                                      resume=args.resume, teacher_cache=_cache(args, out))
    finally:
        close()
    results["preset"] = args.preset
    write_json(json_path, {**results, "complete": True})
    print(format_sweep_table(results))
    if len(config.run_seeds()) > 1:
        print()
        print(format_seed_table(results))
    print(f"\nsweep, {args.preset} preset, {results['seconds']:.0f} s on {device}; wrote {json_path}")
    if not args.no_plot:
        print(f"wrote {plot_sweep(results, out / 'sweep.png')}")
        if config.eval_every > 0:
            print(f"wrote {plot_curves(results, out / 'curves.png')}")
    return results


def _cache(args: argparse.Namespace, out: Path) -> Path | None:
    if args.no_teacher_cache:
        return None
    return Path(args.teacher_cache) if args.teacher_cache is not None else out / "teachers"


def _digits_stages(config) -> int:
    """Progress messages :func:`run_digits` sends: the teacher; per convergence level its map, its
    teacher-initialised student and (last level) the scratch student; the memorising teacher's map
    and its scratch student."""
    n_levels = len(config.level_steps())
    per_level = sum(2 + (1 if config.scratch and i == n_levels - 1 else 0) for i in range(n_levels))
    per_seed = 1 + per_level + ((1 + int(config.scratch)) if config.memorising else 0)
    return len(config.run_seeds()) * per_seed


def _ablation_stages(config) -> int:
    """Progress messages :func:`run_ablations` sends: the teacher, the memorising network teacher
    when a variant uses one, and each variant."""
    extra = int(any(getattr(v, "memorising_net", False) for v in config.variants))
    return len(config.run_seeds()) * (1 + extra + len(config.variants))


def _run_digits(args: argparse.Namespace, device, out: Path) -> dict:
    from dmdcopy.experiments.digits import DIGITS_PRESETS, run_digits
    from dmdcopy.experiments.report import (
        format_digits_table,
        format_seed_table,
        plot_digit_pairs,
        plot_digits,
        write_json,
    )

    config = DIGITS_PRESETS[args.preset]()
    changes = _common_changes(args, config)
    if args.resolution is not None:
        changes["resolution"] = args.resolution
    if args.network is not None:
        changes["network"] = args.network
    config = dataclasses.replace(config, **changes)
    progress, close = _progress_bar(_digits_stages(config), not args.no_progress, "digits")
    json_path = out / RESULT_FILES["digits"]
    try:
        results = run_digits(config, device=device, progress=progress, out=json_path, resume=args.resume,
                             teacher_cache=_cache(args, out))
    finally:
        close()
    results["preset"] = args.preset
    write_json(json_path, {**results, "complete": True})
    print(format_digits_table(results))
    if len(config.run_seeds()) > 1:
        print()
        print(format_seed_table(results))
    print(f"\ndigits, {args.preset} preset, {results['seconds']:.0f} s on {device}; wrote {json_path}")
    if not args.no_plot:
        print(f"wrote {plot_digits(results, out / 'digits.png')}")
        pairs = plot_digit_pairs(results, out / "digits_pairs.png")
        if pairs is not None:
            print(f"wrote {pairs} (teacher and student images from the same noise)")
    return results


def _run_ablations(args: argparse.Namespace, device, out: Path) -> dict:
    from dmdcopy.experiments.ablations import ABLATION_PRESETS, run_ablations
    from dmdcopy.experiments.report import (
        format_ablation_table,
        format_seed_table,
        plot_ablations,
        write_json,
    )

    config = ABLATION_PRESETS[args.preset]()
    changes = _common_changes(args, config)
    if args.dims:
        dims = _dims(args.dims)
        changes["dim"] = dims[0]
    if args.kinds:
        changes["kind"] = args.kinds.split(",")[0].strip()
    config = dataclasses.replace(config, **changes)
    progress, close = _progress_bar(_ablation_stages(config), not args.no_progress, "ablations")
    json_path = out / RESULT_FILES["ablations"]
    try:
        results = run_ablations(config, device=device, progress=progress, out=json_path, resume=args.resume,
                                teacher_cache=_cache(args, out))
    finally:
        close()
    results["preset"] = args.preset
    write_json(json_path, {**results, "complete": True})
    print(format_ablation_table(results))
    if len(config.run_seeds()) > 1:
        print()
        print(format_seed_table(results))
    print(f"\nablations, {args.preset} preset, {results['seconds']:.0f} s on {device}; wrote {json_path}")
    if not args.no_plot:
        print(f"wrote {plot_ablations(results, out / 'ablations.png')}")
    return results


def run(args: argparse.Namespace) -> int:
    import torch

    from dmdcopy.distill.rundir import writer_lock
    from dmdcopy.errors import ConfigError
    from dmdcopy.experiments.resume import refuse_interrupted

    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise ConfigError(f"--device {args.device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA device")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if not args.no_plot:
        from dmdcopy.experiments.report import require_matplotlib

        require_matplotlib()  # fail before training, not after
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runners = {"sweep": _run_sweep, "digits": _run_digits, "ablations": _run_ablations}
    names = list(runners) if args.experiment == "all" else [args.experiment]
    bad = 0
    with writer_lock(out):  # a second demo on the same --out is refused, not interleaved
        if not args.resume:  # before any work, not after the experiments that come first
            for name in names:
                refuse_interrupted(out / RESULT_FILES[name])
        for name in names:
            results = runners[name](args, device, out)
            bad += _count_non_finite(results)
    if bad:
        print(f"warning: {bad} student(s) produced non-finite samples")
    return 0


def _count_non_finite(results: dict) -> int:
    if "points" in results:
        return sum(not s["finite"] for p in results["points"] for s in p["students"].values())
    sections = [results, *(results.get("more_seeds") or {}).values()]  # one per seed
    if "variants" in results:
        return sum(not r["finite"] for sec in sections for r in sec["variants"].values())
    return sum(not s["finite"] for sec in sections for t in sec["teachers"].values()
               for s in t["students"].values())
