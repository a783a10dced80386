"""The Distiller: config validation, two time-scale rule, GMM distillation, resume, faults, logs."""

import copy
import importlib.util
import json
import math
import random
import time
from types import SimpleNamespace

import pytest
import torch
from _dist import in_gloo_group
from torch import nn

from dmdcopy import delta_e
from dmdcopy.distill import DistillConfig, Distiller, latest_checkpoint, list_checkpoints
from dmdcopy.distill.callbacks import DELTA_E_LOG_KEYS, DeltaECallback
from dmdcopy.distill.draws import Stream
from dmdcopy.errors import CheckpointError, ConfigError, NonFiniteError, ShapeError
from dmdcopy.nets import MLP
from dmdcopy.pairs import generate_pairs
from dmdcopy.precond import EDMPrecond
from dmdcopy.samplers import teacher_ode
from dmdcopy.schedules import karras_sigmas
from dmdcopy.students import MultiStepStudent, OneStepStudent
from dmdcopy.teachers import GaussianMixtureTeacher

MEANS = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [1.0, -1.0]])


def gmm(conditional=False):
    return GaussianMixtureTeacher(MEANS, torch.full((4,), 0.15), conditional=conditional)


def net(label_dim=0, hidden=32):
    return EDMPrecond(MLP(2, hidden=hidden, depth=2, label_dim=label_dim))


def small_config(**kw):
    base = dict(batch_size=16, num_steps=4, generator_lr=1e-3, fake_score_lr=1e-3, log_every=2,
                progress_bar=False, ema_halflife_steps=None, checkpoint_every=1000)
    base.update(kw)
    return DistillConfig(**base)


class ScratchStudent(nn.Module):
    """A generator built from scratch: no denoiser inside."""

    def __init__(self, dim=2, out=2):
        super().__init__()
        self.sample_shape = (dim,)
        self.net = nn.Sequential(nn.Linear(dim, 64), nn.SiLU(), nn.Linear(64, out))

    def forward(self, z, class_labels=None):
        return self.net(z)


def sliced_wasserstein(a, b, n_proj=128):
    theta = torch.randn(a.shape[1], n_proj, generator=torch.Generator().manual_seed(5))
    theta = theta / theta.norm(dim=0)
    pa, pb = (a @ theta).sort(0).values, (b @ theta).sort(0).values
    return ((pa - pb) ** 2).mean().sqrt().item()


# --- configuration ------------------------------------------------------------------------------


def test_config_defaults_are_dmd2_imagenet():
    c = DistillConfig()
    assert (c.generator_lr, c.fake_score_lr, c.betas, c.weight_decay) == (2e-6, 2e-6, (0.9, 0.999), 0.01)
    assert (c.fake_score_steps, c.grad_clip, c.num_sigmas, c.sigma_min, c.sigma_max) == (5, 10.0, 1000,
                                                                                          0.002, 80.0)
    assert (c.gan_discriminator_weight, c.gan_generator_weight, c.regression_weight) == (1e-2, 3e-3, 0.0)
    assert c.generator_k_range == (20, 980) and c.fake_score_k_range == (0, 999)
    with pytest.raises(AttributeError):
        c.generator_lr = 1.0  # frozen


@pytest.mark.parametrize("changes, field", [
    (dict(generator_lr=-1e-3), "generator_lr"),
    (dict(fake_score_lr=0.0), "fake_score_lr"),
    (dict(sigma_min=80.0, sigma_max=80.0), "sigma_min"),
    (dict(fake_score_steps=0), "fake_score_steps"),
    (dict(batch_size=2.5), "batch_size"),
    (dict(generator_k_range=(20, 1000)), "generator_k_range"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(gan=True), "gan_feature_module"),
    (dict(regression_loss="l1"), "regression_loss"),
    (dict(weight_decay=float("nan")), "weight_decay"),
    (dict(betas="0.9"), "betas"),              # a string is no pair (was a bare ValueError)
    (dict(generator_k_range=20), "generator_k_range"),  # was a bare TypeError
    (dict(gan="false"), "gan"),                # a TOML string would have switched the GAN on
    (dict(mixed_precision="no"), "mixed_precision"),
    (dict(seed=True), "seed"),
])
def test_invalid_config_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=rf"^{field} must"):
        DistillConfig(**changes)


