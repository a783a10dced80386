"""Your own network as teacher and student: train, distil with DMD, measure Delta E, save, reload.

dmdcopy needs one thing from a network: ``F(x_in, c_noise, class_labels=None) -> (B, ...)`` (the
raw-network protocol of EDM). Put it behind a preconditioning wrapper
(``EDMPrecond(F)``) and it is a denoiser ``D(x, sigma, class_labels=None)``; wrap that denoiser in
``OneStepStudent`` and it is a generator ``G(z)``. Any denoiser callable works as a teacher too.

Here ``RingNet`` (written below, not part of dmdcopy) learns an 8-mode ring in 2-D, is distilled
into a one-step student initialised from its own weights (DMD2), the student's Delta E against the
teacher's ODE pairing is printed, and the student is saved with ``dmdcopy.io.save`` and reloaded
with ``load(path, into=...)`` (a user class cannot be rebuilt from the file: you build it, the file
fills it). About 20 s on one CPU thread.

    python examples/custom_architecture.py
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import torch
from torch import nn

from dmdcopy.distill import DistillConfig, Distiller
from dmdcopy.experiments.teacher_training import TeacherConfig, train_teacher
from dmdcopy.io import load, save
from dmdcopy.metrics import pairing_inefficiency
from dmdcopy.noise import noise_for_seeds
from dmdcopy.precond import EDMPrecond
from dmdcopy.samplers import teacher_ode
from dmdcopy.students import OneStepStudent


class RingNet(nn.Module):
    """A user-defined raw network: ``x_in: (B, 2)``, ``c_noise: (B,)`` -> ``(B, 2)``."""

    sample_shape = (2,)  # optional: lets the wrappers check input shapes
    label_dim = 0

    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.freqs = nn.Parameter(torch.randn(16) * 4, requires_grad=False)  # Fourier features of c_noise
        self.body = nn.Sequential(
            nn.Linear(2 + 32, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2)
        )

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, class_labels=None) -> torch.Tensor:
        angle = c_noise[:, None] * self.freqs  # (B, 16)
        return self.body(torch.cat([x_in, angle.cos(), angle.sin()], dim=1))


def ring(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n, 2)`` samples of 8 Gaussian modes (std 0.05) on the unit circle."""
    k = torch.randint(0, 8, (n,), generator=generator)
    angle = k * 2 * math.pi / 8
    centre = torch.stack([angle.cos(), angle.sin()], dim=1)
    return centre + 0.05 * torch.randn(n, 2, generator=generator)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)

    # 1. Teacher: EDMPrecond(RingNet) trained with the EDM loss over sigma in [0.002, 80].
    trained = train_teacher(
        ring,
        RingNet(),
        TeacherConfig(steps=1500, batch=256, lr=2e-3),
        generator=torch.Generator().manual_seed(0),
    )
    teacher = trained.denoiser
    print(f"teacher trained: final loss {trained.summary()['final_loss']:.4f} in {trained.seconds:.1f} s")

    # 2. Student: DMD2's one-step generator G(z) = D(80 z, 80), starting from the teacher's weights.
    student = OneStepStudent(copy.deepcopy(teacher).train().requires_grad_(True), sigma_max=80.0)
    config = DistillConfig(
        num_steps=150,
        batch_size=256,
        generator_lr=1e-4,
        fake_score_lr=1e-4,
        weight_decay=0.0,
        fake_score_steps=5,
        ema_halflife_steps=None,
        mixed_precision=False,
        progress_bar=False,
        log_every=50,
        checkpoint_every=10**9,
    )
    Distiller(teacher, student, config=config).train()

    # 3. Delta E of the student against the teacher's probability-flow pairing on shared noise.
    z = noise_for_seeds(range(1000), (2,))
    with torch.no_grad():
        x_teacher = teacher_ode(teacher, z)
        x_student = student.eval()(z)
    r = pairing_inefficiency(x_student, x_teacher, n_boot=200)
    print(f"student Delta E = {r.delta_e:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] over N = {len(z)}")

    # 4. Save; reload into a freshly built network of the same user-defined class.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "student.safetensors"
        save(student, path, metadata={"steps": config.num_steps, "delta_e": r.delta_e})
        fresh = OneStepStudent(
            EDMPrecond(RingNet(), sigma_min=teacher.sigma_min, sigma_max=teacher.sigma_max), sigma_max=80.0
        )
        reloaded = load(path, into=fresh).eval()
        with torch.no_grad():
            same = torch.equal(reloaded(z), x_student)
    print(
        f"saved {path.name} and reloaded into a new OneStepStudent(EDMPrecond(RingNet())): identical = {same}"
    )
    assert same


if __name__ == "__main__":
    main()
