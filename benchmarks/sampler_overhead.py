"""Sampler overhead: ``teacher_ode`` (Heun, 18 steps = 35 evaluations) vs 35 bare denoiser calls.

The ratio ``time(teacher_ode) / time(35 bare calls)`` measures what the sampler adds on top of the
network (step arithmetic, sigma tensors, checks). Target: <= 1.05 on CPU.

    OMP_NUM_THREADS=1 python benchmarks/sampler_overhead.py --append docs/performance.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from dmdcopy.nets import MLP
from dmdcopy.precond import EDMPrecond
from dmdcopy.samplers import heun, teacher_ode
from dmdcopy.schedules import karras_sigmas


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--append", metavar="MD", help="append the result as a section of this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    D = EDMPrecond(MLP(args.dim, hidden=args.hidden, depth=args.depth)).eval()
    z = torch.randn(args.batch, args.dim)
    sigmas = karras_sigmas(18)
    n_eval = 2 * 18 - 1
    # record the (x, sigma) pairs the sampler feeds the denoiser, so the bare calls see the same inputs
    inputs = []

    def recorder(x, sigma):
        inputs.append((x.clone(), sigma.clone()))
        return D(x, sigma)

    with torch.inference_mode():
        teacher_ode(recorder, z, sigmas, solver=heun)
    assert len(inputs) == n_eval
    x, sigma = inputs[0]

    def sampler():
        teacher_ode(D, z, sigmas, solver=heun)

    def bare():
        for x_i, sigma_i in inputs:
            D(x_i, sigma_i)

    with torch.inference_mode():
        # interleave so drift in machine load hits both alike
        t_ode, t_bare = [], []
        for _ in range(args.repeats):
            t_ode += _time(sampler, 1)
            t_bare += _time(bare, 1)
        # the sampler's own cost per step, with a denoiser that costs (almost) nothing
        def trivial(x, sigma):
            return x * 0.5

        t_triv_ode = min(_time(lambda: teacher_ode(trivial, z, sigmas), 5 * args.repeats))
        t_triv_bare = min(_time(lambda: [trivial(x, sigma) for _ in range(n_eval)], 5 * args.repeats))
    med_ode, med_bare = statistics.median(t_ode), statistics.median(t_bare)
    ratio = med_ode / med_bare
    per_step = (t_triv_ode - t_triv_bare) / 18
    cmd = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python benchmarks/sampler_overhead.py "
           f"--batch {args.batch} --dim {args.dim} --hidden {args.hidden} --depth {args.depth} "
           f"--repeats {args.repeats} --threads {args.threads}")
    lines = [
        f"command: `{cmd}`",
        f"machine: {os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, torch threads {args.threads}",
        f"denoiser: EDMPrecond(MLP(dim={args.dim}, hidden={args.hidden}, depth={args.depth})), "
        f"batch {args.batch}",
        f"teacher_ode (heun, 18 steps, {n_eval} evaluations): median {med_ode * 1e3:.2f} ms",
        f"{n_eval} bare denoiser calls: median {med_bare * 1e3:.2f} ms",
        f"overhead ratio: {ratio:.3f} (target <= 1.05), median of {args.repeats} interleaved repeats; "
        f"ratio of the fastest runs {min(t_ode) / min(t_bare):.3f}",
        f"sampler's own cost per Heun step (trivial denoiser, fastest of {5 * args.repeats}): "
        f"{per_step * 1e6:.1f} us",
    ]
    print("\n".join(lines))
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n## Sampler overhead (teacher_ode vs bare denoiser calls)\n\n")
            f.write("\n".join(f"- {line}" for line in lines) + "\n")


if __name__ == "__main__":
    main()
