"""Pictures of a run: log reading, curves, image grids, and the plot/sample commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dmdcopy.cli import main
from dmdcopy.errors import ConfigError, ShapeError
from dmdcopy.viz import image_grid, plot_run, read_log

matplotlib = pytest.importorskip("matplotlib")
from matplotlib import image as mpimg  # noqa: E402


def test_grid_places_every_tile_in_order_with_black_padding():
    values = torch.linspace(-1, 1, 5)  # tile i is constant values[i]
    images = values[:, None, None, None].expand(5, 1, 4, 4)
    grid = image_grid(images)  # ceil(sqrt(5)) = 3 columns, 2 rows, each tile 4 + 2 pad
    assert grid.shape == (12, 18, 1) and grid.dtype == np.uint8
    for i in range(6):
        r, c = divmod(i, 3)
        tile = grid[r * 6 + 1 : r * 6 + 5, c * 6 + 1 : c * 6 + 5, 0]
        want = 0 if i == 5 else round(float((values[i] + 1) / 2) * 255)  # the empty last tile is black
        assert (tile == want).all(), (i, tile)
    assert (grid[0, :, 0] == 0).all() and (grid[:, 0, 0] == 0).all()


def test_paired_grid_alternates_teacher_and_student():
    student = torch.full((3, 3, 2, 2), 1.0)
    teacher = torch.full((3, 3, 2, 2), -1.0)
    grid = image_grid(student, pair_with=teacher, pad=0)
    assert grid.shape == (4, 8, 3)  # 6 tiles -> 4 columns (even), 2 rows
    first_row = grid[0, ::2, 0].tolist()  # one pixel per tile
    assert first_row == [0, 255, 0, 255]
    with pytest.raises(ShapeError, match="pair_with"):
        image_grid(student, pair_with=teacher[:2])
    with pytest.raises(ShapeError, match="C in"):
        image_grid(torch.zeros(2, 5, 4, 4))


def _write_log(path, lines):
    path.write_text("\n".join(json.dumps(r) if isinstance(r, dict) else r for r in lines) + "\n")


def test_read_log_keeps_records_before_a_cut_line_and_refuses_garbage(tmp_path):
    log = tmp_path / "log.jsonl"
    _write_log(log, [{"step": 1, "generator_loss": 0.5}, {"step": 2, "generator_loss": 0.4},
                     '{"step": 3, "gen'])
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2]
    _write_log(log, [{"step": 1}, "not json", {"step": 3}])
    with pytest.raises(ConfigError, match=":2: not a JSON record"):
        read_log(log)
    with pytest.raises(ConfigError, match="no such log"):
        read_log(tmp_path / "elsewhere")


def test_plot_a_real_run_with_its_delta_e_curve(tmp_path):
    from dmdcopy.distill import DeltaECallback, DistillConfig, Distiller
    from dmdcopy.nets import MLP
    from dmdcopy.precond import EDMPrecond
    from dmdcopy.schedules import karras_sigmas
    from dmdcopy.students import OneStepStudent
    from dmdcopy.teachers import GaussianMixtureTeacher

    torch.manual_seed(0)
    teacher = GaussianMixtureTeacher(torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), torch.full((2,), 0.3))
    student = OneStepStudent(EDMPrecond(MLP(2, hidden=16, depth=1)))
    config = DistillConfig(num_steps=6, batch_size=32, generator_lr=1e-3, fake_score_lr=1e-3,
                           log_every=1, checkpoint_every=6, fake_score_steps=1, progress_bar=False,
                           ema_halflife_steps=None)
    cb = DeltaECallback(2, range(64), sigmas=karras_sigmas(6), n_boot=20)
    Distiller(teacher, student, fake_score=EDMPrecond(MLP(2, hidden=16, depth=1)), config=config,
              callbacks=[cb], out_dir=tmp_path).train()
    written = plot_run(tmp_path, tmp_path / "pics")
    assert sorted(p.name for p in written) == ["delta_e.png", "grad_norms.png", "losses.png"]
    for p in written:
        img = mpimg.imread(p)
        assert img.shape[0] > 300 and img.shape[1] > 500 and img[..., :3].std() > 0.05  # drawn, not blank
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "delta_e.png").is_file()


def test_sample_command_writes_a_paired_grid_of_the_right_size(tmp_path, capsys):
    from _nets import randomise, small_song

    from dmdcopy.io import save
    from dmdcopy.precond import EDMPrecond
    from dmdcopy.students import OneStepStudent

    teacher = EDMPrecond(randomise(small_song()), sample_shape=(3, 8, 8)).eval()
    student = OneStepStudent(EDMPrecond(randomise(small_song()), sample_shape=(3, 8, 8))).eval()
    save(teacher, tmp_path / "teacher.safetensors")
    save(student, tmp_path / "student.safetensors")
    out = tmp_path / "grid.png"
    rc = main(["sample", str(tmp_path / "student.safetensors"), "--teacher",
               str(tmp_path / "teacher.safetensors"), "--seeds", "0-5", "--out", str(out), "--steps", "4"])
    assert rc == 0 and "6 pairs" in capsys.readouterr().out
    img = mpimg.imread(out)
    assert img.shape[:2] == (3 * 10, 4 * 10)  # 12 tiles: 4 columns (even), 3 rows of 8 + 2 pad
    assert img[..., :3].std() > 0.01
    too_many = ["sample", str(tmp_path / "student.safetensors"), "--out", str(out), "--seeds", "0-2000000"]
    assert main(too_many) == 1


def _image_run(tmp_path, callback, num_steps=2):
    import copy

    from _nets import randomise, small_song

    from dmdcopy.distill import DistillConfig, Distiller
    from dmdcopy.precond import EDMPrecond
    from dmdcopy.students import OneStepStudent

    torch.manual_seed(0)
    teacher = EDMPrecond(randomise(small_song()), sample_shape=(3, 8, 8)).eval()
    student = OneStepStudent(copy.deepcopy(teacher).requires_grad_(True))
    cfg = DistillConfig(num_steps=num_steps, batch_size=4, fake_score_steps=1, progress_bar=False,
                        ema_halflife_steps=None, generator_lr=1e-4, fake_score_lr=1e-4)
    return Distiller(teacher, student, config=cfg, out_dir=tmp_path, callbacks=[callback]).train()


def test_each_delta_e_measurement_of_an_image_run_draws_teacher_and_student_side_by_side(tmp_path):
    from dmdcopy.distill import DeltaECallback

    callback = DeltaECallback(every=1, seeds=range(6), n_boot=0, sigmas=torch.tensor([80.0, 2.0, 0.0]))
    d = _image_run(tmp_path, callback)
    grids = sorted(p.name for p in (tmp_path / "grids").iterdir())
    assert grids == ["delta_e-000000001.png", "delta_e-000000002.png"]  # no temp file left either
    img = mpimg.imread(tmp_path / "grids" / grids[-1])[..., :3]
    assert img.shape[:2] == (3 * 10, 4 * 10)  # 6 pairs = 12 tiles: 4 columns (even), 3 rows
    ts = callback.teacher_samples(d)
    want = image_grid(d.student(ts.z[:6]).detach(), pair_with=ts.x[:6]) / 255.0
    np.testing.assert_allclose(img, want, atol=1.5 / 255)  # teacher left, student right, in seed order


def test_grids_are_off_on_request_and_refused_for_samples_that_are_not_images(tmp_path):
    from dmdcopy.distill import DeltaECallback

    _image_run(tmp_path / "off", DeltaECallback(every=1, seeds=range(4), n_boot=0, grid=0,
                                                sigmas=torch.tensor([80.0, 0.0])), num_steps=1)
    assert not (tmp_path / "off" / "grids").exists()
    with pytest.raises(ConfigError, match="grid must be None or an int >= 0"):
        DeltaECallback(every=1, seeds=range(4), grid=-1)
    from dmdcopy.distill import DistillConfig, Distiller
    from dmdcopy.nets import MLP
    from dmdcopy.precond import EDMPrecond
    from dmdcopy.students import OneStepStudent
    from dmdcopy.teachers import GaussianMixtureTeacher

    teacher = GaussianMixtureTeacher(torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), torch.full((2,), 0.3))
    cfg = DistillConfig(num_steps=1, batch_size=4, fake_score_steps=1, progress_bar=False)
    make = lambda cb: Distiller(teacher, OneStepStudent(EDMPrecond(MLP(2, hidden=8, depth=1))),  # noqa: E731
                                fake_score=EDMPrecond(MLP(2, hidden=8, depth=1)), config=cfg,
                                out_dir=tmp_path / "points", callbacks=[cb], overwrite=True)
    make(DeltaECallback(every=1, seeds=range(4), n_boot=0)).train()  # auto: 2-D points get no grid
    assert not (tmp_path / "points" / "grids").exists()
    with pytest.raises(ConfigError, match=r"grid=4 needs image samples .* not \(2,\); pass grid=0"):
        make(DeltaECallback(every=1, seeds=range(4), n_boot=0, grid=4)).train()


def test_a_grid_write_that_fails_leaves_no_file_and_does_not_stop_the_run(tmp_path, monkeypatch, capsys):
    import matplotlib.pyplot as plt

    from dmdcopy.distill import DeltaECallback

    def half_then_full_disk(fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG\r\n")  # a cut PNG
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plt, "imsave", half_then_full_disk)
    callback = DeltaECallback(every=1, seeds=range(4), n_boot=0, sigmas=torch.tensor([80.0, 0.0]))
    d = _image_run(tmp_path, callback)
    assert d.step == 2
    assert list((tmp_path / "grids").iterdir()) == []  # neither a cut PNG nor a temp file
    err = capsys.readouterr().err
    assert "could not write" in err and "No space left on device" in err
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "delta_e" in r] == [1, 2]  # the figures are still logged
