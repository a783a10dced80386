"""`dmdcopy delta-e` end to end on tiny checkpoints, and the Delta E training callback."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dmdcopy.cli import main
from dmdcopy.distill.callbacks import DeltaECallback
from dmdcopy.errors import ConfigError
from dmdcopy.io import save
from dmdcopy.nets import MLP
from dmdcopy.noise import noise_for_seeds
from dmdcopy.pairs import generate_pairs
from dmdcopy.precond import EDMPrecond
from dmdcopy.samplers import teacher_ode
from dmdcopy.schedules import karras_sigmas
from dmdcopy.students import OneStepStudent
from dmdcopy.teachers import GaussianMixtureTeacher


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    teacher = EDMPrecond(MLP(2, hidden=16, depth=1))
    save(teacher, d / "teacher.safetensors")
    save(OneStepStudent(teacher), d / "student.safetensors")
    save(teacher, d / "student_denoiser.safetensors")
    save(EDMPrecond(MLP(3, hidden=16, depth=1)), d / "teacher3.safetensors")
    save(EDMPrecond(MLP(2, hidden=16, depth=1, label_dim=4)), d / "cond.safetensors")
    return d


def _run(ckpts, *extra):
    return main(["delta-e", "--teacher", str(ckpts / "teacher.safetensors"), "--seeds", "0-119",
                 "--steps", "6", "--bootstrap", "50", "--no-progress", *extra])


def test_end_to_end_report(ckpts, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = _run(ckpts, "--student", str(ckpts / "student.safetensors"), "--pairs-cache", str(tmp_path / "pc"),
              "--out", str(out), "--transport", "--block-size", "60")
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Delta E" in printed and "resolution" in printed and "120 / 60 / 2" in printed
    report = json.loads(out.read_text())
    r = report["delta_e"]
    assert r["n"] == 120 and r["block_size"] == 60 and r["n_blocks"] == 2 and r["n_boot"] == 50
    assert r["ci_low"] <= r["delta_e"] <= r["ci_high"]
    assert report["settings"]["steps"] == 6 and len(report["settings"]["sigmas"]) == 7
    assert set(report["transport"]) == {"teacher", "student"}
    assert report["time_s"]["total"] > 0
    # The same figures by hand, from the library
    from dmdcopy.io import load
    from dmdcopy.metrics import pairing_inefficiency

    T = load(ckpts / "teacher.safetensors")
    G = load(ckpts / "student.safetensors")
    z = noise_for_seeds(range(120), (2,))
    with torch.no_grad():
        grid = karras_sigmas(6, 0.002, 80.0)
        expected = pairing_inefficiency(G(z), teacher_ode(T, z, grid), block_size=60, n_boot=50)
    assert r["delta_e"] == pytest.approx(expected.delta_e, rel=1e-5)


def test_denoiser_student_and_cache_reuse(ckpts, tmp_path, capsys):
    cache = tmp_path / "pc"
    assert _run(ckpts, "--student", str(ckpts / "student.safetensors"), "--pairs-cache", str(cache),
                "--out", str(tmp_path / "a.json")) == 0
    # A denoiser checkpoint is wrapped as OneStepStudent(D, sigma_max=80): the same generator
    assert _run(ckpts, "--student", str(ckpts / "student_denoiser.safetensors"), "--student-sigma", "80",
                "--pairs-cache", str(cache), "--out", str(tmp_path / "b.json")) == 0
    a = json.loads((tmp_path / "a.json").read_text())["delta_e"]
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["settings"]["student_class"] == "OneStepStudent" and b["settings"]["student_sigma"] == 80.0
    assert b["delta_e"]["delta_e"] == a["delta_e"]


def test_conditional_checkpoints(ckpts, tmp_path):
    cond = EDMPrecond(MLP(2, hidden=16, depth=1, label_dim=4))
    save(OneStepStudent(cond), tmp_path / "cond_student.safetensors")
    rc = main(["delta-e", "--teacher", str(ckpts / "cond.safetensors"), "--student",
               str(tmp_path / "cond_student.safetensors"), "--seeds", "0-49", "--steps", "4",
               "--bootstrap", "0", "--no-progress", "--pairs-cache", str(tmp_path / "pc"),
               "--out", str(tmp_path / "r.json")])
    assert rc == 0
    manifest = json.loads((tmp_path / "pc" / "manifest.json").read_text())
    assert manifest["labels"] == {"kind": "labels_for_seeds", "num_classes": 4}
    assert json.loads((tmp_path / "r.json").read_text())["delta_e"]["n"] == 50


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def test_errors_are_one_line(ckpts, tmp_path, capsys):
    student = str(ckpts / "student.safetensors")
    assert _run(ckpts, "--student", str(tmp_path / "missing.safetensors")) == 1
    assert "--student" in _error_line(capsys)
    assert main(["delta-e", "--teacher", student, "--student", student, "--no-progress"]) == 1
    assert "not a denoiser" in _error_line(capsys)
    assert main(["delta-e", "--teacher", str(ckpts / "teacher3.safetensors"), "--student", student,
                 "--no-progress"]) == 1
    assert "mismatched checkpoints" in _error_line(capsys)
    assert main(["delta-e", "--teacher", str(ckpts / "cond.safetensors"), "--student", student,
                 "--no-progress"]) == 1
    assert "label_dim" in _error_line(capsys)
    assert _run(ckpts, "--student", student, "--student-sigma", "10") == 1
    assert "--student-sigma" in _error_line(capsys)
    (tmp_path / "text.safetensors").write_text("hello")
    assert _run(ckpts, "--student", str(tmp_path / "text.safetensors")) == 1
    _error_line(capsys)
    cache = str(tmp_path / "pc")
    assert _run(ckpts, "--student", student, "--pairs-cache", cache) == 0
    capsys.readouterr()
    assert _run(ckpts, "--student", student, "--pairs-cache", cache, "--steps", "7") == 1
    assert "other settings" in _error_line(capsys)
    assert _run(ckpts, "--student", student, "--seeds", "3") == 1
    assert "at least 2" in _error_line(capsys)
    assert _run(ckpts, "--student", student, "--seeds", "9-0") == 1
    assert "seed range" in _error_line(capsys)
    if not torch.cuda.is_available():
        assert _run(ckpts, "--student", student, "--device", "cuda") == 1
        assert "CUDA is not available" in _error_line(capsys)


# ---------------------------------------------------------------------------------------------
# Training callback

GRID = karras_sigmas(8)


class TeacherMap(nn.Module):
    """The teacher's own ODE map as a generator: a student that copies its teacher exactly."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, z, class_labels=None):
        return self.scale * teacher_ode(self.teacher, z, GRID, class_labels=class_labels)


