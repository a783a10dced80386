"""Shape checks shared by the public entry points (torchsde-style contracts)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dmdcopy.errors import ShapeError


def check_x_sigma(x: torch.Tensor, sigma: torch.Tensor, where: str) -> None:
    """Check the denoiser contract: ``x: (B, ...)`` and ``sigma: (B,)``."""
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ShapeError(f"{where}: expected x of shape (B, ...) with at least 2 dims, got {shape}")
    if not isinstance(sigma, torch.Tensor) or sigma.shape != (x.shape[0],):
        shape = tuple(sigma.shape) if isinstance(sigma, torch.Tensor) else type(sigma).__name__
        raise ShapeError(
            f"{where}: expected sigma of shape (B,) = ({x.shape[0]},) matching x, got {shape}"
        )


def check_sample_shape(x: torch.Tensor, sample_shape: Sequence[int] | None, where: str) -> None:
    """Check that ``x`` is ``(B, *sample_shape)`` when the expected per-sample shape is known."""
    if sample_shape is None:
        return
    if tuple(x.shape[1:]) != tuple(sample_shape):
        raise ShapeError(
            f"{where}: expected x of shape (B, {', '.join(map(str, sample_shape))}), "
            f"got {tuple(x.shape)}"
        )


def check_labels(
    class_labels: torch.Tensor | None, batch: int, label_dim: int, where: str
) -> torch.Tensor | None:
    """Check class labels: ``(B,)`` integer indices or ``(B, label_dim)`` one-hot/soft labels.

    Returns ``(B, label_dim)`` float labels, or ``None`` for an unconditional model.
    """
    if label_dim == 0:
        if class_labels is not None:
            raise ShapeError(f"{where}: got class_labels but the model is unconditional")
        return None
    if class_labels is None:
        raise ShapeError(f"{where}: the model is conditional (label_dim={label_dim}); "
                         "pass class_labels of shape (B,) or (B, label_dim)")
    if class_labels.ndim == 1 and not class_labels.is_floating_point():
        if class_labels.shape[0] != batch:
            raise ShapeError(f"{where}: expected class_labels of shape ({batch},), "
                             f"got {tuple(class_labels.shape)}")
        # The range check reads values back to the host: on CPU only, so that a sampler step on an
        # accelerator makes no host-device sync (there one_hot's device-side assert catches them).
        on_cpu = class_labels.device.type == "cpu"
        if on_cpu and batch and (int(class_labels.min()) < 0 or int(class_labels.max()) >= label_dim):
            raise ShapeError(f"{where}: class indices must lie in [0, {label_dim})")
        return torch.nn.functional.one_hot(class_labels.long(), label_dim)
    if class_labels.shape != (batch, label_dim):
        raise ShapeError(f"{where}: expected class_labels of shape ({batch},) or "
                         f"({batch}, {label_dim}), got {tuple(class_labels.shape)}")
    return class_labels
