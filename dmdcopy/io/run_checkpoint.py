"""Run checkpoints of :class:`dmdcopy.distill.Distiller`: the one owner of their file format.

Layout of ``checkpoint-<step:09d>.safetensors`` (no pickle: nothing in it runs code when read):

- tensors, each under the prefix of its *entry*: ``student/``, ``ema/``, ``fake_score/``,
  ``discriminator/`` (network state dicts), ``optim/<name>/<param index>/<key>`` (AdamW moments)
  and ``rng/...`` (torch's generator states);
- metadata ``format`` = :data:`FORMAT` and ``state``, a JSON document: the counters, the optimisers'
  JSON part (``optim``), the config, the world size, the run's id and fingerprint; ``sha256``, a
  digest of every tensor (name, dtype, shape, bytes) verified on read (files written before it
  existed carry none and still load); ``run_id``, the run that wrote it (pruning touches only its own).

The distiller (:mod:`dmdcopy.distill.checkpoint` registers what goes in), :func:`dmdcopy.io.load`
(``key=`` picks one network with :func:`read_entry`) and ``dmdcopy distill`` (which exports the
students with :func:`export_students`) all go through this module.

Writes go to a temporary file in the same directory, are flushed to disk, then renamed over the
final name, so a reader sees either no file or a complete one. :func:`latest_checkpoint` still
validates each candidate (safetensors checks that the data covers the header's offsets, and the
data must match the recorded digest) and skips a damaged file, e.g. one truncated by a full disk,
a copy cut short or flipped bits.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dmdcopy._atomic import write_atomic
from dmdcopy.errors import CheckpointError
from dmdcopy.io.safetensors_io import save

__all__ = [
    "FORMAT",
    "checkpoint_name",
    "checkpoint_run_id",
    "digest",
    "entry_names",
    "export_students",
    "flatten_optimizer",
    "is_run_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "read_checkpoint",
    "read_entry",
    "split_entry",
    "unflatten_optimizer",
    "write_checkpoint",
]

FORMAT = "dmdcopy-distill-checkpoint/1"
_NAME = re.compile(r"^checkpoint-(\d{9})\.safetensors$")
_NOT_NETWORKS = frozenset({"optim", "rng"})  # entries that hold no network weights


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:09d}.safetensors"


def is_run_checkpoint(metadata: Mapping[str, str]) -> bool:
    """Whether a safetensors file's metadata is that of a run checkpoint."""
    return metadata.get("format") == FORMAT


def digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}\n".encode())
        # reshape(-1): a 0-dim tensor cannot be viewed as bytes
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                     state: Mapping[str, Any]) -> Path:
    """Write ``tensors`` and the JSON-able ``state`` to ``path`` atomically (temp file + rename),
    with the :func:`digest` of the tensors (and ``state["run_id"]``, if any) in the metadata."""
    # safetensors wants contiguous CPU tensors that share no memory.
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {"format": FORMAT, "state": json.dumps(state, allow_nan=True), "sha256": digest(flat)}
    if state.get("run_id") is not None:
        meta["run_id"] = str(state["run_id"])
    return write_atomic(path, lambda tmp: save_file(flat, tmp, metadata=meta))


