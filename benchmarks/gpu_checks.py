"""Every GPU figure of issue 14 in one short run: lever correctness, DMD2 ImageNet-64 step speed,
FSDP2 on one GPU, the profiler summary, the teacher ODE and the Delta E pipeline.

    python benchmarks/gpu_checks.py --out gpu_checks.json            # one H100 / H200, ~8 min
    OMP_NUM_THREADS=1 python benchmarks/gpu_checks.py --smoke        # CPU, tiny sizes, seconds

Items run in order of priority and each is skipped (and says so) once ``--budget-s`` is spent, so
the run ends in time with what it has; the JSON is rewritten after every item, so a run cut short
still leaves its figures. Items:

1. ``correctness``: on a small UNet case, each lever against the float32 run: attention ``sdpa``
   vs ``exact`` (float32 and bf16 autocast differences), the loss curve (12 updates) of bf16
   autocast, the bf16 teacher, channels_last + fused AdamW, torch.compile (inductor; recompiles
   counted with dynamo's counters under ``error_on_recompile``) and FSDP2 on one process.
2. ``adm/<levers>``: EDM's ImageNet-64 ADM (296M parameters, random weights, dropout 0), DMD2's
   step (batch 40, 5 fake-score updates per generator update, AdamW + clipping + EMA, bf16
   autocast): steps/s of the plain reference loop of ``benchmarks/distill_step.py`` with the same
   levers and of the Distiller (alternating rounds), their ratio, generator samples/s, peak memory
   and the model FLOP utilisation (FLOPs of one baseline step from ``torch.utils.flop_counter``).
   Lever sets: baseline, all, all but compile, each lever alone, a larger batch, cudnn.benchmark,
   and all with ``compile_mode="reduce-overhead"`` (CUDA graphs).
3. ``fsdp_vs_ddp``: the Distiller with ``sharding="fsdp"`` on a one-process group against the same
   run without sharding (what DDP is on one GPU).
4. ``profile``: ``benchmarks/profile_step.py``'s summary of baseline and all-but-compile steps and
   the host syncs that ``torch.cuda.set_sync_debug_mode("warn")`` reports in one step.
5. ``teacher_ode`` and ``delta_e``: samples/s of the teacher ODE (Heun, 18 steps) in
   ``generate_pairs`` in float32 and bf16, and ``dmdcopy.delta_e`` end to end with its stage times
   (measured at ``--delta-e-n`` seeds, the metric also at N = 10000; extrapolated to N = 10000).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_step
from distill_step import _BF16_PEAK_TFLOPS, ReferenceLoop, _rate

from dmdcopy.distill import DistillConfig, Distiller
from dmdcopy.nets import DhariwalUNet, SongUNet, set_attention_impl
from dmdcopy.precond import EDMPrecond
from dmdcopy.students import OneStepStudent

FAKE_SCORE_STEPS = [5]  # DMD2's; --smoke sets 1
ALL = dict(attention="sdpa", channels_last=True, fused=True, teacher_bf16=True, compile=True)
NO_COMPILE = {**ALL, "compile": False}


class Run:
    """The run's clock, budget and results (written to JSON after every item)."""

    def __init__(self, args) -> None:
        self.args, self.t0, self.results = args, time.perf_counter(), {}
        self.device = torch.device(args.device)

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def item(self, name: str, fn, *, needs_s: float = 0.0) -> None:
        needs_s *= 0.05 if self.args.smoke else 1.0  # the estimates are a GPU's
        if self.left() < needs_s:
            left = self.left()
            self.results[name] = {"skipped": f"out of time ({left:.0f} s left, needs ~{needs_s:.0f} s)"}
        else:
            t = time.perf_counter()
            try:
                self.results[name] = fn()
            except Exception as e:  # one failing item must not cost the others
                self.results[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            if isinstance(self.results[name], dict):
                self.results[name]["item_s"] = round(time.perf_counter() - t, 1)
            _free(self.device)
        print(f"[{time.perf_counter() - self.t0:6.0f} s] {name}: {_short(self.results[name])}",
              file=sys.stderr, flush=True)
        self.write()

    def write(self) -> None:
        out = {"env": env(self.device), "args": vars(self.args), "results": self.results,
               "seconds": round(time.perf_counter() - self.t0, 1)}
        Path(self.args.out).write_text(json.dumps(out, indent=1, default=str))


def _short(r) -> str:
    text = json.dumps(r, default=str)
    return text if len(text) < 300 else text[:297] + "..."


def env(device: torch.device) -> dict:
    e = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
         "device": str(device), "cudnn_benchmark": torch.backends.cudnn.benchmark,
         "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
         "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    if device.type == "cuda":
        e.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                 memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    return e


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- networks and configurations ------------------------------------------------------------------


def build(kind: str, device: torch.device, attention: str = "exact"):
    """(teacher, student, fake score) on ``device``: ``"adm"`` EDM's ImageNet-64 ADM (DMD2's net),
    ``"small"`` a class-conditional ADM at 16x16, ``"tiny"`` (smoke) a SongUNet at 8x8."""
    torch.manual_seed(0)
    with torch.device(device):
        if kind == "adm":
            from dmdcopy.io.dmd2 import dmd2_imagenet64

            teacher = dmd2_imagenet64()
        elif kind == "small":
            teacher = EDMPrecond(DhariwalUNet(16, 3, 3, label_dim=10, model_channels=64, channel_mult=[1, 2],
                                              num_blocks=1, attn_resolutions=[16, 8], dropout=0.0))
        else:
            teacher = EDMPrecond(SongUNet(8, 3, 3, label_dim=4, model_channels=16, channel_mult=[1, 2],
                                          num_blocks=1, attn_resolutions=[4], dropout=0.0))
    if kind != "adm":  # EDM's init zeroes the output layers; give attention something to do
        g = torch.Generator(device=device).manual_seed(3)
        with torch.no_grad():
            for p in teacher.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g, device=device) / max(p[0].numel(), 1) ** 0.5)
    set_attention_impl(teacher, attention)
    teacher = teacher.eval().requires_grad_(False)
    student = OneStepStudent(copy.deepcopy(teacher).requires_grad_(True).train())
    fake = copy.deepcopy(teacher).requires_grad_(True).train()
    return teacher, student, fake


