"""Students: one- and few-step generators ``G(z, class_labels=None) -> x`` built on a denoiser.

A student is any ``nn.Module`` called as ``G(z, class_labels=None)`` with ``z: (B, ...)`` standard
normal; a network built from scratch needs no wrapper. The two classes here are the DMD2
parametrisations that start from the teacher's weights:

- :class:`OneStepStudent`: ``G(z) = D_theta(sigma_max z, sigma_max)`` (DMD2, one step).
- :class:`MultiStepStudent`: a few denoising steps over a decreasing list of sigmas; between steps
  the current estimate is re-noised, ``x_{j+1} = x0_hat_j + sigma_{j+1} n_j``. The re-injected noise
  ``n_j`` is part of the pairing, so it is never drawn from a global generator: either pass it in
  (``noise=``) or leave it to the default, which derives it from each sample's own ``z`` (a hash of
  its float32 bits seeds a counter-based normal), so the same ``z`` always gives the same ``x``,
  whatever the batch, device or process.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

from dmdcopy import _rng
from dmdcopy._checks import check_sample_shape
from dmdcopy.contracts import denoise
from dmdcopy.errors import ConfigError, ShapeError

__all__ = ["MultiStepStudent", "OneStepStudent", "student_noise"]

_DEFAULT_SIGMA_MAX = 80.0




def _default_sigma_max(denoiser: nn.Module, sigma_max: float | None) -> float:
    if sigma_max is None:
        sigma_max = float(getattr(denoiser, "sigma_max", math.inf))
        if not math.isfinite(sigma_max):
            sigma_max = _DEFAULT_SIGMA_MAX
    sigma_max = float(sigma_max)
    if not (math.isfinite(sigma_max) and sigma_max > 0):
        raise ConfigError(f"sigma_max must be a positive finite number, got {sigma_max}")
    return sigma_max


class OneStepStudent(nn.Module):
    """DMD2's one-step generator ``G(z, c) = D(sigma_max z, sigma_max, c)``.

    Args:
        denoiser: a denoiser ``D(x, sigma, class_labels=None)`` (e.g. a deep copy of the teacher,
            so the student starts from the teacher's weights); kept as ``.denoiser``.
        sigma_max: the noise level of the single step; defaults to ``denoiser.sigma_max`` when
            finite, else 80 (EDM's).

    >>> from dmdcopy.nets import MLP
    >>> from dmdcopy.precond import EDMPrecond
    >>> G = OneStepStudent(EDMPrecond(MLP(2, hidden=16, depth=1)))
    >>> G(torch.randn(5, 2)).shape
    torch.Size([5, 2])
    """

    def __init__(self, denoiser: nn.Module, sigma_max: float | None = None) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.sigma_max = _default_sigma_max(denoiser, sigma_max)
        self.label_dim = int(getattr(denoiser, "label_dim", 0))
        shape = getattr(denoiser, "sample_shape", None)
        self.sample_shape = tuple(shape) if shape is not None else None

    def forward(self, z: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """``z: (B, ...)`` standard normal -> ``x: (B, ...)``."""
        check_sample_shape(z, self.sample_shape, "OneStepStudent")
        sigma = torch.full((z.shape[0],), self.sigma_max, device=z.device, dtype=z.dtype)
        return denoise(self.denoiser, self.sigma_max * z, sigma, class_labels)

    def extra_repr(self) -> str:
        return f"sigma_max={self.sigma_max}"


def student_noise(z: torch.Tensor, num: int) -> torch.Tensor:
    """The default re-injected noise of a :class:`MultiStepStudent`, derived from ``z`` alone.

    ``z: (B, ...)`` -> ``(num, B, ...)``; row ``b`` depends on ``z[b]`` only.
    """
    B = z.shape[0]
    if num == 0 or B == 0:
        return z.new_zeros((num, *z.shape))
    keys = _rng.hash_rows(z)  # (B,) int64, one key per sample
    # One counter-based stream per sample: index = its key, elements = num * per-sample size.
    per = z[0].numel()
    n = _rng.normal(_rng.derive_key(0x5EED), keys, (num * per,), dtype=torch.float32)  # (B, num*per)
    n = n.reshape(B, num, *z.shape[1:]).transpose(0, 1)  # (num, B, ...)
    return n.to(device=z.device, dtype=z.dtype).contiguous()


class MultiStepStudent(nn.Module):
    """A few-step student: denoise at ``sigmas[0]``, re-noise to ``sigmas[1]``, denoise, ...

    ``x_0 = sigmas[0] z``; for ``j = 0..J-1``: ``x0_hat_j = D(x_j, sigmas[j])`` and, if another step
    follows, ``x_{j+1} = x0_hat_j + sigmas[j+1] n_j``. The output is ``x0_hat_{J-1}``.

    Training uses DMD2's backward simulation: with ``train_step=j`` the steps before ``j`` run
    without gradient from the student's own outputs, and only step ``j`` is differentiated; the
    output is then ``x0_hat_j``.

    Args:
        denoiser: the denoiser ``D(x, sigma, class_labels=None)``; kept as ``.denoiser``.
        sigmas: strictly decreasing positive noise levels, e.g. ``(80.0, 1.5)``; the first
            defaults to the denoiser's ``sigma_max`` rules of :class:`OneStepStudent` when omitted.

    >>> from dmdcopy.nets import MLP
    >>> from dmdcopy.precond import EDMPrecond
    >>> G = MultiStepStudent(EDMPrecond(MLP(2, hidden=16, depth=1)), sigmas=(80.0, 1.5))
    >>> z = torch.randn(3, 2)
    >>> torch.allclose(G(z)[1], G(z[1:2])[0])  # the re-injected noise follows the sample
    True
    """

    def __init__(self, denoiser: nn.Module, sigmas: Sequence[float] = (80.0, 1.5)) -> None:
        super().__init__()
        sig = [float(s) for s in sigmas]
        if not sig:
            raise ConfigError("sigmas must hold at least one noise level")
        if any(not (math.isfinite(s) and s > 0) for s in sig):
            raise ConfigError(f"sigmas must be positive and finite, got {sig}")
        if any(a <= b for a, b in itertools.pairwise(sig)):
            raise ConfigError(f"sigmas must be strictly decreasing, got {sig}")
        self.denoiser = denoiser
        self.sigmas = tuple(sig)
        self.sigma_max = sig[0]
        self.label_dim = int(getattr(denoiser, "label_dim", 0))
        shape = getattr(denoiser, "sample_shape", None)
        self.sample_shape = tuple(shape) if shape is not None else None

    @property
    def num_steps(self) -> int:
        return len(self.sigmas)

    def forward(
        self,
        z: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        *,
        noise: torch.Tensor | None = None,
        train_step: int | None = None,
    ) -> torch.Tensor:
        """``z: (B, ...)`` -> ``x: (B, ...)``.

        Args:
            noise: ``(num_steps - 1, B, ...)`` re-injected noise; default :func:`student_noise`.
            train_step: ``None`` to run every step; ``j`` to return step ``j``'s estimate with
                gradient through that step only (backward simulation).
        """
        check_sample_shape(z, self.sample_shape, "MultiStepStudent")
        J = self.num_steps
        if noise is None:
            noise = student_noise(z, J - 1)
        elif tuple(noise.shape) != (J - 1, *z.shape):
            raise ShapeError(f"MultiStepStudent: expected noise of shape {(J - 1, *z.shape)}, "
                             f"got {tuple(noise.shape)}")
        last = J - 1 if train_step is None else int(train_step)
        if not 0 <= last < J:
            raise ConfigError(f"train_step must lie in [0, {J}), got {train_step}")

        def sigma_of(j: int) -> torch.Tensor:
            return torch.full((z.shape[0],), self.sigmas[j], device=z.device, dtype=z.dtype)

        x = self.sigmas[0] * z
        for j in range(last):
            # Backward simulation: the earlier steps only make the input; no gradient through them.
            with torch.no_grad() if train_step is not None else contextlib.nullcontext():
                x0 = denoise(self.denoiser, x, sigma_of(j), class_labels)
            x = x0 + self.sigmas[j + 1] * noise[j]
        return denoise(self.denoiser, x, sigma_of(last), class_labels)

    def extra_repr(self) -> str:
        return f"sigmas={self.sigmas}"
