"""Benchmark the EDM-compatible UNets behind ``EDMPrecond``: forward, and forward + backward.

Usage (one thread, as recorded in docs/performance.md)::

    OMP_NUM_THREADS=1 python benchmarks/unet.py           # small configurations (~10 s)
    OMP_NUM_THREADS=1 python benchmarks/unet.py --full    # + EDM's ImageNet-64 ADM at batch 1 (~1 min)

Forward runs in eval mode without gradients; forward + backward in training mode (dropout 0) on
the loss ``mean(D(x, sigma)^2)``. Each figure is the mean of ``--reps`` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import time

import torch

from dmdcopy.nets import DhariwalUNet, SongUNet
from dmdcopy.precond import EDMPrecond

SMALL = [
    ("SongUNet DDPM++ 16x16, mc 32, mult [1,2], 1 block, attn 8", 16, SongUNet, dict(
        img_resolution=16, in_channels=3, out_channels=3, model_channels=32, channel_mult=[1, 2],
        num_blocks=1, attn_resolutions=[8], dropout=0.0)),
    ("SongUNet NCSN++ 16x16, same sizes", 16, SongUNet, dict(
        img_resolution=16, in_channels=3, out_channels=3, model_channels=32, channel_mult=[1, 2],
        num_blocks=1, attn_resolutions=[8], dropout=0.0, embedding_type="fourier",
        channel_mult_noise=2, encoder_type="residual", resample_filter=[1, 3, 3, 1])),
    ("DhariwalUNet 32x32, mc 64, mult [1,2,2], 2 blocks, attn 16,8, label_dim 10", 8, DhariwalUNet, dict(
        img_resolution=32, in_channels=3, out_channels=3, label_dim=10, model_channels=64,
        channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[16, 8], dropout=0.0)),
]
FULL = [
    ("DhariwalUNet, EDM ImageNet-64 ADM (mc 192, [1,2,3,4], 3 blocks, attn 32,16,8, 1000 classes)", 1,
     DhariwalUNet, dict(
         img_resolution=64, in_channels=3, out_channels=3, label_dim=1000, model_channels=192,
         channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.0)),
]


def bench(net: torch.nn.Module, batch: int, reps: int) -> tuple[float, float]:
    """Seconds per forward (no grad) and per forward + backward."""
    D = EDMPrecond(net)
    x = torch.randn(batch, *net.sample_shape)
    sigma = torch.rand(batch) + 0.1
    labels = torch.randint(0, net.label_dim, (batch,)) if net.label_dim else None
    D.eval()
    with torch.no_grad():
        D(x, sigma, labels)
        start = time.perf_counter()
        for _ in range(reps):
            D(x, sigma, labels)
        forward = (time.perf_counter() - start) / reps
    D.train()
    D(x, sigma, labels).square().mean().backward()
    start = time.perf_counter()
    for _ in range(reps):
        D(x, sigma, labels).square().mean().backward()
    return forward, (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also time EDM's ImageNet-64 ADM (296M params)")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print("| network | parameters | batch | forward | forward + backward |")
    print("|---|---|---|---|---|")
    for name, batch, cls, options in SMALL + (FULL if args.full else []):
        net = cls(**options)
        reps = 1 if options["img_resolution"] >= 64 else args.reps
        fwd, fwd_bwd = bench(net, batch, reps)
        n_params = sum(p.numel() for p in net.parameters()) / 1e6
        print(f"| {name} | {n_params:.2f}M | {batch} | {fwd * 1e3:.0f} ms | {fwd_bwd * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