def test_config_from_dict_rejects_unknown_keys():
    c = DistillConfig.from_dict({"batch_size": 8, "betas": [0.5, 0.9]})
    assert c.betas == (0.5, 0.9)
    with pytest.raises(ConfigError, match="generator_lrr"):
        DistillConfig.from_dict({"generator_lrr": 1e-3})
    assert DistillConfig.from_dict(c.to_dict()) == c


def test_bad_setups_fail_before_the_first_step():
    cfg = small_config()
    with pytest.raises(ConfigError, match="fake_score"):
        Distiller(gmm(), OneStepStudent(net()), config=cfg)  # exact teacher has nothing to copy
    wrong = OneStepStudent(EDMPrecond(MLP(3, hidden=8, depth=1)))
    with pytest.raises(ConfigError, match="sample_shape"):
        Distiller(gmm(), wrong, fake_score=net(), config=cfg)
    with pytest.raises(ShapeError, match="student output"):
        Distiller(gmm(), ScratchStudent(out=3), fake_score=net(), config=cfg)
    with pytest.raises(ConfigError, match="real_data"):
        Distiller(gmm(), OneStepStudent(net()), fake_score=net(),
                  config=small_config(gan=True, gan_feature_module="model.blocks.1"))
    with pytest.raises(ConfigError, match="regression_pairs"):
        Distiller(gmm(), OneStepStudent(net()), fake_score=net(), config=small_config(regression_weight=1.0))
    with pytest.raises(ConfigError, match="label_dim"):
        Distiller(gmm(conditional=True), OneStepStudent(net()), fake_score=net(4), config=cfg)
    # The fake score is checked too (it used to fail only inside the first fake-score step).
    with pytest.raises(ConfigError, match=r"fake_score\.label_dim"):
        Distiller(gmm(conditional=True), OneStepStudent(net(4)), fake_score=net(), config=cfg)
    with pytest.raises(ConfigError, match=r"fake_score\.sample_shape"):
        Distiller(gmm(), OneStepStudent(net()), fake_score=EDMPrecond(MLP(3, hidden=8, depth=1)), config=cfg)


def test_shared_parameters_are_refused():
    teacher = net()
    for kw in (dict(student=OneStepStudent(net()), fake_score=teacher),  # would train the teacher
               dict(student=OneStepStudent(teacher), fake_score=net())):
        with pytest.raises(ConfigError, match="share parameters"):
            Distiller(teacher, config=small_config(), **kw)
        assert all(p.requires_grad for p in teacher.parameters())  # refused before any change
    fake = net()
    with pytest.raises(ConfigError, match="student and fake_score share"):
        Distiller(gmm(), OneStepStudent(fake), fake_score=fake, config=small_config())


def test_fake_score_defaults_to_a_copy_of_the_teacher():
    teacher = net()
    d = Distiller(teacher, OneStepStudent(net()), config=small_config())
    assert d.fake_score is not teacher
    for a, b in zip(d.fake_score.parameters(), teacher.parameters()):
        assert torch.equal(a, b) and a.requires_grad and not b.requires_grad


def test_a_failed_construction_leaves_the_teacher_as_it_was():
    teacher = net()  # trainable, in train mode, as a user's network usually is
    bad = small_config(gan=True, gan_feature_module="model.blocks.1.fc2")  # no real_data
    with pytest.raises(ConfigError, match="real_data"):
        Distiller(teacher, OneStepStudent(copy.deepcopy(teacher)), config=bad)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    # so the README's next try works: a student copied from the (still trainable) teacher
    d = Distiller(teacher, OneStepStudent(copy.deepcopy(teacher)), config=small_config(num_steps=1))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in d.student.parameters())


def test_a_student_copied_from_a_frozen_teacher_gets_a_fix_in_the_error():
    teacher = net().requires_grad_(False)
    with pytest.raises(ConfigError, match=r"no parameter requires grad.*requires_grad_\(True\)"):
        Distiller(teacher, OneStepStudent(copy.deepcopy(teacher)), config=small_config())


