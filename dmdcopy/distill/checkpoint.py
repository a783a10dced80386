"""Distillation checkpoints: one safetensors file per checkpoint, written atomically.

A checkpoint ``checkpoint-000012000.safetensors`` holds every tensor of the run state under a
prefix (``student/``, ``ema/``, ``fake_score/``, ``discriminator/``, ``optim/<name>/<i>/<key>``,
``rng/...``) and a JSON document in the safetensors metadata (step, counters, optimiser
hyper-parameters, the config). No pickle: nothing in a checkpoint runs code when read.

Writes go to a temporary file in the same directory, are flushed to disk, then renamed over the
final name, so a reader sees either no file or a complete one. :func:`latest_checkpoint` still
validates each candidate (safetensors checks that the data covers the header's offsets) and skips
a damaged file, e.g. one truncated by a full disk or a copy cut short.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dmdcopy._atomic import write_atomic
from dmdcopy.errors import CheckpointError
from dmdcopy.io.checkpoints import DISTILL_CHECKPOINT_FORMAT

__all__ = [
    "FORMAT",
    "checkpoint_name",
    "flatten_optimizer",
    "latest_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "read_checkpoint",
    "unflatten_optimizer",
    "write_checkpoint",
]

FORMAT = DISTILL_CHECKPOINT_FORMAT
_NAME = re.compile(r"^checkpoint-(\d{9})\.safetensors$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:09d}.safetensors"


def write_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                     state: Mapping[str, Any]) -> Path:
    """Write ``tensors`` and the JSON-able ``state`` to ``path`` atomically (temp file + rename)."""
    # safetensors wants contiguous CPU tensors that share no memory.
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {"format": FORMAT, "state": json.dumps(state, allow_nan=True)}
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
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not a dmdcopy distillation checkpoint "
                                      f"(format {meta.get('format')!r}, expected {FORMAT!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state = json.loads(meta["state"])
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error type for a truncated file
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    return tensors, state


def _is_valid(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return meta.get("format") == FORMAT and "state" in meta
    except Exception:
        return False


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
    """The newest checkpoint in ``directory`` that reads back whole; ``None`` if there is none."""
    for _, p in reversed(list_checkpoints(directory)):
        if _is_valid(p):
            return p
    return None


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; return the deleted paths."""
    doomed = [p for _, p in list_checkpoints(directory)[:-keep]] if keep > 0 else []
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


# --- optimiser state <-> flat tensors + JSON --------------------------------------------------


def flatten_optimizer(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``opt.state_dict()`` into tensors named ``{prefix}/{param}/{key}`` and a JSON part."""
    sd = opt.state_dict()
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