def config(levers: dict, batch: int, **kw) -> DistillConfig:
    kw.setdefault("fake_score_steps", FAKE_SCORE_STEPS[0])
    return DistillConfig(batch_size=batch, num_steps=10**9, progress_bar=False, log_every=10**8,
                         ema_halflife_steps=100.0, channels_last=bool(levers.get("channels_last")),
                         fused_optimizer=bool(levers.get("fused")), compile=bool(levers.get("compile")),
                         compile_mode=levers.get("compile_mode"),
                         teacher_dtype="bfloat16" if levers.get("teacher_bf16") else None,
                         sharding=levers.get("sharding", "ddp"), **kw)


class LeverLoop(ReferenceLoop):
    """distill_step's plain loop with the Distiller's levers: fused AdamW, channels_last, the
    teacher in bf16 under inference_mode, compiled training calls (sdpa is the networks' own)."""

    def __init__(self, teacher, student, fake, cfg: DistillConfig, device, levers: dict) -> None:
        super().__init__(teacher, student, fake, cfg, device)
        kw = dict(betas=cfg.betas, weight_decay=cfg.weight_decay, fused=bool(levers.get("fused")) or None)
        self.opt_g = torch.optim.AdamW(student.parameters(), lr=cfg.generator_lr, **kw)
        self.opt_f = torch.optim.AdamW(fake.parameters(), lr=cfg.fake_score_lr, **kw)
        if levers.get("channels_last"):
            for m in (student, fake, teacher):
                m.to(memory_format=torch.channels_last)
        self.teacher_bf16 = bool(levers.get("teacher_bf16"))
        if self.teacher_bf16:
            teacher.to(torch.bfloat16)
        compiled = functools.partial(torch.compile, mode=levers.get("compile_mode"))
        self.G_call = compiled(student) if levers.get("compile") else student
        self.F_call = compiled(fake) if levers.get("compile") else fake

    def _teacher(self, x, sigma, c):
        if not self.teacher_bf16:
            return self.T(x, sigma, **c)
        with torch.inference_mode():
            out = self.T(x, sigma, **c)
        return out.float().clone()


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# --- 1. correctness ------------------------------------------------------------------------------


