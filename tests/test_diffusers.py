"""A local diffusers folder as a denoiser, checked against diffusers' own scheduler arithmetic."""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from dmdcopy.discrete import EpsDenoiser, VDenoiser  # noqa: E402
from dmdcopy.errors import CheckpointError, ConfigError  # noqa: E402
from dmdcopy.io.diffusers_folder import load_diffusers_unet  # noqa: E402


def _tiny_unet(num_class_embeds=None):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 num_class_embeds=num_class_embeds)


@pytest.mark.parametrize("prediction, schedule", [("epsilon", "linear"), ("v_prediction", "scaled_linear"),
                                                  ("epsilon", "squaredcos_cap_v2")])
def test_round_trip_matches_diffusers_own_x0_prediction(tmp_path, prediction, schedule):
    unet = _tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule,
                                    prediction_type=prediction)
    sched.save_pretrained(tmp_path / "scheduler")  # the pipeline layout: unet/ and scheduler/
    D = load_diffusers_unet(tmp_path)
    assert isinstance(D, EpsDenoiser if prediction == "epsilon" else VDenoiser)
    assert D.sample_shape == (3, 8, 8) and D.label_dim == 0
    torch.testing.assert_close(1 / (1 + D.sigmas**2), sched.alphas_cumprod.double(), rtol=1e-5, atol=1e-7)
    g = torch.Generator().manual_seed(1)
    for t in (0, 10, 500, 999):
        x_t = torch.randn(2, 3, 8, 8, generator=g)  # the model's own state at timestep t
        with torch.no_grad():
            out = unet(x_t, t).sample
            ref = sched.step(out, t, x_t).pred_original_sample  # diffusers' x0 from its prediction
            sigma = D.sigmas[t].float().expand(2)
            mine = D(x_t * (1 + sigma[0] ** 2).sqrt(), sigma)  # the same state in x0 + sigma eps form
        if sched.config.clip_sample:
            mine = mine.clamp(-1, 1)  # DDPMScheduler clips its x0 prediction by default
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4)


def test_labels_and_a_flat_folder(tmp_path):
    unet = _tiny_unet(num_class_embeds=4)
    unet.save_pretrained(tmp_path)
    diffusers.DDPMScheduler(num_train_timesteps=100).save_pretrained(tmp_path)
    D = load_diffusers_unet(tmp_path, interpolate=True)
    assert D.label_dim == 4 and D.interpolate
    x = torch.randn(3, 3, 8, 8)
    y = torch.tensor([0, 1, 3])
    with torch.no_grad():
        a, b = D(x, torch.ones(3), class_labels=y), D(x, torch.ones(3), class_labels=torch.tensor([2, 2, 2]))
    assert a.shape == x.shape and not torch.allclose(a, b)  # the labels reach the network


def test_bad_folders_are_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_diffusers_unet(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_diffusers_unet(tmp_path)
    _tiny_unet().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"no scheduler_config\.json"):
        load_diffusers_unet(tmp_path)
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"prediction_type": "sample"}))
    with pytest.raises(ConfigError, match=r"prediction_type 'sample'"):
        load_diffusers_unet(tmp_path)
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "sigmoid"}))
    with pytest.raises(ConfigError, match=r"beta_schedule 'sigmoid'"):
        load_diffusers_unet(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64)
    (tmp_path / "scheduler_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="could not load"):
        load_diffusers_unet(tmp_path)
