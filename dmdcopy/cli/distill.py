"""``dmdcopy distill CONFIG.toml [--resume | --overwrite]``: run a DMD / DMD2 distillation from a TOML file.

The file has top-level keys ``out_dir`` and ``device`` and four tables (unknown keys are errors)::

    out_dir = "runs/gmm2d"     # log.jsonl, checkpoints, student.safetensors and (for an exact
                               # teacher) teacher.safetensors go here, for `dmdcopy delta-e`
    device = "auto"            # "auto": cuda:LOCAL_RANK when CUDA is there, else cpu

    [teacher]                  # kind = "gmm": exact Gaussian-mixture teacher, no training needed
    kind = "gmm"
    means = [[-1.0, -1.0], [1.0, 1.0]]
    stds = [0.15, 0.15]        # (K,) or (K, d)
    weights = [0.5, 0.5]       # optional
    conditional = false        # one class per component
    real_samples = 4096        # teacher draws used as the GAN's real data
    # kind = "checkpoint": path = "teacher.safetensors" (any file dmdcopy.io.load reads),
    #   real_data = "real.safetensors" (tensors "x" and optionally "labels") when gan = true

    [student]
    init = "teacher"           # "teacher": a copy of the teacher's network; "mlp": fresh EDMPrecond(MLP);
                               # "checkpoint": path = "student.safetensors"
    sigmas = [80.0]            # one sigma: OneStepStudent; several: MultiStepStudent (e.g. [80.0, 1.5])
    hidden = 128               # MLP width and depth, for init = "mlp"
    depth = 3

    [fake_score]
    init = "teacher"           # or "mlp" (required for an exact teacher), with hidden / depth

    [distill]                  # any DistillConfig field
    batch_size = 128

With ``regression_weight > 0`` the ``[distill]`` table's companion ``[pairs]`` names
``path = "pairs.safetensors"`` holding tensors ``z``, ``x_teacher`` (and optionally ``labels``).
Run it under ``torchrun --nproc_per_node=N -m dmdcopy distill ...`` to use N processes.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["build_run", "export_students", "export_teacher", "load_toml", "register", "run"]

_TOP = {"out_dir", "device", "teacher", "student", "fake_score", "distill", "pairs"}
_TEACHER = {"gmm": {"kind", "means", "stds", "weights", "conditional", "real_samples", "sigma_max"},
            "checkpoint": {"kind", "path", "real_data"}}
_STUDENT = {"init", "sigmas", "hidden", "depth", "path"}
_FAKE = {"init", "hidden", "depth"}


def register(subparsers) -> None:
    p = subparsers.add_parser("distill", help="distil a teacher into a one/few-step student (DMD2)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="TOML run file (see above)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in out_dir (fresh start if none)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an out_dir holding another run: move that run into "
                        "out_dir/previous-<UTC time>/ (nothing is deleted)")
    p.add_argument("--device", default=None, help="override the file's device, e.g. cpu or cuda:0")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    from dmdcopy.errors import ConfigError

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no config file at {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    from dmdcopy.errors import ConfigError

    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _read_tensors(path: str, names: tuple[str, ...], where: str):
    from safetensors.torch import load_file

    from dmdcopy.errors import ConfigError

    try:
        data = load_file(path)
    except Exception as e:
        raise ConfigError(f"{where}: cannot read {path}: {e}") from None
    missing = [n for n in names if n not in data]
    if missing:
        raise ConfigError(f"{where}: {path} lacks tensor(s) {missing} (has {sorted(data)})")
    return data


def _int(table: Mapping[str, Any], key: str, default: int, where: str) -> int:
    from dmdcopy.errors import ConfigError

    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} {key} must be an integer, got {value!r}")
    return value


def _floats(value: Any, where: str) -> list[float]:
    """A non-empty TOML array of numbers as floats."""
    from dmdcopy.errors import ConfigError

    if (not isinstance(value, list) or not value
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)):
        raise ConfigError(f"{where} must be a non-empty array of numbers, got {value!r}")
    return [float(v) for v in value]


def _mlp_denoiser(table: Mapping[str, Any], dim_shape, label_dim: int, where: str):
    from dmdcopy.errors import ConfigError
    from dmdcopy.nets import MLP
    from dmdcopy.precond import EDMPrecond

    if len(dim_shape) != 1:
        raise ConfigError(f"init = 'mlp' needs vector data, the teacher's samples have shape {dim_shape}")
    hidden, depth = _int(table, "hidden", 128, where), _int(table, "depth", 3, where)
    return EDMPrecond(MLP(dim_shape[0], hidden=hidden, depth=depth, label_dim=label_dim))


def build_run(spec: Mapping[str, Any], *, device=None, progress: bool | None = None) -> dict[str, Any]:
    """Map a parsed TOML run file onto objects: ``teacher, student, fake_score, config, out_dir,
    device`` and the optional ``real_data`` / ``regression_pairs``, ready for :class:`Distiller`."""
    import torch

    from dmdcopy.distill import DistillConfig
    from dmdcopy.errors import ConfigError
    from dmdcopy.students import MultiStepStudent, OneStepStudent

    _check_keys(spec, _TOP, "config file")
    for name in ("teacher", "student", "fake_score", "distill"):
        if name not in spec:
            raise ConfigError(f"config file: missing table [{name}]")
    for name in ("teacher", "student", "fake_score", "distill") + (("pairs",) if "pairs" in spec else ()):
        if not isinstance(spec[name], Mapping):
            raise ConfigError(f"config file: [{name}] must be a table, got {spec[name]!r}")
    dist_table = dict(spec["distill"])
    if progress is False:
        dist_table["progress_bar"] = False
    config = DistillConfig.from_dict(dist_table, where="[distill]")
    out: dict[str, Any] = {"config": config, "out_dir": spec.get("out_dir", "dmdcopy-distill")}

    # teacher
    t = spec["teacher"]
    kind = t.get("kind")
    if kind not in _TEACHER:
        raise ConfigError(f"[teacher] kind must be one of {sorted(_TEACHER)}, got {kind!r}")
    _check_keys(t, _TEACHER[kind], f"[teacher] (kind = {kind!r})")
    real_data = None
    if kind == "gmm":
        from dmdcopy.teachers import GaussianMixtureTeacher

        for key in ("means", "stds"):
            if key not in t:
                raise ConfigError(f"[teacher] kind = 'gmm' needs {key}")
        try:
            means, stds = torch.tensor(t["means"]), torch.tensor(t["stds"])
            weights = torch.tensor(t["weights"]) if "weights" in t else None
            sigma_max = float(t.get("sigma_max", 80.0))
        except (TypeError, ValueError) as e:  # ragged or non-numeric arrays
            raise ConfigError(f"[teacher] means / stds / weights / sigma_max must be numbers: {e}") from None
        teacher = GaussianMixtureTeacher(means, stds, weights, bool(t.get("conditional", False)),
                                         sigma_max=sigma_max)
        if config.gan:
            n = _int(t, "real_samples", 4096, "[teacher]")
            gen = torch.Generator().manual_seed(config.seed)
            if teacher.label_dim:
                labels = torch.randint(teacher.label_dim, (n,), generator=gen)
                real_data = (teacher.sample(n, generator=gen, class_labels=labels), labels)
            else:
                real_data = teacher.sample(n, generator=gen)
    else:
        from dmdcopy.io import load

        if "path" not in t:
            raise ConfigError("[teacher] kind = 'checkpoint' needs path")
        teacher = load(t["path"])
        if "real_data" in t:
            data = _read_tensors(t["real_data"], ("x",), "[teacher] real_data")
            real_data = (data["x"], data["labels"]) if "labels" in data else data["x"]
    out["teacher"], out["real_data"] = teacher, real_data
    shape = tuple(getattr(teacher, "sample_shape", None) or ())
    label_dim = int(getattr(teacher, "label_dim", 0) or 0)
    has_params = any(True for _ in teacher.parameters())

    # Networks built here from scratch draw their initial weights from the run's seed, so two
    # launches of one config start alike (and a resume finds the same run).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        # student
        s = spec["student"]
        _check_keys(s, _STUDENT, "[student]")
        init = s.get("init", "teacher")
        if init == "teacher":
            if not has_params:
                raise ConfigError("[student] init = 'teacher' needs a teacher network with parameters; "
                                  "use init = 'mlp' for an exact teacher")
            denoiser = copy.deepcopy(teacher).requires_grad_(True)
        elif init == "mlp":
            denoiser = _mlp_denoiser(s, shape, label_dim, "[student]")
        elif init == "checkpoint":
            from dmdcopy.io import load

            if "path" not in s:
                raise ConfigError("[student] init = 'checkpoint' needs path")
            denoiser = load(s["path"]).requires_grad_(True)
        else:
            raise ConfigError(f"[student] init must be 'teacher', 'mlp' or 'checkpoint', got {init!r}")
        if isinstance(denoiser, (OneStepStudent, MultiStepStudent)):
            student = denoiser  # a saved student is used as it is
        else:
            sigmas = _floats(s.get("sigmas", [config.sigma_max]), "[student] sigmas")
            student = (OneStepStudent(denoiser, sigmas[0]) if len(sigmas) == 1
                       else MultiStepStudent(denoiser, sigmas))
        out["student"] = student

        # fake score
        f = spec["fake_score"]
        _check_keys(f, _FAKE, "[fake_score]")
        finit = f.get("init", "teacher")
        if finit == "teacher":
            out["fake_score"] = None  # the Distiller copies the teacher (and says so if it cannot)
        elif finit == "mlp":
            out["fake_score"] = _mlp_denoiser(f, shape, label_dim, "[fake_score]")
        else:
            raise ConfigError(f"[fake_score] init must be 'teacher' or 'mlp', got {finit!r}")

    # regression pairs
    out["regression_pairs"] = None
    if "pairs" in spec:
        _check_keys(spec["pairs"], {"path"}, "[pairs]")
        data = _read_tensors(spec["pairs"]["path"], ("z", "x_teacher"), "[pairs]")
        out["regression_pairs"] = ((data["z"], data["x_teacher"], data["labels"]) if "labels" in data
                                   else (data["z"], data["x_teacher"]))

    dev = device or spec.get("device", "auto")
    if dev == "auto":
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    try:
        out["device"] = torch.device(dev)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device: {dev!r} is not a torch device (e.g. 'cpu', 'cuda:0', 'auto'): {e}"
                          ) from None
    return out


def run(args: argparse.Namespace) -> int:
    from dmdcopy.distill import Distiller, init_from_env
    from dmdcopy.errors import RunInterrupted

    info = init_from_env()
    spec = load_toml(args.config)
    parts = build_run(spec, device=args.device, progress=False if args.no_progress else None)
    out_dir = Path(parts.pop("out_dir"))
    device = parts.pop("device")
    teacher, student, config = parts.pop("teacher"), parts.pop("student"), parts.pop("config")
    distiller = Distiller(teacher, student, config=config, out_dir=out_dir, device=device,
                          overwrite=args.overwrite, **parts)
    try:
        distiller.train(resume="latest" if args.resume else None)
    except RunInterrupted as e:
        if info.is_main:
            print(f"dmdcopy distill: stopped by {e}; resume: dmdcopy distill {args.config} --resume",
                  file=sys.stderr)
        return 128 + e.signum  # 130 for SIGINT, 143 for SIGTERM
    if info.is_main:
        written = export_students(distiller, out_dir)
        # an exact teacher exists only in the config: write it where `dmdcopy delta-e` can read it
        teacher_file = (Path(spec["teacher"]["path"]) if spec["teacher"].get("kind") == "checkpoint"
                        else export_teacher(teacher, out_dir))
        print(f"dmdcopy distill: {distiller.step} steps done; checkpoints and log.jsonl in {out_dir}; "
              f"students for `dmdcopy delta-e`: {', '.join(p.name for p in written)}")
        if written:
            print(f"measure: dmdcopy delta-e --teacher {teacher_file} --student {written[0]}")
    return 0


def export_teacher(teacher, out_dir: Path) -> Path:
    """Write the run's teacher (e.g. the exact Gaussian mixture of a ``kind = "gmm"`` config) to
    ``out_dir / "teacher.safetensors"``; :func:`dmdcopy.io.load` rebuilds it bit for bit."""
    from dmdcopy.io import save

    path = out_dir / "teacher.safetensors"
    out_dir.mkdir(parents=True, exist_ok=True)
    save(teacher, path, metadata={"dmdcopy.distill.role": "teacher"})
    return path


def export_students(distiller, out_dir: Path) -> list[Path]:
    """Write ``student.safetensors`` (and ``student_ema.safetensors`` when EMA is on) with their
    architecture (:func:`dmdcopy.io.run_checkpoint.export_students`), so ``dmdcopy.load`` /
    ``dmdcopy delta-e --student`` rebuild them.

    A student of a class dmdcopy cannot describe (a user's own module) is skipped with a note:
    its weights are in the training checkpoints, to load with ``dmdcopy.load(path, into=...)``.
    """
    from dmdcopy.io.run_checkpoint import export_students as export

    written, skipped = export({"student": distiller.student, "student_ema": distiller.ema_student},
                              out_dir, step=distiller.step)
    for name, reason in skipped.items():
        print(f"dmdcopy distill: {name} not exported ({reason}); its weights are in the checkpoints",
              file=sys.stderr)
    return written
