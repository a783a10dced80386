"""dmdcopy.measure: one path from a teacher and a student to a reported Delta E."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from _dist import in_gloo_group, tcp_rendezvous
from torch import nn

import dmdcopy
from dmdcopy.errors import ConfigError, ShapeError
from dmdcopy.measure import DeltaEReport, TeacherSamples, delta_e, measure_student, teacher_samples
from dmdcopy.metrics import gaussian_delta_e, pairing_inefficiency
from dmdcopy.nets import MLP
from dmdcopy.noise import labels_for_seeds, noise_for_seeds
from dmdcopy.pairs import PairStore, teacher_fingerprint
from dmdcopy.precond import EDMPrecond
from dmdcopy.samplers import euler, teacher_ode
from dmdcopy.schedules import karras_sigmas
from dmdcopy.students import OneStepStudent
from dmdcopy.teachers import GaussianMixtureTeacher, GaussianTeacher

GRID = karras_sigmas(8)


def _gaussian(d: int = 3) -> GaussianTeacher:
    g = torch.Generator().manual_seed(1)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    return GaussianTeacher(torch.linspace(-1, 1, d), A @ A.T + 0.1 * torch.eye(d, dtype=torch.float64))


class TeacherMap(nn.Module):
    """The teacher's own ODE map as a generator (a perfect copy), with dropout that only eval mode
    switches off: a measurement in train mode would not read 0."""

    def __init__(self, teacher: nn.Module, sigmas: torch.Tensor = GRID) -> None:
        super().__init__()
        self.teacher, self.sigmas = teacher, sigmas
        self.drop = nn.Dropout(0.5)
        self.seen_labels: list[torch.Tensor] = []
        self.label_dim = int(teacher.label_dim)

    def forward(self, z, class_labels=None):
        if class_labels is not None:
            self.seen_labels.append(class_labels)
        return self.drop(teacher_ode(self.teacher, z, self.sigmas, class_labels=class_labels))


class Linear(nn.Module):
    """``G(z) = W z``."""

    def __init__(self, W: torch.Tensor) -> None:
        super().__init__()
        self.W = nn.Parameter(W.to(torch.float32))

    def forward(self, z, class_labels=None):
        return z @ self.W.T


def test_identical_student_reads_zero_and_keeps_its_mode():
    T = _gaussian()
    G = TeacherMap(T).train()
    report = delta_e(T, G, range(64), sigmas=GRID, n_boot=50, batch=20)
    r = report.result
    assert r.delta_e == 0.0 and r.delta_e_lower == 0.0 and r.own_pair_rate == 1.0
    assert r.n == 64 and report.n_nonfinite == 0 and report.transport is None
    assert G.training  # eval during the measurement, train mode restored after
    assert set(report.time_s) == {"teacher", "student", "metric", "transport", "total"}
    assert report.time_s["total"] >= report.time_s["teacher"] > 0
    s = report.settings
    assert s["n"] == 64 and s["steps"] == 8 and s["teacher_fingerprint"] == teacher_fingerprint(T)
    assert s["seeds"] == [[0, 63]] and s["student_class"] == "TeacherMap" and s["pairs"] is None


def test_linear_student_of_a_gaussian_teacher_matches_the_closed_form():
    """A rotated linear student ``G(z) = B R z`` of ``T(z) = B z`` (the same law): the interval of
    the population bracket contains ``gaussian_delta_e`` (the teacher ODE on a fine grid, so the
    teacher's map is ``B z`` to 0.2 %)."""
    d, S = 8, 80.0
    g = torch.Generator().manual_seed(0)
    lam = 1.0 / torch.arange(1, d + 1, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    T = GaussianTeacher(torch.zeros(d), Q @ torch.diag(lam) @ Q.T)
    B = (T.eigvecs * (T.eigvals / (T.eigvals + S**2)).sqrt() * S) @ T.eigvecs.T  # the exact map z -> T(z)
    skew = torch.randn(d, d, generator=g, dtype=torch.float64)
    R = torch.linalg.matrix_exp((skew - skew.T) / math.sqrt(d))
    fine = karras_sigmas(80, 0.002, S)
    samples = teacher_samples(T, range(500), sigmas=fine)
    torch.testing.assert_close(samples.x.double(), samples.z.double() @ B.T, rtol=0, atol=0.02)
    for W in (B @ R, B):
        population = gaussian_delta_e(W, B).delta_e
        r = measure_student(Linear(W), samples, n_boot=200).result
        assert r.bracket_low - 1e-9 <= population <= r.bracket_high + 1e-9, (population, r)
        assert r.delta_e_lower <= r.delta_e_upper
    assert population == pytest.approx(0.0, abs=1e-12) and r.delta_e == 0.0


def test_non_finite_student_gives_no_result_and_the_count():
    T = _gaussian()
    z = noise_for_seeds(range(40), (3,))
    expected = int((z[:, 0] > 0.5).sum())
    assert 0 < expected < 40

    def broken(z, class_labels=None):
        x = teacher_ode(T, z, GRID)
        return torch.where(z[:, :1] > 0.5, torch.full_like(x, math.nan), x)  # NaN for some seeds only

    report = delta_e(T, broken, range(40), sigmas=GRID, n_boot=10, transport=True, batch=16)
    assert report.result is None and report.n_nonfinite == expected and report.transport is None
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["delta_e"] is None and d["n_nonfinite"] == expected


def test_conditional_teacher_labels_reach_the_student():
    M = GaussianMixtureTeacher(torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]]), torch.full((3,), 0.3),
                               conditional=True)
    G = TeacherMap(M)
    report = delta_e(M, G, range(30, 70), sigmas=GRID, n_boot=0, batch=16)
    assert report.result.delta_e == 0.0 and report.settings["conditional"]
    assert torch.equal(torch.cat(G.seen_labels), labels_for_seeds(range(30, 70), 3))
    # a student without labels against a conditional teacher, and the converse, are refused
    unconditional = Linear(torch.eye(2))
    unconditional.label_dim = 0
    with pytest.raises(ConfigError, match="class-conditional"):
        delta_e(M, unconditional, range(8), sigmas=GRID)
    T = GaussianTeacher(torch.zeros(2), torch.eye(2))
    with pytest.raises(ConfigError, match="carry no labels"):
        delta_e(T, G, range(8), sigmas=GRID)


