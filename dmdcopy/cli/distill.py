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

Every value is checked before anything is built or written, each failure a one-line error: types
are strict (``conditional = "false"`` is a string, not a boolean; sizes are integers), sizes have
bounds (``hidden`` <= 2**20, ``depth`` <= 1000, ``batch_size`` < 2**31) and must fit in half the
machine's memory, ``out_dir`` must be a directory this process can create or write to, and
``device`` must exist on this machine.

(About 560 lines: the TOML schema, its one-line checks before any work and the run it builds
are one command's contract with its users.)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import math
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["build_run", "check_device", "check_out_dir", "export_students", "export_teacher", "load_toml",
           "register", "run"]

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


_MAX_CONFIG_BYTES = 16 * 2**20  # a run file is a few hundred bytes; past this it is not one


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a TOML run file; anything that is not a readable UTF-8 TOML file is a one-line
    :class:`ConfigError` (a directory, a binary or non-UTF-8 file, invalid or absurdly nested TOML)."""
    from dmdcopy.errors import ConfigError

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        if Path(path).is_dir():
            raise ConfigError(f"{path} is a directory, not a TOML config file")
        with open(path, "rb") as f:
            data = f.read(_MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"no config file at {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    if len(data) > _MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: over {_MAX_CONFIG_BYTES // 2**20} MiB, not a TOML config file")
    if b"\0" in data:
        raise ConfigError(f"{path}: a binary file, not a TOML config file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); a TOML file is UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None


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


# Sizes of networks built from a config, past which it is a typo rather than a model.
_MAX_HIDDEN = 2**20
_MAX_DEPTH = 1000
_MAX_REAL_SAMPLES = 2**31 - 1
_MAX_SIGMA = 1e6  # as DistillConfig's sigma_max


def _physical_memory() -> int | None:
    """Bytes of physical memory, or None where the OS does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):  # pragma: no cover - e.g. Windows
        return None


def _check_memory(nbytes: float, what: str) -> None:
    """Refuse an allocation estimated above half the machine's physical memory."""
    from dmdcopy.errors import ConfigError

    total = _physical_memory()
    if total and nbytes > total / 2:
        raise ConfigError(f"{what} needs about {nbytes / 2**30:.3g} GiB, over half of this machine's "
                          f"{total / 2**30:.3g} GiB of memory")


def _int(table: Mapping[str, Any], key: str, default: int, where: str, lo: int = 1,
         hi: int | None = None) -> int:
    from dmdcopy.errors import ConfigError

    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} {key} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rule = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ConfigError(f"{where} {key} must be {rule}, got {value!r}")
    return value