class NoSigma(nn.Module):
    """A network called as f(x): not a denoiser."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.sample_shape = (2,)

    def forward(self, x):
        return self.lin(x)


def test_the_teacher_is_test_called_before_training():
    raw = MLP(2, hidden=8, depth=1)  # F(x_in, c_noise, class_labels), no preconditioning
    with pytest.raises(ConfigError, match=r"teacher: MLP.forward takes 'noise_labels'.*EDMPrecond"):
        Distiller(raw, OneStepStudent(net()), fake_score=net(), config=small_config(), sample_shape=(2,))
    wrong = NoSigma()
    with pytest.raises(ConfigError, match=r"teacher: a test call .* failed \(TypeError"):
        Distiller(wrong, OneStepStudent(net()), fake_score=net(), config=small_config())
    assert wrong.training and all(p.requires_grad for p in wrong.parameters())
    with pytest.raises(ConfigError, match=r"fake_score: MLP.forward takes 'noise_labels'"):
        Distiller(gmm(), OneStepStudent(net()), fake_score=MLP(2, hidden=8, depth=1), config=small_config())


def test_a_float64_run_computes_in_float64():
    torch.manual_seed(0)
    student, fake = OneStepStudent(net().double()), net().double()
    d = Distiller(gmm(), student, fake_score=fake, config=small_config(num_steps=2, ema_halflife_steps=2.0))
    draws = d.draws(0)
    assert draws.z().dtype == torch.float64 and draws.sigma(Stream.K, (0, 999)).dtype == torch.float64
    d.train()
    assert (d.generator_updates, d.nonfinite_total) == (2, 0)
    for p in [*student.parameters(), *fake.parameters(), *d.ema_student.parameters()]:
        assert p.dtype == torch.float64 and torch.isfinite(p).all()


# --- the loop -----------------------------------------------------------------------------------


def test_two_time_scale_rule_counts_optimizer_steps():
    cfg = small_config(num_steps=3, progress_bar=True)  # the tqdm path too (on stderr)
    d = Distiller(gmm(), OneStepStudent(net()), fake_score=net(), config=cfg)
    counts = {"gen": 0, "fake": 0}
    d.generator_optimizer.register_step_post_hook(lambda *a: counts.__setitem__("gen", counts["gen"] + 1))
    d.fake_score_optimizer.register_step_post_hook(lambda *a: counts.__setitem__("fake", counts["fake"] + 1))
    d.train()
    assert counts == {"gen": 3, "fake": 15}
    assert (d.generator_updates, d.fake_score_updates, d.step) == (3, 15, 3)


def test_gmm_distillation_lowers_sliced_wasserstein():
    # Modes of std 0.3 overlap a little: with narrow, far-apart modes DMD finds every mode quickly
    # but rebalances their weights slowly, and a short run's distance depends on the seed.
    teacher = GaussianMixtureTeacher(MEANS, torch.full((4,), 0.3))
    student = OneStepStudent(net(hidden=64))
    g = torch.Generator().manual_seed(1)
    ref, z = teacher.sample(2000, generator=g), torch.randn(2000, 2, generator=g)
    with torch.no_grad():
        before = sliced_wasserstein(student(z), ref)
    cfg = small_config(batch_size=128, num_steps=100, generator_lr=2e-3, fake_score_lr=2e-3, log_every=100)
    Distiller(teacher, student, fake_score=net(hidden=64), config=cfg).train()
    with torch.no_grad():
        after = sliced_wasserstein(student(z), ref)
    # Over seeds 1-8 the ratio was 0.14-0.22; 0.4 leaves room for platform round-off.
    assert after < 0.4 * before, (before, after)


def test_scratch_multistep_and_conditional_students_train():
    for teacher, student, fake, kw in [
        (gmm(), ScratchStudent(), net(), {}),
        (gmm(), MultiStepStudent(net(), (80.0, 1.0)), net(), {}),
        (gmm(conditional=True), OneStepStudent(net(4)), net(4),
         dict(class_weights=torch.tensor([1.0, 0.0, 0.0, 1.0]))),
    ]:
        d = Distiller(teacher, student, fake_score=fake, config=small_config(num_steps=2), **kw)
        before = [p.clone() for p in student.parameters()]
        d.train()
        assert d.generator_updates == 2
        assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
        assert all(torch.isfinite(p).all() for p in student.parameters())


class Recorder(nn.Module):
    """A denoiser that records each call's sigma, labels and whether autograd was on."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []
        self.sample_shape, self.label_dim = inner.sample_shape, inner.label_dim

    def forward(self, x, sigma, class_labels=None):
        self.calls.append((sigma.detach().clone(), None if class_labels is None else class_labels.clone(),
                           torch.is_grad_enabled()))
        return self.inner(x, sigma, class_labels)


