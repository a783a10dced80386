"""Run safety: a run directory belongs to one run, checkpoint integrity and identity, teacher
faults, and SIGINT / SIGTERM."""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dmdcopy.distill import DistillConfig, Distiller, list_checkpoints, rundir
from dmdcopy.errors import CheckpointError, ConfigError, NonFiniteError, RunInterrupted
from dmdcopy.io import run_checkpoint as ckpt
from dmdcopy.nets import MLP
from dmdcopy.precond import EDMPrecond
from dmdcopy.students import OneStepStudent
from dmdcopy.teachers import GaussianMixtureTeacher

MEANS = torch.tensor([[-1.0, -1.0], [1.0, 1.0]])


def gmm(shift=0.0):
    return GaussianMixtureTeacher(MEANS + shift, torch.full((2,), 0.15))


def net(hidden=16):
    return EDMPrecond(MLP(2, hidden=hidden, depth=1))


def config(**kw):
    base = dict(batch_size=8, num_steps=3, generator_lr=1e-3, fake_score_lr=1e-3, log_every=1,
                progress_bar=False, ema_halflife_steps=None, fake_score_steps=1, checkpoint_every=1,
                keep_checkpoints=5)
    base.update(kw)
    return DistillConfig(**base)


def distiller(out_dir, *, teacher=None, sigma=80.0, seed=0, **kw):
    overwrite = kw.pop("overwrite", False)
    torch.manual_seed(seed)  # the same initial weights in every call
    return Distiller(teacher or gmm(), OneStepStudent(net(), sigma), fake_score=net(),
                     config=config(**kw), out_dir=out_dir, overwrite=overwrite)


def steps(directory):
    return [s for s, _ in list_checkpoints(directory)]


def weights(d):
    return {k: v.clone() for k, v in d.state_tensors()[0].items() if not k.startswith("rng/")}


# --- 1. a run directory belongs to one run --------------------------------------------------------


def test_a_fresh_run_refuses_a_used_directory_and_overwrite_moves_it_aside(tmp_path):
    distiller(tmp_path).train()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ConfigError, match=r"holds another run \(3 checkpoint\(s\), log.jsonl\); "
                                          r"resume it .*new out_dir.*overwrite"):
        distiller(tmp_path, seed=1).train()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing touched

    distiller(tmp_path, seed=1, num_steps=2, overwrite=True).train()
    (old,) = tmp_path.glob("previous-*")
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before  # moved, byte for byte
    assert steps(tmp_path) == [1, 2]
    log = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2]


def test_pruning_removes_only_this_runs_older_checkpoints(tmp_path):
    other = tmp_path / "other"
    distiller(other, seed=3, num_steps=1).train()
    run = tmp_path / "run"
    d = distiller(run, num_steps=2, keep_checkpoints=1)
    d.train()
    assert steps(run) == [2]
    # another run's checkpoint, newer than anything this run writes, lands in the directory
    (run / ckpt.checkpoint_name(50)).write_bytes((other / ckpt.checkpoint_name(1)).read_bytes())
    again = distiller(run, num_steps=4, keep_checkpoints=1)
    again.train(resume=run / ckpt.checkpoint_name(2))
    assert again.step == 4
    assert steps(run) == [4, 50]  # its own 2 and 3 pruned; the foreign (and newer) one kept


def test_a_second_writer_is_refused_at_once_and_a_dead_ones_file_does_not_block(tmp_path):
    d = distiller(tmp_path)
    with rundir.writer_lock(tmp_path):
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=rf"another run \(pid {os.getpid()}, host .+\) is writing"):
            d.train()
        assert time.monotonic() - t0 < 5
    assert steps(tmp_path) == [] and not (tmp_path / "log.jsonl").exists()
    # a killed writer leaves its lock file behind, unlocked: it does not block the next run
    (tmp_path / rundir.LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "gone"}))
    d.train()
    assert d.step == 3 and not (tmp_path / rundir.LOCK_NAME).exists()


# --- 2. integrity -----------------------------------------------------------------------------------


def _data_offset(path):
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + n