def correctness(run: Run) -> dict:
    device, kind = run.device, ("tiny" if run.args.smoke else "small")
    out: dict = {}
    # attention: sdpa vs exact on one network, float32 and bf16 autocast
    teacher, _, _ = build(kind, device)
    b = 4
    x = torch.randn(b, *teacher.sample_shape, device=device)
    sigma, labels = torch.full((b,), 80.0, device=device), torch.arange(b, device=device) % teacher.label_dim
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda"
           else torch.autocast("cpu", dtype=torch.bfloat16))
    with torch.no_grad():
        ref = teacher(x, sigma, class_labels=labels)
        set_attention_impl(teacher, "sdpa")
        f32 = teacher(x, sigma, class_labels=labels)
        with amp:
            sdpa_bf16 = teacher(x, sigma, class_labels=labels).float()
            set_attention_impl(teacher, "exact")
            exact_bf16 = teacher(x, sigma, class_labels=labels).float()
    d = lambda a, c: float((a - c).abs().max())  # noqa: E731
    out["attention_max_abs_diff"] = {"output_scale": float(ref.abs().max()), "f32_sdpa_vs_exact": d(f32, ref),
                                     "bf16_exact_vs_f32": d(exact_bf16, ref),
                                     "bf16_sdpa_vs_f32": d(sdpa_bf16, ref),
                                     "bf16_sdpa_vs_bf16_exact": d(sdpa_bf16, exact_bf16)}
    scale = max(1.0, float(ref.abs().max()))
    out["attention_ok"] = out["attention_max_abs_diff"]["f32_sdpa_vs_exact"] < 1e-3 * scale

    steps = 2 if run.args.smoke else 4

    def curve(levers: dict, mixed: bool) -> torch.Tensor:
        t, s, f = build(kind, device, levers.get("attention", "exact"))
        cfg = config(levers, 8, generator_lr=1e-3, fake_score_lr=1e-3, fake_score_steps=2,
                     mixed_precision=mixed, autocast_on_cpu=mixed and device.type == "cpu")
        dist = Distiller(t, s, fake_score=f, config=cfg, device=device)
        vals = []
        for _ in range(steps):
            vals += [dist.fake_score_step(k).dsm_loss for k in range(cfg.fake_score_steps)]
            vals.append(dist.generator_step().dmd_loss)
            dist.counters.step += 1
        return torch.tensor(vals, dtype=torch.float64)

    ref_curve = curve({}, mixed=False)
    cases = {  # name: (levers, bf16 autocast, tolerance on the max relative difference)
        "bf16_autocast": ({}, True, 0.08),
        "bf16_autocast+teacher_bf16": ({"teacher_bf16": True}, True, 0.08),
        "sdpa_f32": ({"attention": "sdpa"}, False, 1e-3),
        "channels_last+fused_f32": ({"channels_last": True, "fused": True}, False, 1e-3),
        "all_but_compile_bf16": (NO_COMPILE, True, 0.08),
    }
    out["loss_curve_max_rel_diff"], out["loss_curve_ok"] = {}, {}
    for name, (levers, mixed, tol) in cases.items():
        try:
            rel = float(((curve(levers, mixed) - ref_curve).abs() / ref_curve.abs()).max())
            out["loss_curve_max_rel_diff"][name], out["loss_curve_ok"][name] = rel, rel < tol
        except Exception as e:
            out["loss_curve_max_rel_diff"][name] = f"{type(e).__name__}: {e}"[:500]
            out["loss_curve_ok"][name] = False
    # compile (float32): same curve, no recompiles after the first step
    torch._dynamo.reset()
    counters.clear()
    try:
        t, s, f = build(kind, device)
        cfg = config({"compile": True}, 8, generator_lr=1e-3, fake_score_lr=1e-3, fake_score_steps=2,
                     mixed_precision=False)
        dist = Distiller(t, s, fake_score=f, config=cfg, device=device)
        vals = []
        for step in range(steps):
            patch = torch._dynamo.config.patch(error_on_recompile=True) if step else contextlib.nullcontext()
            with patch:
                vals += [dist.fake_score_step(k).dsm_loss for k in range(2)]
                vals.append(dist.generator_step().dmd_loss)
            dist.counters.step += 1
            if step == 0:
                graphs = counters["stats"]["unique_graphs"]
        rel = float(((torch.tensor(vals, dtype=torch.float64) - ref_curve).abs() / ref_curve.abs()).max())
        last = counters["stats"]["unique_graphs"]
        out["compile"] = {"graphs_after_step_1": graphs, "graphs_after_last_step": last,
                          "recompiles": last - graphs, "max_rel_diff_f32": rel,
                          "ok": rel < 1e-3 and last == graphs}
    except Exception as e:
        out["compile"] = {"error": f"{type(e).__name__}: {e}"[:1000], "ok": False}
    torch._dynamo.reset()
    # FSDP2 on a one-process group (float32): the same curve
    with process_group(device):
        try:
            rel = float(((curve({"sharding": "fsdp"}, False) - ref_curve).abs() / ref_curve.abs()).max())
            out["fsdp_1proc_f32"] = {"max_rel_diff": rel, "ok": rel < 1e-3}
        except Exception as e:
            out["fsdp_1proc_f32"] = {"error": f"{type(e).__name__}: {e}"[:1000], "ok": False}
    return out


