"""Named DistillConfig presets, the run-length warning, and what a run shows while it trains
(the latest Delta E on the progress bar, "resumed from step N")."""

import warnings

import pytest
import torch
from test_run_safety import CLI_TOML

from dmdcopy.cli import main
from dmdcopy.distill import DeltaECallback, DistillConfig, Distiller
from dmdcopy.distill.config import PRESETS
from dmdcopy.errors import ConfigError
from dmdcopy.nets import MLP
from dmdcopy.precond import EDMPrecond
from dmdcopy.students import OneStepStudent
from dmdcopy.teachers import GaussianMixtureTeacher


def gmm():
    return GaussianMixtureTeacher(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), torch.full((2,), 0.2))


def net():
    return EDMPrecond(MLP(2, hidden=16, depth=1))


def distiller(config, **kw):
    torch.manual_seed(0)
    return Distiller(gmm(), OneStepStudent(net()), fake_score=net(), config=config, **kw)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_valid_config_without_a_budget_warning(name):
    cfg = DistillConfig.preset(name)
    cfg.validate()
    assert cfg.budget_warning() is None
    assert DistillConfig.from_dict({"preset": name}) == cfg


def test_presets_say_what_they_change():
    assert DistillConfig.preset("imagenet64") == DistillConfig()  # DMD2's recipe is the default
    toy = DistillConfig.preset("toy", num_steps=600, batch_size=64)
    assert (toy.generator_lr, toy.fake_score_lr, toy.num_steps, toy.batch_size) == (1e-3, 1e-3, 600, 64)
    assert DistillConfig.from_dict({"preset": "toy", "num_steps": 600, "batch_size": 64}) == toy


@pytest.mark.parametrize("data, match", [
    ({"preset": "tiny"}, r"unknown preset 'tiny'; presets: \['imagenet64', 'toy'\]"),
    ({"preset": 3}, "unknown preset 3"),
    ({"preset": "toy", "generator_lr": -1.0}, "generator_lr must be > 0"),
    ({"preset": "toy", "lr": 1.0}, r"unknown key\(s\) \['lr'\]"),
])
def test_bad_presets_are_one_clear_error(data, match):
    with pytest.raises(ConfigError, match=match):
        DistillConfig.from_dict(data, where="[distill]")


def test_dmd2_rates_on_a_short_run_warn_and_say_what_to_do():
    cfg = DistillConfig(num_steps=1000, batch_size=8, progress_bar=False)  # DMD2's lr 2e-6
    message = cfg.budget_warning()
    assert "generator_lr x updates = 2e-06 x 1000 = 0.002" in message and "preset('toy'" in message
    assert "fake_score_lr" not in message  # 2e-6 x 5000 fake-score updates = 0.01 is not below
    with pytest.warns(UserWarning, match="can barely move its networks"):
        distiller(cfg)
    for quiet in (DistillConfig.preset("toy", batch_size=8, progress_bar=False),
                  DistillConfig(num_steps=99, batch_size=8, progress_bar=False)):  # a smoke test
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            distiller(quiet)


def test_the_command_line_says_the_warning_in_one_line(tmp_path, capsys):
    config = tmp_path / "run.toml"  # run_safety's tiny GMM run, with a learning rate far too small
    config.write_text(CLI_TOML.format(out=(tmp_path / "out").as_posix(), steps=100) + "generator_lr = 1e-5\n")
    assert main(["distill", str(config), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "dmdcopy distill: warning: DistillConfig: generator_lr x updates = 1e-05 x 100 = 0.001" in err
    assert "UserWarning" not in err and "Traceback" not in err


def test_a_resumed_run_says_from_which_step(tmp_path, capsys):
    cfg = DistillConfig(num_steps=2, batch_size=8, fake_score_steps=1, checkpoint_every=1,
                        progress_bar=False, generator_lr=1e-3, fake_score_lr=1e-3)
    distiller(cfg, out_dir=tmp_path).train()
    capsys.readouterr()
    distiller(cfg.replace(num_steps=3), out_dir=tmp_path).train(resume="latest")
    assert "dmdcopy: resumed from step 2 (checkpoint-000000002.safetensors)" in capsys.readouterr().err


def test_the_progress_bar_shows_the_latest_delta_e_and_its_step(capsys):
    cfg = DistillConfig(num_steps=4, batch_size=8, fake_score_steps=1, log_every=1, progress_bar=True,
                        generator_lr=1e-3, fake_score_lr=1e-3, ema_halflife_steps=None)
    callback = DeltaECallback(every=3, seeds=range(64), n_boot=0, sigmas=torch.tensor([80.0, 1.0, 0.0]))
    d = distiller(cfg, callbacks=[callback])
    d.train()
    err = capsys.readouterr().err
    measured = [line for line in err.replace("\r", "\n").splitlines() if "delta_e=" in line]
    assert measured, err[-2000:]
    assert "@3" in measured[-1]  # measured at step 3, still shown at step 4
    assert "gen=" in measured[-1] and "fake=" in measured[-1]
