"""``load`` any supported checkpoint, and ``convert`` foreign ones to dmdcopy's format."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from dmdcopy.errors import CheckpointError
from dmdcopy.io.architectures import INIT_PREFIX, build_module, check_wrapper_settings, init_tensors
from dmdcopy.io.formats import EDM_PICKLE, SAFETENSORS, detect_format
from dmdcopy.io.run_checkpoint import is_run_checkpoint, split_entry
from dmdcopy.io.safetensors_io import read_safetensors, read_safetensors_header, save
from dmdcopy.io.state import build_checked, load_state_checked

__all__ = ["convert", "load"]


def _uniform_float_dtype(state: dict[str, torch.Tensor]) -> torch.dtype | None:
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def split_init_tensors(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(state dict, constructor tensors)`` of a file's tensors (see :func:`init_tensors`)."""
    init = {k: v for k, v in state.items() if k.startswith(INIT_PREFIX)}
    return {k: v for k, v in state.items() if not k.startswith(INIT_PREFIX)}, init


def _check_init_tensors(into: nn.Module, init: dict[str, torch.Tensor], source: str) -> None:
    """``into`` must hold the constructor tensors the file holds (e.g. an EmpiricalTeacher's data):
    they are not loaded into it, so a different data set would go unnoticed."""
    own = init_tensors(into)
    same = set(own) == set(init) and all(
        own[k].shape == init[k].shape and torch.equal(own[k].detach().cpu().to(init[k].dtype), init[k])
        for k in init)
    if not same:
        raise CheckpointError(f"{source} holds {type(into).__name__} constructor tensors "
                              f"{sorted(k[len(INIT_PREFIX):] for k in init)} that differ from those of the "
                              "module passed as into=; load it without into= to rebuild it from the file")


def _rebuild_from_file(
    path: str | os.PathLike, meta: dict[str, str], shapes: dict[str, tuple[int, ...]], strict: bool
) -> nn.Module:
    """The module a dmdcopy file records, filled from it. The recorded architecture is first built
    on the meta device and checked against the shapes in the file's header (:func:`build_checked`):
    a small file recording a huge module is refused before anything large is allocated."""
    source = f"{path}"
    if "dmdcopy.architecture" not in meta:
        raise CheckpointError(
            f"{path}: a safetensors file without dmdcopy's architecture metadata "
            f"(metadata keys: {sorted(meta)}); pass the module to fill as load(path, into=module)"
        )
    try:
        spec = json.loads(meta["dmdcopy.architecture"])
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt dmdcopy.architecture metadata: {e}") from e
    init, _ = read_safetensors(path, keys=lambda k: k.startswith(INIT_PREFIX))  # constructor tensors
    state_shapes = {k: v for k, v in shapes.items() if not k.startswith(INIT_PREFIX)}
    module = build_checked(lambda: build_module(spec, init), state_shapes,
                           file_bytes=os.path.getsize(path), strict=strict, source=source)
    state, _ = read_safetensors(path, keys=lambda k: not k.startswith(INIT_PREFIX))
    dtype = _uniform_float_dtype(state)
    if dtype is not None:
        module.to(dtype)  # keep the stored precision (e.g. a float16 export)
    load_state_checked(module, state, strict=strict, source=source)
    return module


