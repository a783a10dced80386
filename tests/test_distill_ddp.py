"""Two gloo processes (DistributedDataParallel) equal one process with the same global batch."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from _dist import free_port, in_gloo_group

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


def _worker(rank, out_dir):
    d, state, records = _run(out_dir if rank == 0 else None)
    assert d.local_batch == 4 and d.world_size == 2
    torch.save(records, os.path.join(out_dir, f"records{rank}.pt"))
    if rank == 0:
        torch.save(state, os.path.join(out_dir, "state.pt"))


def _mean(records, field):
    values = [r[field] for r in records if not r["skipped"]]
    return sum(values) / len(values)


def test_two_processes_match_one(tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(in_gloo_group, args=(2, f"file://{tmp_path / 'rendezvous'}", _worker, str(out)), nprocs=2)
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



def _env_worker(rank, ports, out_dir):
    import torch.distributed as dist

    from dmdcopy.distill import process_group_from_env

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    seen = []
    os.environ["MASTER_PORT"] = str(ports[0])
    with process_group_from_env(backend="gloo") as info:
        seen.append((info.rank, info.world_size, dist.is_initialized()))
    seen.append(dist.is_initialized())  # the group it started is gone
    os.environ["MASTER_PORT"] = str(ports[1])
    try:
        with process_group_from_env(backend="gloo"):
            raise RuntimeError("this rank failed")
    except RuntimeError:  # no barrier on the way out (the other ranks may still be working)
        seen.append(dist.is_initialized())
    with process_group_from_env() as info:  # a group started before is not the block's to end
        seen.append(info.world_size)
    seen.append(dist.is_initialized())
    dist.destroy_process_group()
    torch.save(seen, os.path.join(out_dir, f"seen{rank}.pt"))


def test_process_group_from_env_ends_only_the_group_it_started(tmp_path):
    ports = (free_port(), free_port())
    mp.start_processes(_env_worker, args=(ports, str(tmp_path)), nprocs=2, start_method="fork")
    for rank in range(2):
        assert torch.load(tmp_path / f"seen{rank}.pt") == [(rank, 2, True), False, True, 2, True]


@pytest.mark.parametrize("world, message", [
    ("2", "WORLD_SIZE=2 (torchrun) but torch.distributed has no process group"),
    ("two", "WORLD_SIZE='two' in the environment"),
    ("0", "expected a process count >= 1")])
def test_a_torchrun_process_without_a_group_is_refused(monkeypatch, tmp_path, world, message):
    import re

    from dmdcopy.errors import ConfigError

    def build():
        teacher = GaussianMixtureTeacher(torch.tensor([[-1.0, 0.0], [1.0, 0.5]]), torch.tensor([0.2, 0.3]))
        student = OneStepStudent(EDMPrecond(MLP(2, hidden=16, depth=1)))
        return Distiller(teacher, student, fake_score=EDMPrecond(MLP(2, hidden=16, depth=1)),
                         config=DistillConfig(batch_size=8, num_steps=1), out_dir=tmp_path)

    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(ConfigError, match=re.escape(message)):
        build()
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert build().world_size == 1
