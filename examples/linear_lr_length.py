"""The solvable model of copying against learning rate, training length and seed.

Linear one-step students ``G(z) = A z`` of a power-law Gaussian teacher, DMD2's initialisation
(the teacher's pairing, population Delta E 0), Adam, batch 256, exact fake score. Every figure is
the closed-form *population* Delta E (no finite-N bias; see docs/linear_model.md), recorded along
training, for several seeds; the table gives the mean over seeds and the range.

    python examples/linear_lr_length.py --threads 1 --out linear_lr_length.json   # about 4 minutes

``--dims``, ``--lrs``, ``--seeds``, ``--steps`` and ``--record`` (the steps to report) change the grid.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dmdcopy.experiments.linear import linear_dmd, power_law_teacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--record", type=int, nargs="+", default=[250, 1000, 4000])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write every trajectory as JSON here")
    args = p.parse_args()
    if any(r % 50 or r > args.steps for r in args.record):
        p.error("--record steps must be multiples of 50 and at most --steps")
    torch.set_num_threads(args.threads)

    rows = []
    print(f"Adam, batch {args.batch}, exact fake score, teacher init; population Delta E: "
          f"mean over seeds {args.seeds} [min, max]  (W2^2/d at the end, worst seed)")
    print(f"{'d':>4} {'lr':>7}  " + "  ".join(f"{'step ' + str(r):>22}" for r in args.record) + "  W2^2/d")
    for d in args.dims:
        for lr in args.lrs:
            t0 = time.perf_counter()
            runs = []
            for seed in args.seeds:
                run = linear_dmd(power_law_teacher(d, seed=seed), init="teacher", steps=args.steps, lr=lr,
                                 batch=args.batch, record_every=50, seed=seed)
                runs.append(dict(seed=seed, steps=list(run.steps), delta_e=list(run.delta_e),
                                 w2=list(run.w2)))
            cells = []
            for r in args.record:
                values = [run["delta_e"][run["steps"].index(r)] for run in runs]
                cells.append(f"{statistics.fmean(values):.3f} [{min(values):.3f}, {max(values):.3f}]")
            worst = max(run["w2"][-1] for run in runs)
            print(f"{d:>4} {lr:>7.0e}  " + "  ".join(f"{c:>22}" for c in cells)
                  + f"  {worst:.1e}   ({time.perf_counter() - t0:.0f} s)", flush=True)
            rows.append(dict(d=d, lr=lr, batch=args.batch, runs=runs))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(command=vars(args), rows=rows), f)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