@contextlib.contextmanager
def process_group(device: torch.device):
    """A one-process default group (nccl on CUDA, gloo on CPU), destroyed afterwards."""
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


# --- 2. the ImageNet-64 step ----------------------------------------------------------------------


def adm(run: Run, levers: dict, *, batch: int | None = None, reference: bool = True,
        count_flops: bool = False, cudnn_benchmark: bool = False) -> dict:
    args, device = run.args, run.device
    batch = batch or args.batch
    kind = "tiny" if args.smoke else "adm"
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark  # a script may; the library never does
    try:
        teacher, student, fake = build(kind, device, levers.get("attention", "exact"))
        cfg = config(levers, batch)
        ref = None
        if reference:
            ref = LeverLoop(teacher, copy.deepcopy(student), copy.deepcopy(fake), cfg, device, levers)
        dist = Distiller(teacher, student, fake_score=fake, config=cfg, device=device)
        step = functools.partial(profile_step.distiller_step, dist)
        t = time.perf_counter()
        for fn in ([ref.step] if ref else []) + [step]:  # warm-up (compiles when compile is on)
            _rate(fn, args.warmup, device)
        out: dict = {"levers": levers, "batch": batch, "warmup_s": round(time.perf_counter() - t, 1)}
        ref_rates, dist_rates = [], []
        for _ in range(args.rounds):
            if ref:
                ref_rates.append(_rate(ref.step, args.steps, device))
            dist_rates.append(_rate(step, args.steps, device))
        r_dist = statistics.median(dist_rates)
        out.update(distiller_steps_per_s=r_dist, generator_samples_per_s=r_dist * batch,
                   samples_per_s_through_networks=r_dist * batch * (cfg.fake_score_steps + 1))
        if ref:
            ratios = sorted(d / r for d, r in zip(dist_rates, ref_rates))
            out.update(reference_steps_per_s=statistics.median(ref_rates),
                       ratio_median=statistics.median(ratios), ratio_range=[ratios[0], ratios[-1]])
            del ref
            _free(device)
        _reset_peak(device)
        step()
        _sync(device)
        out["peak_gib"] = _peak_gib(device)
        if count_flops:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                step()
            run.results.setdefault("flops_per_step", {})[str(batch)] = counter.get_total_flops()
        flops = run.results.get("flops_per_step", {}).get(str(batch))
        if flops:
            achieved = flops * r_dist / 1e12
            out.update(tflop_per_step=flops / 1e12, achieved_tflops=achieved)
            peak = args.peak_tflops or (next((v for k, v in _BF16_PEAK_TFLOPS.items()
                                              if k in torch.cuda.get_device_name(device)), None)
                                        if device.type == "cuda" else None)
            if peak:
                out.update(peak_tflops=peak, mfu=achieved / peak)
        return out
    finally:
        torch.backends.cudnn.benchmark = previous


