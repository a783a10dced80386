"""Per-sample seeded noise: the noise of seed ``i`` depends on ``i`` alone.

This is what makes a pairing measurable: teacher and student fed seed ``i`` see the same ``z``,
whatever the batch it is drawn in, the order of the seeds, the device or the number of processes
(as EDM's ``StackedRandomGenerator``). Each seed gets its own CPU ``torch.Generator``; the draw is
made on the CPU in float32 and only then moved and cast, so CUDA and CPU give the same bits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

from dmdcopy.errors import ConfigError

__all__ = ["labels_for_seeds", "noise_for_seeds", "parse_seeds", "split_seeds"]

# Streams derived from one seed: the noise uses the seed itself, the class label a second stream.
_LABEL_STREAM = 0x9E3779B97F4A7C15
_MASK63 = (1 << 63) - 1
_SEED_LIMIT = 1 << 64


def _as_seed_list(seeds: Iterable[int] | torch.Tensor) -> list[int]:
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.tolist()
    out = [int(s) for s in seeds]
    bad = [s for s in out if not 0 <= s < _SEED_LIMIT]
    if bad:  # torch.Generator.manual_seed takes 64-bit unsigned seeds only
        raise ConfigError(f"seeds must be non-negative integers below 2^64, got {bad[0]}")
    return out


def noise_for_seeds(
    seeds: Iterable[int] | torch.Tensor,
    shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard-normal noise, one sample per seed.

    Args:
        seeds: ``N`` non-negative integer seeds.
        shape: the per-sample shape, e.g. ``(3, 64, 64)`` or ``(d,)``.

    Returns: ``(N, *shape)`` on ``device`` in ``dtype``; row ``i`` depends on ``seeds[i]`` only.

    >>> a = noise_for_seeds([3, 7], (4,))
    >>> torch.equal(a[1], noise_for_seeds([7], (4,))[0])
    True
    """
    seed_list = _as_seed_list(seeds)
    shape = tuple(int(s) for s in shape)
    out = torch.empty((len(seed_list), *shape), dtype=torch.float32)
    gen = torch.Generator(device="cpu")
    for i, seed in enumerate(seed_list):
        gen.manual_seed(seed)
        torch.randn(shape, generator=gen, out=out[i])
    return out.to(device=device, dtype=dtype)


def labels_for_seeds(
    seeds: Iterable[int] | torch.Tensor,
    label_dim: int,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A uniform class label per seed, from a stream independent of :func:`noise_for_seeds`.

    Returns: ``(N,)`` int64 in ``[0, label_dim)``.
    """
    if label_dim < 1:
        raise ConfigError(f"label_dim must be >= 1, got {label_dim}")
    seed_list = _as_seed_list(seeds)
    out = torch.empty(len(seed_list), dtype=torch.int64)
    gen = torch.Generator(device="cpu")
    for i, seed in enumerate(seed_list):
        gen.manual_seed((seed * _LABEL_STREAM + 1) & _MASK63)
        out[i] = torch.randint(label_dim, (1,), generator=gen)[0]
    return out.to(device)


_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


# More seeds than this in one spec is a typo (a list of 10^7 ints is already 300 MB of Python).
MAX_SEEDS = 10_000_000


def parse_seeds(spec: str, *, limit: int = MAX_SEEDS) -> list[int]:
    """Parse ``"0-9999"``, ``"1,5,9"`` or ``"0-9,100-109"`` (ranges include both ends); at most
    ``limit`` seeds, checked before any list is built.

    >>> parse_seeds("0-3,10")
    [0, 1, 2, 3, 10]
    """
    ranges: list[tuple[int, int]] = []
    for part in spec.split(","):
        m = _RANGE.match(part)
        if m is None:
            raise ConfigError(f"cannot parse seed range {part!r} in {spec!r}; use e.g. '0-9999,20'")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ConfigError(f"seed range {part!r} ends before it starts")
        ranges.append((lo, hi))
    count = sum(hi - lo + 1 for lo, hi in ranges)
    if count > limit:
        raise ConfigError(f"seeds {spec!r} give {count} seeds, more than {limit}; did you mean fewer?")
    return [s for lo, hi in ranges for s in range(lo, hi + 1)]


def split_seeds(seeds: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The seeds (or shards, or any items) rank ``rank`` of ``world_size`` handles: a strided
    share, so loads stay even."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(seeds[rank::world_size])
