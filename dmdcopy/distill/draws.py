"""The random draws of one training sub-step: each a pure function of the run's counters.

Every draw of a step (noise ``z``, noise level, class label, data index, re-injected noise, GAN
inputs) is a counter-based function of ``(config.seed, step, sub-step, stream, global sample
index)`` through :mod:`dmdcopy._rng`, so

- a run resumed from a checkpoint draws exactly what the uninterrupted run drew, and
- ``N`` processes, each drawing its own slice of the global batch, draw what one process draws.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dmdcopy import _rng

__all__ = ["Draws", "Stream"]


class Stream(enum.IntEnum):
    """One key per kind of draw, so adding a kind changes no other draw. The values are part of
    every run's randomness: changing one changes the runs (and breaks bit-exact resumption)."""

    Z = 0                 # the student's input noise
    LABEL = 1             # class labels
    K = 2                 # grid index of the noise level of the DMD / denoising loss
    EPS = 3               # the noise added at that level
    K_GAN = 4             # noise level of the GAN's fake inputs
    EPS_GAN = 5
    REAL_INDEX = 6        # which real samples the GAN sees
    K_GAN_REAL = 7        # noise level of the GAN's real inputs
    EPS_GAN_REAL = 8
    REGRESSION_INDEX = 9  # which stored teacher pairs the regression loss sees
    TRAIN_STEP = 10       # the step a multi-step student trains (one per batch)
    RENOISE = 11          # a multi-step student's re-injected noise


@dataclass(frozen=True)
class Draws:
    """The draws of sub-step ``substep`` of training step ``step``.

    A step's sub-steps ``0 .. F-1`` are its fake-score updates and ``F`` its generator update.

    Args:
        seed, step, substep: the counters every draw derives from.
        index: ``(B,)`` int64, the global sample indices of this process's slice of the batch.
        sample_shape: per-sample shape of ``z`` and of the noises.
        grid: ``(num_sigmas,)`` float64 sigma grid the noise levels are indexed from.
        label_cdf: ``(label_dim,)`` cumulative class weights ending in 1; ``None`` when unconditional.
        dtype: floating dtype of the draws (``float32``; ``float64`` for a float64 run).
    """

    seed: int
    step: int
    substep: int
    index: torch.Tensor
    sample_shape: tuple[int, ...]
    grid: torch.Tensor
    label_cdf: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32

    def key(self, stream: Stream) -> int:
        return _rng.derive_key(self.seed, self.step, self.substep, int(stream))

    def noise(self, stream: Stream = Stream.EPS, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Standard normal, ``(B, *shape)`` (``shape`` defaults to ``sample_shape``)."""
        return _rng.normal(self.key(stream), self.index, shape or self.sample_shape).to(self.dtype)

    def z(self) -> torch.Tensor:
        """The student's input noise, ``(B, *sample_shape)``."""
        return self.noise(Stream.Z)

    def labels(self) -> torch.Tensor | None:
        """``(B,)`` int64 class labels drawn from the class weights; ``None`` when unconditional."""
        if self.label_cdf is None:
            return None
        u = _rng.uniform(self.key(Stream.LABEL), self.index)[:, 0]
        labels = torch.searchsorted(self.label_cdf, u.contiguous())
        return labels.clamp_(max=self.label_cdf.shape[0] - 1)

    def sigma(self, stream: Stream, k_range: tuple[int, int]) -> torch.Tensor:
        """``(B,)`` noise levels ``grid[k]``, ``k`` uniform on ``k_range`` (both ends included)."""
        k = _rng.randint(self.key(stream), self.index, *k_range)
        return self.grid[k].to(self.dtype)

    def indices(self, stream: Stream, n: int, index: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` uniform indices into ``n`` data rows; ``index`` overrides the sample indices
        (the regression batch may differ in size from the training batch)."""
        return _rng.randint(self.key(stream), self.index if index is None else index, 0, n - 1)

    def train_step(self, num_steps: int) -> int:
        """The step a multi-step student trains at this sub-step: one per batch, the same on every
        process."""
        return self.key(Stream.TRAIN_STEP) % num_steps