def read_checkpoint(path: str | os.PathLike, *, device: torch.device | str = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint; raise :class:`CheckpointError` if it is missing, damaged or foreign."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if not is_run_checkpoint(meta):
                raise CheckpointError(f"{path} is not a dmdcopy distillation checkpoint "
                                      f"(format {meta.get('format')!r}, expected {FORMAT!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state = json.loads(meta["state"])
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error type for a truncated file
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if "sha256" in meta and digest(tensors) != meta["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: its tensor data do not match the "
                              "sha256 digest recorded when it was written")
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt: its state is not a JSON object")
    if "rng/torch_cpu" in tensors:  # a file without digest: at least refuse a damaged RNG state
        try:
            torch.Generator().set_state(tensors["rng/torch_cpu"])
        except (RuntimeError, TypeError) as e:
            raise CheckpointError(f"checkpoint {path} is corrupt: invalid RNG state ({e})") from None
    return tensors, state


def entry_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The networks a checkpoint's tensors hold (``student``, ``ema``, ...), sorted."""
    return sorted({k.split("/", 1)[0] for k in tensors if "/" in k} - _NOT_NETWORKS)


def split_entry(tensors: Mapping[str, torch.Tensor], key: str, *, source: str = "checkpoint"
                ) -> dict[str, torch.Tensor]:
    """The state dict of network ``key`` out of a checkpoint's flat tensors (prefix removed)."""
    entries = entry_names(tensors)
    if key not in entries:
        raise CheckpointError(f"{source}: a distillation checkpoint without a {key!r} entry; "
                              f"it holds {entries}: pass key= one of them")
    prefix = f"{key}/"
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def read_entry(path: str | os.PathLike, key: str = "ema") -> dict[str, torch.Tensor]:
    """The state dict of one network of a run checkpoint: ``"ema"``, ``"student"``, ``"fake_score"``
    or ``"discriminator"`` (CPU tensors), e.g. for ``module.load_state_dict``."""
    tensors, _ = read_checkpoint(path)
    return split_entry(tensors, key, source=str(path))


def _is_valid(path: Path) -> bool:
    try:
        read_checkpoint(path)
    except CheckpointError:
        return False
    return True


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint-named file in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint in ``directory`` that reads back whole and matches its digest;
    ``None`` if there is none."""
    for _, p in reversed(list_checkpoints(directory)):
        if _is_valid(p):
            return p
    return None


def checkpoint_run_id(path: str | os.PathLike) -> str | None:
    """The ``run_id`` a checkpoint was written by (``None``: unreadable, or written before run ids)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:
        return None
    return meta.get("run_id") if is_run_checkpoint(meta) else None


def prune_checkpoints(directory: str | os.PathLike, keep: int, *, run_id: str | None = None,
                      up_to: int | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; return the deleted paths.

    With ``run_id``, only checkpoints written by that run are candidates; with ``up_to``, only
    those of at most that step (a run never deletes a newer checkpoint than its own).
    """
    found = [(s, p) for s, p in list_checkpoints(directory) if up_to is None or s <= up_to]
    if run_id is not None:
        found = [(s, p) for s, p in found if checkpoint_run_id(p) == run_id]
    doomed = [p for _, p in found[:-keep]] if keep > 0 else []
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


# --- optimiser state <-> flat tensors + JSON --------------------------------------------------


def flatten_optimizer(opt: torch.optim.Optimizer | Mapping[str, Any], prefix: str
                      ) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``opt.state_dict()`` (or such a dict itself) into tensors named
    ``{prefix}/{param}/{key}`` and a JSON part."""
    sd = opt.state_dict() if isinstance(opt, torch.optim.Optimizer) else opt
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}/{pid}/{key}"] = v
            else:
                scalars.setdefault(str(pid), {})[key] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], prefix: str
                        ) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer`: a dict for ``opt.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    head = prefix + "/"
    for name, v in tensors.items():
        if name.startswith(head):
            pid, key = name[len(head):].split("/", 1)
            state.setdefault(int(pid), {})[key] = v
    for pid, kv in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(kv)
    return {"state": state, "param_groups": meta["param_groups"]}


# --- the students a run exports ---------------------------------------------------------------


def export_students(
    students: Mapping[str, nn.Module | None], out_dir: str | os.PathLike, *, step: int
) -> tuple[list[Path], dict[str, str]]:
    """Write each module of ``students`` (e.g. ``{"student": G, "student_ema": G_ema}``; ``None``
    is skipped) to ``out_dir/<name>.safetensors`` with its architecture, so :func:`dmdcopy.io.load`
    rebuilds it without ``into=``.

    Returns:
        The paths written, and ``{name: reason}`` for each module that could not be described (a
        class dmdcopy does not know): its weights stay in the run checkpoints (:func:`read_entry`).
    """
    written, skipped = [], {}
    meta = {"dmdcopy.distill.step": str(step)}
    for name, module in students.items():
        if module is None:
            continue
        path = Path(out_dir) / f"{name}.safetensors"
        try:
            save(module, path, metadata=meta)
        except CheckpointError as e:
            skipped[name] = str(e)
            continue
        written.append(path)
    return written, skipped
