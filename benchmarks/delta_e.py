"""Benchmark Delta E: cost matrix, exact assignment and bootstrap timed apart; pair generation.

Usage (one thread, as recorded in docs/performance.md)::

    OMP_NUM_THREADS=1 python benchmarks/delta_e.py --sizes 2000 5000 10000
    OMP_NUM_THREADS=1 python benchmarks/delta_e.py --pairs-only

Data for the metric: teacher samples ``t ~ N(0, I)`` at 3x64x64 and a student
``s = t + 0.5 * noise`` (a partial copy: the assignment has real work to do). Pair generation:
``dmdcopy.pairs.generate_pairs`` with Heun (18 steps) over an EDM-preconditioned MLP denoiser
(no UNet; the figure is the library's overhead plus a small network), at dim 2 and at
3*64*64 = 12288 (flattened), written to safetensors shards in a temporary directory.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from dmdcopy.metrics import (
    _bootstrap_block,
    _direct_cost,
    optimal_assignment,
    pairing_inefficiency,
    pairwise_cost,
)


def bench_metric(n: int, shape: tuple[int, ...], n_boot: int, dtype: torch.dtype) -> dict:
    """Two students: a near copy (``t + 0.5 noise``) and an independent one (fresh ``N(0, I)``)."""
    g = torch.Generator().manual_seed(n)
    t = torch.randn((n, *shape), generator=g)
    out = dict(n=n)
    for name, s in (("copy", t + 0.5 * torch.randn((n, *shape), generator=g)),
                    ("indep", torch.randn((n, *shape), generator=g))):
        t0 = time.perf_counter()
        cost = pairwise_cost(s, t, dtype=dtype)
        t1 = time.perf_counter()
        perm = optimal_assignment(cost)
        t2 = time.perf_counter()
        pair_cost = _direct_cost(s.flatten(1), t.flatten(1)).numpy()
        opt_cost = _direct_cost(s.flatten(1), t.flatten(1)[torch.as_tensor(perm)]).numpy()
        t3 = time.perf_counter()
        _bootstrap_block(cost, pair_cost, opt_cost, n_boot, torch.Generator().manual_seed(0))
        t4 = time.perf_counter()
        del cost
        r = pairing_inefficiency(s, t, n_boot=n_boot, dtype=dtype)  # everything, end to end
        t5 = time.perf_counter()
        out[name] = dict(cost_s=t1 - t0, assign_s=t2 - t1, direct_s=t3 - t2, boot_s=t4 - t3,
                         total_s=t5 - t4, delta_e=r.delta_e)
        del s
    return out


def bench_pairs(n: int, dim: int, batch: int, steps: int) -> dict:
    from dmdcopy.nets import MLP
    from dmdcopy.pairs import generate_pairs
    from dmdcopy.precond import EDMPrecond
    from dmdcopy.schedules import karras_sigmas

    D = EDMPrecond(MLP(dim, hidden=256, depth=3)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        generate_pairs(D, range(n), tmp, sample_shape=(dim,), sigmas=karras_sigmas(steps), batch=batch)
        t1 = time.perf_counter()
    return dict(n=n, dim=dim, steps=steps, seconds=t1 - t0, pairs_per_s=n / (t1 - t0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[2000, 5000, 10000])
    p.add_argument("--shape", type=int, nargs="+", default=[3, 64, 64])
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--float32", action="store_true", help="build the cost in float32 (default float64)")
    p.add_argument("--pairs-only", action="store_true")
    p.add_argument("--pairs-n", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.float32 else torch.float64
    if not args.pairs_only:
        print("student, n, cost matrix [s], assignment [s], direct pair costs [s], "
              f"bootstrap x{args.n_boot} [s], pairing_inefficiency total [s], delta_e", flush=True)
        for n in args.sizes:
            r = bench_metric(n, tuple(args.shape), args.n_boot, dtype)
            for name in ("copy", "indep"):
                q = r[name]
                print(f"{name}, {n}, {q['cost_s']:.1f}, {q['assign_s']:.1f}, {q['direct_s']:.1f}, "
                      f"{q['boot_s']:.1f}, {q['total_s']:.1f}, {q['delta_e']:.4f}", flush=True)
    for n, dim in ((args.pairs_n, 2), (args.pairs_n // 8, 3 * 64 * 64)):
        r = bench_pairs(n, dim, 256, 18)
        print(f"pairs: {r['n']} pairs, dim {r['dim']}, Heun {r['steps']} steps (35 evals), "
              f"EDMPrecond(MLP(hidden=256, depth=3)), batch 256: {r['seconds']:.1f} s, "
              f"{r['pairs_per_s']:.0f} pairs/s", flush=True)


if __name__ == "__main__":
    main()
