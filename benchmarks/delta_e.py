"""Benchmark Delta E against the bare computation it must match or beat; pair generation.

Usage (as recorded in docs/performance.md)::

    python benchmarks/delta_e.py --sizes 2000 10000 --threads 2
    python benchmarks/delta_e.py --pairs-only --threads 1
    python benchmarks/delta_e.py --sizes 10000 --device cuda     # the GPU figure (cost on the GPU)

Data for the metric: teacher samples ``t ~ N(0, I)`` at 3x64x64 and two students: a partial copy
``s = t + 0.5 * noise`` and an independent one (fresh ``N(0, I)``). For each, in the same run:

- ``bare``: what a careful user writes by hand for the exact finite-N figure: the float64 cost
  matrix with torch (centred, ``|a|^2 + |b|^2 - 2 a.b``), :func:`scipy.optimize.linear_sum_assignment`,
  and the three energies. No interval, no bracket.
- ``dmdcopy``: :func:`dmdcopy.metrics.pairing_inefficiency` with its defaults (float32 products
  with float64 recomputation, LAPJV, the held-out ``W2`` bound, 1000 bootstrap resamples), its
  stages timed through the ``progress`` callback.

The ratio ``dmdcopy / bare`` (<= 1.0 is the target) and the relative difference of the two
``E_opt`` and Delta E values are printed. Pair generation: ``dmdcopy.pairs.generate_pairs`` with
Heun (18 steps) over an EDM-preconditioned MLP denoiser at dim 2 and 3*64*64.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from dmdcopy.metrics import pairing_inefficiency


def bare(s: torch.Tensor, t: torch.Tensor) -> tuple[float, float]:
    """Exact finite-N Delta E by hand: ``(delta_e, e_opt)``."""
    a, b = s.flatten(1).double(), t.flatten(1).double()
    center = b.mean(0)
    a, b = a - center, b - center
    cost = ((a.square().sum(1)[:, None] + b.square().sum(1)[None] - 2 * a @ b.T) / a.shape[1]).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    e_pair, e_opt, e_ind = float(np.diag(cost).mean()), float(cost[rows, cols].mean()), float(cost.mean())
    return (e_pair - e_opt) / (e_ind - e_opt), e_opt


class StageClock:
    """Seconds spent in each stage of ``pairing_inefficiency``, from its progress calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.t = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int) -> None:
        # a call reports work just done: the time since the previous call belongs to its stage
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.t
        self.t = now


def bench_metric(n: int, shape: tuple[int, ...], n_boot: int, device: torch.device) -> list[dict]:
    g = torch.Generator().manual_seed(n)
    t = torch.randn((n, *shape), generator=g).to(device)
    rows = []
    for name, s in (("copy", t + 0.5 * torch.randn((n, *shape), generator=g).to(device)),
                    ("indep", torch.randn((n, *shape), generator=g).to(device))):
        t0 = time.perf_counter()
        ref_delta, ref_opt = bare(s, t)
        t1 = time.perf_counter()
        clock = StageClock()
        r = pairing_inefficiency(s, t, n_boot=n_boot, progress=clock)
        t2 = time.perf_counter()
        clock("results", 0, 0)
        rows.append(dict(student=name, n=n, bare_s=t1 - t0, dmdcopy_s=t2 - t1, ratio=(t2 - t1) / (t1 - t0),
                         e_opt_rel_diff=abs(r.e_opt - ref_opt) / ref_opt,
                         delta_e_diff=abs(r.delta_e - ref_delta), delta_e=r.delta_e,
                         bracket=(r.delta_e_lower, r.delta_e_upper), stages=clock.seconds))
        del s
    return rows


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
    p.add_argument("--sizes", type=int, nargs="*", default=[2000, 10000])
    p.add_argument("--shape", type=int, nargs="+", default=[3, 64, 64])
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--pairs-only", action="store_true")
    p.add_argument("--pairs-n", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "no GPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device} ({gpu})",
          flush=True)
    if not args.pairs_only:
        print("student, N, bare [s], dmdcopy [s], ratio, E_opt rel diff, Delta E diff, Delta E, "
              "bracket, dmdcopy stages [s]", flush=True)
        for n in args.sizes:
            for q in bench_metric(n, tuple(args.shape), args.n_boot, torch.device(args.device)):
                stages = ", ".join(f"{k} {v:.1f}" for k, v in q["stages"].items() if v >= 0.05)
                print(f"{q['student']}, {n}, {q['bare_s']:.1f}, {q['dmdcopy_s']:.1f}, {q['ratio']:.2f}, "
                      f"{q['e_opt_rel_diff']:.1e}, {q['delta_e_diff']:.1e}, {q['delta_e']:.4f}, "
                      f"[{q['bracket'][0]:.3f}, {q['bracket'][1]:.3f}], {stages}", flush=True)
        return
    for n, dim in ((args.pairs_n, 2), (args.pairs_n // 8, 3 * 64 * 64)):
        r = bench_pairs(n, dim, 256, 18)
        print(f"pairs: {r['n']} pairs, dim {r['dim']}, Heun {r['steps']} steps (35 evals), "
              f"EDMPrecond(MLP(hidden=256, depth=3)), batch 256: {r['seconds']:.1f} s, "
              f"{r['pairs_per_s']:.0f} pairs/s", flush=True)


if __name__ == "__main__":
    main()
