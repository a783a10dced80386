"""ImageNet-64 as in the paper: EDM's ADM teacher -> DMD2 one-step student -> Delta E. Needs a GPU.

Given an EDM network pickle (``edm-imagenet-64x64-cond-adm.pkl`` from NVlabs' EDM release, which
you download yourself), this script

1. converts it to ``teacher.safetensors`` (:func:`dmdcopy.io.convert`; the pickle is read by a
   restricted unpickler, nothing in it is executed) and loads the teacher;
2. builds DMD2's student ``G(z) = D_theta(80 z, 80)`` and fake score from the teacher's weights,
   with dropout 0 as DMD2 does, and distils with :class:`dmdcopy.distill.Distiller` under the
   ``[distill]`` settings (DMD2's defaults), checkpointing and resuming in ``out_dir``;
3. computes the teacher's ODE pairs for ``num_noises`` seeds (:func:`dmdcopy.pairs.generate_pairs`,
   resumable) and the student's Delta E on the same noises and labels, written to
   ``out_dir/delta_e.json``.

    python examples/imagenet64_edm.py --config examples/configs/imagenet64_edm.toml
    python examples/imagenet64_edm.py --edm-pickle my-snapshot.pkl --num-steps 20000

Multi-GPU: ``torchrun --nproc_per_node=8 examples/imagenet64_edm.py ...`` (the script starts the
process group from torchrun's variables; the distiller splits the global batch, the pair generation
splits the shards). It is not run in CI; the full recipe is days
of GPU time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dmdcopy.distill import DistillConfig, Distiller, process_group_from_env
from dmdcopy.io import build_module, convert, load, module_spec, save
from dmdcopy.metrics import pairing_inefficiency
from dmdcopy.pairs import generate_pairs
from dmdcopy.students import OneStepStudent

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def without_dropout(teacher: torch.nn.Module, dropout: float) -> torch.nn.Module:
    """A trainable copy of ``teacher`` whose UNet uses ``dropout`` (DMD2: 0)."""
    spec = module_spec(teacher)
    spec["children"]["model"]["kwargs"]["dropout"] = dropout
    copy = build_module(spec).to(next(teacher.parameters()).device)
    copy.load_state_dict(teacher.state_dict())
    return copy.train().requires_grad_(True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(Path(__file__).parent / "configs" / "imagenet64_edm.toml"))
    p.add_argument("--edm-pickle", help="override [teacher] edm_pickle")
    p.add_argument("--out", help="override [run] out_dir")
    p.add_argument("--device", help="override [run] device")
    p.add_argument("--num-steps", type=int, help="override [distill] num_steps")
    p.add_argument("--batch-size", type=int, help="override [distill] batch_size")
    p.add_argument("--num-noises", type=int, help="override [delta_e] num_noises")
    args = p.parse_args(argv)
    with open(args.config, "rb") as f:
        cfg = tomllib.load(f)
    run, dcfg, ecfg = cfg["run"], dict(cfg["distill"]), cfg["delta_e"]
    pickle_path = Path(args.edm_pickle or cfg["teacher"]["edm_pickle"])
    out = Path(args.out or run["out_dir"])
    device = torch.device(args.device or run["device"])
    if args.num_steps is not None:
        dcfg["num_steps"] = args.num_steps
    if args.batch_size is not None:
        dcfg["batch_size"] = args.batch_size
    num_noises = args.num_noises or ecfg["num_noises"]
    config = DistillConfig(**dcfg)
    out.mkdir(parents=True, exist_ok=True)

    # 1. Teacher: convert once, then load the safetensors (fast, no pickle involved).
    teacher_file = out / "teacher.safetensors"
    if not teacher_file.exists():
        convert(pickle_path, teacher_file, key=cfg["teacher"].get("key", "ema"))
    teacher = load(teacher_file, map_location=device)
    n_params = sum(p.numel() for p in teacher.parameters()) / 1e6
    print(
        f"teacher: {type(teacher).__name__}({type(teacher.model).__name__}), {n_params:.1f}M parameters, "
        f"label_dim={teacher.label_dim}, sample_shape={teacher.sample_shape}"
    )

    # 2. DMD2: student and fake score start from the teacher's weights.
    dropout = float(run.get("student_dropout", 0.0))
    student = OneStepStudent(without_dropout(teacher, dropout), sigma_max=config.sigma_max)
    fake_score = without_dropout(teacher, dropout)
    distiller = Distiller(teacher, student, fake_score=fake_score, config=config, out_dir=out, device=device)
    distiller.train(resume="latest" if run.get("resume", True) else None)
    final = distiller.ema_student or student
    if distiller.is_main:
        save(final, out / "student.safetensors", metadata={"num_steps": config.num_steps})

    # 3. Delta E on shared noises and labels.
    store = generate_pairs(
        teacher, range(num_noises), out / "teacher_pairs", batch=ecfg["ode_batch"], device=device
    )
    if not distiller.is_main:
        return
    _, x_teacher, labels = store.load(device=device)
    z = store.load_noise(device=device)
    final = final.eval()
    b = ecfg["student_batch"]
    with torch.no_grad():
        x_student = torch.cat(
            [final(z[i : i + b], None if labels is None else labels[i : i + b]) for i in range(0, len(z), b)]
        )
    r = pairing_inefficiency(x_student, x_teacher, block_size=ecfg["block_size"], n_boot=ecfg["n_boot"])
    result = dict(
        delta_e=r.delta_e,
        ci_low=r.ci_low,
        ci_high=r.ci_high,
        n=len(z),
        block_size=ecfg["block_size"],
        resolution=r.resolution,
        num_steps=config.num_steps,
        teacher=str(pickle_path),
    )
    (out / "delta_e.json").write_text(json.dumps(result, indent=2))
    print(
        f"Delta E = {r.delta_e:.4f} [{r.ci_low:.4f}, {r.ci_high:.4f}] (N = {len(z)}, "
        f"resolution {r.resolution:.3f}) -> {out / 'delta_e.json'}"
    )


if __name__ == "__main__":
    with process_group_from_env():  # a no-op in one process; under torchrun, one group for all ranks
        main()