def _number(value: Any, hi: float = 1e30) -> bool:
    """A finite int or float (not a bool) of magnitude at most ``hi``, well inside float32."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and -hi <= value <= hi


def _floats(value: Any, where: str, positive: bool = False) -> list[float]:
    """A non-empty TOML array of finite numbers as floats (all > 0 with ``positive``)."""
    from dmdcopy.errors import ConfigError

    if not isinstance(value, list) or not value or not all(_number(v) for v in value):
        raise ConfigError(f"{where} must be a non-empty array of finite numbers (|x| <= 1e30), "
                          f"got {value!r}"[:300])
    if positive and not all(v > 0 for v in value):
        raise ConfigError(f"{where} must all be > 0, got {value!r}")
    return [float(v) for v in value]


def _str(table: Mapping[str, Any], key: str, where: str) -> str:
    from dmdcopy.errors import ConfigError

    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} {key} must be a non-empty string, got {value!r}")
    return value


def _existing_file(table: Mapping[str, Any], key: str, where: str) -> str:
    from dmdcopy.errors import ConfigError

    path = _str(table, key, where)
    if not Path(path).is_file():
        what = "a directory" if Path(path).is_dir() else "no file"
        raise ConfigError(f"{where} {key}: {path} is {what}; a file was expected")
    return path


def _gmm_arrays(t: Mapping[str, Any]) -> tuple[list[list[float]], list, list[float] | None]:
    """Check a ``kind = "gmm"`` teacher's arrays: means (K, d), stds (K,) or (K, d) > 0, weights (K,)
    >= 0 with a positive sum, all finite numbers."""
    from dmdcopy.errors import ConfigError

    for key in ("means", "stds"):
        if key not in t:
            raise ConfigError(f"[teacher] kind = 'gmm' needs {key}")
    means = t["means"]
    if (not isinstance(means, list) or not means or not all(isinstance(m, list) for m in means)
            or not all(len(m) == len(means[0]) for m in means) or not means[0]):
        raise ConfigError(f"[teacher] means must be numbers in a non-empty (K, d) array (rows of equal, "
                          f"non-zero length), got {means!r}"[:300])
    for row in means:
        _floats(row, "[teacher] means rows")
    K, d = len(means), len(means[0])
    stds = t["stds"]
    if isinstance(stds, list) and stds and all(isinstance(r, list) for r in stds):
        if len(stds) != K or any(len(r) != d for r in stds):
            raise ConfigError(f"[teacher] stds must have shape ({K},) or ({K}, {d}) to match means")
        for row in stds:
            _floats(row, "[teacher] stds rows", positive=True)
    else:
        _floats(stds, "[teacher] stds", positive=True)
        if len(stds) != K:
            raise ConfigError(f"[teacher] stds must have shape ({K},) or ({K}, {d}) to match means, "
                              f"got {len(stds)} value(s)")
    weights = None
    if "weights" in t:
        _floats(t["weights"], "[teacher] weights")
        weights = t["weights"]
        if len(weights) != K:
            raise ConfigError(f"[teacher] weights must have {K} values (one per mean), got {len(weights)}")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"[teacher] weights must be >= 0 with a positive sum, got {weights}")
    return means, stds, weights


def _mlp_params(dim: int, hidden: int, depth: int, label_dim: int) -> int:
    """Parameter count of ``MLP(dim, hidden, depth, label_dim=label_dim)`` (emb_dim 64)."""
    return (3 * depth + 1) * hidden**2 + hidden * (64 + 2 * dim + label_dim + 6 * depth + 5) + dim


def _mlp_size(table: Mapping[str, Any], where: str) -> tuple[int, int]:
    return (_int(table, "hidden", 128, where, hi=_MAX_HIDDEN),
            _int(table, "depth", 3, where, hi=_MAX_DEPTH))


def _check_mlps(student: Mapping[str, Any], fake_score: Mapping[str, Any], dim: int, label_dim: int) -> None:
    """Refuse ``init = "mlp"`` networks whose float32 weights, gradients, AdamW moments (and the
    student's EMA copy) would not fit in memory, before any is built."""
    nbytes, sizes = 0, []
    for table, where, copies in ((student, "[student]", 5), (fake_score, "[fake_score]", 4)):
        if table.get("init", "teacher") == "mlp":
            hidden, depth = _mlp_size(table, where)
            nbytes += 4 * copies * _mlp_params(dim, hidden, depth, label_dim)
            sizes.append(f"{where} hidden = {hidden}, depth = {depth}")
    if sizes:
        _check_memory(nbytes, "training MLPs of " + " and ".join(sizes))


def _mlp_denoiser(table: Mapping[str, Any], dim_shape, label_dim: int, where: str):
    from dmdcopy.errors import ConfigError
    from dmdcopy.nets import MLP
    from dmdcopy.precond import EDMPrecond

    if len(dim_shape) != 1:
        raise ConfigError(f"init = 'mlp' needs vector data, the teacher's samples have shape {dim_shape}")
    hidden, depth = _mlp_size(table, where)
    return EDMPrecond(MLP(dim_shape[0], hidden=hidden, depth=depth, label_dim=label_dim))


def check_out_dir(out_dir: Any) -> Path:
    """``out_dir`` as a Path, refused at start (nothing created) when it is no string, an existing
    file, under a file, or in a directory this process cannot write to."""
    from dmdcopy.errors import ConfigError

    if not isinstance(out_dir, str) or not out_dir.strip():
        raise ConfigError(f"out_dir must be a non-empty string (a directory path), got {out_dir!r}")
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out_dir {out_dir}: exists and is not a directory")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"out_dir {out_dir}: {existing} is a file, so no directory can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir {out_dir}: {existing} is not writable by this process")
    return path


def check_device(dev: Any) -> Any:
    """A torch device from a config's or the command line's ``device`` (``"auto"``: CUDA when there),
    refused when it is not a device name or names an accelerator this machine does not have."""
    import torch

    from dmdcopy.errors import ConfigError

    if not isinstance(dev, str) or not dev:
        raise ConfigError(f"device must be a string such as 'cpu', 'cuda:0' or 'auto', got {dev!r}")
    if dev == "auto":
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(dev)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"device: {dev!r} is not a torch device (e.g. 'cpu', 'cuda:0', 'auto'): {e}"
                          ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {dev!r}: CUDA is not available on this machine (use 'cpu' or 'auto')")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {dev!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"device {dev!r}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {dev!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    return device


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
    # Every check that needs no network comes first: a bad value is refused before anything is
    # built, allocated or loaded.
    config = DistillConfig.from_dict(dict(spec["distill"]), where="[distill]")
    if progress is False:  # the file's value is checked all the same
        config = config.replace(progress_bar=False)
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("[distill] tensorboard = true needs the tensorboard package: "
                          "pip install tensorboard")
    out: dict[str, Any] = {"config": config,
                           "out_dir": check_out_dir(spec.get("out_dir", "dmdcopy-distill"))}
    out_device = check_device(device if device is not None else spec.get("device", "auto"))

    t, s, f = spec["teacher"], spec["student"], spec["fake_score"]
    kind = t.get("kind")
    if not isinstance(kind, str) or kind not in _TEACHER:
        raise ConfigError(f"[teacher] kind must be one of {sorted(_TEACHER)}, got {kind!r}")
    _check_keys(t, _TEACHER[kind], f"[teacher] (kind = {kind!r})")
    _check_keys(s, _STUDENT, "[student]")
    _check_keys(f, _FAKE, "[fake_score]")
    init, finit = s.get("init", "teacher"), f.get("init", "teacher")
    if not isinstance(init, str) or init not in ("teacher", "mlp", "checkpoint"):
        raise ConfigError(f"[student] init must be 'teacher', 'mlp' or 'checkpoint', got {init!r}")
    if not isinstance(finit, str) or finit not in ("teacher", "mlp"):
        raise ConfigError(f"[fake_score] init must be 'teacher' or 'mlp', got {finit!r}")
    sigmas = _floats(s.get("sigmas", [config.sigma_max]), "[student] sigmas", positive=True)
    if any(a <= b for a, b in itertools.pairwise(sigmas)):
        raise ConfigError(f"[student] sigmas must be strictly decreasing, got {sigmas}")
    if sigmas[0] > _MAX_SIGMA:
        raise ConfigError(f"[student] sigmas must be <= {_MAX_SIGMA:g}, got {sigmas}")
    if config.regression_weight > 0 and "pairs" not in spec:
        raise ConfigError("[distill] regression_weight > 0 needs a [pairs] table with path = "
                          "\"pairs.safetensors\" (tensors z, x_teacher)")
    if kind == "gmm" and finit == "teacher":
        raise ConfigError("[fake_score] init = 'teacher' needs a teacher network with parameters; "
                          "use init = 'mlp' for an exact teacher")
    if kind == "gmm" and init == "teacher":
        raise ConfigError("[student] init = 'teacher' needs a teacher network with parameters; "
                          "use init = 'mlp' for an exact teacher")
    for table, where in ((s, "[student]"), (f, "[fake_score]")):
        if table.get("init", "teacher") == "mlp":
            _mlp_size(table, where)
    if init == "checkpoint":
        _existing_file(s, "path", "[student] init = 'checkpoint':")
    if "pairs" in spec:
        _check_keys(spec["pairs"], {"path"}, "[pairs]")
        _existing_file(spec["pairs"], "path", "[pairs]")
    conditional = t.get("conditional", False)
    if not isinstance(conditional, bool):
        raise ConfigError(f"[teacher] conditional must be true or false, got {conditional!r}")
    n_real = _int(t, "real_samples", 4096, "[teacher]", hi=_MAX_REAL_SAMPLES)
    sigma_max = t.get("sigma_max", 80.0)
    if not _number(sigma_max, _MAX_SIGMA) or sigma_max <= 0:
        raise ConfigError(f"[teacher] sigma_max must be a finite number in (0, {_MAX_SIGMA:g}], "
                          f"got {sigma_max!r}")
    per_process = -(-config.batch_size // max(1, int(os.environ.get("WORLD_SIZE", "1"))))
    if kind == "gmm":
        means, stds, weights = _gmm_arrays(t)
        dim = len(means[0])
        # A batch through the exact teacher holds a few (B, K, d) float64 arrays; a real-data set of
        # n samples is n x d floats. Both must fit before the first draw.
        _check_memory(per_process * 8 * 4 * len(means) * dim, f"[distill] batch_size = {config.batch_size}")
        if config.gan:
            _check_memory(n_real * 8 * dim, f"[teacher] real_samples = {n_real}")
        _check_mlps(s, f, dim, len(means) if conditional else 0)
    else:
        _existing_file(t, "path", "[teacher] kind = 'checkpoint':")
        if "real_data" in t:
            _existing_file(t, "real_data", "[teacher]")

    # teacher
    real_data = None
    if kind == "gmm":
        from dmdcopy.teachers import GaussianMixtureTeacher

        # float32 tensors, as TOML's numbers always became here (a run's teacher stays the same)
        teacher = GaussianMixtureTeacher(torch.tensor(means), torch.tensor(stds),
                                         None if weights is None else torch.tensor(weights),
                                         conditional, sigma_max=float(sigma_max))
        if config.gan:
            n = n_real
            gen = torch.Generator().manual_seed(config.seed)
            if teacher.label_dim:
                labels = torch.randint(teacher.label_dim, (n,), generator=gen)
                real_data = (teacher.sample(n, generator=gen, class_labels=labels), labels)
            else:
                real_data = teacher.sample(n, generator=gen)
    else:
        from dmdcopy.io import load

        teacher = load(t["path"])
        if "real_data" in t:
            data = _read_tensors(t["real_data"], ("x",), "[teacher] real_data")
            real_data = (data["x"], data["labels"]) if "labels" in data else data["x"]
    out["teacher"], out["real_data"] = teacher, real_data
    shape = tuple(getattr(teacher, "sample_shape", None) or ())
    label_dim = int(getattr(teacher, "label_dim", 0) or 0)
    if kind != "gmm" and len(shape) == 1:
        _check_mlps(s, f, shape[0], label_dim)
    has_params = any(True for _ in teacher.parameters())
    # activations of one batch: at least the samples and one hidden layer per block, float32
    numel = math.prod(shape) if shape else 1
    widths = sum(math.prod(_mlp_size(x, "")) for x in (s, f) if x.get("init", "teacher") == "mlp")
    _check_memory(per_process * 4 * (4 * numel + 2 * widths), f"[distill] batch_size = {config.batch_size}")

    # Networks built here from scratch draw their initial weights from the run's seed, so two
    # launches of one config start alike (and a resume finds the same run).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        # student
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
            student = (OneStepStudent(denoiser, sigmas[0]) if len(sigmas) == 1
                       else MultiStepStudent(denoiser, sigmas))
        out["student"] = student

        # fake score
        if finit == "teacher":
            out["fake_score"] = None  # the Distiller copies the teacher (and says so if it cannot)
        elif finit == "mlp":
            out["fake_score"] = _mlp_denoiser(f, shape, label_dim, "[fake_score]")
        else:
            raise ConfigError(f"[fake_score] init must be 'teacher' or 'mlp', got {finit!r}")

    # regression pairs
    out["regression_pairs"] = None
    if "pairs" in spec:
        data = _read_tensors(spec["pairs"]["path"], ("z", "x_teacher"), "[pairs]")
        out["regression_pairs"] = ((data["z"], data["x_teacher"], data["labels"]) if "labels" in data
                                   else (data["z"], data["x_teacher"]))

    out["device"] = out_device
    return out


def run(args: argparse.Namespace) -> int:
    from dmdcopy.distill import process_group_from_env

    with process_group_from_env() as info:  # under torchrun: every rank ends together, group closed
        return _train_and_export(args, info)


def _train_and_export(args: argparse.Namespace, info) -> int:
    from dmdcopy.distill import Distiller
    from dmdcopy.errors import RunInterrupted

    spec = load_toml(args.config)
    parts = build_run(spec, device=args.device, progress=False if args.no_progress else None)
    out_dir = Path(parts.pop("out_dir"))
    device = parts.pop("device")
    teacher, student, config = parts.pop("teacher"), parts.pop("student"), parts.pop("config")
    with warnings.catch_warnings(record=True) as caught:  # said as one line each, not as Python's
        warnings.simplefilter("always", UserWarning)
        distiller = Distiller(teacher, student, config=config, out_dir=out_dir, device=device,
                              overwrite=args.overwrite, **parts)
    for w in caught:
        print(f"dmdcopy distill: warning: {w.message}", file=sys.stderr)
    try:
        distiller.train(resume="latest" if args.resume else None)
    except RunInterrupted as e:
        if info.is_main:
            print(f"dmdcopy distill: stopped by {e}; resume: dmdcopy distill {args.config} --resume",
                  file=sys.stderr)
        return 128 + e.signum  # 130 for SIGINT, 143 for SIGTERM
    students = distiller.unsharded_students()  # every process takes part when sharded (FSDP)
    if info.is_main:
        written = export_students(distiller, out_dir, students)
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


def export_students(distiller, out_dir: Path, students: dict | None = None) -> list[Path]:
    """Write ``student.safetensors`` (and ``student_ema.safetensors`` when EMA is on) with their
    architecture (:func:`dmdcopy.io.run_checkpoint.export_students`), so ``dmdcopy.load`` /
    ``dmdcopy delta-e --student`` rebuild them. ``students``: the modules to write (default the
    distiller's own; a sharded run passes :meth:`Distiller.unsharded_students`'s copies).

    A student of a class dmdcopy cannot describe (a user's own module) is skipped with a note:
    its weights are in the training checkpoints, to load with ``dmdcopy.load(path, into=...)``.
    """
    from dmdcopy.io.run_checkpoint import export_students as export

    if students is None:
        students = {"student": distiller.student, "student_ema": distiller.ema_student}
    written, skipped = export(students, out_dir, step=distiller.step)
    for name, reason in skipped.items():
        print(f"dmdcopy distill: {name} not exported ({reason}); its weights are in the checkpoints",
              file=sys.stderr)
    return written
