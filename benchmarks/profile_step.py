"""Where a Distiller step spends its time: ``torch.profiler`` over a few steps, summarised by kind.

Every operator's *self* time (on CUDA: the self time of the GPU kernels it launched; on CPU: its
own CPU time) goes to one category, so the categories add up to the profiled total:

    convolution | attention/matmul | normalisation | optimiser | EMA | communication |
    data movement | other

``optimiser`` and ``EMA`` are the operators run inside the optimisers' ``step`` and the gradient
clipping, and inside the EMA update (the script wraps them in ``record_function`` scopes, so the
library code carries no profiling hooks); the rest go by operator name. On CUDA the script also
runs the step once with ``torch.cuda.set_sync_debug_mode("warn")`` and counts the host syncs it
reports (each stalls the CPU until the GPU catches up).

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --net unet --batch 8 --steps 2
    python benchmarks/profile_step.py --net imagenet64 --device cuda --batch 40 --steps 2

Also used by ``benchmarks/gpu_checks.py`` (the one GPU run of issue 14).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function

CATEGORIES = ("convolution", "attention/matmul", "normalisation", "optimiser", "EMA", "communication",
              "data movement", "other")
_SCOPES = {"dmdcopy::optimiser": "optimiser", "dmdcopy::ema": "EMA"}
# (category, pattern of operator / kernel names), first match wins
_RULES = [
    ("communication", r"nccl|gloo|c10d::|record_param_comms|all_gather|allgather|reduce_scatter|"
                      r"all_reduce|allreduce"),
    ("attention/matmul", r"scaled_dot_product|flash|efficient_attention|attention|softmax|einsum|bmm|"
                         r"\bmm\b|aten::mm|addmm|matmul|linear|gemm|cutlass|sm90_xmma|ampere_.*gemm"),
    ("convolution", r"conv|cudnn|implicit_gemm|winograd|xmma_fprop|xmma_dgrad|xmma_wgrad|mkldnn"),
    ("normalisation", r"norm"),
    ("data movement", r"copy|_to_copy|aten::to\b|contiguous|clone|\bcat\b|aten::cat|stack|index|gather|"
                      r"scatter|memcpy|memset|Memcpy|Memset|fill_|zero_|pad|tile|repeat|expand|permute|"
                      r"transpose|reshape|view"),
]
_COMPILED = [(cat, re.compile(pattern)) for cat, pattern in _RULES]


def categorise(name: str) -> str:
    """The category of an operator or kernel name (scopes aside)."""
    for cat, pattern in _COMPILED:
        if pattern.search(name):
            return cat
    return "other"


def _scope_of(event) -> str | None:
    e = event
    while e is not None:
        if e.name in _SCOPES:
            return _SCOPES[e.name]
        e = e.cpu_parent
    return None


def summarise(events: Iterable, *, device_time: bool) -> dict[str, float]:
    """Seconds of self time per category (every category present; they add up to the total)."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for e in events:
        us = e.self_device_time_total if device_time else e.self_cpu_time_total
        if us <= 0:
            continue
        scope = _scope_of(e)
        if scope is not None:
            out[scope] += us / 1e6
            continue
        if device_time and e.kernels:  # on CUDA the kernels say more than the launching op
            for k in e.kernels:
                out[categorise(f"{e.name} {k.name}")] += k.duration / 1e6
            continue
        out[categorise(e.name)] += us / 1e6
    return out


def table(summary: dict[str, float], *, wall_s: float, steps: int, what: str) -> str:
    """A small markdown table: ms per step and share of the profiled total for each category."""
    total = max(sum(summary.values()), 1e-12)
    rows = [f"| category | ms / step | share of {what} |", "|---|---|---|"]
    for cat in CATEGORIES:
        rows.append(f"| {cat} | {1e3 * summary[cat] / steps:.1f} | {100 * summary[cat] / total:.1f} % |")
    rows.append(f"| total ({what}) | {1e3 * total / steps:.1f} | 100 % |")
    busy = 100 * total / max(wall_s, 1e-12)
    rows.append(f"| wall time | {1e3 * wall_s / steps:.1f} | ({busy:.0f} % busy) |")
    return "\n".join(rows)


