"""Counter-based randomness: every draw is a pure function of integer keys.

The distiller needs each training sample's randomness (noise, noise level, label, pair index) to
depend on ``(run seed, step, sub-step, global sample index)`` only, so that one process drawing
the whole batch and two processes drawing half each see the same numbers, and a resumed run sees
what the uninterrupted run saw. A ``torch.Generator`` per sample does that but costs a Python loop;
here a splitmix64 hash of the counters runs as integer tensor ops, which are exact, so CPU and CUDA
produce the same bits. Normals come from Box-Muller in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["derive_key", "hash_rows", "normal", "randint", "uniform"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB


def _signed(v: int) -> int:
    """A 64-bit pattern as the int64 value torch stores for it."""
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def _mix_int(x: int) -> int:
    """splitmix64 finaliser on a Python int (the reference the tensor version must match)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _C1) & _MASK64
    x = ((x ^ (x >> 27)) * _C2) & _MASK64
    return x ^ (x >> 31)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on an int64 tensor; multiplication wraps modulo 2^64."""
    x = (x ^ _shr(x, 30)) * _signed(_C1)
    x = (x ^ _shr(x, 27)) * _signed(_C2)
    return x ^ _shr(x, 31)


def derive_key(*parts: int) -> int:
    """Fold non-negative integers into one 64-bit key (order matters)."""
    key = 0
    for p in parts:
        key = _mix_int(key ^ ((int(p) + _GOLDEN) & _MASK64))
    return key


def _bits(key: int, index: torch.Tensor, n: int) -> torch.Tensor:
    """64 random bits per (sample, element): ``index: (B,)`` int64 -> ``(B, n)`` int64."""
    elem = torch.arange(n, device=index.device, dtype=torch.int64)
    counter = index.to(torch.int64)[:, None] * n + elem[None, :]  # unique per (sample, element)
    return _mix(_mix(counter ^ _signed(key)) + _signed(_GOLDEN))


def uniform(key: int, index: torch.Tensor, n: int = 1) -> torch.Tensor:
    """Uniform draws in the open interval (0, 1), float64: ``index: (B,)`` -> ``(B, n)``."""
    top53 = _shr(_bits(key, index, n), 11)
    return (top53.to(torch.float64) + 0.5) * 2.0**-53


def randint(key: int, index: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """One integer per sample, uniform on ``{low, ..., high}`` (both ends included): ``(B,)``."""
    u = uniform(key, index, 1)[:, 0]
    return (low + (u * (high - low + 1)).floor().to(torch.int64)).clamp_(max=high)


def normal(
    key: int, index: torch.Tensor, shape: Sequence[int], *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normal draws, ``index: (B,)`` -> ``(B, *shape)`` on ``index.device``."""
    shape = tuple(int(s) for s in shape)
    n = 1
    for s in shape:
        n *= s
    half = (n + 1) // 2
    u = uniform(key, index, 2 * half)  # (B, 2 * half) -> Box-Muller pairs
    u1, u2 = u[:, :half], u[:, half:]
    r = (-2.0 * u1.log()).sqrt()
    theta = 2.0 * torch.pi * u2
    z = torch.cat([r * theta.cos(), r * theta.sin()], dim=1)[:, :n]
    return z.to(dtype).reshape(index.shape[0], *shape)


def hash_rows(x: torch.Tensor) -> torch.Tensor:
    """A 63-bit key per row of ``x: (B, ...)`` from its float32 bits: ``(B,)`` int64 >= 0.

    Equal rows give equal keys whatever the batch they sit in.
    """
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=x.device)
    bits = x.detach().reshape(x.shape[0], -1).to(torch.float32).contiguous().view(torch.int32)
    bits = bits.to(torch.int64) & 0xFFFFFFFF
    n = bits.shape[1]
    pos = torch.arange(n, device=x.device, dtype=torch.int64)
    h = _mix(bits + pos * _signed(_GOLDEN))  # (B, n): position-aware so permuted rows differ
    # An exact, order-independent fold: wrap-around sum of mixed words, then one more mix.
    return _mix(h.sum(dim=1)) & ((1 << 63) - 1)
