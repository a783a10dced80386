"""The Distiller on a CUDA device (bf16 autocast, torch.compile); skipped where there is no GPU."""

import pytest
import torch

from dmdcopy.distill import DistillConfig, Distiller
from dmdcopy.nets import MLP
from dmdcopy.precond import EDMPrecond
from dmdcopy.students import MultiStepStudent, OneStepStudent
from dmdcopy.teachers import GaussianMixtureTeacher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MEANS = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [1.0, -1.0]])
CUDA = torch.device("cuda")


def net(label_dim=0, hidden=64):
    return EDMPrecond(MLP(2, hidden=hidden, depth=2, label_dim=label_dim)).to(CUDA)


def config(**kw):
    base = dict(batch_size=128, num_steps=4, generator_lr=2e-3, fake_score_lr=2e-3, log_every=1000,
                progress_bar=False, ema_halflife_steps=10.0, checkpoint_every=1000)
    base.update(kw)
    return DistillConfig(**base)


def sliced_wasserstein(a, b, n_proj=128):
    theta = torch.randn(a.shape[1], n_proj, generator=torch.Generator().manual_seed(5)).to(a.device)
    theta = theta / theta.norm(dim=0)
    pa, pb = (a @ theta).sort(0).values, (b @ theta).sort(0).values
    return ((pa - pb) ** 2).mean().sqrt().item()


def test_bf16_distillation_on_cuda_lowers_the_distance_and_stays_on_device():
    teacher = GaussianMixtureTeacher(MEANS, torch.full((4,), 0.3))
    torch.manual_seed(0)
    student, fake = OneStepStudent(net()), net()
    g = torch.Generator().manual_seed(1)
    ref, z = teacher.sample(2000, generator=g).to(CUDA), torch.randn(2000, 2, generator=g).to(CUDA)
    with torch.no_grad():
        before = sliced_wasserstein(student(z), ref)
    real = teacher.sample(256, generator=g)
    d = Distiller(teacher, student, fake_score=fake, real_data=real,
                  config=config(num_steps=100, gan=True, gan_feature_module="model.blocks.1.fc2"))
    assert d.device.type == "cuda"
    # mixed_precision (on by default) must run the networks' matmuls in bfloat16 on CUDA
    seen = {"student": set(), "fake_score": set()}
    for name, module in (("student", student.denoiser.model.blocks[0].fc1),
                         ("fake_score", fake.model.blocks[0].fc1)):
        module.register_forward_hook(lambda m, a, out, name=name: seen[name].add(out.dtype))
    d.train()
    assert seen == {"student": {torch.bfloat16}, "fake_score": {torch.bfloat16}}, seen
    with torch.no_grad():
        after = sliced_wasserstein(student(z), ref)
    assert after < 0.5 * before, (before, after)
    tensors, _ = d.state_tensors()
    for k, v in tensors.items():
        if k.startswith(("student/", "ema/", "fake_score/", "discriminator/")):
            assert v.device.type == "cuda" and v.dtype == torch.float32, k


def test_multistep_and_conditional_students_train_on_cuda():
    for teacher, student, fake in [
        (GaussianMixtureTeacher(MEANS, torch.full((4,), 0.15)), MultiStepStudent(net(), (80.0, 1.0)), net()),
        (GaussianMixtureTeacher(MEANS, torch.full((4,), 0.15), conditional=True), OneStepStudent(net(4)),
         net(4)),
    ]:
        d = Distiller(teacher, student, fake_score=fake, config=config(num_steps=2))
        d.train()
        assert d.generator_updates == 2 and d.nonfinite_total == 0
        assert all(torch.isfinite(p).all() for p in student.parameters())


def test_resume_on_cuda_reproduces_the_uninterrupted_run(tmp_path):
    def setup(out):
        torch.manual_seed(0)
        teacher = GaussianMixtureTeacher(MEANS, torch.full((4,), 0.15))
        return Distiller(teacher, OneStepStudent(net()), fake_score=net(), out_dir=out,
                         config=config(num_steps=6, checkpoint_every=3))

    reference = setup(tmp_path / "a").train()

    def interrupt(distiller, step):
        if step == 4:
            raise KeyboardInterrupt

    first = setup(tmp_path / "b")
    first.callbacks.append(interrupt)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    resumed = setup(tmp_path / "b")
    resumed.train(resume="latest")
    ref, got = reference.state_tensors()[0], resumed.state_tensors()[0]
    for k in ref:
        if not k.startswith("rng/"):
            assert torch.equal(ref[k].cpu(), got[k].cpu()), k


def test_compile_with_the_gan_hook_on_cuda():
    teacher = GaussianMixtureTeacher(MEANS, torch.full((4,), 0.15))
    torch.manual_seed(0)
    d = Distiller(teacher, OneStepStudent(net()), fake_score=net(), real_data=teacher.sample(64),
                  config=config(num_steps=2, fake_score_steps=2, compile=True, gan=True,
                                gan_feature_module="model.blocks.1.fc2"))
    head = [p.clone() for p in d.discriminator.parameters()]
    d.train()
    assert d.generator_updates == 2 and d.fake_score_updates == 4
    assert any(not torch.equal(a, b) for a, b in zip(head, d.discriminator.parameters()))