def test_backward_simulation_trains_one_step_and_only_that_one():
    # Each generator update must run the steps before j without gradient and return step j's
    # estimate with gradient; j varies between updates, so every step of the student is trained.
    sigmas = (80.0, 5.0, 1.0)
    student = MultiStepStudent(Recorder(net()), sigmas)
    d = Distiller(gmm(), student, fake_score=net(), config=small_config(num_steps=12, fake_score_steps=1))
    trained = []

    def hook(module, args, kwargs, output):
        if torch.is_grad_enabled():  # the generator update (fake-score samples are made without grad)
            trained.append((kwargs["train_step"], output))

    student.register_forward_hook(hook, with_kwargs=True)
    recorder = student.denoiser
    gen_calls = []
    for _ in range(12):
        recorder.calls.clear()
        d.fake_score_step(0)
        recorder.calls.clear()
        d.generator_step()
        gen_calls.append(list(recorder.calls))
        d.counters.step += 1
    assert {j for j, _ in trained} == {0, 1, 2}
    for (j, out), calls in zip(trained, gen_calls):
        assert [float(s[0]) for s, _, _ in calls] == list(sigmas[:j + 1])  # steps 0..j, none after
        assert [grad for _, _, grad in calls] == [False] * j + [True]  # only step j differentiated
        assert out.requires_grad


def test_conditional_labels_reach_student_teacher_and_fake_score():
    # With weight on classes 0 and 3 only, every network must see those labels, and in the
    # generator update the teacher and fake score must see the very labels the student got.
    teacher = Recorder(gmm(conditional=True))
    fake = Recorder(net(4))
    student = OneStepStudent(Recorder(net(4)))
    d = Distiller(teacher, student, fake_score=fake, config=small_config(batch_size=64, num_steps=1),
                  class_weights=torch.tensor([1.0, 0.0, 0.0, 1.0]))
    for m in (teacher, fake, student.denoiser):
        m.calls.clear()
    d.generator_step()
    (_, s_labels, s_grad), = student.denoiser.calls
    (_, t_labels, _), = teacher.calls
    (_, f_labels, _), = fake.calls
    assert s_grad and s_labels.shape == (64,) and set(s_labels.tolist()) == {0, 3}
    assert torch.equal(t_labels, s_labels) and torch.equal(f_labels, s_labels)
    fake.calls.clear()
    d.fake_score_step(0)
    (_, f_labels, f_grad), = fake.calls
    assert f_grad and set(f_labels.tolist()) == {0, 3}


def test_class_weights_select_the_training_labels():
    d = Distiller(gmm(conditional=True), OneStepStudent(net(4)), fake_score=net(4),
                  config=small_config(batch_size=256), class_weights=torch.tensor([0.0, 1.0, 0.0, 3.0]))
    labels = d.draws(0).labels()
    assert labels.shape == (256,) and set(labels.tolist()) == {1, 3}
    assert 0.15 < (labels == 1).float().mean() < 0.35


def test_regression_only_fits_the_teacher_pairs():
    z = torch.randn(32, 2)
    target = torch.tanh(z) * 0.7  # any stored pairing (z, T(z))
    student = ScratchStudent()
    cfg = small_config(num_steps=40, dmd_weight=0.0, regression_weight=1.0, generator_lr=1e-2,
                       regression_batch_size=32, log_every=40)
    d = Distiller(gmm(), student, fake_score=net(), config=cfg, regression_pairs=(z, target))
    with torch.no_grad():
        before = (student(z) - target).pow(2).mean().item()
    d.train()
    with torch.no_grad():
        after = (student(z) - target).pow(2).mean().item()
    assert after < 0.2 * before