def fsdp_vs_ddp(run: Run) -> dict:
    """The same levers (all but compile and channels_last, which FSDP2 refuses) with and without
    sharding, on a one-process group, alternating rounds."""
    args, device = run.args, run.device
    levers = {**NO_COMPILE, "channels_last": False}
    kind = "tiny" if args.smoke else "adm"
    with process_group(device):
        rates = {}
        for sharding in ("ddp", "fsdp"):
            t, s, f = build(kind, device, "sdpa")
            rates[sharding] = Distiller(t, s, fake_score=f, config=config({**levers, "sharding": sharding},
                                                                              args.batch), device=device)
        steps = {k: functools.partial(profile_step.distiller_step, d) for k, d in rates.items()}
        for fn in steps.values():
            _rate(fn, args.warmup, device)
        got = {k: [] for k in steps}
        for _ in range(args.rounds):
            for k, fn in steps.items():
                got[k].append(_rate(fn, args.steps, device))
        med = {k: statistics.median(v) for k, v in got.items()}
        out = {"levers": levers, "ddp_steps_per_s": med["ddp"], "fsdp_steps_per_s": med["fsdp"],
               "fsdp_over_ddp": med["fsdp"] / med["ddp"]}
        del rates, steps
    return out


def profile(run: Run) -> dict:
    args, device = run.args, run.device
    kind = "tiny" if args.smoke else "adm"
    out = {}
    for name, levers in (("baseline", {}), ("all_but_compile", NO_COMPILE)):
        t, s, f = build(kind, device, levers.get("attention", "exact"))
        d = Distiller(t, s, fake_score=f, config=config(levers, args.batch), device=device)
        r = profile_step.profile_distiller(d, steps=1, warmup=1)
        r["sync_warnings_in_one_step"] = profile_step.count_sync_warnings(
            functools.partial(profile_step.distiller_step, d), device)
        out[name] = r
        del d, t, s, f
        _free(device)
    return out


# --- 5. teacher ODE and the Delta E pipeline ------------------------------------------------------


def teacher_ode(run: Run) -> dict:
    from dmdcopy.pairs import generate_pairs

    args, device = run.args, run.device
    kind = "tiny" if args.smoke else "adm"
    out = {}
    for name, (n, bf16, attention) in {"float32": (args.ode_n_f32, False, "exact"),
                                       "bf16": (args.ode_n_bf16, True, "exact"),
                                       "bf16_sdpa": (args.ode_n_bf16, True, "sdpa")}.items():
        teacher, _, _ = build(kind, device, attention)
        teacher.net_dtype = torch.bfloat16 if bf16 else None  # EDM's use_fp16 way; the ODE stays float32
        with tempfile.TemporaryDirectory() as tmp:
            warm = min(n, 16)  # CUDA context, kernels: a short call (the timed one is what counts)
            generate_pairs(teacher, range(10**6, 10**6 + warm), tmp + "/warm", batch=warm, device=device)
            _sync(device)
            t = time.perf_counter()
            generate_pairs(teacher, range(n), tmp + "/pairs", batch=args.ode_batch, device=device)
            _sync(device)
            sec = time.perf_counter() - t
        out[name] = {"n": n, "seconds": sec, "samples_per_s": n / sec, "batch": args.ode_batch,
                     "extrapolated_s_for_10000": 10000 * sec / n}
        del teacher
        _free(device)
    return out