def test_a_corrupt_newest_checkpoint_is_reported_and_skipped(tmp_path, capsys):
    distiller(tmp_path).train()
    newest = tmp_path / ckpt.checkpoint_name(3)
    raw = newest.read_bytes()
    start = _data_offset(newest)
    newest.write_bytes(raw[:start] + bytes(len(raw) - start))  # zero-filled data, intact header
    d = distiller(tmp_path)
    assert d.resume("latest").name == ckpt.checkpoint_name(2)
    assert d.step == 2
    err = capsys.readouterr().err
    assert f"skipping {newest.name}" in err and "sha256" in err

    # one flipped bit in a weight: refused on an explicit load too
    second = tmp_path / ckpt.checkpoint_name(2)
    raw = bytearray(second.read_bytes())
    raw[_data_offset(second) + 5] ^= 0x10
    second.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"corrupt.*sha256"):
        distiller(tmp_path).load_checkpoint(second)
    assert distiller(tmp_path).resume("latest").name == ckpt.checkpoint_name(1)

    # all of them corrupt: an error, not a silent restart from step 0
    first = tmp_path / ckpt.checkpoint_name(1)
    first.write_bytes(first.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="none of its 3 checkpoint"):
        distiller(tmp_path).train(resume="latest")


def test_a_checkpoint_without_digest_still_loads(tmp_path):
    d = distiller(tmp_path, num_steps=1)
    d.train()
    path = tmp_path / ckpt.checkpoint_name(1)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state = json.loads(meta["state"])
    del state["fingerprint"], state["run_id"]
    save_file(tensors, str(path), metadata={"format": meta["format"], "state": json.dumps(state)})
    again = distiller(tmp_path, num_steps=1)
    again.load_checkpoint(path)
    assert again.step == 1
    assert all(torch.equal(v, weights(again)[k]) for k, v in weights(d).items())


def test_temp_files_of_interrupted_writes_are_removed(tmp_path):
    names = [".checkpoint-000000004.safetensors.k2j3.tmp", ".tmpab12cd", ".log.jsonl.tmp"]
    for name in names:
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / "notes.tmp").write_text("the user's own file")
    distiller(tmp_path, num_steps=1).train()
    assert [n for n in names if (tmp_path / n).exists()] == []
    assert (tmp_path / "notes.tmp").exists()
    (tmp_path / names[0]).write_bytes(b"partial")
    distiller(tmp_path, num_steps=2).train(resume="latest")
    assert not (tmp_path / names[0]).exists()


# --- 3. run identity --------------------------------------------------------------------------------


def test_resume_refuses_another_run_and_names_the_fields(tmp_path):
    distiller(tmp_path, num_steps=2).train()
    with pytest.raises(CheckpointError, match=r"another run: \['teacher'\] differ"):
        distiller(tmp_path, teacher=gmm(shift=0.5)).train(resume="latest")
    with pytest.raises(CheckpointError, match=r"\['student_architecture'\] differ"):
        distiller(tmp_path, sigma=40.0).train(resume="latest")
    # a longer run with other intervals continues
    d = distiller(tmp_path, num_steps=4, log_every=2, checkpoint_every=2)
    d.train(resume="latest")
    assert d.step == 4


def test_resume_refuses_other_initial_weights_unless_allowed(tmp_path, capsys):
    distiller(tmp_path, num_steps=2).train()
    with pytest.raises(CheckpointError, match=r"\['fake_score_init', 'student_init'\] differ; the "
                                              r"networks were initialised differently.*allow_new_init"):
        distiller(tmp_path, seed=5).train(resume="latest")
    d = distiller(tmp_path, seed=5, num_steps=3)
    d.train(resume="latest", allow_new_init=True)
    assert d.step == 3
    assert "initial weights differ" in capsys.readouterr().err


