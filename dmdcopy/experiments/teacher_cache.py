"""Trained teachers cached on disk by a fingerprint of everything that determines them.

Training a teacher is the slowest stage of most points, and the same teacher (same data, network,
training settings and seeds) is needed again when a run is resumed, rerun with other distillation
settings, or shared by two experiments. :func:`cached_teacher` trains it once and keeps it as
``<root>/<fingerprint>.safetensors``:

- the **fingerprint** is the SHA-256 of a canonical JSON ``spec`` (the caller lists the data, the
  network, the :class:`~dmdcopy.experiments.TeacherConfig`, the seeds and the snapshot steps) plus
  :data:`CACHE_VERSION` and the torch version, dtype and device type, which change the numbers;
- an entry holds every snapshot of the EMA weights (``snapshot/<step>/<name>``), the training
  losses, the seconds it took and the spec, with the :func:`~dmdcopy.io.run_checkpoint.digest` of
  its tensors; it is written atomically (temp file + rename) under an exclusive lock, so two
  processes asking for the same teacher train it once;
- on read, the digest, the spec and the tensor names and shapes are checked; an entry that fails
  (truncated, edited, from another spec) is reported with :func:`warnings.warn` and retrained.

A teacher read back is bitwise the one that was trained (float32 weights round-trip exactly, and
the losses are stored as JSON floats), so a run that reuses a cached teacher writes the same
results as one that trains it.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from dmdcopy._atomic import locked, write_atomic
from dmdcopy.experiments.teacher_training import TrainedTeacher
from dmdcopy.io.run_checkpoint import digest
from dmdcopy.precond import EDMPrecond

__all__ = ["CACHE_VERSION", "cached_teacher", "teacher_fingerprint_of"]

# Bump when teacher training changes its numbers for the same spec (every old entry is then unused).
CACHE_VERSION = 1
FORMAT = "dmdcopy-teacher-cache/1"


def teacher_fingerprint_of(spec: Mapping[str, Any], *, dtype: torch.dtype, device: torch.device) -> str:
    """The cache key of a teacher: SHA-256 (hex, 32 characters) of the canonical JSON of ``spec``
    with :data:`CACHE_VERSION`, the torch version, ``dtype`` and ``device.type``."""
    full = dict(spec=spec, cache_version=CACHE_VERSION, torch=torch.__version__, dtype=str(dtype),
                device=torch.device(device).type)
    text = json.dumps(full, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _write(path: Path, trained: TrainedTeacher, spec: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors = {f"snapshot/{step}/{k}": v.detach().cpu().contiguous().clone()
               for step, state in trained.snapshots.items() for k, v in state.items()}
    meta = dict(format=FORMAT, sha256=digest(tensors),
                spec=json.dumps(spec, sort_keys=True, default=str),
                losses=json.dumps(trained.losses), seconds=repr(float(trained.seconds)))

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o644)

    write_atomic(path, write)


def _read(path: Path, spec: Mapping[str, Any], denoiser: EDMPrecond, config) -> TrainedTeacher:
    """The cached teacher at ``path`` loaded into ``denoiser`` (a fresh network of the right
    architecture); raises ``ValueError`` when the entry is damaged or does not fit."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type on a damaged file
        raise ValueError(f"unreadable ({e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
    if digest(tensors) != meta.get("sha256"):
        raise ValueError("its tensors do not match the sha256 digest written with them")
    if meta.get("spec") != json.dumps(spec, sort_keys=True, default=str):
        raise ValueError("it was written for another spec")
    try:
        losses = [float(v) for v in json.loads(meta["losses"])]
        seconds = float(meta["seconds"])
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"damaged metadata ({e})") from e
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        _, step, name = key.split("/", 2)
        snapshots.setdefault(int(step), {})[name] = t
    if config.steps not in snapshots or len(losses) != config.steps:
        raise ValueError("it lacks the final weights or the losses of every step")
    own = denoiser.state_dict()
    for step, state in snapshots.items():
        if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
            raise ValueError(f"snapshot {step} does not fit the network")
    param = next(denoiser.parameters())
    denoiser.load_state_dict(snapshots[config.steps])
    denoiser.to(param.device).eval().requires_grad_(False)
    return TrainedTeacher(denoiser=denoiser, config=config, losses=losses, snapshots=snapshots,
                          seconds=seconds)


def cached_teacher(
    root: str | os.PathLike | None,
    spec: Mapping[str, Any],
    train: Callable[[], TrainedTeacher],
    *,
    build: Callable[[], EDMPrecond],
    config,
) -> tuple[TrainedTeacher, str]:
    """The teacher of ``spec`` from the cache in ``root``, or ``train()`` and store it there.

    Args:
        root: the cache folder; ``None`` trains without a cache.
        spec: JSON-able description of everything that determines the teacher (data, network,
            training config, seeds, snapshot steps); the caller is responsible for its completeness.
        train: trains the teacher (:func:`~dmdcopy.experiments.train_teacher`).
        build: a fresh ``EDMPrecond`` of the teacher's architecture on its device, to load into.
        config: the :class:`~dmdcopy.experiments.TeacherConfig` it is trained with.

    Returns: ``(trained, status)`` with ``status`` one of ``"trained"`` (no cache), ``"cached"``
    (read back), ``"stored"`` (trained and written) or ``"retrained"`` (a damaged entry replaced).
    """
    if root is None:
        return train(), "trained"
    probe = build()
    param = next(probe.parameters())
    fp = teacher_fingerprint_of(spec, dtype=param.dtype, device=param.device)
    root = Path(root)
    path = root / f"{fp}.safetensors"
    with locked(root / f".{fp}.lock"):
        status = "stored"
        if path.exists():
            try:
                return _read(path, spec, probe, config), "cached"
            except ValueError as e:
                warnings.warn(f"teacher cache entry {path} is damaged ({e}); retraining it", stacklevel=2)
                status = "retrained"
        trained = train()
        _write(path, trained, spec)
        return trained, status
