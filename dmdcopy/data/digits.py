"""scikit-learn's 8x8 handwritten digits (1,797 images that ship inside scikit-learn; no download),
resized to 8, 16 or 32 pixels and scaled to [-1, 1].

Small enough to train a teacher on a CPU in minutes and to hold the exact empirical (memorising)
denoiser of the whole set, which is what the memorisation ablation needs.
"""

from __future__ import annotations

import torch

from dmdcopy.errors import ConfigError

__all__ = ["load_digits", "split_digits"]


def load_digits(
    resolution: int = 8,
    *,
    dtype: torch.dtype = torch.float32,
    return_labels: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 digits as ``(N, 1, resolution, resolution)`` images in [-1, 1].

    The 8x8 originals hold integers 0..16; they are scaled to [-1, 1] and, for 16 and 32 px,
    upsampled bilinearly (``align_corners=False``) and clamped back into [-1, 1].

    Args:
        resolution: 8, 16 or 32.
        return_labels: also return the digit classes ``(N,)`` int64.

    Raises:
        ConfigError: bad resolution, or scikit-learn is not installed (``pip install scikit-learn``).
    """
    if resolution not in (8, 16, 32):
        raise ConfigError(f"resolution must be 8, 16 or 32, got {resolution!r}")
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "the digits data needs scikit-learn: pip install 'dmdcopy[digits]' or pip install scikit-learn"
        ) from e
    bunch = _sk_load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32)  # (N, 8, 8) in 0..16
    x = (x / 8.0 - 1.0).unsqueeze(1)  # (N, 1, 8, 8) in [-1, 1]
    if resolution != 8:
        x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear",
                                            align_corners=False).clamp(-1, 1)
    x = x.to(dtype)
    if return_labels:
        return x, torch.as_tensor(bunch.target, dtype=torch.int64)
    return x


def split_digits(
    x: torch.Tensor, train_fraction: float = 0.8, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random train/held-out split of ``x: (N, ...)``; returns ``(train, held_out)``."""
    if not 0 < train_fraction < 1:
        raise ConfigError(f"train_fraction must lie in (0, 1), got {train_fraction}")
    perm = torch.randperm(x.shape[0], generator=generator)
    n_train = round(train_fraction * x.shape[0])
    return x[perm[:n_train]], x[perm[n_train:]]
