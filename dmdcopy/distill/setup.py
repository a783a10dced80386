"""Checks a Distiller runs before its first step, so a bad setup fails with a clear error at once.

Pure functions over the user's objects: none changes a module (the Distiller freezes the teacher
only after every check has passed, so a failed construction leaves the teacher as it was).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from dmdcopy import _rng
from dmdcopy.contracts import denoise, generate
from dmdcopy.errors import ConfigError, ShapeError

__all__ = [
    "check_data",
    "check_pairs",
    "check_unshared",
    "label_cdf",
    "probe_denoiser",
    "probe_inputs",
    "probe_student",
    "restored_on_error",
    "run_dtype",
    "sample_shapes",
]

# Argument names of a raw network F(x_in, c_noise, class_labels) (EDM's and dmdcopy's nets).
_RAW_NET_ARGS = ("noise_labels", "c_noise")


def check_unshared(**modules: object) -> None:
    """Teacher, student and fake score must not share a parameter: freezing the teacher would freeze
    the student, and training the fake score would silently train the teacher (pass copies)."""
    owner: dict[int, str] = {}
    for name, module in modules.items():
        if not isinstance(module, nn.Module):
            continue
        for p in module.parameters():
            other = owner.setdefault(id(p), name)
            if other != name:
                raise ConfigError(f"{other} and {name} share parameters; give each its own copy, e.g. "
                                  f"copy.deepcopy(teacher)")


@contextlib.contextmanager
def restored_on_error(*modules: object) -> Iterator[None]:
    """Put back the train/eval mode and ``requires_grad`` flags of ``modules`` if the body raises."""
    mods = [m for m in modules if isinstance(m, nn.Module)]
    modes = [[(sub, sub.training) for sub in m.modules()] for m in mods]
    grads = [[(p, p.requires_grad) for p in m.parameters()] for m in mods]
    try:
        yield
    except BaseException:
        for sub, training in (x for group in modes for x in group):
            sub.training = training
        for p, flag in (x for group in grads for x in group):
            p.requires_grad_(flag)
        raise


def run_dtype(student: nn.Module) -> torch.dtype:
    """The floating dtype of a run's draws and samples: float64 for a student whose floating
    parameters are all float64, else float32 (a float16/bfloat16 network casts its own inputs)."""
    dtypes = {p.dtype for p in student.parameters() if p.is_floating_point()}
    return torch.float64 if dtypes == {torch.float64} else torch.float32


def sample_shapes(teacher: object, student: object, fake_score: object,
                  sample_shape: Sequence[int] | None) -> tuple[tuple[int, ...], int]:
    """``(sample_shape, label_dim)`` of the run, checked across teacher, student and fake score."""
    t_shape = getattr(teacher, "sample_shape", None)
    s_shape = getattr(student, "sample_shape", None)
    if t_shape is not None and s_shape is not None and tuple(t_shape) != tuple(s_shape):
        raise ConfigError(f"student.sample_shape {tuple(s_shape)} does not match "
                          f"teacher.sample_shape {tuple(t_shape)}")
    shape = sample_shape or t_shape or s_shape
    if shape is None:
        raise ConfigError("sample_shape: neither teacher nor student declares sample_shape; "
                          "pass sample_shape= to the Distiller")
    t_lab = int(getattr(teacher, "label_dim", 0) or 0)
    s_lab = getattr(student, "label_dim", None)
    if s_lab is not None and int(s_lab) != t_lab:
        raise ConfigError(f"student.label_dim {s_lab} does not match teacher.label_dim {t_lab}")
    # The fake score sees the student's samples with the teacher's labels: check it before step 1.
    f_shape = getattr(fake_score, "sample_shape", None)
    if f_shape is not None and tuple(f_shape) != tuple(shape):
        raise ConfigError(f"fake_score.sample_shape {tuple(f_shape)} does not match the samples' "
                          f"shape {tuple(shape)}")
    f_lab = getattr(fake_score, "label_dim", None)
    if f_lab is not None and int(f_lab) != t_lab:
        raise ConfigError(f"fake_score.label_dim {f_lab} does not match teacher.label_dim {t_lab}")
    return tuple(int(s) for s in shape), t_lab


def label_cdf(weights: torch.Tensor | None, label_dim: int, device: torch.device) -> torch.Tensor | None:
    """``(label_dim,)`` cumulative class weights ending in 1 (uniform by default); ``None`` when
    unconditional."""
    if label_dim == 0:
        if weights is not None:
            raise ConfigError("class_weights given but the teacher is unconditional (label_dim=0)")
        return None
    w = torch.ones(label_dim) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (label_dim,) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"class_weights must be ({label_dim},) finite, >= 0, not all 0")
    cdf = torch.cumsum(w.double(), 0)
    return (cdf / cdf[-1]).to(device)


def check_data(data, name: str, sample_shape: tuple[int, ...], label_dim: int, device: torch.device,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``x`` or ``(x, labels)`` -> ``(x: (N, *sample_shape), labels: (N,) int64 or None)``."""
    if data is None:
        return None
    x, labels = (data, None) if isinstance(data, torch.Tensor) else (data[0], data[1])
    if tuple(x.shape[1:]) != sample_shape or x.shape[0] == 0:
        raise ShapeError(f"{name}: expected x of shape (N, {sample_shape}), got {tuple(x.shape)}")
    if label_dim and labels is None:
        raise ConfigError(f"{name}: the teacher is conditional; pass (x, labels)")
    if labels is not None:
        if labels.shape != (x.shape[0],) or labels.is_floating_point():
            raise ShapeError(f"{name}: labels must be ({x.shape[0]},) integers, "
                             f"got {tuple(labels.shape)} {labels.dtype}")
        labels = labels.to(device, torch.int64) if label_dim else None
    return x.to(device, dtype), labels