def _gan_setup(tmp_path, **kw):
    teacher = gmm()
    cfg = small_config(gan=True, gan_feature_module="model.blocks.1.fc2", ema_halflife_steps=3.0, **kw)
    real = teacher.sample(64, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(1)  # identical initial weights in every call
    return Distiller(teacher, OneStepStudent(net()), fake_score=net(), config=cfg, real_data=real,
                     out_dir=tmp_path)


def test_gan_feature_module_must_run(tmp_path):
    cfg = small_config(gan=True, gan_feature_module="model.blocks.1")  # a ModuleDict: never called
    with pytest.raises(ConfigError, match="never called"):
        Distiller(gmm(), OneStepStudent(net()), fake_score=net(), config=cfg, real_data=torch.zeros(4, 2))


def test_gan_trains_the_discriminator_and_logs(tmp_path):
    calls = []

    def callback(distiller, step):
        calls.append(step)
        assert distiller.ema_student is not None and distiller.is_main
        return {"custom": float(step)} if step == 3 else None

    d = _gan_setup(tmp_path, num_steps=4)
    d.callbacks.append(callback)
    head_before = [p.clone() for p in d.discriminator.parameters()]
    d.train()
    assert calls == [1, 2, 3, 4]
    assert any(not torch.equal(a, b) for a, b in zip(head_before, d.discriminator.parameters()))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3, 4]
    assert records[1] == {"step": 3, "custom": 3.0}
    for key in ("generator_loss", "dmd_loss", "gan_generator_loss", "gan_discriminator_loss", "dsm_loss",
                "generator_grad_norm", "fake_score_grad_norm", "generator_lr", "samples_per_s",
                "fake_score_updates", "nonfinite_skipped"):
        assert key in records[0], key
    assert records[-1]["fake_score_updates"] == 20


def test_gan_generator_term_trains_only_the_student(tmp_path):
    # dmd_weight = 0: the generator update is driven by the GAN term alone, so it must reach the
    # student through the hooked fake-score features, and leave no gradient on fake score or head.
    d = _gan_setup(tmp_path, dmd_weight=0.0, gan_generator_weight=1.0)
    student_before = [p.clone() for p in d.student.parameters()]
    fake_before = [p.clone() for p in d.fake_score.parameters()]
    head_before = [p.clone() for p in d.discriminator.parameters()]
    record = d.generator_step()
    assert not record.skipped and record.gan_loss > 0 and record.grad_norm > 0
    assert any(not torch.equal(a, b) for a, b in zip(student_before, d.student.parameters()))
    for before, module in ((fake_before, d.fake_score), (head_before, d.discriminator)):
        for a, p in zip(before, module.parameters()):
            assert torch.equal(a, p) and p.grad is None and p.requires_grad


# --- checkpoints --------------------------------------------------------------------------------


def _state(d):
    tensors, _ = d.state_tensors()
    return {k: v for k, v in tensors.items() if not k.startswith("rng/")}


def test_resume_after_interruption_is_bit_exact(tmp_path):
    reference = _gan_setup(tmp_path / "a", num_steps=7, checkpoint_every=2)
    reference.train()
    stop_at = random.Random().randint(1, 6)

    def interrupt(distiller, step):
        if step == stop_at:
            raise KeyboardInterrupt

    first = _gan_setup(tmp_path / "b", num_steps=7, checkpoint_every=2)
    first.callbacks.append(interrupt)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    resumed = _gan_setup(tmp_path / "b", num_steps=7, checkpoint_every=2)
    resumed.train(resume="latest")
    assert resumed.step == 7
    ref, got = _state(reference), _state(resumed)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), (stop_at, k)
    log = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert log == [2, 4, 6, 7]  # records after the restored step were dropped, then rewritten


def test_resume_before_the_first_checkpoint_restarts_the_log(tmp_path):
    def interrupt(distiller, step):
        if step == 2:
            raise KeyboardInterrupt

    cfg = small_config(num_steps=3, log_every=1, checkpoint_every=1000)
    first = Distiller(gmm(), OneStepStudent(net()), fake_score=net(), out_dir=tmp_path, config=cfg,
                      callbacks=[interrupt])
    with pytest.raises(KeyboardInterrupt):
        first.train()
    again = Distiller(gmm(), OneStepStudent(net()), fake_score=net(), out_dir=tmp_path, config=cfg)
    again.train(resume="latest")  # no checkpoint yet: a fresh start, so the old records go
    log = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3]