def test_the_default_discriminator_is_seeded_by_the_config(tmp_path):
    real = gmm().sample(64, generator=torch.Generator().manual_seed(0))

    def head(seed, global_seed):
        torch.manual_seed(0)
        student, fake = OneStepStudent(net(), 80.0), net()
        torch.manual_seed(global_seed)  # the global RNG state at construction must not matter
        d = Distiller(gmm(), student, fake_score=fake, real_data=real,
                      config=config(gan=True, seed=seed, gan_feature_module="model.blocks.0.fc2"))
        return {k: v.clone() for k, v in d.discriminator.state_dict().items()}

    a, b, c = head(0, 1), head(0, 2), head(1, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# --- 4. teacher faults ------------------------------------------------------------------------------


class FaultyTeacher(GaussianMixtureTeacher):
    """A GMM teacher that returns NaN while ``bad`` is set."""

    bad = False

    def forward(self, x, sigma, class_labels=None):
        out = super().forward(x, sigma, class_labels)
        return torch.full_like(out, float("nan")) if self.bad else out


def faulty():
    return FaultyTeacher(MEANS, torch.full((2,), 0.15))


def test_non_finite_teacher_outputs_are_skipped_and_counted(tmp_path):
    teacher = faulty()
    d = distiller(None, teacher=teacher)
    before = [p.clone() for p in d.student.parameters()]
    teacher.bad = True
    record = d.generator_step()
    assert record.skipped and d.nonfinite_total == 1 and d.generator_updates == 0
    assert all(torch.equal(a, b) for a, b in zip(before, d.student.parameters()))
    teacher.bad = False
    assert not d.generator_step().skipped and d.nonfinite_in_a_row["generator"] == 0

    teacher = faulty()
    d = distiller(None, teacher=teacher, num_steps=20, max_nonfinite_in_a_row=3)
    teacher.bad = True
    with pytest.raises(NonFiniteError, match=r"3 generator updates in a row.*teacher output"):
        d.train()
    assert d.step == 2 and d.generator_updates == 0


# --- 5. signals -------------------------------------------------------------------------------------


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_resumes_bit_exact(tmp_path):
    reference = distiller(tmp_path / "ref", num_steps=4, checkpoint_every=100)
    reference.train()

    def terminate(distiller, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    first = distiller(tmp_path / "run", num_steps=4, checkpoint_every=100)
    first.callbacks.append(terminate)
    with pytest.raises(RunInterrupted, match=r"SIGTERM at step 2 of 4.*resume") as info:
        first.train()
    assert info.value.signum == signal.SIGTERM and steps(tmp_path / "run") == [2]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is put back
    resumed = distiller(tmp_path / "run", num_steps=4, checkpoint_every=100)
    resumed.train(resume="latest")
    ref, got = weights(reference), weights(resumed)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


CLI_TOML = """
out_dir = "{out}"
device = "cpu"

[teacher]
kind = "gmm"
means = [[-1.0, 0.0], [1.0, 0.0]]
stds = [0.2, 0.2]

[student]
init = "mlp"
hidden = 8
depth = 1

[fake_score]
init = "mlp"
hidden = 8
depth = 1

[distill]
num_steps = {steps}
batch_size = 8
fake_score_steps = 1
log_every = 1
checkpoint_every = 1000000
"""


@pytest.mark.parametrize("sig, rc", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_cli_stops_cleanly_on_a_signal(tmp_path, sig, rc):
    cfg = tmp_path / "run.toml"
    out = tmp_path / "out"
    cfg.write_text(CLI_TOML.format(out=out.as_posix(), steps=1000000))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "dmdcopy", "distill", str(cfg), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (out / "log.jsonl").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == rc, err
    assert "Traceback" not in err and f"{cfg} --resume" in err
    (step, _), = list_checkpoints(out)
    assert step >= 1


def test_cli_refuses_a_used_out_dir_unless_overwrite(tmp_path, capsys):
    from dmdcopy.cli import main

    cfg = tmp_path / "run.toml"
    cfg.write_text(CLI_TOML.format(out=(tmp_path / "out").as_posix(), steps=2))
    assert main(["distill", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["distill", str(cfg), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--resume" in err and "--overwrite" in err
    assert main(["distill", str(cfg), "--no-progress", "--overwrite"]) == 0
    (old,) = (tmp_path / "out").glob("previous-*")
    assert steps(old) == [2] and steps(tmp_path / "out") == [2]
    assert (old / "student.safetensors").exists() and (tmp_path / "out" / "student.safetensors").exists()


def test_an_out_dir_that_is_a_file_is_a_config_error(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot write there"):
        distiller(path).train()


def test_a_zero_filled_checkpoint_without_digest_is_skipped_too(tmp_path, capsys):
    distiller(tmp_path, num_steps=2).train()
    for step in (1, 2):  # as written before digests existed
        path = tmp_path / ckpt.checkpoint_name(step)
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        if step == 2:
            tensors = {k: torch.zeros_like(v) for k, v in tensors.items()}
        save_file(tensors, str(path), metadata={"format": meta["format"], "state": meta["state"]})
    d = distiller(tmp_path, num_steps=2)
    assert d.resume("latest").name == ckpt.checkpoint_name(1)
    assert "invalid RNG state" in capsys.readouterr().err


def test_train_again_on_the_same_distiller_continues_its_own_run(tmp_path):
    sent = []

    def interrupt_once(distiller, step):
        if not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGINT)  # e.g. Ctrl-C in a notebook

    d = distiller(tmp_path)
    d.callbacks.append(interrupt_once)
    with pytest.raises(RunInterrupted):
        d.train()
    d.train()  # carries on: its own directory is not "another run"
    assert d.step == 3 and steps(tmp_path) == [1, 2, 3] and not list(tmp_path.glob("previous-*"))
