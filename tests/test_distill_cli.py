"""``dmdcopy distill CONFIG.toml [--resume]``."""

import json

import pytest
import torch

from dmdcopy.cli import main
from dmdcopy.cli.distill import build_run, load_toml
from dmdcopy.errors import ConfigError
from dmdcopy.nets import MLP
from dmdcopy.precond import EDMPrecond
from dmdcopy.students import MultiStepStudent, OneStepStudent

GMM_TOML = """
out_dir = "{out}"
device = "cpu"

[teacher]
kind = "gmm"
means = [[-1.0, 0.0], [1.0, 0.0]]
stds = [0.2, 0.2]

[student]
init = "mlp"
hidden = 16
depth = 1

[fake_score]
init = "mlp"
hidden = 16
depth = 1

[distill]
num_steps = {steps}
batch_size = 8
fake_score_steps = 2
log_every = 1
checkpoint_every = 2
{extra}
"""


def write(tmp_path, steps=3, extra=""):
    path = tmp_path / "run.toml"
    path.write_text(GMM_TOML.format(out=(tmp_path / "out").as_posix(), steps=steps, extra=extra))
    return path


def test_cli_runs_and_resumes(tmp_path, capsys):
    assert main(["distill", str(write(tmp_path, steps=3)), "--no-progress"]) == 0
    assert "3 steps done" in capsys.readouterr().out
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000000002.safetensors",
                                                                  "checkpoint-000000003.safetensors"]
    assert main(["distill", str(write(tmp_path, steps=5)), "--resume", "--no-progress"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    assert main(["distill", str(write(tmp_path, extra="generator_lrr = 1.0"))]) == 1
    err = capsys.readouterr().err
    assert "generator_lrr" in err and "Traceback" not in err
    assert main(["distill", str(write(tmp_path, extra="generator_lr = -1.0"))]) == 1
    assert "generator_lr must be > 0" in capsys.readouterr().err
    assert main(["distill", str(tmp_path / "missing.toml")]) == 1
    capsys.readouterr()


@pytest.mark.parametrize("edit, message", [
    (lambda spec: spec["student"].update(sigmas="80"), "sigmas must be a non-empty array"),
    (lambda spec: spec["student"].update(sigmas=[]), "sigmas must be a non-empty array"),
    (lambda spec: spec["student"].update(hidden="wide"), "hidden must be an integer"),
    (lambda spec: spec.update(distill=5), r"\[distill\] must be a table"),
    (lambda spec: spec["teacher"].update(means=[[0.0, 1.0], [2.0]]), "must be numbers"),
    (lambda spec: spec.update(device="gpu0"), "not a torch device"),
    (lambda spec: spec["distill"].update(betas="0.9, 0.99"), "betas must be a pair"),
])
def test_malformed_values_are_config_errors(tmp_path, edit, message):
    # Each of these used to escape as a bare ValueError / TypeError / IndexError / RuntimeError.
    spec = load_toml(write(tmp_path))
    edit(spec)
    with pytest.raises(ConfigError, match=message):
        build_run(spec)


def test_build_run_from_a_saved_teacher(tmp_path):
    from dmdcopy.io import save

    teacher = EDMPrecond(MLP(2, hidden=16, depth=1))
    save(teacher, tmp_path / "teacher.safetensors")
    text = GMM_TOML.format(out="o", steps=1, extra="")
    text = text.replace('kind = "gmm"\nmeans = [[-1.0, 0.0], [1.0, 0.0]]\nstds = [0.2, 0.2]',
                        f'kind = "checkpoint"\npath = "{(tmp_path / "teacher.safetensors").as_posix()}"')
    text = text.replace('init = "mlp"\nhidden = 16\ndepth = 1\n\n[fake_score]', 'init = "teacher"\n'
                        'sigmas = [80.0, 1.0]\n\n[fake_score]')
    (tmp_path / "t.toml").write_text(text)
    parts = build_run(load_toml(tmp_path / "t.toml"))
    assert isinstance(parts["student"], MultiStepStudent) and parts["student"].sigmas == (80.0, 1.0)
    for a, b in zip(parts["student"].denoiser.parameters(), teacher.parameters()):
        assert torch.equal(a, b)
    spec = load_toml(tmp_path / "t.toml")
    spec["teacher"]["means"] = [[0.0, 0.0]]
    with pytest.raises(ConfigError, match="unknown key"):
        build_run(spec)
    gmm_spec = load_toml(write(tmp_path))
    gmm_spec["student"]["init"] = "teacher"
    with pytest.raises(ConfigError, match="init = 'mlp'"):
        build_run(gmm_spec)
    gmm_spec["student"]["init"] = "mlp"
    assert isinstance(build_run(gmm_spec)["student"], OneStepStudent)


def test_cli_exports_students_that_load_back(tmp_path, capsys):
    """The run ends with student.safetensors (and the EMA's), rebuilt by dmdcopy.load as they trained."""
    from dmdcopy.distill import read_checkpoint
    from dmdcopy.io import load

    assert main(["distill", str(write(tmp_path, steps=2, extra="ema_halflife_steps = 1.0")),
                 "--no-progress"]) == 0
    assert "student.safetensors" in capsys.readouterr().out
    out = tmp_path / "out"
    z = torch.randn(5, 2)
    for name in ("student", "student_ema"):
        G = load(out / f"{name}.safetensors")
        assert isinstance(G, OneStepStudent)
        ref = OneStepStudent(EDMPrecond(MLP(2, hidden=16, depth=1)))
        tensors, _ = read_checkpoint(out / "checkpoint-000000002.safetensors")
        prefix = "student/" if name == "student" else "ema/"
        ref.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        with torch.no_grad():
            assert torch.equal(G(z), ref.eval()(z))


def test_load_takes_one_network_out_of_a_training_checkpoint(tmp_path):
    from dmdcopy.errors import CheckpointError
    from dmdcopy.io import load

    assert main(["distill", str(write(tmp_path, steps=2, extra="ema_halflife_steps = 0")),
                 "--no-progress"]) == 0
    ckpt = tmp_path / "out" / "checkpoint-000000002.safetensors"
    exported = load(tmp_path / "out" / "student.safetensors")
    G = OneStepStudent(EDMPrecond(MLP(2, hidden=16, depth=1)))
    load(ckpt, into=G, key="student")
    z = torch.randn(4, 2)
    with torch.no_grad():
        assert torch.equal(G.eval()(z), exported(z))
    with pytest.raises(CheckpointError, match="without a 'ema' entry"):
        load(ckpt, into=G)  # the default key; this run had no EMA
    with pytest.raises(CheckpointError, match="stores weights, not architectures"):
        load(ckpt, key="student")



def test_run_checkpoint_entries_and_student_export(tmp_path):
    from dmdcopy.distill import read_checkpoint, read_entry
    from dmdcopy.errors import CheckpointError
    from dmdcopy.io import load, read_metadata
    from dmdcopy.io.run_checkpoint import FORMAT, export_students

    assert FORMAT == "dmdcopy-distill-checkpoint/1"  # files written before stay readable
    assert main(["distill", str(write(tmp_path, steps=2, extra="ema_halflife_steps = 1.0")),
                 "--no-progress"]) == 0
    ckpt = tmp_path / "out" / "checkpoint-000000002.safetensors"
    tensors, state = read_checkpoint(ckpt)
    assert state["step"] == 2 and set(state["optim"]) == {"generator", "fake_score"}
    for key in ("student", "ema", "fake_score"):
        entry = read_entry(ckpt, key)
        assert entry and all(torch.equal(v, tensors[f"{key}/{k}"]) for k, v in entry.items())
        assert len(entry) == sum(k.startswith(f"{key}/") for k in tensors)
    with pytest.raises(CheckpointError, match=r"without a 'discriminator' entry; it holds \['ema', "
                                              r"'fake_score', 'student'\]"):
        read_entry(ckpt, "discriminator")
    G = OneStepStudent(EDMPrecond(MLP(2, hidden=16, depth=1)))
    written, skipped = export_students({"student": G, "student_ema": None}, tmp_path / "exp", step=7)
    assert written == [tmp_path / "exp" / "student.safetensors"] and skipped == {}
    z = torch.randn(3, 2)
    with torch.no_grad():
        assert torch.equal(load(written[0])(z), G.eval()(z))
    assert read_metadata(written[0])["dmdcopy.distill.step"] == "7"