def test_report_is_json_ready_with_transport():
    T = _gaussian()
    W = torch.linalg.cholesky(T.cov).flip(1)  # same law, another coupling
    report = delta_e(T, Linear(W), range(48), sigmas=GRID, n_boot=20, transport=True)
    assert isinstance(report, DeltaEReport) and set(report.transport) == {"teacher", "student"}
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert set(d) == {"delta_e", "n_nonfinite", "transport", "time_s", "settings"}
    for key in ("delta_e", "delta_e_lower", "delta_e_upper", "bracket_low", "bracket_high", "e_opt_lower",
                "warnings", "ci_low", "ci_high", "resolution", "own_pair_rate"):
        assert key in d["delta_e"]
    assert d["delta_e"]["delta_e"] == pytest.approx(report.result.delta_e)
    assert d["transport"]["student"]["n"] == 48


def test_pair_store_path_object_and_subset(tmp_path):
    T = _gaussian()
    W = torch.linalg.cholesky(T.cov)
    memory = delta_e(T, Linear(W), range(50), sigmas=GRID, n_boot=20)
    stored = delta_e(T, Linear(W), range(50), sigmas=GRID, n_boot=20, pairs=tmp_path / "pc")
    assert stored.result.delta_e == memory.result.delta_e and stored.settings["pairs"] == str(tmp_path / "pc")
    # the store serves a subset of its seeds, from its directory or as a PairStore
    sub = [45, 3, 17, 8, 30, 22]
    a = teacher_samples(T, sub, pairs=tmp_path / "pc", sigmas=GRID)
    b = teacher_samples(T, sub, pairs=PairStore(tmp_path / "pc"))
    full = teacher_samples(T, range(50), sigmas=GRID)
    for s in (a, b):
        assert s.seeds == sub and torch.equal(s.x, full.x[sub]) and torch.equal(s.z, full.z[sub])
        assert s.fingerprint == teacher_fingerprint(T) and s.solver.endswith("heun")
    with pytest.raises(ConfigError, match="another sigma grid"):
        teacher_samples(T, sub, pairs=PairStore(tmp_path / "pc"), sigmas=karras_sigmas(5))
    with pytest.raises(ConfigError, match="solver"):
        teacher_samples(T, sub, pairs=PairStore(tmp_path / "pc"), solver=euler)
    with pytest.raises(ConfigError, match="another teacher"):
        teacher_samples(_gaussian(2), sub, pairs=PairStore(tmp_path / "pc"))


