"""Exponential moving average of a module's weights, parametrised by its half-life in updates."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dmdcopy.errors import ConfigError

__all__ = ["EMA"]


class EMA:
    """``theta_ema <- beta theta_ema + (1 - beta) theta`` with ``beta = 0.5 ** (1 / halflife)``.

    After ``halflife`` updates an old weight's share has halved (EDM's ``ema_halflife_kimg``, counted
    in updates here). Buffers (e.g. normalisation statistics) are copied, not averaged.

    Args:
        module: the live module; the EMA copy is a deep copy of it, in eval mode, without grads.
        halflife: half-life in updates, > 0.

    >>> net = nn.Linear(1, 1, bias=False)
    >>> ema = EMA(net, halflife=1.0)
    >>> with torch.no_grad():
    ...     _ = net.weight.fill_(1.0); _ = ema.module.weight.fill_(0.0)
    >>> ema.update(net)
    >>> ema.module.weight.item()
    0.5
    """

    def __init__(self, module: nn.Module, halflife: float) -> None:
        if not halflife > 0:
            raise ConfigError(f"ema_halflife_steps must be > 0, got {halflife}")
        self.halflife = float(halflife)
        self.beta = 0.5 ** (1.0 / self.halflife)
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Move the average one update towards ``module``'s current weights."""
        for p_ema, p in zip(self.module.parameters(), module.parameters(), strict=True):
            p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - self.beta)
        for b_ema, b in zip(self.module.buffers(), module.buffers(), strict=True):
            b_ema.copy_(b)
