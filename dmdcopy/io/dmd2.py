"""DMD2 checkpoints and other ``torch.save`` state dicts, read with ``weights_only=True``.

DMD2's released ImageNet-64 students are ``pytorch_model.bin`` files holding the state dict of
EDM's ``EDMPrecond`` around a ``DhariwalUNet`` (:func:`dmd2_imagenet64`, the one place this
network is built): keys ``model.enc.64x64_conv.weight``, ... with no prefix, as dmdcopy's
``EDMPrecond``.
Its critic file ``pytorch_model_1.bin`` holds the whole guidance module: the frozen teacher
under ``real_unet.``, the fake score under ``fake_unet.`` and the GAN head under
``cls_pred_branch.``; pass ``prefix="fake_unet."`` (or ``"real_unet."``) to take one network out.
"""

from __future__ import annotations

import os
import pickle
import zipfile

import torch
from torch import nn

from dmdcopy.errors import CheckpointError
from dmdcopy.io.formats import TORCH_LEGACY, TORCH_ZIP, check_torch_sizes, detect_format
from dmdcopy.io.state import load_state_checked

__all__ = ["dmd2_imagenet64", "load_dmd2_checkpoint", "read_torch_state", "strip_prefix"]

# Wrappers whose prefix is removed automatically when every key carries it.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "feedforward_model.")


def read_torch_state(
    path: str | os.PathLike, *, map_location: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The flat ``{key: tensor}`` state dict of a ``torch.save`` file, read with ``weights_only=True``."""
    fmt = detect_format(path)
    if fmt not in (TORCH_ZIP, TORCH_LEGACY):
        raise CheckpointError(f"{path}: expected a torch.save state dict, this is a {fmt} file")
    check_torch_sizes(path)  # nothing is allocated that the file's bytes do not back
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: torch.load(weights_only=True) refused or could not read the file: {first}"
        ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = sorted(obj, key=repr)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: expected a state dict of tensors, found {what}")
    return dict(obj)


def strip_prefix(state: dict[str, torch.Tensor], prefix: str | None) -> dict[str, torch.Tensor]:
    """Keys under ``prefix`` with it removed; ``None`` removes a wrapper prefix every key shares."""
    if prefix is None:
        for p in _WRAPPER_PREFIXES:
            if state and all(k.startswith(p) for k in state):
                prefix = p
                break
        else:
            return state
    picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not picked:
        heads = sorted({k.split(".", 1)[0] + "." for k in state})
        raise CheckpointError(f"no key starts with {prefix!r}; the file's top-level prefixes are {heads}")
    return picked


def dmd2_imagenet64() -> nn.Module:
    """DMD2's ImageNet-64 network, freshly initialised (its generator and both critic networks).

    ``EDMPrecond(DhariwalUNet(**edm_imagenet64_adm(dropout=0)))``: EDM's class-conditional ADM
    network with dropout 0, ``sigma_data`` 0.5 and the sigma range (0, inf) of EDM's wrapper.
    """
    from dmdcopy.io.architectures import edm_imagenet64_adm
    from dmdcopy.nets.unet import DhariwalUNet
    from dmdcopy.precond import EDMPrecond

    return EDMPrecond(DhariwalUNet(**edm_imagenet64_adm(dropout=0.0)), sigma_min=0.0, sigma_data=0.5)


def load_dmd2_checkpoint(
    path: str | os.PathLike,
    architecture: nn.Module | None = None,
    *,
    into: nn.Module | None = None,
    prefix: str | None = None,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
) -> nn.Module:
    """Load a DMD2 (or any ``torch.save``) state dict into a dmdcopy module.

    Args:
        path: e.g. DMD2's ``pytorch_model.bin``.
        architecture / into: the module to fill (same thing, two names). Default: DMD2's
            ImageNet-64 generator, :func:`dmd2_imagenet64`.
        prefix: keep only keys under it and strip it (``"fake_unet."`` for DMD2's critic file);
            ``None`` strips ``module.``/``_orig_mod.``/``feedforward_model.`` when every key has it.
        map_location: device the tensors are read to.
        strict: see :func:`dmdcopy.io.load_state_checked`.

    Returns:
        The filled module.
    """
    if architecture is not None and into is not None and architecture is not into:
        raise CheckpointError("load_dmd2_checkpoint: pass the module as architecture= or into=, not both")
    state = strip_prefix(read_torch_state(path, map_location=map_location), prefix)
    module = into or architecture
    if module is None:
        if prefix is None and state and not all(k.startswith("model.") for k in state):
            heads = sorted({k.split(".", 1)[0] + "." for k in state})
            raise CheckpointError(
                f"{path}: keys are not those of an EDMPrecond (top-level prefixes {heads}); "
                "pick one network with prefix=..., e.g. prefix='fake_unet.' for DMD2's critic"
            )
        module = dmd2_imagenet64()
    load_state_checked(module, state, strict=strict, source=str(path))
    return module