def check_pairs(pairs, *, sample_shape: tuple[int, ...], multi_step: bool, data: Callable
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(z, x_teacher[, labels])`` stored teacher pairs for the regression loss -> ``(z, x, labels)``,
    each checked by ``data`` (:func:`check_data` with the run's shape, device and dtype)."""
    if pairs is None:
        raise ConfigError("regression_weight > 0 needs regression_pairs=(z, x_teacher[, labels])")
    if multi_step:
        raise ConfigError("regression_weight > 0 needs a one-step student (the regression target "
                          "is the full map z -> T(z))")
    if len(pairs) not in (2, 3):
        raise ConfigError("regression_pairs must be (z, x_teacher) or (z, x_teacher, labels)")
    z, x_teacher = pairs[0], pairs[1]
    if tuple(z.shape[1:]) != sample_shape or x_teacher.shape != z.shape:
        raise ShapeError(f"regression_pairs: expected z and x_teacher of shape (N, {sample_shape}), "
                         f"got {tuple(z.shape)} and {tuple(x_teacher.shape)}")
    x, labels = data((x_teacher, pairs[2]) if len(pairs) == 3 else x_teacher, "regression_pairs")
    return z.to(x.device, x.dtype), x, labels


def probe_inputs(sample_shape, label_dim, device, dtype):
    """Two probe samples ``(2, *sample_shape)`` (counter-based, so no global RNG is used) and labels 0."""
    idx = torch.arange(2, device=device)
    x = _rng.normal(0, idx, sample_shape).to(device, dtype)
    labels = torch.zeros(2, dtype=torch.int64, device=device) if label_dim else None
    return x, labels


def probe_student(student: nn.Module, sample_shape: tuple[int, ...], label_dim: int,
                  device: torch.device, dtype: torch.dtype, autocast: Callable) -> None:
    """Run the student on two samples so a shape mismatch fails before the first step."""
    z, labels = probe_inputs(sample_shape, label_dim, device, dtype)
    with torch.no_grad(), autocast():
        x = generate(student, z, labels)
    if tuple(x.shape) != (2, *sample_shape):
        raise ShapeError(f"student output has shape {tuple(x.shape)} for z of shape {tuple(z.shape)}; "
                         f"expected (B, {sample_shape}) like the teacher's samples")


def _raw_network_arg(D: object) -> str | None:
    forward = getattr(D, "forward", None) if isinstance(D, nn.Module) else None
    try:
        params = list(inspect.signature(forward).parameters) if forward is not None else []
    except (TypeError, ValueError):
        return None
    return next((p for p in params[1:2] if p in _RAW_NET_ARGS), None)


def probe_denoiser(D: object, name: str, sample_shape: tuple[int, ...], label_dim: int,
                   device: torch.device, dtype: torch.dtype, autocast: Callable) -> None:
    """Call ``D(x, sigma[, class_labels=])`` once on two samples (in eval mode, without grad) so a
    raw network without preconditioning, a wrong signature or a wrong dtype fails here, not in the
    first step."""
    how = (f"{name} must be a denoiser D(x, sigma, class_labels=None) -> x0_hat; a raw network "
           "F(x_in, c_noise, class_labels) goes behind a preconditioning first, e.g. "
           "dmdcopy.precond.EDMPrecond(net)")
    raw = _raw_network_arg(D)
    if raw is not None:
        raise ConfigError(f"{name}: {type(D).__name__}.forward takes {raw!r}: it looks like a raw "
                          f"network. {how}")
    if not callable(D):
        raise ConfigError(f"{name}: a {type(D).__name__} is not callable. {how}")
    x, labels = probe_inputs(sample_shape, label_dim, device, dtype)
    sigma = torch.ones(2, device=device, dtype=dtype)
    modes = [(m, m.training) for m in D.modules()] if isinstance(D, nn.Module) else []
    if isinstance(D, nn.Module):
        D.eval()
    try:
        with torch.no_grad(), autocast():
            out = denoise(D, x, sigma, labels)
    except (TypeError, RuntimeError) as e:  # a wrong signature; a dtype or shape the network refuses
        raise ConfigError(f"{name}: a test call on x: {tuple(x.shape)} {dtype}, sigma: (2,)"
                          f"{' with class_labels: (2,) int64' if labels is not None else ''} failed "
                          f"({type(e).__name__}: {e}). {how}") from e
    finally:
        for m, training in modes:
            m.training = training
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(x.shape):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ShapeError(f"{name}: returned {got} for x of shape {tuple(x.shape)}; {how}")
