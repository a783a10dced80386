"""FSDP2 (sharding="fsdp") with two gloo processes: the run equals one process, a resume on the same
process count is bit for bit the uninterrupted run, and the sharded student exports as one file."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _dist import in_gloo_group

from dmdcopy.distill import DistillConfig, Distiller
from dmdcopy.errors import ConfigError
from dmdcopy.nets import SongUNet
from dmdcopy.precond import EDMPrecond
from dmdcopy.students import OneStepStudent

pytest.importorskip("torch.distributed.fsdp")

UNET = dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[4], dropout=0.0)


def _setup(out_dir=None, sharding="fsdp", num_steps=4):
    torch.manual_seed(0)
    teacher = EDMPrecond(SongUNet(**UNET))
    student = OneStepStudent(EDMPrecond(SongUNet(**UNET)))
    student.load_state_dict({f"denoiser.{k}": v for k, v in teacher.state_dict().items()})
    cfg = DistillConfig(batch_size=4, num_steps=num_steps, generator_lr=1e-3, fake_score_lr=1e-3,
                        fake_score_steps=2, ema_halflife_steps=2.0, progress_bar=False, log_every=100,
                        checkpoint_every=2, sharding=sharding)
    return Distiller(teacher, student.requires_grad_(True), config=cfg, out_dir=out_dir)


def _state(d):
    tensors, _ = d.state_tensors()  # every process gathers; all get the full tensors
    return {k: v for k, v in tensors.items() if not k.startswith("rng/")}


def _worker(rank, out):
    from torch.distributed.tensor import DTensor

    d = _setup(os.path.join(out, "a") if rank == 0 else None)
    assert isinstance(next(d.student.parameters()), DTensor)
    d.train()
    full = _state(d)
    students = d.unsharded_students()

    def stop_at_3(distiller, step):  # after the checkpoint of step 2
        if step == 3:
            raise KeyboardInterrupt

    b = os.path.join(out, "b")
    first = _setup(b if rank == 0 else None)
    first.callbacks.append(stop_at_3)
    try:
        first.train()
    except KeyboardInterrupt:
        pass
    dist.barrier()
    resumed = _setup(b)  # every rank reads rank 0's checkpoint (only rank 0 writes)
    resumed.train(resume="latest")
    again = _state(resumed)
    if rank == 0:
        torch.save(full, os.path.join(out, "full.pt"))
        torch.save(again, os.path.join(out, "resumed.pt"))
        from dmdcopy.io import save

        save(students["student_ema"], os.path.join(out, "student_ema.safetensors"))
    else:
        assert students == {"student": None, "student_ema": None}


@pytest.mark.slow  # two spawned processes, three runs each (~17 s)
def test_fsdp_two_processes_match_one_resume_bit_for_bit_and_export(tmp_path):
    out = tmp_path / "fsdp"
    out.mkdir()
    mp.spawn(in_gloo_group, args=(2, f"file://{tmp_path / 'rendezvous'}", _worker, str(out)), nprocs=2)
    full = torch.load(out / "full.pt", weights_only=True)
    resumed = torch.load(out / "resumed.pt", weights_only=True)
    assert full.keys() == resumed.keys()
    for k in full:  # same process count: the resumed run is the uninterrupted one, bit for bit
        assert torch.equal(full[k], resumed[k]), k
    single = _state(_setup(tmp_path / "single", sharding="ddp").train())
    assert full.keys() == single.keys()
    for k in single:  # two sharded processes = one process up to float summation order
        # (AdamW divides by sqrt(v): where a gradient is near 0 its summation order moves a weight by
        # up to ~lr per update; 8 updates at lr 1e-3 moved none by more than 2.5e-5 here)
        torch.testing.assert_close(full[k], single[k], rtol=1e-4, atol=1e-4, msg=k)
    # AdamW hides a gradient's scale; the logged global grad norms (gathered over the shards) do not
    logged, alone = (json.loads((d / "log.jsonl").read_text().splitlines()[-1])
                     for d in (out / "a", tmp_path / "single"))
    for key in ("generator_grad_norm", "fake_score_grad_norm", "generator_loss", "fake_score_loss"):
        assert logged[key] == pytest.approx(alone[key], rel=1e-3), key
    # the gathered EMA student is one ordinary safetensors file that dmdcopy.io.load rebuilds
    from dmdcopy.io import load

    ema = load(out / "student_ema.safetensors")
    for k, v in ema.state_dict().items():
        assert torch.equal(v, full[f"ema/{k}"]), k
    assert sorted(p.name for p in (out / "a").iterdir()) == ["checkpoint-000000002.safetensors",
                                                             "checkpoint-000000004.safetensors",
                                                             "log.jsonl"]


def test_fsdp_without_a_process_group_is_a_config_error():
    with pytest.raises(ConfigError, match=r"sharding=.fsdp. needs torch\.distributed"):
        _setup(sharding="fsdp")


def test_cli_under_torchrun_with_fsdp_exports_files_delta_e_reads(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists():
        pytest.skip("no torchrun")
    toml = (root / "examples" / "configs" / "gmm2d.toml").read_text()
    toml = (toml.replace('out_dir = "runs/gmm2d"', f'out_dir = "{tmp_path / "out"}"')
            .replace("num_steps = 600", "num_steps = 2").replace("hidden = 128", "hidden = 16")
            .replace("checkpoint_every = 200",
                     'checkpoint_every = 200\nsharding = "fsdp"\nprogress_bar = false'))
    (tmp_path / "run.toml").write_text(toml)
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "dmdcopy", "distill",
                           str(tmp_path / "run.toml")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from dmdcopy.io import load
    from dmdcopy.teachers import GaussianMixtureTeacher

    # the exact teacher was not sharded, so it saves as its own class (not FSDP's subclass)
    assert isinstance(load(tmp_path / "out" / "teacher.safetensors"), GaussianMixtureTeacher)
    ema = load(tmp_path / "out" / "student_ema.safetensors")
    assert type(ema).__name__ == "OneStepStudent" and ema(torch.randn(3, 2)).shape == (3, 2)
    # ... and `dmdcopy delta-e` under torchrun: each rank maps its share, rank 0 reports the
    # one-process figures once
    out = tmp_path / "out"
    measure = ["delta-e", "--teacher", str(out / "teacher.safetensors"), "--student",
               str(out / "student_ema.safetensors"), "--seeds", "0-59", "--steps", "6", "--bootstrap", "20",
               "--no-progress"]
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "dmdcopy", *measure,
                           "--pairs-cache", str(tmp_path / "pairs"), "--out", str(tmp_path / "two.json")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("report written to") == 1
    from dmdcopy.cli import main

    assert main([*measure, "--out", str(tmp_path / "one.json")]) == 0
    two, one = (json.loads((tmp_path / f"{n}.json").read_text())["delta_e"] for n in ("two", "one"))
    for key in ("delta_e", "ci_low", "ci_high", "bracket_low", "bracket_high"):
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key
