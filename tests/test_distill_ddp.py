"""Two gloo processes (DistributedDataParallel) equal one process with the same global batch."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dmdcopy.distill import DistillConfig, Distiller
from dmdcopy.nets import MLP
from dmdcopy.precond import EDMPrecond
from dmdcopy.students import OneStepStudent
from dmdcopy.teachers import GaussianMixtureTeacher


def _run(out_path=None):
    """Build the same models (seeded), run 3 steps with GAN and EMA on, return the final state."""
    torch.manual_seed(0)
    teacher = GaussianMixtureTeacher(torch.tensor([[-1.0, 0.0], [1.0, 0.5]]), torch.tensor([0.2, 0.3]))
    student = OneStepStudent(EDMPrecond(MLP(2, hidden=16, depth=1)))
    fake = EDMPrecond(MLP(2, hidden=16, depth=1))
    real = teacher.sample(32, generator=torch.Generator().manual_seed(1))
    cfg = DistillConfig(batch_size=8, num_steps=3, generator_lr=1e-3, fake_score_lr=1e-3,
                        fake_score_steps=2, gan=True, gan_feature_module="model.blocks.0.fc2",
                        ema_halflife_steps=2.0, progress_bar=False, log_every=3)
    d = Distiller(teacher, student, fake_score=fake, config=cfg, real_data=real,
                  out_dir=out_path and os.path.dirname(out_path))
    d.train()
    state, _ = d.state_tensors()
    state = {k: v for k, v in state.items() if not k.startswith("rng/")}
    return d, state


def _worker(rank, world_size, init_file, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        d, state = _run(out_path if rank == 0 else None)
        assert d.local_batch == 4 and d.world_size == 2
        if rank == 0:
            torch.save(state, out_path)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    out = str(tmp_path / "ddp" / "state.pt")
    os.makedirs(os.path.dirname(out))
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), out), nprocs=2, join=True)
    ddp_state = torch.load(out, weights_only=True)
    _, single = _run()
    assert ddp_state.keys() == single.keys()
    for k in single:
        torch.testing.assert_close(ddp_state[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
    # Only rank 0 wrote; the log's losses are averages over both processes.
    assert (tmp_path / "ddp" / "log.jsonl").exists()
    assert len(list((tmp_path / "ddp").glob("checkpoint-*.safetensors"))) == 1
