"""The solvable model of copying: linear DMD students of a power-law Gaussian teacher.

Every figure is the closed-form *population* Delta E (no finite-N bias): see
``dmdcopy.experiments.linear`` and docs/linear_model.md.

    python examples/linear_copying.py [--steps 1000] [--dims 2 8 32 128]   # about 2.5 minutes

Prints, per dimension, the final population Delta E and W2^2 / d to the teacher's law for: DMD2's
teacher initialisation with Adam at batch 256 and 4096, and a scratch initialisation.
"""

from __future__ import annotations

import argparse
import time

import torch

from dmdcopy.experiments.linear import linear_dmd, power_law_teacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 8, 32, 128])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    variants = [("teacher", 256), ("teacher", 4096), ("scratch", 256)]
    print(f"Adam lr {args.lr}, {args.steps} steps, exact fake score; population Delta E (W2^2/d)")
    print(f"{'d':>5}  " + "  ".join(f"{init + ' b' + str(b):>22}" for init, b in variants) + "   time")
    for d in args.dims:
        T = power_law_teacher(d, seed=args.seed)
        t0 = time.perf_counter()
        cells = []
        for init, batch in variants:
            run = linear_dmd(T, init=init, steps=args.steps, lr=args.lr, batch=batch,
                             record_every=args.steps, seed=args.seed)
            cells.append(f"{run.delta_e[-1]:>8.3f} ({run.w2[-1]:.1e})")
        print(f"{d:>5}  " + "  ".join(f"{c:>22}" for c in cells) + f"   {time.perf_counter() - t0:.0f} s",
              flush=True)


if __name__ == "__main__":
    main()
