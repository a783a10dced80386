"""`dmdcopy delta-e` end to end on tiny checkpoints, and the Delta E training callback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dmdcopy.cli import main
from dmdcopy.distill.callbacks import DeltaECallback
from dmdcopy.errors import CheckpointError, ConfigError
from dmdcopy.io import load, read_metadata, save
from dmdcopy.measure import delta_e
from dmdcopy.nets import MLP
from dmdcopy.noise import noise_for_seeds
from dmdcopy.pairs import generate_pairs, teacher_fingerprint
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


def test_a_report_write_that_fails_midway_keeps_the_previous_report(ckpts, tmp_path, monkeypatch):
    from pathlib import Path

    out = tmp_path / "report.json"
    out.write_text('{"previous": true}')
    real = Path.write_text

    def disk_full(self, text, *args, **kwargs):  # half the report reaches the disk, then ENOSPC
        real(self, text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _run(ckpts, "--student", str(ckpts / "student.safetensors"), "--out", str(out))
    monkeypatch.undo()
    assert json.loads(out.read_text()) == {"previous": True}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left behind
    assert _run(ckpts, "--student", str(ckpts / "student.safetensors"), "--out", str(out)) == 0
    assert json.loads(out.read_text())["delta_e"]["n"] == 120


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
    assert manifest["labels"] == {"kind": "labels_for_seeds", "label_dim": 4}
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
# Your own classes by import path (tests/userpkg stands in for an installed package)

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def user_ckpts(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    from userpkg.nets import build_student, build_teacher

    torch.manual_seed(3)
    teacher, student = build_teacher(width=16), build_student(width=16)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    save_file(teacher.state_dict(), tmp_path / "teacher_plain.safetensors")  # no dmdcopy metadata
    save(teacher, tmp_path / "teacher.safetensors")  # dmdcopy's format, records a user class
    torch.save(student.state_dict(), tmp_path / "student.pt")
    save_file(student.state_dict(), tmp_path / "student.safetensors")
    with torch.no_grad():
        expected = delta_e(teacher, student, range(60), sigmas=karras_sigmas(5, 0.002, 80.0), n_boot=0)
    return tmp_path, teacher, expected.result.delta_e


TEACHER_ARCH = ["--teacher-arch", "userpkg.nets:build_teacher", "--teacher-kwargs", '{"width": 16}']
STUDENT_ARCH = ["--student-arch", "userpkg.nets:build_student", "--student-kwargs", '{"width": 16}']


def _user_run(d, teacher, student, *extra):
    return ["delta-e", "--teacher", str(d / teacher), "--student", str(d / student), "--seeds", "0-59",
            "--steps", "5", "--bootstrap", "0", "--no-progress", *extra]


def test_user_classes_from_the_command_line_in_a_fresh_process(user_ckpts):
    """The real command in a subprocess: the user's package is found on PYTHONPATH only."""
    d, _, expected = user_ckpts
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    argv = _user_run(d, "teacher.pt", "student.safetensors", *TEACHER_ARCH, *STUDENT_ARCH, "--out",
                     str(d / "r.json"))
    done = subprocess.run([sys.executable, "-m", "dmdcopy", *argv], cwd=d, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "population Delta E bracket" in done.stdout
    report = json.loads((d / "r.json").read_text())
    assert report["delta_e"]["delta_e"] == pytest.approx(expected, abs=1e-6)
    assert report["settings"]["teacher_arch"] == "userpkg.nets:build_teacher"
    assert report["settings"]["student_class"] == "Generator"


def test_user_classes_every_file_kind_and_a_denoiser_student(user_ckpts, capsys):
    d, teacher, expected = user_ckpts
    for teacher_file, student_file in (("teacher.safetensors", "student.pt"),
                                       ("teacher_plain.safetensors", "student.safetensors")):
        out = d / f"{teacher_file}.json"
        assert main(_user_run(d, teacher_file, student_file, *TEACHER_ARCH, *STUDENT_ARCH,
                              "--out", str(out))) == 0
        assert json.loads(out.read_text())["delta_e"]["delta_e"] == pytest.approx(expected, abs=1e-6)
    # a user denoiser as the student is wrapped as OneStepStudent: the same network reads a copy
    student_arch = ["--student-arch", "userpkg.nets:build_teacher", "--student-kwargs", '{"width": 16}']
    assert main(_user_run(d, "teacher.pt", "teacher.pt", *TEACHER_ARCH, *student_arch,
                          "--out", str(d / "self.json"))) == 0
    report = json.loads((d / "self.json").read_text())
    assert report["settings"]["student_class"] == "OneStepStudent"
    assert report["settings"]["student_sigma"] == 80.0
    with torch.no_grad():
        wrapped = delta_e(teacher, OneStepStudent(teacher), range(60), sigmas=karras_sigmas(5, 0.002, 80.0),
                          n_boot=0)
    assert report["delta_e"]["delta_e"] == pytest.approx(wrapped.result.delta_e, abs=1e-6)
    capsys.readouterr()


def test_convert_with_a_user_architecture(user_ckpts, capsys):
    d, teacher, _ = user_ckpts
    out = d / "converted.safetensors"
    assert main(["convert", str(d / "teacher.pt"), str(out), *["--arch", "userpkg.nets:build_teacher"],
                 "--kwargs", '{"width": 16}']) == 0
    printed = capsys.readouterr().out
    assert "Denoiser" in printed and "same --arch" in printed
    assert read_metadata(out)["arch"] == "userpkg.nets:build_teacher"
    with pytest.raises(CheckpointError, match="user-defined classes"):
        load(out)
    from userpkg.nets import build_teacher

    filled = load(out, into=build_teacher(width=16))
    assert all(torch.equal(a, b) for a, b in zip(filled.state_dict().values(), teacher.state_dict().values()))
    assert main(["convert", str(d / "teacher.pt"), str(out), "--arch", "userpkg.nets:build_teacher",
                 "--kwargs", '{"width": 8}']) == 1
    assert "mismatched shapes" in _error_line(capsys)
    assert main(["convert", str(d / "teacher.pt"), str(out), "--arch", "imagenet64"]) == 1
    assert "module:builder" in _error_line(capsys)


@pytest.mark.parametrize("args, message", [
    (["--teacher-arch", "userpkg.nope:build"], "no module named 'userpkg.nope'"),
    (["--teacher-arch", "userpkg.nets:build_nothing"], "has no attribute 'build_nothing'"),
    (["--teacher-arch", "userpkg.nets:WIDTH"], "not a callable"),
    (["--teacher-arch", "userpkg.nets.build_teacher"], "expected 'module:callable'"),
    (["--teacher-arch", "userpkg.nets:build_teacher", "--teacher-kwargs", '{"width": }'], "not valid JSON"),
    (["--teacher-arch", "userpkg.nets:build_teacher", "--teacher-kwargs", "[16]"], "must be a JSON object"),
    (["--teacher-arch", "userpkg.nets:build_teacher", "--teacher-kwargs", '{"width": -1}'],
     "raised ValueError: width must be positive"),
    (["--teacher-arch", "userpkg.nets:build_teacher", "--teacher-kwargs", '{"wide": 1}'], "raised TypeError"),
    (["--teacher-arch", "userpkg.nets:build_teacher", "--teacher-kwargs", '{"width": 8}'],
     "does not fit userpkg.nets:build_teacher .* mismatched shapes"),
    (["--teacher-arch", "userpkg.nets:build_student"], "not a denoiser"),  # a generator as the teacher
    (["--teacher-kwargs", '{"width": 16}'], "--teacher-kwargs needs --teacher-arch"),
])
def test_user_architecture_errors_are_one_line(user_ckpts, capsys, args, message):
    d, _, _ = user_ckpts
    teacher_file = "student.pt" if "userpkg.nets:build_student" in args else "teacher.pt"
    assert main(_user_run(d, teacher_file, "student.pt", *STUDENT_ARCH, *args)) == 1
    line = _error_line(capsys)
    assert re.search(message, line), line
    assert line.startswith("dmdcopy delta-e: error: --teacher")


def test_missing_file_with_an_architecture_is_one_line(user_ckpts, capsys):
    d, _, _ = user_ckpts
    assert main(_user_run(d, "nothing.pt", "student.pt", *TEACHER_ARCH, *STUDENT_ARCH)) == 1
    assert "nothing.pt: no such file" in _error_line(capsys)
    # a dmdcopy file of a user class names the way out
    assert main(_user_run(d, "teacher.safetensors", "student.pt", *STUDENT_ARCH)) == 1
    assert "--teacher-arch" in _error_line(capsys)


# ---------------------------------------------------------------------------------------------
# The README's flow: `dmdcopy distill examples/configs/gmm2d.toml`, then `dmdcopy delta-e` on it


def test_distill_gmm2d_then_delta_e(tmp_path, capsys):
    config = (TESTS.parent / "examples" / "configs" / "gmm2d.toml").read_text()
    short = {'out_dir = "runs/gmm2d"': f'out_dir = "{(tmp_path / "gmm2d").as_posix()}"',
             'device = "auto"': 'device = "cpu"', "num_steps = 600": "num_steps = 4",
             "batch_size = 256": "batch_size = 16", "hidden = 128": "hidden = 16", "depth = 3": "depth = 1",
             "checkpoint_every = 200": "checkpoint_every = 4", "log_every = 50": "log_every = 2"}
    for old, new in short.items():
        assert old in config, old
        config = config.replace(old, new)
    (tmp_path / "gmm2d.toml").write_text(config)
    assert main(["distill", str(tmp_path / "gmm2d.toml"), "--no-progress"]) == 0
    run = tmp_path / "gmm2d"
    assert f"dmdcopy delta-e --teacher {run / 'teacher.safetensors'}" in capsys.readouterr().out
    teacher = load(run / "teacher.safetensors")
    assert isinstance(teacher, GaussianMixtureTeacher) and teacher.means.shape == (8, 2)
    assert main(["delta-e", "--teacher", str(run / "teacher.safetensors"), "--student",
                 str(run / "student.safetensors"), "--seeds", "0-199", "--steps", "6", "--bootstrap", "20",
                 "--pairs-cache", str(tmp_path / "pairs"), "--out", str(tmp_path / "r.json"),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Delta E (finite N)" in printed and "population Delta E bracket" in printed
    report = json.loads((tmp_path / "r.json").read_text())
    r = report["delta_e"]
    assert r["n"] == 200 and r["delta_e_lower"] <= r["delta_e_upper"]
    assert report["settings"]["teacher_fingerprint"] == teacher_fingerprint(teacher)
    # the same figure through the one library path
    student = load(run / "student.safetensors")
    again = delta_e(teacher, student, range(200), sigmas=karras_sigmas(6, 0.002, 80.0), n_boot=20)
    assert again.result.delta_e == pytest.approx(r["delta_e"], abs=1e-6)


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
                        "own_pair_rate", "delta_e_lower", "delta_e_upper", "bracket_low", "bracket_high",
                        "e_opt_lower", "delta_e_nonfinite"}
    assert log["delta_e_nonfinite"] == 0.0 and log["delta_e_upper"] == pytest.approx(0.0, abs=1e-6)
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
    # the last logged figures are those of the trained student, measured on the same seeds
    import dmdcopy

    last = next(r for r in reversed(records) if "delta_e" in r)
    again = dmdcopy.delta_e(T, G, range(48), sigmas=GRID, batch=48, n_boot=20).result
    assert last["delta_e"] == pytest.approx(again.delta_e, rel=1e-9, abs=1e-12)
    assert last["delta_e_upper"] == pytest.approx(again.delta_e_upper, rel=1e-9, abs=1e-12)
    assert last["delta_e_lower"] <= last["delta_e_upper"]


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0-2000000000"], "more than"),
    (["--rho", "0"], "--rho must be > 0"),
    (["--out", "{tmp}"], "is a directory"),
    (["--out", "{tmp}/file.json/report.json"], "is a file, not a directory"),
])
def test_bad_sizes_and_targets_are_one_line_before_any_work(tmp_path, capsys, args, message):
    (tmp_path / "file.json").write_text("{}")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    rc = main(["delta-e", "--teacher", str(tmp_path / "missing-teacher.safetensors"),
               "--student", str(tmp_path / "missing-student.safetensors"), *args])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and message in err and len(err.splitlines()) == 1, err