@contextlib.contextmanager
def scopes(distiller) -> Iterator[None]:
    """Wrap the distiller's optimiser steps, gradient clipping and EMA update in named
    ``record_function`` scopes for the duration (instance attributes; nothing else changes)."""
    wrapped = []

    def wrap(obj, attr: str, scope: str):
        fn = getattr(obj, attr)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            with record_function(scope):
                return fn(*args, **kwargs)

        setattr(obj, attr, run)
        wrapped.append((obj, attr))

    for opt in (distiller.generator_optimizer, distiller.fake_score_optimizer):
        wrap(opt, "step", "dmdcopy::optimiser")
    wrap(distiller, "_clip_and_check", "dmdcopy::optimiser")
    if distiller._ema is not None:
        wrap(distiller._ema, "update", "dmdcopy::ema")
    try:
        yield
    finally:
        for obj, attr in wrapped:
            delattr(obj, attr)  # back to the class's method


def make_nets(kind: str, device: torch.device):
    """Teacher, student and fake score of the benchmark step (seeded): ``mlp``, ``unet`` (a small
    SongUNet) or ``imagenet64`` (EDM's ADM as DMD2 distils it)."""
    import copy

    from dmdcopy.precond import EDMPrecond
    from dmdcopy.students import OneStepStudent

    torch.manual_seed(0)
    if kind == "mlp":
        from dmdcopy.nets import MLP

        teacher = EDMPrecond(MLP(2, hidden=256, depth=3))
    elif kind == "imagenet64":
        from dmdcopy.io.dmd2 import dmd2_imagenet64

        teacher = dmd2_imagenet64()  # EDM's ImageNet-64 ADM as DMD2 distils it (dropout 0)
    else:
        from dmdcopy.nets.unet import SongUNet

        teacher = EDMPrecond(SongUNet(16, 3, 3, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                                      attn_resolutions=(), dropout=0.0), sample_shape=(3, 16, 16))
    teacher = teacher.to(device).eval().requires_grad_(False)
    student = OneStepStudent(copy.deepcopy(teacher).requires_grad_(True).train())
    fake = copy.deepcopy(teacher).requires_grad_(True).train()
    return teacher, student, fake


def distiller_step(distiller) -> None:
    """One training step of ``distiller`` (F fake-score updates, one generator update)."""
    for s in range(distiller.config.fake_score_steps):
        distiller.fake_score_step(s)
    distiller.generator_step()
    distiller.counters.step += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_distiller(distiller, *, steps: int = 2, warmup: int = 1) -> dict:
    """Profile ``steps`` steps of ``distiller`` (after ``warmup``); return the summary, the wall
    time, the table and the number of ``aten::_local_scalar_dense`` calls (scalar reads; only those
    of CUDA tensors sync the host, e.g. AdamW's step counts live on the CPU:
    :func:`count_sync_warnings` counts the real syncs)."""
    device = distiller.device
    for _ in range(warmup):
        distiller_step(distiller)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with scopes(distiller), profile(activities=activities) as prof:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            distiller_step(distiller)
        _sync(device)
        wall = time.perf_counter() - t0
    events = prof.events()
    summary = summarise(events, device_time=cuda)
    what = "GPU kernel time" if cuda else "CPU operator time"
    return {
        "seconds": summary, "wall_s": wall, "steps": steps, "device_time": cuda,
        "scalar_reads": sum(1 for e in events if e.name == "aten::_local_scalar_dense"),
        "table": table(summary, wall_s=wall, steps=steps, what=what),
    }


def count_sync_warnings(step: Callable[[], None], device: torch.device) -> int | None:
    """Run ``step`` once under ``torch.cuda.set_sync_debug_mode("warn")`` and count the
    synchronising calls it reports (``None`` off CUDA). The mode is put back afterwards."""
    if device.type != "cuda":
        return None
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.synchronize(device)  # (the explicit sync here is not reported)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum(1 for w in caught if "synchroniz" in str(w.message))


def main() -> None:
    from dmdcopy.distill import DistillConfig, Distiller

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", choices=("mlp", "unet", "imagenet64"), default="unet")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    teacher, student, fake = make_nets(args.net, device)
    cfg = DistillConfig(batch_size=args.batch, num_steps=10**9, progress_bar=False, log_every=10**8,
                        ema_halflife_steps=100.0)
    d = Distiller(teacher, student, fake_score=fake, config=cfg, device=device)
    result = profile_distiller(d, steps=args.steps)
    syncs = count_sync_warnings(lambda: distiller_step(d), device)
    print(f"net {args.net}, batch {args.batch}, device {device}, torch {torch.__version__}, "
          f"{args.steps} steps profiled")
    print(result["table"])
    reads = result["scalar_reads"] / args.steps
    print(f"scalar reads (aten::_local_scalar_dense, most on CPU tensors: no sync): {reads:.0f} per step"
          + (f"; CUDA sync warnings in one step: {syncs}" if syncs is not None else ""))


if __name__ == "__main__":
    main()