def test_truncated_checkpoint_is_never_resumed(tmp_path):
    d = Distiller(gmm(), OneStepStudent(net()), fake_score=net(), out_dir=tmp_path,
                  config=small_config(num_steps=3, checkpoint_every=1, keep_checkpoints=2))
    d.train()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]  # only the newest K kept
    newest = tmp_path / "checkpoint-000000003.safetensors"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # cut mid-write
    (tmp_path / ".checkpoint-000000004.safetensors.tmp-1").write_bytes(data)  # a stray temp file
    assert latest_checkpoint(tmp_path).name == "checkpoint-000000002.safetensors"
    again = Distiller(gmm(), OneStepStudent(net()), fake_score=net(), out_dir=tmp_path,
                      config=small_config(num_steps=3, checkpoint_every=1, keep_checkpoints=2))
    # (unseeded networks: their initial weights differ from the run's, which is allowed explicitly)
    assert again.resume("latest", allow_new_init=True).name == "checkpoint-000000002.safetensors"
    assert again.step == 2
    with pytest.raises(CheckpointError):
        again.load_checkpoint(newest)
    other = Distiller(gmm(), OneStepStudent(net()), fake_score=net(), out_dir=tmp_path,
                      config=small_config(num_steps=3, generator_lr=5e-4))
    with pytest.raises(CheckpointError, match="generator_lr"):
        other.resume("latest", allow_new_init=True)


def test_a_checkpoint_that_does_not_fit_loads_nothing(tmp_path):
    cfg = small_config(num_steps=1, ema_halflife_steps=2.0)
    Distiller(gmm(), OneStepStudent(net()), fake_score=net(), out_dir=tmp_path, config=cfg).train()
    other = Distiller(gmm(), OneStepStudent(net()), fake_score=net(hidden=16), out_dir=tmp_path, config=cfg)
    before = {k: v.clone() for k, v in other.state_tensors()[0].items() if not k.startswith("rng/")}
    with pytest.raises(CheckpointError, match=r"the fake_score weights do not fit the model: .*mismatched"):
        other.resume("latest")
    after = other.state_tensors()[0]
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # the student was not loaded either
    assert other.step == 0


# --- faults -------------------------------------------------------------------------------------


class Poisoned(nn.Module):
    """Wraps a student; its forward returns NaN on the generator-step calls listed in ``at``."""

    def __init__(self, inner, at):
        super().__init__()
        self.inner, self.at, self.calls = inner, set(at), 0
        self.sample_shape = inner.sample_shape

    def forward(self, z, class_labels=None):
        x = self.inner(z, class_labels)
        if torch.is_grad_enabled():  # generator step (fake-score samples are drawn without grad)
            self.calls += 1
            if self.calls in self.at or -1 in self.at:
                x = x * float("nan")
        return x


def test_nan_is_skipped_and_counted():
    student = Poisoned(OneStepStudent(net()), at={2})
    d = Distiller(gmm(), student, fake_score=net(), config=small_config(num_steps=4, ema_halflife_steps=2.0))
    d.train()
    assert (d.nonfinite_total, d.generator_updates, d.fake_score_updates, d.step) == (1, 3, 20, 4)
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert all(torch.isfinite(p).all() for p in d.ema_student.parameters())


class PoisonedSamples(nn.Module):
    """Wraps a student; its no-grad forward (the fake-score steps' samples) returns NaN on call ``at``."""

    def __init__(self, inner, at):
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0
        self.sample_shape = inner.sample_shape

    def forward(self, z, class_labels=None):
        x = self.inner(z, class_labels)
        if not torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.at:
                x = x * float("nan")
        return x


def test_nan_in_a_fake_score_update_is_skipped_and_counted():
    student = PoisonedSamples(OneStepStudent(net()), at=4)  # call 1 is the Distiller's shape probe
    d = Distiller(gmm(), student, fake_score=net(), config=small_config(num_steps=2))
    d.train()
    assert (d.nonfinite_total, d.fake_score_updates, d.generator_updates) == (1, 9, 2)
    assert d.nonfinite_in_a_row == {"generator": 0, "fake_score": 0}
    assert all(torch.isfinite(p).all() for p in d.fake_score.parameters())


