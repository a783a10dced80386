"""``dmdcopy plot RUN_DIR``: the run's loss, gradient-norm and Delta E curves as PNGs."""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]


def register(subparsers) -> None:
    p = subparsers.add_parser("plot", help="PNG curves of a distillation run (from its log.jsonl)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory (holding log.jsonl) or the log file itself")
    p.add_argument("--out", default=None, help="directory for the PNGs (default: the run directory)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dmdcopy.viz import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(f"wrote {path}")
    return 0