def _mixture() -> GaussianMixtureTeacher:
    means = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]])
    return GaussianMixtureTeacher(means, torch.full((3,), 0.3))


def test_callback_copying_student_scores_zero(tmp_path):
    T = _mixture()
    G = TeacherMap(T)
    distiller = SimpleNamespace(student=G, ema_student=None, teacher=T, device=torch.device("cpu"),
                                step=0, is_main=True, sample_shape=(2,), label_dim=0)
    cb = DeltaECallback(5, range(64), sigmas=GRID, batch=64, n_boot=20)
    assert cb(distiller, 3) is None
    log = cb(distiller, 5)
    assert log["delta_e"] == pytest.approx(0.0, abs=1e-6) and log["own_pair_rate"] == 1.0
    assert set(log) == {"delta_e", "delta_e_lo", "delta_e_hi", "e_pair", "e_opt", "e_ind", "resolution",
                        "own_pair_rate"}
    assert G.training  # mode restored
    # From a pair store, with the teacher fingerprint checked
    store = generate_pairs(T, range(64), tmp_path / "pc", sigmas=GRID, batch=64)
    cb2 = DeltaECallback(1, range(10, 50), pairs=store, batch=64, n_boot=0, prefix="copy/")
    assert cb2(distiller, 1)["copy/delta_e"] == pytest.approx(0.0, abs=1e-6)
    other = SimpleNamespace(**{**vars(distiller), "teacher": GaussianMixtureTeacher(
        torch.zeros(1, 2), torch.ones(1))})
    with pytest.raises(ConfigError, match="another teacher"):
        DeltaECallback(1, range(10), pairs=store)(other, 1)
    assert cb(SimpleNamespace(**{**vars(distiller), "is_main": False}), 5) is None
    with pytest.raises(ConfigError, match="every"):
        DeltaECallback(0, range(10))


def test_callback_writes_to_distiller_log(tmp_path):
    from dmdcopy.distill import DistillConfig, Distiller

    torch.manual_seed(0)
    T = _mixture()
    G = OneStepStudent(EDMPrecond(MLP(2, hidden=16, depth=1)))
    cfg = DistillConfig(num_steps=4, batch_size=8, fake_score_steps=1, log_every=2, progress_bar=False,
                        ema_halflife_steps=None, checkpoint_every=1000)
    cb = DeltaECallback(2, range(48), sigmas=GRID, batch=48, n_boot=20)
    Distiller(T, G, config=cfg, fake_score=EDMPrecond(MLP(2, hidden=16, depth=1)), callbacks=[cb],
              out_dir=tmp_path).train()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["delta_e"]) for r in records if "delta_e" in r]
    assert [s for s, _ in curve] == [2, 4]
    assert all(v >= 0 for _, v in curve)
