"""dmdcopy's checkpoint format: a safetensors file whose metadata holds the architecture.

Metadata keys (all strings, as safetensors requires):

- ``dmdcopy.format``: format version, ``"1"``;
- ``dmdcopy.architecture``: JSON spec of the module (:func:`dmdcopy.io.architectures.module_spec`);
- ``dmdcopy.aliases``: JSON ``{key: canonical key}`` for tensors shared between several keys
  (tied weights), stored once;
- ``dmdcopy.metadata``: JSON of the user's ``metadata=`` dict.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from dmdcopy._atomic import write_atomic
from dmdcopy.errors import CheckpointError, ConfigError
from dmdcopy.io.architectures import init_tensors, module_spec

__all__ = ["read_metadata", "read_safetensors", "read_safetensors_header", "save", "save_state"]

FORMAT_VERSION = "1"


def _dedupe(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU tensors sharing no storage, and the aliases of exact duplicates."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for key, t in state.items():
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() > 0 and ident in seen:  # the same tensor under another name (tied weights)
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        t = t.cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into shared or larger storage: safetensors stores it alone
        storages.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    return tensors, aliases


def save_state(
    state: Mapping[str, torch.Tensor], path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None
) -> None:
    """Write tensors and string metadata to ``path`` atomically (temporary file + ``os.replace``)."""
    path = Path(path)
    tensors, aliases = _dedupe(state)
    meta = dict(metadata or {})
    meta["dmdcopy.aliases"] = json.dumps(aliases)
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def save(module: nn.Module, path: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None) -> None:
    """Save ``module``'s state dict and architecture to a safetensors file.

    Args:
        module: any ``nn.Module``. dmdcopy's classes (preconditioning wrappers, MLP, UNets,
            students, the exact teachers of :mod:`dmdcopy.teachers`) are recorded so that
            :func:`dmdcopy.io.load` rebuilds them; a user-defined network is saved too, and loads
            with ``load(path, into=...)``.
        path: destination, written atomically (a crash never leaves a half-written file there).
        metadata: JSON-serialisable facts to keep with the weights (training step, data set, ...),
            read back by :func:`read_metadata`.

    >>> import tempfile, os
    >>> from dmdcopy.precond import EDMPrecond
    >>> from dmdcopy.nets import MLP
    >>> from dmdcopy.io import load
    >>> net = EDMPrecond(MLP(2, hidden=16, depth=1))
    >>> path = os.path.join(tempfile.mkdtemp(), "net.safetensors")
    >>> save(net, path, metadata={"step": 10})
    >>> type(load(path)).__name__, read_metadata(path)
    ('EDMPrecond', {'step': 10})
    """
    try:
        user = json.dumps(dict(metadata or {}))
    except TypeError as e:
        raise ConfigError(f"save: metadata must be JSON-serialisable: {e}") from e
    meta = {
        "format": "pt",
        "dmdcopy.format": FORMAT_VERSION,
        "dmdcopy.architecture": json.dumps(module_spec(module)),
        "dmdcopy.metadata": user,
    }
    # an exact teacher's constructor tensors (EmpiricalTeacher's data) travel beside its state dict
    save_state({**module.state_dict(), **init_tensors(module)}, path, metadata=meta)


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8}


def _aliases(path: str | os.PathLike, meta: Mapping[str, str]) -> dict[str, str]:
    try:
        aliases = json.loads(meta.get("dmdcopy.aliases", "{}"))
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt dmdcopy.aliases metadata: {e}") from e
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise CheckpointError(f"{path}: corrupt dmdcopy.aliases metadata: expected {{key: key}}")
    return aliases


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """``({key: shape}, metadata)`` of a safetensors file from its header alone (no tensor data is
    read), aliased (tied) keys included. The bytes the shapes declare are checked against the
    file's size: a header cannot announce more data than the file holds."""
    size = os.path.getsize(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            headers = {key: f.get_slice(key) for key in f.keys()}
            shapes = {key: tuple(int(n) for n in h.get_shape()) for key, h in headers.items()}
            dtypes = {key: h.get_dtype() for key, h in headers.items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the safetensors file: {e}") from e
    declared = 0
    for key, shape in shapes.items():
        numel = 1
        for n in shape:
            numel *= n
        declared += numel * _ITEMSIZE.get(dtypes[key], 0)  # an unknown dtype: safetensors checks it
    if declared > size:
        raise CheckpointError(
            f"{path}: the safetensors header declares {declared:,} bytes of tensors, the file has {size:,}; "
            "it is corrupt or hostile"
        )
    for key, canonical in _aliases(path, meta).items():
        if canonical not in shapes:
            raise CheckpointError(f"{path}: tied key {key!r} refers to {canonical!r}, which the file lacks")
        shapes[key] = shapes[canonical]
    return shapes, meta


def read_safetensors(
    path: str | os.PathLike, *, map_location: str | torch.device = "cpu", keys: Any = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state dict, metadata)`` of a safetensors file, with aliased (tied) keys restored.

    The header is checked first (:func:`read_safetensors_header`); ``keys``: read only those
    (a predicate on the key, e.g. ``lambda k: k.startswith(prefix)``), default all.
    """
    _, meta = read_safetensors_header(path)  # declared sizes within the file's bytes, before any is read
    aliases = _aliases(path, meta)
    device = str(torch.device(map_location))
    wanted = (lambda key: True) if keys is None else keys
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            state = {key: f.get_tensor(key) for key in f.keys() if wanted(key) or key in aliases.values()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the safetensors file: {e}") from e
    for key, canonical in aliases.items():
        if not wanted(key):
            continue
        if canonical not in state:
            raise CheckpointError(f"{path}: tied key {key!r} refers to {canonical!r}, which the file lacks")
        state[key] = state[canonical]
    return {k: v for k, v in state.items() if wanted(k)}, meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata=`` dict that :func:`save` stored with the weights (``{}`` if none)."""
    from dmdcopy.io.formats import SAFETENSORS, detect_format

    fmt = detect_format(path)
    if fmt != SAFETENSORS:
        raise CheckpointError(f"{path}: read_metadata needs a dmdcopy safetensors file, this is {fmt}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the safetensors file: {e}") from e
    try:
        return json.loads(meta.get("dmdcopy.metadata", "{}"))
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt dmdcopy.metadata (not JSON): {e}") from e
