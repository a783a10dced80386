"""The Distiller's speed levers that are options of :class:`DistillConfig`, each off by default.

- ``teacher_dtype``: :class:`LowPrecisionTeacher` holds the frozen teacher's weights in bfloat16
  (or float16) and calls it under ``torch.inference_mode``; its outputs come back in the run's dtype.
- ``fused_optimizer``: :func:`adamw` builds ``AdamW(fused=True)`` (one kernel per update) where
  torch has the fused kernel for the parameters' device, and says so in one line where it has not.
- ``channels_last``: :func:`to_channels_last` puts a network's 4-D weights in channels-last order
  (what GPU convolution kernels prefer); the inputs need no change.

``mixed_precision`` (bf16 autocast) and ``compile`` are the older levers; ``sharding="fsdp"`` is
:mod:`dmdcopy.distill.fsdp`. docs/performance.md measures each on a GPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from dmdcopy.errors import ConfigError

__all__ = ["LowPrecisionTeacher", "adamw", "to_channels_last"]


class LowPrecisionTeacher:
    """A frozen teacher module cast (in place) to ``dtype``, called under ``torch.inference_mode``.

    ``T(x, sigma, **cond)`` returns the teacher's output in ``x.dtype``: the inputs reach the
    module as given (a dmdcopy :class:`~dmdcopy.precond.Precond` casts them to its network's
    dtype; under autocast any network does) and the output is cast back. Not an ``nn.Module``, so
    nothing registers it twice; ``.module`` is the teacher. ``inference_mode=False`` calls it
    under ``torch.no_grad`` instead: an FSDP2-sharded teacher cannot gather its weights in inference
    mode (torch 2.13: "Inference tensors do not track version counter").
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype, *, inference_mode: bool = True) -> None:
        if not any(p.is_floating_point() for p in module.parameters()):
            raise ConfigError(f"teacher_dtype: the teacher ({type(module).__name__}) has no floating "
                              "parameters to hold in another dtype (an exact teacher); leave it None")
        self.module = module.to(dtype)
        self.dtype = dtype
        self.inference_mode = bool(inference_mode)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        with torch.inference_mode() if self.inference_mode else torch.no_grad():
            out = self.module(x, sigma, **cond)
        # outside inference mode: a new tensor autograd may use (out itself is an inference tensor)
        return out.to(x.dtype, copy=True)


def adamw(params: Iterable[torch.Tensor], *, lr: float, betas: tuple[float, float], weight_decay: float,
          fused: bool) -> torch.optim.AdamW:
    """``torch.optim.AdamW``; with ``fused`` its single-kernel implementation, or a ConfigError
    naming the reason where torch has none for these parameters (their device or dtype)."""
    params = list(params)
    if not fused:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    try:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    except RuntimeError as e:
        devices = sorted({str(p.device) for p in params})
        raise ConfigError(f"fused_optimizer: torch {torch.__version__} has no fused AdamW for "
                          f"parameters on {devices} ({e}); set fused_optimizer = false") from None


def to_channels_last(module: object) -> None:
    """Put the 4-D parameters and buffers of ``module`` (if it is an ``nn.Module``) in channels-last
    memory order, in place; values are unchanged."""
    if isinstance(module, nn.Module):
        module.to(memory_format=torch.channels_last)
