"""Delta E from checkpoints of your own network classes, in one call: ``dmdcopy.delta_e``.

``RingNet`` (a teacher network) and ``Generator`` (a one-step student) below are user classes
dmdcopy knows nothing about. The script trains the teacher on an 8-mode ring, fits two students
of the same law to it by regression (one learns the teacher's pairing ``z -> T(z)``, one the
rotated pairing ``z -> T(R z)``), saves all three, builds fresh modules from the classes, loads the
files into them, and measures each student with ``dmdcopy.delta_e``: the copy reads about 0, the
rotated student about 1 (a relabelling of the modes), and both figures come with the population
bracket. About 10 s on one CPU thread.

    python examples/delta_e_checkpoints.py

The same measurement from the command line, with the classes in your own installed package::

    dmdcopy delta-e --teacher teacher.safetensors --teacher-arch mypkg.nets:build_teacher \\
        --student copy.pt --student-arch mypkg.nets:build_student --student-kwargs '{"width": 64}'
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from torch import nn

import dmdcopy
from dmdcopy.experiments.teacher_training import TeacherConfig, train_teacher
from dmdcopy.io import load, save
from dmdcopy.precond import EDMPrecond
from dmdcopy.samplers import teacher_ode


class RingNet(nn.Module):
    """A user-defined raw network: ``x_in: (B, 2)``, ``c_noise: (B,)`` -> ``(B, 2)``."""

    sample_shape = (2,)
    label_dim = 0

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.freqs = nn.Parameter(torch.randn(16) * 4, requires_grad=False)  # Fourier features of c_noise
        self.body = nn.Sequential(nn.Linear(2 + 32, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                  nn.Linear(width, 2))

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, class_labels=None) -> torch.Tensor:
        angle = c_noise[:, None] * self.freqs  # (B, 16)
        return self.body(torch.cat([x_in, angle.cos(), angle.sin()], dim=1))


class Generator(nn.Module):
    """A user-defined one-step student ``G(z, class_labels=None) -> x``: ``z: (B, 2)`` -> ``(B, 2)``."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                  nn.Linear(width, 2))

    def forward(self, z: torch.Tensor, class_labels=None) -> torch.Tensor:
        return self.body(z)


def build_teacher(width: int = 64) -> EDMPrecond:
    """The teacher's architecture (what ``--teacher-arch`` would name)."""
    return EDMPrecond(RingNet(width), sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)


def build_student(width: int = 64) -> Generator:
    return Generator(width)


def ring(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n, 2)`` samples of 8 Gaussian modes (std 0.05) on the unit circle."""
    k = torch.randint(0, 8, (n,), generator=generator)
    angle = k * 2 * math.pi / 8
    return torch.stack([angle.cos(), angle.sin()], dim=1) + 0.05 * torch.randn(n, 2, generator=generator)


def fit(z: torch.Tensor, x: torch.Tensor, steps: int = 600) -> Generator:
    """A student regressed onto the pairs ``z_i -> x_i`` (full batch, Adam)."""
    G = build_student()
    opt = torch.optim.Adam(G.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        (G(z) - x).square().mean().backward()
        opt.step()
    return G.eval()


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = train_teacher(ring, RingNet(), TeacherConfig(steps=800, batch=256),
                            generator=torch.Generator().manual_seed(0)).denoiser.eval()

    # Two students of the teacher's law, fitted on seeds the measurement does not use.
    train = dmdcopy.teacher_samples(teacher, range(100_000, 102_048))
    quarter = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # R: a quarter turn keeps N(0, I) as it is
    with torch.no_grad():
        x_rotated = teacher_ode(teacher, train.z @ quarter.T)  # T(R z)
    students = {"copy": fit(train.z, train.x), "rotated": fit(train.z, x_rotated)}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save(teacher, tmp / "teacher.safetensors")  # records RingNet as a user class: load it with into=
        for name, G in students.items():
            torch.save(G.state_dict(), tmp / f"{name}.pt")  # a plain torch state dict

        # What a user does with the files: build the classes, fill them, measure. The teacher's
        # pairs are computed once into tmp/pairs; the second student reads them from the store.
        teacher = load(tmp / "teacher.safetensors", into=build_teacher()).eval()
        for name in students:
            student = load(tmp / f"{name}.pt", into=build_student()).eval()
            report = dmdcopy.delta_e(teacher, student, range(2000), pairs=tmp / "pairs", n_boot=200)
            r = report.result
            print(f"{name:>8}: Delta E (finite N) {r.delta_e:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}], "
                  f"population bracket [{r.delta_e_lower:.3f}, {r.delta_e_upper:.3f}] "
                  f"(interval [{r.bracket_low:.3f}, {r.bracket_high:.3f}]), N = {r.n}, "
                  f"{report.time_s['total']:.1f} s")
            for w in r.warnings:
                print(f"          warning: {w}")


if __name__ == "__main__":
    main()
