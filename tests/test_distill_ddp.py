"""Two gloo processes (DistributedDataParallel) equal one process with the same global batch."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dmdcopy.distill import DistillConfig, Distiller
from dmdcopy.nets import MLP
from dmdcopy.precond import EDMPrecond
from dmdcopy.students import OneStepStudent
from dmdcopy.teachers import GaussianMixtureTeacher

_LOSSES = {"generator_loss": ("gen", "loss"), "dmd_loss": ("gen", "dmd_loss"),
           "gan_generator_loss": ("gen", "gan_loss"), "generator_grad_norm": ("gen", "grad_norm"),
           "fake_score_loss": ("fake", "loss"), "dsm_loss": ("fake", "dsm_loss"),
           "gan_discriminator_loss": ("fake", "gan_loss"), "fake_score_grad_norm": ("fake", "grad_norm")}


def _run(out_dir=None):
    """Build the same models (seeded), run 3 steps with GAN and EMA on; return the distiller, its
    final state and this process's update records."""
    torch.manual_seed(0)
    teacher = GaussianMixtureTeacher(torch.tensor([[-1.0, 0.0], [1.0, 0.5]]), torch.tensor([0.2, 0.3]))
    student = OneStepStudent(EDMPrecond(MLP(2, hidden=16, depth=1)))
    fake = EDMPrecond(MLP(2, hidden=16, depth=1))
    real = teacher.sample(32, generator=torch.Generator().manual_seed(1))
    cfg = DistillConfig(batch_size=8, num_steps=3, generator_lr=1e-3, fake_score_lr=1e-3,
                        fake_score_steps=2, gan=True, gan_feature_module="model.blocks.0.fc2",
                        ema_halflife_steps=2.0, progress_bar=False, log_every=3)
    d = Distiller(teacher, student, fake_score=fake, config=cfg, real_data=real, out_dir=out_dir)
    records = {"gen": [], "fake": []}
    gen_step, fake_step = d.generator_step, d.fake_score_step

    def keep(kind, step):
        def run(*args):
            records[kind].append(step(*args))
            return records[kind][-1]
        return run

    d.generator_step, d.fake_score_step = keep("gen", gen_step), keep("fake", fake_step)
    d.train()
    state, _ = d.state_tensors()
    state = {k: v for k, v in state.items() if not k.startswith("rng/")}
    records = {kind: [r.__dict__ for r in rs] for kind, rs in records.items()}
    return d, state, records


def _worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        d, state, records = _run(out_dir if rank == 0 else None)
        assert d.local_batch == 4 and d.world_size == 2
        torch.save(records, os.path.join(out_dir, f"records{rank}.pt"))
        if rank == 0:
            torch.save(state, os.path.join(out_dir, "state.pt"))
    finally:
        dist.destroy_process_group()


def _mean(records, field):
    values = [r[field] for r in records if not r["skipped"]]
    return sum(values) / len(values)


def test_two_processes_match_one(tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(out)), nprocs=2, join=True)
    ddp_state = torch.load(out / "state.pt", weights_only=True)
    _, single, _ = _run(tmp_path / "single")
    assert ddp_state.keys() == single.keys()
    for k in single:
        torch.testing.assert_close(ddp_state[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
    # Only rank 0 wrote, once.
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".pt")) == [
        "checkpoint-000000003.safetensors", "log.jsonl"]
    # The log's losses are the averages over both processes of each process's window means ...
    (logged,) = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    ranks = [torch.load(out / f"records{r}.pt", weights_only=True) for r in range(2)]
    assert [len(r["gen"]) for r in ranks] == [3, 3] and [len(r["fake"]) for r in ranks] == [6, 6]
    for key, (kind, field) in _LOSSES.items():
        means = [_mean(r[kind], field) for r in ranks]
        assert logged[key] == pytest.approx((means[0] + means[1]) / 2, rel=1e-12, abs=0), key
    # ... which differ (each rank saw its own half of the batch), so rank 0's own figures would fail.
    assert _mean(ranks[0]["gen"], "dmd_loss") != _mean(ranks[1]["gen"], "dmd_loss")
    # The averages are the one-process figures of the same global batch.
    (alone,) = [json.loads(line) for line in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    for key in _LOSSES:
        assert logged[key] == pytest.approx(alone[key], rel=1e-3), key
    assert (logged["generator_updates"], logged["fake_score_updates"]) == (3, 6)
