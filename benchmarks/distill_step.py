"""Distiller overhead: steps/s of ``Distiller`` vs a plain DMD loop with the same networks and math.

One step = ``fake_score_steps`` fake-score updates + 1 generator update, AdamW with grad-norm
clipping on both, EMA of the student. The reference loop below is what one would write by hand:
``torch.randn`` from one generator, no per-sample seeding, no finiteness checks, no records. The
ratio ``steps/s(Distiller) / steps/s(reference)`` is the price of the Distiller's guarantees
(per-sample counter-based randomness, skip-on-NaN, typed metrics). Target: >= 0.95 on CPU.

    OMP_NUM_THREADS=1 python benchmarks/distill_step.py --append docs/performance.md
    OMP_NUM_THREADS=1 python benchmarks/distill_step.py --net unet   # a small SongUNet, 16x16
    python benchmarks/distill_step.py --net imagenet64 --device cuda --batch 40 --steps 5 --rounds 5

On CUDA (``--device cuda``) the Distiller runs under bf16 autocast; the reference loop does too.
``--net imagenet64`` is EDM's class-conditional ImageNet-64 ADM network (296M parameters, dropout 0
as DMD2's students, random weights; 40 samples per GPU is DMD2's per-GPU batch). On CUDA the script
also reports the Distiller's generator samples/s, its peak memory (reference loop freed first) and
its model FLOP utilisation: FLOPs of one step counted by ``torch.utils.flop_counter`` (matmuls,
convolutions, attention; forward and backward) times steps/s over the GPU's dense bf16 peak
(``--peak-tflops``; H100 / H200 SXM: 989).
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import platform
import statistics
import time

import profile_step  # this folder: the networks and the one training step a profile and a rate take
import torch

from dmdcopy.distill import DistillConfig, Distiller
from dmdcopy.losses import dmd_direction, dmd_surrogate_loss, dsm_loss
from dmdcopy.schedules import dmd_sigma_grid


class ReferenceLoop:
    """A hand-written DMD2 loop: the same update rule as the Distiller, nothing else."""

    def __init__(self, teacher, student, fake, cfg: DistillConfig, device: torch.device):
        self.T, self.G, self.F, self.cfg, self.device = teacher, student, fake, cfg, device
        kw = dict(betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.opt_g = torch.optim.AdamW(student.parameters(), lr=cfg.generator_lr, **kw)
        self.opt_f = torch.optim.AdamW(fake.parameters(), lr=cfg.fake_score_lr, **kw)
        self.ema = copy.deepcopy(student).eval().requires_grad_(False)
        self.beta = 0.5 ** (1 / cfg.ema_halflife_steps)
        self.grid = dmd_sigma_grid(cfg.num_sigmas, cfg.sigma_min, cfg.sigma_max, cfg.rho,
                                   device=device, dtype=torch.float64)
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.shape = (cfg.batch_size, *teacher.sample_shape)
        self.label_dim = int(getattr(teacher, "label_dim", 0))
        # the training calls (a subclass may compile them); updates and clipping use G and F
        self.G_call, self.F_call = student, fake

    def _teacher(self, x, sigma, c):
        return self.T(x, sigma, **c)

    def _labels(self) -> dict:
        """``class_labels=`` drawn uniformly for a conditional teacher, else nothing."""
        if not self.label_dim:
            return {}
        return {"class_labels": torch.randint(self.label_dim, (self.shape[0],), generator=self.gen,
                                              device=self.device)}

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def _sigma(self, lo: int, hi: int) -> torch.Tensor:
        k = torch.randint(lo, hi + 1, (self.shape[0],), generator=self.gen, device=self.device)
        return self.grid[k].float()

    def _view(self, s):
        return s.view(-1, *([1] * (len(self.shape) - 1)))

    def step(self) -> None:
        cfg = self.cfg
        for _ in range(cfg.fake_score_steps):
            z, c = torch.randn(self.shape, generator=self.gen, device=self.device), self._labels()
            with torch.no_grad(), self._autocast():
                x = self.G(z, **c).float()
            sigma = self._sigma(*cfg.fake_score_k_range)
            x_t = x + self._view(sigma) * torch.randn(self.shape, generator=self.gen, device=self.device)
            self.opt_f.zero_grad(set_to_none=True)
            with self._autocast():
                loss = dsm_loss(self.F_call(x_t, sigma, **c), x, sigma, sigma_data=cfg.sigma_data).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.F.parameters(), cfg.grad_clip)
            self.opt_f.step()
        z, c = torch.randn(self.shape, generator=self.gen, device=self.device), self._labels()
        self.opt_g.zero_grad(set_to_none=True)
        with self._autocast():
            x = self.G_call(z, **c).float()
        sigma = self._sigma(*cfg.generator_k_range)
        x_t = x.detach() + self._view(sigma) * torch.randn(self.shape, generator=self.gen, device=self.device)
        with torch.no_grad(), self._autocast():
            g = dmd_direction(x, self._teacher(x_t, sigma, c), self.F(x_t, sigma, **c))
        dmd_surrogate_loss(x, g).mean().backward()
        torch.nn.utils.clip_grad_norm_(self.G.parameters(), cfg.grad_clip)
        self.opt_g.step()
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), self.G.parameters()):
                pe.lerp_(p, 1 - self.beta)


def _rate(step, n: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


_BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM parts


def cuda_figures(step, args, cfg: DistillConfig, device: torch.device) -> list[str]:
    """Samples/s, peak memory and model FLOP utilisation of the Distiller's step on a GPU."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    torch.cuda.reset_peak_memory_stats(device)
    rate = _rate(step, args.steps, device)
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    name = torch.cuda.get_device_name(device)
    peak = args.peak_tflops or next((v for k, v in _BF16_PEAK_TFLOPS.items() if k in name), None)
    achieved = flops * rate / 1e12
    mfu = f"{100 * achieved / peak:.1f} % of {peak:g} TFLOP/s" if peak else "unknown peak (--peak-tflops)"
    return [
        f"- GPU: {name}; Distiller alone: {rate:.3f} steps/s = {rate * cfg.batch_size:.1f} generator "
        f"samples/s ({rate * cfg.batch_size * (cfg.fake_score_steps + 1):.1f} samples/s through "
        "student + fake score)",
        f"- peak memory {peak_gib:.1f} GiB (torch.cuda.max_memory_allocated); {flops / 1e12:.2f} TFLOP per "
        f"step (flop_counter), {achieved:.1f} TFLOP/s achieved: MFU {mfu}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", choices=("mlp", "unet", "imagenet64"), default="mlp")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds (median reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak of the GPU for the MFU figure (default: known GPUs)")
    parser.add_argument("--append", metavar="MD", help="append the result as a section of this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    cfg = DistillConfig(batch_size=args.batch, num_steps=10**9, progress_bar=False, log_every=10**8,
                        ema_halflife_steps=100.0)
    teacher, student, fake = profile_step.make_nets(args.net, device)
    ref = ReferenceLoop(teacher, copy.deepcopy(student), copy.deepcopy(fake), cfg, device)
    dist = Distiller(teacher, student, fake_score=fake, config=cfg, device=device)

    distiller_step = functools.partial(profile_step.distiller_step, dist)  # one step, as train() takes it

    for fn in (ref.step, distiller_step):  # warm-up
        _rate(fn, 2, device)
    ref_rates, dist_rates = [], []
    for _ in range(args.rounds):  # alternate so drifting machine load hits both alike
        ref_rates.append(_rate(ref.step, args.steps, device))
        dist_rates.append(_rate(distiller_step, args.steps, device))
    r_ref, r_dist = statistics.median(ref_rates), statistics.median(dist_rates)
    ratios = sorted(d / r for d, r in zip(dist_rates, ref_rates))
    lines = [
        f"- net: {args.net}, batch {args.batch}, {cfg.fake_score_steps} fake-score updates per step, "
        f"device {device}, threads {args.threads}, torch {torch.__version__}, {platform.machine()}",
        f"- reference loop: {r_ref:.2f} steps/s; Distiller: {r_dist:.2f} steps/s",
        f"- ratio Distiller / reference: median {statistics.median(ratios):.3f} "
        f"(per-round range {ratios[0]:.3f} - {ratios[-1]:.3f}, {args.rounds} rounds of {args.steps} steps)",
    ]
    if device.type == "cuda":
        del ref  # the Distiller's own memory and FLOPs only from here on
        torch.cuda.empty_cache()
        lines += cuda_figures(distiller_step, args, cfg, device)
    print("\n".join(lines))
    if args.append:
        with open(args.append, "a") as f:
            threads = os.environ.get("OMP_NUM_THREADS", "?")
            f.write(f"\n## Distiller step overhead ({args.net})\n\n"
                    f"`OMP_NUM_THREADS={threads} python benchmarks/distill_step.py --net {args.net} "
                    f"--batch {args.batch}`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