def test_features_and_input_errors():
    T = _gaussian()
    W = torch.linalg.cholesky(T.cov)
    samples = teacher_samples(T, range(40), sigmas=GRID)
    proj = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    report = measure_student(Linear(W), samples, n_boot=0, features=lambda x: x @ proj.T)
    by_hand = pairing_inefficiency(Linear(W)(samples.z).detach() @ proj.T, samples.x @ proj.T, n_boot=0)
    assert report.result.dim == 2 and report.result.delta_e == pytest.approx(by_hand.delta_e, abs=1e-9)
    stages = []
    measure_student(Linear(W), samples, n_boot=5, progress=lambda s, d, t: stages.append(s), batch=16)
    assert stages[0] == "student" and "assignment" in stages
    with pytest.raises(ConfigError, match="at least 2 seeds"):
        teacher_samples(T, [3])
    with pytest.raises(ConfigError, match="distinct"):
        teacher_samples(T, [3, 3])
    with pytest.raises(ShapeError, match="student makes samples of shape"):
        measure_student(OneStepStudent(EDMPrecond(MLP(2, hidden=8, depth=1))), samples)
    with pytest.raises(ShapeError, match="mapped z of shape"):
        measure_student(lambda z, class_labels=None: z[:, :2], samples)
    with pytest.raises(ShapeError, match="TeacherSamples"):
        TeacherSamples(seeds=[0, 1], z=torch.zeros(2, 3), x=torch.zeros(3, 3), labels=None,
                       sigmas=GRID, solver="s", fingerprint=None)
    with pytest.raises(ConfigError, match="NaN or inf"):
        teacher_samples(lambda x, sigma, class_labels=None: x * math.nan, range(4), sample_shape=(2,))


def test_top_level_exports():
    for name in ("delta_e", "teacher_samples", "measure_student", "TeacherSamples", "DeltaEReport"):
        assert name in dmdcopy.__all__ and getattr(dmdcopy, name) is getattr(dmdcopy.measure, name)


# ---------------------------------------------------------------------------------------------
# torch.distributed: every rank maps its share, every rank gets the one-process report


def _rank_worker(rank: int, out_dir: str) -> None:
    T = _gaussian()
    W = torch.linalg.cholesky(T.cov).flip(1)
    big = delta_e(T, Linear(W), range(40), sigmas=GRID, n_boot=20, transport=True)
    tiny = delta_e(T, Linear(W), [5, 9], sigmas=GRID, n_boot=0)  # a rank without seeds
    nan = delta_e(T, lambda z, class_labels=None: z * math.nan, range(10), sigmas=GRID, n_boot=0)
    torch.save([big.to_dict()["delta_e"], big.to_dict()["transport"], tiny.result.delta_e,
                nan.n_nonfinite], os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_ranks_share_the_seeds_and_agree(tmp_path):
    args = (3, tcp_rendezvous(), _rank_worker, str(tmp_path))
    torch.multiprocessing.start_processes(in_gloo_group, args=args, nprocs=3, start_method="fork")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(3)]
    assert got[0] == got[1] == got[2]
    T = _gaussian()
    W = torch.linalg.cholesky(T.cov).flip(1)
    one = delta_e(T, Linear(W), range(40), sigmas=GRID, n_boot=20, transport=True).to_dict()
    assert got[0][0]["delta_e"] == pytest.approx(one["delta_e"]["delta_e"], abs=1e-12)
    assert got[0][0]["ci_low"] == pytest.approx(one["delta_e"]["ci_low"], abs=1e-12)
    assert got[0][1]["student"]["value"] == pytest.approx(one["transport"]["student"]["value"], abs=1e-12)
    assert got[0][3] == 10