def delta_e_pipeline(run: Run) -> dict:
    """``dmdcopy.delta_e`` end to end (teacher pairs in bf16, one-step student, metric) at
    ``--delta-e-n`` seeds with its stage times, the metric alone at N = 10000 on synthetic pairs of
    the same shape, and the extrapolated total for N = 10000."""
    import dmdcopy
    from dmdcopy.metrics import pairing_inefficiency

    args, device = run.args, run.device
    kind = "tiny" if args.smoke else "adm"
    teacher, student, _ = build(kind, device, "sdpa")
    teacher.net_dtype = torch.bfloat16
    student.eval().requires_grad_(False)
    student.denoiser.net_dtype = torch.bfloat16
    n = args.delta_e_n
    _sync(device)
    t = time.perf_counter()
    report = dmdcopy.delta_e(teacher, student, range(n), batch=args.ode_batch, device=device, n_boot=200)
    total = time.perf_counter() - t
    stage_s = {k: round(float(v), 2) for k, v in report.time_s.items()}
    out = {"n": n, "total_s": total, "stage_s": stage_s,
           "delta_e": float(report.result.delta_e) if report.result is not None else None}
    del teacher, student
    _free(device)
    # the metric at N = 10000 (its cost grows as N^2, the assignment faster): a near-copy student
    m = 10000 if not args.smoke else 256
    shape = (m, 3, 64, 64) if not args.smoke else (m, 3, 8, 8)
    g = torch.Generator(device=device).manual_seed(0)
    tt = torch.randn(shape, generator=g, device=device)
    ss = tt + 0.5 * torch.randn(shape, generator=g, device=device)
    _sync(device)
    t = time.perf_counter()
    pairing_inefficiency(ss, tt, n_boot=200)
    out["metric_n"], out["metric_s"] = m, time.perf_counter() - t
    ode = run.results.get("teacher_ode", {}).get("bf16_sdpa", {})
    if ode.get("samples_per_s") and not args.smoke:
        student_s = stage_s.get("student", 0.0) * 10000 / n
        out["extrapolated_s_for_10000"] = {"pairs": 10000 / ode["samples_per_s"], "student": student_s,
                                           "metric": out["metric_s"]}
        out["extrapolated_s_for_10000"]["total"] = sum(out["extrapolated_s_for_10000"].values())
    return out


# --- the run ---------------------------------------------------------------------------------------


