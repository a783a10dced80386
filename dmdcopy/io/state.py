"""Load a state dict into a module and say precisely what did not fit."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from dmdcopy.errors import CheckpointError

__all__ = ["LoadReport", "compare_state", "load_state_checked"]


@dataclass(frozen=True)
class LoadReport:
    """Keys of a state dict compared with a module's.

    Attributes:
        missing: keys the module has and the file lacks.
        unexpected: keys the file has and the module lacks.
        mismatched: ``(key, shape in file, shape in module)`` for every key present in both with
            different shapes.
    """

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 3) -> str:
        """The same on one line, naming at most ``limit`` keys of each kind."""

        def some(items: tuple[str, ...]) -> str:
            return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing key(s) ({some(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected key(s) ({some(self.unexpected)})")
        if self.mismatched:
            shapes = tuple(f"{k}: {list(a)} in the file vs {list(b)}" for k, a, b in self.mismatched)
            parts.append(f"{len(self.mismatched)} key(s) with mismatched shapes ({some(shapes)})")
        return "; ".join(parts) if parts else "all keys match"

    def describe(self) -> str:
        """Every offending key, one per line."""
        lines = []
        if self.missing:
            lines.append(f"{len(self.missing)} missing key(s) (in the module, not in the file):")
            lines += [f"  {k}" for k in self.missing]
        if self.unexpected:
            lines.append(f"{len(self.unexpected)} unexpected key(s) (in the file, not in the module):")
            lines += [f"  {k}" for k in self.unexpected]
        if self.mismatched:
            lines.append(f"{len(self.mismatched)} key(s) with mismatched shapes (file vs module):")
            lines += [f"  {k}: {list(a)} vs {list(b)}" for k, a, b in self.mismatched]
        return "\n".join(lines) if lines else "all keys match"


def compare_state(module: nn.Module, state: Mapping[str, torch.Tensor]) -> LoadReport:
    """The :class:`LoadReport` of loading ``state`` into ``module``, without loading anything."""
    own = module.state_dict()
    mismatched = tuple(
        (k, tuple(state[k].shape), tuple(v.shape))
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    )
    return LoadReport(
        missing=tuple(k for k in own if k not in state),
        unexpected=tuple(k for k in state if k not in own),
        mismatched=mismatched,
    )


def load_state_checked(
    module: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True, source: str = "checkpoint"
) -> LoadReport:
    """Copy ``state`` into ``module``'s parameters and buffers (cast to their dtype and device).

    With ``strict=True`` any missing, unexpected or mis-shaped key raises
    :class:`~dmdcopy.errors.CheckpointError` listing every one of them, and nothing is loaded.
    With ``strict=False`` the keys that fit are loaded and a warning lists the rest.
    """
    report = compare_state(module, state)
    if not report.ok:
        message = f"{source} does not fit {type(module).__name__}:\n{report.describe()}"
        if strict:
            raise CheckpointError(message)
        warnings.warn(message, stacklevel=3)
    bad = set(report.unexpected) | {k for k, _, _ in report.mismatched}
    module.load_state_dict({k: v for k, v in state.items() if k not in bad}, strict=False)
    return report