def test_nan_in_a_row_stops_with_a_clear_error():
    student = Poisoned(OneStepStudent(net()), at={-1})
    cfg = small_config(num_steps=10, max_nonfinite_in_a_row=3)
    d = Distiller(gmm(), student, fake_score=net(), config=cfg)
    with pytest.raises(NonFiniteError, match="3 generator updates in a row"):
        d.train()
    assert d.nonfinite_total == 3


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard installed")
def test_tensorboard_without_the_package_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        Distiller(gmm(), OneStepStudent(net()), fake_score=net(), out_dir=tmp_path,
                  config=small_config(tensorboard=True))


def test_gan_head_on_a_unet_fake_score():
    from dmdcopy.nets.unet import SongUNet

    def unet():
        torch.manual_seed(0)
        return EDMPrecond(SongUNet(8, 1, 1, model_channels=8, channel_mult=(1, 2), num_blocks=1,
                                   attn_resolutions=(), dropout=0.0), sample_shape=(1, 8, 8))

    teacher = unet()
    cfg = small_config(batch_size=4, num_steps=1, fake_score_steps=1, gan=True,
                       gan_feature_module="model.dec.4x4_in1")
    d = Distiller(teacher, OneStepStudent(unet()), config=cfg, real_data=torch.randn(8, 1, 8, 8))
    assert d.discriminator.feature_shape[1:] == (4, 4)
    d.train()
    assert (d.generator_updates, d.fake_score_updates) == (1, 1)


# --- Delta E callback ---------------------------------------------------------------------------

GRID = karras_sigmas(8)


