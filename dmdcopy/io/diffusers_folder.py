"""A local diffusers ``UNet2DModel`` folder as a dmdcopy denoiser (optional extra ``diffusers``).

::

    D = load_diffusers_unet("ddpm-cifar10/")        # a pipeline folder, or its unet/ folder
    x = teacher_ode(D, z, D.discrete_grid(50), heun)

The folder is read from disk only (``local_files_only``; nothing is downloaded). The network comes
from ``config.json`` and its weights (diffusers' own loader; a diffusers folder holds no pickled
code). The noise schedule is read from ``scheduler_config.json``, in the folder, in a sibling
``scheduler/`` folder (the pipeline layout) or at ``scheduler=``:
``num_train_timesteps``, ``beta_schedule`` (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``)
or ``trained_betas``, ``beta_start``/``beta_end``, and ``prediction_type`` (``epsilon`` or
``v_prediction``), which picks :class:`~dmdcopy.discrete.EpsDenoiser` or
:class:`~dmdcopy.discrete.VDenoiser`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dmdcopy.discrete import (
    DiscreteVPDenoiser,
    EpsDenoiser,
    VDenoiser,
    cosine_alphas_cumprod,
    linear_alphas_cumprod,
    scaled_linear_alphas_cumprod,
)
from dmdcopy.errors import CheckpointError, ConfigError

__all__ = ["alphas_cumprod_from_config", "load_diffusers_unet"]

# The one place diffusers' schedule names map to dmdcopy's schedules.
_SCHEDULES = {"linear": linear_alphas_cumprod, "scaled_linear": scaled_linear_alphas_cumprod}
_PREDICTIONS = {"epsilon": EpsDenoiser, "v_prediction": VDenoiser}


def alphas_cumprod_from_config(config: dict) -> torch.Tensor:
    """``(T,)`` float64 ``alphas_cumprod`` of a diffusers scheduler config (a dict of its JSON)."""
    n = int(config.get("num_train_timesteps", 1000))
    if config.get("rescale_betas_zero_snr"):
        raise ConfigError("scheduler: rescale_betas_zero_snr gives sigma = inf at the last timestep, "
                          "which no denoiser D(x, sigma) can take")
    if config.get("trained_betas") is not None:
        betas = torch.as_tensor(config["trained_betas"], dtype=torch.float64)
        return torch.cumprod(1 - betas, 0)
    kind = config.get("beta_schedule", "linear")
    if kind == "squaredcos_cap_v2":
        return cosine_alphas_cumprod(n)
    if kind not in _SCHEDULES:
        raise ConfigError(f"scheduler: beta_schedule {kind!r} is not supported; dmdcopy reads "
                          f"{sorted([*_SCHEDULES, 'squaredcos_cap_v2'])} or trained_betas")
    return _SCHEDULES[kind](n, float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 2e-2)))


def _scheduler_config(folder: Path, scheduler: str | os.PathLike | None) -> dict:
    candidates = ([Path(scheduler)] if scheduler is not None else
                  [folder, folder / "scheduler", folder.parent / "scheduler"])
    for c in candidates:
        path = c if c.is_file() else c / "scheduler_config.json"
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{path}: unreadable scheduler config ({type(e).__name__})") from None
    raise CheckpointError(f"{folder}: no scheduler_config.json (looked in {[str(c) for c in candidates]}); "
                          "pass scheduler=PATH")


def load_diffusers_unet(
    folder: str | os.PathLike,
    *,
    scheduler: str | os.PathLike | None = None,
    interpolate: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> DiscreteVPDenoiser:
    """A diffusers ``UNet2DModel`` folder (or a pipeline folder holding ``unet/``) as a denoiser.

    Args:
        folder: holds ``config.json`` and the weights, or ``unet/`` with them.
        scheduler: a ``scheduler_config.json`` (or its folder); default: found beside the model.
        interpolate: fractional timesteps (see :class:`~dmdcopy.discrete.DiscreteVPDenoiser`).
        device, dtype: where and in what precision the network runs.

    Returns: an :class:`~dmdcopy.discrete.EpsDenoiser` or :class:`~dmdcopy.discrete.VDenoiser`
    in eval mode, with ``sample_shape`` and ``label_dim`` from the network's config.
    """
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise ConfigError("reading a diffusers folder needs diffusers: "
                          "pip install 'dmdcopy[diffusers]'") from None
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory (a diffusers model folder)")
    model_dir = folder if (folder / "config.json").is_file() else folder / "unet"
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json here or in unet/ "
                              "(not a diffusers UNet2DModel folder)")
    config = _scheduler_config(model_dir, scheduler)
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in _PREDICTIONS:
        raise ConfigError(f"scheduler: prediction_type {prediction!r} is not supported; dmdcopy wraps "
                          f"{sorted(_PREDICTIONS)}")
    try:
        net = UNet2DModel.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # diffusers raises several types for a wrong or broken folder
        raise CheckpointError(f"{model_dir}: diffusers could not load a UNet2DModel "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    net = net.to(device=device, dtype=dtype).eval()
    cfg = net.config
    size = cfg.sample_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    label_dim = int(getattr(cfg, "num_class_embeds", None) or 0)
    wrapper = _PREDICTIONS[prediction](net, alphas_cumprod_from_config(config), interpolate=interpolate,
                                       sample_shape=(cfg.in_channels, *size), label_dim=label_dim)
    return wrapper.to(device).eval()