def load(
    path: str | os.PathLike,
    *,
    into: nn.Module | None = None,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
    key: str = "ema",
) -> nn.Module:
    """Load a checkpoint, recognising its format from the file's bytes.

    - dmdcopy ``.safetensors`` (written by :func:`dmdcopy.io.save`): the module is rebuilt from
      the recorded architecture, or the weights go into ``into``;
    - EDM network pickle (``network-snapshot-*.pkl``): read without executing anything from
      the file (:func:`dmdcopy.io.load_edm_pickle`), entry ``key`` (``"ema"``);
    - a checkpoint of :class:`dmdcopy.distill.Distiller` (``checkpoint-*.safetensors``): entry
      ``key`` (``"ema"``, ``"student"``, ``"fake_score"`` or ``"discriminator"``) goes into ``into``
      (the run's exported ``student.safetensors`` needs no ``into``);
    - ``torch.save`` state dict (DMD2's ``pytorch_model.bin``, ``.pt``, ``.pth``): read with
      ``weights_only=True``; it carries no architecture, so ``into`` is required (or use
      :func:`dmdcopy.io.load_dmd2_checkpoint` with an architecture).

    Args:
        into: a module to load the weights into (its device and dtypes are kept).
        map_location: device of the rebuilt module (ignored with ``into``).
        strict: raise :class:`~dmdcopy.errors.CheckpointError` listing every missing, unexpected
            and mis-shaped key; with ``False`` load what fits and warn about the rest.
        key: entry of an EDM snapshot dict, or of a distillation checkpoint, to import.

    Returns:
        ``into``, or the rebuilt module in eval mode (call ``.train()`` to train it).
    """
    fmt = detect_format(path)
    source = f"{path}"
    if fmt == SAFETENSORS:
        shapes, meta = read_safetensors_header(path)  # no tensor data read yet
        if into is None and not is_run_checkpoint(meta):
            return _rebuild_from_file(path, meta, shapes, strict).to(map_location).eval()
        state, meta = read_safetensors(path)  # CPU; the module is moved once it is filled
        if is_run_checkpoint(meta):
            state = split_entry(state, key, source=source)
            if into is None:
                raise CheckpointError(
                    f"{path}: a distillation checkpoint stores weights, not architectures; pass "
                    f"load(path, into=module, key={key!r}), or load the run's exported "
                    "student.safetensors / student_ema.safetensors")
        state, init = split_init_tensors(state)
        check_wrapper_settings(into, meta, source)
        if init:
            _check_init_tensors(into, init, source)
        load_state_checked(into, state, strict=strict, source=source)
        return into
    if fmt == EDM_PICKLE:
        from dmdcopy.io.edm_pickle import load_edm_pickle, read_edm_pickle

        if into is None:
            return load_edm_pickle(path, key=key, map_location=map_location)
        # Any architecture: the weights come straight from the pickled module tree.
        load_state_checked(into, read_edm_pickle(path, key=key).state_dict(), strict=strict, source=source)
        return into
    from dmdcopy.io.dmd2 import load_dmd2_checkpoint

    if into is None:
        raise CheckpointError(
            f"{path}: a torch.save state dict carries no architecture; pass load(path, into=module) "
            "or use load_dmd2_checkpoint(path, architecture=...)"
        )
    return load_dmd2_checkpoint(path, into=into, map_location=map_location, strict=strict)


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    key: str = "ema",
    architecture: nn.Module | None = None,
    prefix: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> nn.Module:
    """Convert an EDM pickle or a DMD2 / torch state dict to a dmdcopy ``.safetensors`` file.

    Args:
        src: the foreign checkpoint.
        dst: the ``.safetensors`` file to write.
        key: entry of an EDM snapshot dict.
        architecture: the module a torch state dict belongs to (required for those), e.g.
            ``EDMPrecond(DhariwalUNet(**edm_imagenet64_adm()))``; its weights are overwritten.
        prefix: for a torch state dict, the key prefix of the network to take (``"fake_unet."``).
        metadata: extra facts to store; the source file name is always recorded.

    Returns:
        The loaded module, as saved.
    """
    fmt = detect_format(src)
    if fmt == EDM_PICKLE:
        module = load(src, key=key, into=architecture)
    elif fmt == SAFETENSORS:
        module = load(src, into=architecture)
    else:
        from dmdcopy.io.dmd2 import load_dmd2_checkpoint

        if architecture is None:
            raise CheckpointError(
                f"{src}: a torch.save state dict carries no architecture; pass architecture="
            )
        module = load_dmd2_checkpoint(src, architecture=architecture, prefix=prefix)
    facts = {"converted_from": os.path.basename(os.fspath(src))}
    if prefix is not None:
        facts["prefix"] = prefix
    save(module, dst, metadata={**facts, **(metadata or {})})
    return module