class TeacherMap(nn.Module):
    """The teacher's own ODE map as a generator: a student that copies its teacher exactly."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, z, class_labels=None):
        return self.scale * teacher_ode(self.teacher, z, GRID, class_labels=class_labels)


def _fake_distiller(student, teacher, **changes):
    """What a callback reads of a Distiller, without training."""
    base = dict(student=student, ema_student=None, teacher=teacher, device=torch.device("cpu"), step=0,
                is_main=True, sample_shape=(2,), label_dim=0)
    return SimpleNamespace(**{**base, **changes})


def test_delta_e_callback_logs_every_figure_of_a_copying_student(tmp_path):
    T = gmm()
    G = TeacherMap(T)
    distiller = _fake_distiller(G, T)
    cb = DeltaECallback(5, range(64), sigmas=GRID, batch=16, n_boot=20)
    assert cb(distiller, 3) is None
    log = cb(distiller, 5)
    assert set(log) == set(DELTA_E_LOG_KEYS) == {
        "delta_e", "delta_e_lo", "delta_e_hi", "e_pair", "e_opt", "e_ind", "resolution", "own_pair_rate",
        "delta_e_lower", "delta_e_upper", "bracket_low", "bracket_high", "e_opt_lower", "delta_e_nonfinite"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in log.values())
    # an exact copy: E_pair = 0, so the finite-N figure is 0 and the population value (0) is bracketed
    assert log["e_pair"] == pytest.approx(0.0, abs=1e-10) and log["delta_e"] == pytest.approx(0.0, abs=1e-6)
    assert log["own_pair_rate"] == 1.0 and log["delta_e_nonfinite"] == 0.0
    assert log["bracket_low"] <= 1e-6 and log["bracket_high"] >= -1e-6
    assert log["delta_e_lower"] <= log["delta_e_upper"] + 1e-9
    assert G.training  # mode restored
    # the same figures as the one path, dmdcopy.delta_e
    report = delta_e(T, G, range(64), sigmas=GRID, n_boot=20)
    assert log["delta_e_upper"] == report.result.delta_e_upper and log["e_ind"] == report.result.e_ind

    # from a pair store (a subset of its seeds), its teacher fingerprint checked
    store = generate_pairs(T, range(64), tmp_path / "pc", sigmas=GRID, batch=64)
    cb2 = DeltaECallback(1, range(10, 50), pairs=store, batch=64, n_boot=0, prefix="copy/")
    log2 = cb2(distiller, 1)
    assert log2["copy/delta_e"] == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(log2["copy/delta_e_lo"])  # no bootstrap, no interval
    other = _fake_distiller(G, GaussianMixtureTeacher(torch.zeros(1, 2), torch.ones(1)))
    with pytest.raises(ConfigError, match="another teacher"):
        DeltaECallback(1, range(10), pairs=store)(other, 1)
    # a non-main process without a process group has nothing to measure
    assert cb(_fake_distiller(G, T, is_main=False), 5) is None
    with pytest.raises(ConfigError, match="every"):
        DeltaECallback(0, range(10))


def test_delta_e_callback_uses_the_ema_student():
    T = gmm()
    copy_, far = TeacherMap(T), ScratchStudent()
    cb = DeltaECallback(1, range(48), sigmas=GRID, batch=48, n_boot=0)
    assert cb(_fake_distiller(far, T, ema_student=copy_), 1)["delta_e"] == pytest.approx(0.0, abs=1e-6)
    no_ema = DeltaECallback(1, range(48), sigmas=GRID, batch=48, n_boot=0, use_ema=False)
    assert no_ema(_fake_distiller(far, T, ema_student=copy_), 1)["e_pair"] > 0.01


class NaNAtFirstMeasurement(ScratchStudent):
    """Finite while training; in eval mode (a measurement) its first call emits NaN for two samples."""

    def __init__(self):
        super().__init__()
        self.eval_calls = 0

    def forward(self, z, class_labels=None):
        x = super().forward(z)
        if not self.training:
            self.eval_calls += 1
            if self.eval_calls == 1:
                x = x.clone()
                x[:2] = float("nan")
        return x


def test_delta_e_callback_records_a_non_finite_student_and_training_goes_on(tmp_path):
    torch.manual_seed(0)
    G = NaNAtFirstMeasurement()
    cb = DeltaECallback(2, range(48), sigmas=GRID, batch=48, n_boot=10)
    d = Distiller(gmm(), G, fake_score=net(), config=small_config(num_steps=4, fake_score_steps=1),
                  callbacks=[cb], out_dir=tmp_path)
    d.train()
    assert d.step == 4 and d.generator_updates == 4 and d.nonfinite_total == 0
    strict = dict(parse_constant=lambda name: pytest.fail(f"log.jsonl holds {name}: not strict JSON"))
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    records = {r["step"]: r for r in (json.loads(line, **strict) for line in lines)}
    assert sorted(records) == [2, 4]
    nan_step, later = records[2], records[4]
    assert nan_step["delta_e_nonfinite"] == 2
    for key in set(DELTA_E_LOG_KEYS) - {"delta_e_nonfinite"}:
        assert nan_step[key] is None, key  # a NaN figure is JSON null in the log
    assert later["delta_e_nonfinite"] == 0 and math.isfinite(later["delta_e"])


def _ddp_callback_worker(rank, out_dir):
    torch.manual_seed(0)
    G = ScratchStudent()
    cb = DeltaECallback(2, range(40), sigmas=GRID, batch=7, n_boot=20)
    d = Distiller(gmm(), G, fake_score=net(), callbacks=[cb], out_dir=out_dir if rank == 0 else None,
                  config=small_config(num_steps=2, batch_size=8, fake_score_steps=1))
    d.train()
    report = cb.measure(d)  # every rank measures together and gets the same report
    torch.save(dict(delta_e=report.result.delta_e, bracket_high=report.result.bracket_high,
                    student={k: v.clone() for k, v in G.state_dict().items()}),
               f"{out_dir}/rank{rank}.pt")


def test_delta_e_callback_under_ddp_measures_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "ddp"
    out.mkdir()
    rendezvous = f"file://{tmp_path / 'rendezvous'}"
    ctx = mp.spawn(in_gloo_group, args=(2, rendezvous, _ddp_callback_worker, str(out)), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:  # a rank left out of a collective waits forever
            for p in ctx.processes:
                p.terminate()
            pytest.fail("DeltaECallback hung under torch.distributed")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["delta_e"] == ranks[1]["delta_e"] and ranks[0]["bracket_high"] == ranks[1]["bracket_high"]
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "delta_e" in r] == [2]
    assert logged[-1]["delta_e"] == ranks[0]["delta_e"]  # logged once, by rank 0
    # one process measuring the same student gets the same figure
    G = ScratchStudent()
    G.load_state_dict(ranks[0]["student"])
    single = DeltaECallback(1, range(40), sigmas=GRID, n_boot=20).measure(_fake_distiller(G, gmm()))
    assert single.result.delta_e == pytest.approx(ranks[0]["delta_e"], rel=1e-6, abs=1e-9)