def summary(run: Run) -> str:
    r, e = run.results, env(run.device)
    lines = [f"gpu_checks: {e.get('gpu', e['device'])}, torch {e['torch']}, CUDA {e.get('cuda')}, "
             f"{run.args.budget_s:.0f} s budget, {time.perf_counter() - run.t0:.0f} s used"]
    for name, v in r.items():
        if not isinstance(v, dict):
            continue
        if "skipped" in v or "error" in v:
            lines.append(f"- {name}: {v.get('skipped') or v.get('error')}")
        elif name.startswith("adm/") or name == "adm":
            mfu = f", MFU {100 * v['mfu']:.1f} %" if "mfu" in v else ""
            ratio = f", Distiller / reference {v['ratio_median']:.3f}" if "ratio_median" in v else ""
            lines.append(f"- {name}: {v['generator_samples_per_s']:.1f} generator samples/s "
                         f"({v['distiller_steps_per_s']:.3f} steps/s){ratio}{mfu}, peak {v['peak_gib']} GiB, "
                         f"warm-up {v['warmup_s']} s")
        elif name == "correctness":
            lines.append(f"- correctness: attention {v['attention_ok']}, loss curves {v['loss_curve_ok']}, "
                         f"compile {v['compile'].get('ok')} (recompiles {v['compile'].get('recompiles')}), "
                         f"FSDP {v['fsdp_1proc_f32'].get('ok')}")
        elif name == "fsdp_vs_ddp":
            lines.append(f"- FSDP2 / DDP on one device: {v['fsdp_over_ddp']:.3f}")
        elif name == "profile":
            for k, p in v.items():
                if not isinstance(p, dict):
                    continue
                lines.append(f"- profile {k} (sync warnings in one step: {p['sync_warnings_in_one_step']}):")
                lines.append(p["table"])
        elif name == "teacher_ode":
            lines.append("- teacher ODE (Heun 18): " + ", ".join(
                f"{k} {p['samples_per_s']:.1f} samples/s" for k, p in v.items() if isinstance(p, dict)))
        elif name == "delta_e":
            ex = v.get("extrapolated_s_for_10000", {})
            lines.append(f"- Delta E pipeline N={v['n']}: {v['total_s']:.1f} s {v['stage_s']}; metric alone "
                         f"at N={v['metric_n']} {v['metric_s']:.1f} s; N=10000 extrapolated "
                         f"{ex.get('total', 0):.0f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny networks on the CPU, to check the script")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--out", default="gpu_checks.json")
    p.add_argument("--budget-s", type=float, default=None, help="default 450 (60 with --smoke)")
    p.add_argument("--batch", type=int, default=None, help="per-device batch (default 40; 4 with --smoke)")
    p.add_argument("--steps", type=int, default=1, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--ode-n-f32", type=int, default=None, help="teacher ODE seeds in float32 (default 128)")
    p.add_argument("--ode-n-bf16", type=int, default=None, help="teacher ODE seeds in bf16 (default 256)")
    p.add_argument("--ode-batch", type=int, default=None, help="teacher batch (default 128)")
    p.add_argument("--delta-e-n", type=int, default=None, help="seeds of the end-to-end run (default 512)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    small = args.smoke
    args.device = args.device or ("cpu" if small else "cuda")
    args.budget_s = args.budget_s or (60.0 if small else 450.0)
    args.batch = args.batch or (2 if small else 40)
    args.ode_n_f32 = args.ode_n_f32 or (4 if small else 128)
    args.ode_n_bf16 = args.ode_n_bf16 or (4 if small else 256)
    args.ode_batch = args.ode_batch or (4 if small else 128)
    args.delta_e_n = args.delta_e_n or (8 if small else 512)
    if small:
        args.rounds = min(args.rounds, 1)
        FAKE_SCORE_STEPS[0] = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cpu":
        # inductor's CPU compile takes minutes; dynamo's guards (recompiles) are the same with aot_eager
        torch.compile = functools.partial(torch.compile, backend="aot_eager")
    run = Run(args)
    run.item("correctness", lambda: correctness(run), needs_s=10)
    run.item("adm/baseline", lambda: adm(run, {}, count_flops=True), needs_s=20)
    run.item("adm/all", lambda: adm(run, ALL), needs_s=90)
    run.item("adm/all_but_compile", lambda: adm(run, NO_COMPILE), needs_s=20)
    run.item("teacher_ode", lambda: teacher_ode(run), needs_s=60)
    run.item("delta_e", lambda: delta_e_pipeline(run), needs_s=60)
    for name in ("attention", "channels_last", "fused", "teacher_bf16"):
        lever = {name: "sdpa" if name == "attention" else True}
        label = "sdpa" if name == "attention" else name
        run.item(f"adm/{label}", functools.partial(adm, run, lever), needs_s=20)
    run.item("fsdp_vs_ddp", lambda: fsdp_vs_ddp(run), needs_s=30)
    run.item("profile", lambda: profile(run), needs_s=20)
    run.item("adm/compile", lambda: adm(run, {"compile": True}), needs_s=60)
    run.item("adm/all_but_compile_batch80",
             lambda: adm(run, NO_COMPILE, batch=2 * args.batch, reference=False, count_flops=True),
             needs_s=25)
    run.item("adm/all_but_compile+cudnn_benchmark",
             lambda: adm(run, NO_COMPILE, cudnn_benchmark=True), needs_s=25)
    # CUDA graphs through torch.compile's "reduce-overhead" mode (last: the least certain to work)
    run.item("adm/all_reduce_overhead", lambda: adm(run, {**ALL, "compile_mode": "reduce-overhead"}),
             needs_s=90)
    text = summary(run)
    print(text)
    Path(args.out).with_suffix(".txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    sys.exit(main())
