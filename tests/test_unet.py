"""Tests of the EDM-compatible UNets (dmdcopy.nets.unet) and their layers (dmdcopy.nets.layers).

The key lists below are facts about EDM's ``training/networks.py``: the state-dict names and shapes
of ``EDMPrecond(img_resolution=16, img_channels=3, ...)`` for the configurations in
``SONG_NCSNPP`` and ``ADM``, generated from EDM's code (not shipped here). Numerical equality with
EDM's networks was verified outside the repository (see docs/networks.md).
"""

import inspect
import json
import math

import pytest
import torch

from dmdcopy._record import constructor_options
from dmdcopy.errors import ConfigError, ShapeError
from dmdcopy.nets.layers import Conv2d, PositionalEmbedding, UNetBlock, weight_init
from dmdcopy.nets.unet import DhariwalUNet, SongUNet
from dmdcopy.precond import EDMPrecond

SONG_NCSNPP = dict(
    img_resolution=16, in_channels=3, out_channels=3, label_dim=10, augment_dim=9, model_channels=16,
    channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], embedding_type="fourier",
    channel_mult_noise=2, encoder_type="residual", decoder_type="skip", resample_filter=[1, 3, 3, 1],
)
SONG_DDPMPP = dict(
    img_resolution=16, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2],
    num_blocks=1, attn_resolutions=[8], dropout=0.0,
)
ADM = dict(
    img_resolution=16, in_channels=3, out_channels=3, label_dim=10, augment_dim=9, model_channels=32,
    channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
)

EDM_SONG_NCSNPP_KEYS = """
model.map_noise.freqs 16
model.map_label.weight 32x10
model.map_label.bias 32
model.map_augment.weight 32x9
model.map_layer0.weight 64x32
model.map_layer0.bias 64
model.map_layer1.weight 64x64
model.map_layer1.bias 64
model.enc.16x16_conv.weight 16x3x3x3
model.enc.16x16_conv.bias 16
model.enc.16x16_block0.norm0.weight 16
model.enc.16x16_block0.norm0.bias 16
model.enc.16x16_block0.conv0.weight 16x16x3x3
model.enc.16x16_block0.conv0.bias 16
model.enc.16x16_block0.affine.weight 16x64
model.enc.16x16_block0.affine.bias 16
model.enc.16x16_block0.norm1.weight 16
model.enc.16x16_block0.norm1.bias 16
model.enc.16x16_block0.conv1.weight 16x16x3x3
model.enc.16x16_block0.conv1.bias 16
model.enc.8x8_down.norm0.weight 16
model.enc.8x8_down.norm0.bias 16
model.enc.8x8_down.conv0.weight 16x16x3x3
model.enc.8x8_down.conv0.bias 16
model.enc.8x8_down.conv0.resample_filter 1x1x4x4
model.enc.8x8_down.affine.weight 16x64
model.enc.8x8_down.affine.bias 16
model.enc.8x8_down.norm1.weight 16
model.enc.8x8_down.norm1.bias 16
model.enc.8x8_down.conv1.weight 16x16x3x3
model.enc.8x8_down.conv1.bias 16
model.enc.8x8_down.skip.weight 16x16x1x1
model.enc.8x8_down.skip.bias 16
model.enc.8x8_down.skip.resample_filter 1x1x4x4
model.enc.8x8_aux_residual.weight 16x3x3x3
model.enc.8x8_aux_residual.bias 16
model.enc.8x8_aux_residual.resample_filter 1x1x4x4
model.enc.8x8_block0.norm0.weight 16
model.enc.8x8_block0.norm0.bias 16
model.enc.8x8_block0.conv0.weight 32x16x3x3
model.enc.8x8_block0.conv0.bias 32
model.enc.8x8_block0.affine.weight 32x64
model.enc.8x8_block0.affine.bias 32
model.enc.8x8_block0.norm1.weight 32
model.enc.8x8_block0.norm1.bias 32
model.enc.8x8_block0.conv1.weight 32x32x3x3
model.enc.8x8_block0.conv1.bias 32
model.enc.8x8_block0.skip.weight 32x16x1x1
model.enc.8x8_block0.skip.bias 32
model.enc.8x8_block0.norm2.weight 32
model.enc.8x8_block0.norm2.bias 32
model.enc.8x8_block0.qkv.weight 96x32x1x1
model.enc.8x8_block0.qkv.bias 96
model.enc.8x8_block0.proj.weight 32x32x1x1
model.enc.8x8_block0.proj.bias 32
model.dec.8x8_in0.norm0.weight 32
model.dec.8x8_in0.norm0.bias 32
model.dec.8x8_in0.conv0.weight 32x32x3x3
model.dec.8x8_in0.conv0.bias 32
model.dec.8x8_in0.affine.weight 32x64
model.dec.8x8_in0.affine.bias 32
model.dec.8x8_in0.norm1.weight 32
model.dec.8x8_in0.norm1.bias 32
model.dec.8x8_in0.conv1.weight 32x32x3x3
model.dec.8x8_in0.conv1.bias 32
model.dec.8x8_in0.norm2.weight 32
model.dec.8x8_in0.norm2.bias 32
model.dec.8x8_in0.qkv.weight 96x32x1x1
model.dec.8x8_in0.qkv.bias 96
model.dec.8x8_in0.proj.weight 32x32x1x1
model.dec.8x8_in0.proj.bias 32
model.dec.8x8_in1.norm0.weight 32
model.dec.8x8_in1.norm0.bias 32
model.dec.8x8_in1.conv0.weight 32x32x3x3
model.dec.8x8_in1.conv0.bias 32
model.dec.8x8_in1.affine.weight 32x64
model.dec.8x8_in1.affine.bias 32
model.dec.8x8_in1.norm1.weight 32
model.dec.8x8_in1.norm1.bias 32
model.dec.8x8_in1.conv1.weight 32x32x3x3
model.dec.8x8_in1.conv1.bias 32
model.dec.8x8_block0.norm0.weight 64
model.dec.8x8_block0.norm0.bias 64
model.dec.8x8_block0.conv0.weight 32x64x3x3
model.dec.8x8_block0.conv0.bias 32
model.dec.8x8_block0.affine.weight 32x64
model.dec.8x8_block0.affine.bias 32
model.dec.8x8_block0.norm1.weight 32
model.dec.8x8_block0.norm1.bias 32
model.dec.8x8_block0.conv1.weight 32x32x3x3
model.dec.8x8_block0.conv1.bias 32
model.dec.8x8_block0.skip.weight 32x64x1x1
model.dec.8x8_block0.skip.bias 32
model.dec.8x8_block1.norm0.weight 48
model.dec.8x8_block1.norm0.bias 48
model.dec.8x8_block1.conv0.weight 32x48x3x3
model.dec.8x8_block1.conv0.bias 32
model.dec.8x8_block1.affine.weight 32x64
model.dec.8x8_block1.affine.bias 32
model.dec.8x8_block1.norm1.weight 32
model.dec.8x8_block1.norm1.bias 32
model.dec.8x8_block1.conv1.weight 32x32x3x3
model.dec.8x8_block1.conv1.bias 32
model.dec.8x8_block1.skip.weight 32x48x1x1
model.dec.8x8_block1.skip.bias 32
model.dec.8x8_block1.norm2.weight 32
model.dec.8x8_block1.norm2.bias 32
model.dec.8x8_block1.qkv.weight 96x32x1x1
model.dec.8x8_block1.qkv.bias 96
model.dec.8x8_block1.proj.weight 32x32x1x1
model.dec.8x8_block1.proj.bias 32
model.dec.8x8_aux_norm.weight 32
model.dec.8x8_aux_norm.bias 32
model.dec.8x8_aux_conv.weight 3x32x3x3
model.dec.8x8_aux_conv.bias 3
model.dec.16x16_up.norm0.weight 32
model.dec.16x16_up.norm0.bias 32
model.dec.16x16_up.conv0.weight 32x32x3x3
model.dec.16x16_up.conv0.bias 32
model.dec.16x16_up.conv0.resample_filter 1x1x4x4
model.dec.16x16_up.affine.weight 32x64
model.dec.16x16_up.affine.bias 32
model.dec.16x16_up.norm1.weight 32
model.dec.16x16_up.norm1.bias 32
model.dec.16x16_up.conv1.weight 32x32x3x3
model.dec.16x16_up.conv1.bias 32
model.dec.16x16_up.skip.weight 32x32x1x1
model.dec.16x16_up.skip.bias 32
model.dec.16x16_up.skip.resample_filter 1x1x4x4
model.dec.16x16_block0.norm0.weight 48
model.dec.16x16_block0.norm0.bias 48
model.dec.16x16_block0.conv0.weight 16x48x3x3
model.dec.16x16_block0.conv0.bias 16
model.dec.16x16_block0.affine.weight 16x64
model.dec.16x16_block0.affine.bias 16
model.dec.16x16_block0.norm1.weight 16
model.dec.16x16_block0.norm1.bias 16
model.dec.16x16_block0.conv1.weight 16x16x3x3
model.dec.16x16_block0.conv1.bias 16
model.dec.16x16_block0.skip.weight 16x48x1x1
model.dec.16x16_block0.skip.bias 16
model.dec.16x16_block1.norm0.weight 32
model.dec.16x16_block1.norm0.bias 32
model.dec.16x16_block1.conv0.weight 16x32x3x3
model.dec.16x16_block1.conv0.bias 16
model.dec.16x16_block1.affine.weight 16x64
model.dec.16x16_block1.affine.bias 16
model.dec.16x16_block1.norm1.weight 16
model.dec.16x16_block1.norm1.bias 16
model.dec.16x16_block1.conv1.weight 16x16x3x3
model.dec.16x16_block1.conv1.bias 16
model.dec.16x16_block1.skip.weight 16x32x1x1
model.dec.16x16_block1.skip.bias 16
model.dec.16x16_aux_up.resample_filter 1x1x4x4
model.dec.16x16_aux_norm.weight 16
model.dec.16x16_aux_norm.bias 16
model.dec.16x16_aux_conv.weight 3x16x3x3
model.dec.16x16_aux_conv.bias 3
"""

EDM_ADM_KEYS = """
model.map_augment.weight 32x9
model.map_layer0.weight 128x32
model.map_layer0.bias 128
model.map_layer1.weight 128x128
model.map_layer1.bias 128
model.map_label.weight 128x10
model.enc.16x16_conv.weight 32x3x3x3
model.enc.16x16_conv.bias 32
model.enc.16x16_block0.norm0.weight 32
model.enc.16x16_block0.norm0.bias 32
model.enc.16x16_block0.conv0.weight 32x32x3x3
model.enc.16x16_block0.conv0.bias 32
model.enc.16x16_block0.affine.weight 64x128
model.enc.16x16_block0.affine.bias 64
model.enc.16x16_block0.norm1.weight 32
model.enc.16x16_block0.norm1.bias 32
model.enc.16x16_block0.conv1.weight 32x32x3x3
model.enc.16x16_block0.conv1.bias 32
model.enc.8x8_down.norm0.weight 32
model.enc.8x8_down.norm0.bias 32
model.enc.8x8_down.conv0.weight 32x32x3x3
model.enc.8x8_down.conv0.bias 32
model.enc.8x8_down.conv0.resample_filter 1x1x2x2
model.enc.8x8_down.affine.weight 64x128
model.enc.8x8_down.affine.bias 64
model.enc.8x8_down.norm1.weight 32
model.enc.8x8_down.norm1.bias 32
model.enc.8x8_down.conv1.weight 32x32x3x3
model.enc.8x8_down.conv1.bias 32
model.enc.8x8_down.skip.resample_filter 1x1x2x2
model.enc.8x8_block0.norm0.weight 32
model.enc.8x8_block0.norm0.bias 32
model.enc.8x8_block0.conv0.weight 64x32x3x3
model.enc.8x8_block0.conv0.bias 64
model.enc.8x8_block0.affine.weight 128x128
model.enc.8x8_block0.affine.bias 128
model.enc.8x8_block0.norm1.weight 64
model.enc.8x8_block0.norm1.bias 64
model.enc.8x8_block0.conv1.weight 64x64x3x3
model.enc.8x8_block0.conv1.bias 64
model.enc.8x8_block0.skip.weight 64x32x1x1
model.enc.8x8_block0.skip.bias 64
model.enc.8x8_block0.norm2.weight 64
model.enc.8x8_block0.norm2.bias 64
model.enc.8x8_block0.qkv.weight 192x64x1x1
model.enc.8x8_block0.qkv.bias 192
model.enc.8x8_block0.proj.weight 64x64x1x1
model.enc.8x8_block0.proj.bias 64
model.dec.8x8_in0.norm0.weight 64
model.dec.8x8_in0.norm0.bias 64
model.dec.8x8_in0.conv0.weight 64x64x3x3
model.dec.8x8_in0.conv0.bias 64
model.dec.8x8_in0.affine.weight 128x128
model.dec.8x8_in0.affine.bias 128
model.dec.8x8_in0.norm1.weight 64
model.dec.8x8_in0.norm1.bias 64
model.dec.8x8_in0.conv1.weight 64x64x3x3
model.dec.8x8_in0.conv1.bias 64
model.dec.8x8_in0.norm2.weight 64
model.dec.8x8_in0.norm2.bias 64
model.dec.8x8_in0.qkv.weight 192x64x1x1
model.dec.8x8_in0.qkv.bias 192
model.dec.8x8_in0.proj.weight 64x64x1x1
model.dec.8x8_in0.proj.bias 64
model.dec.8x8_in1.norm0.weight 64
model.dec.8x8_in1.norm0.bias 64
model.dec.8x8_in1.conv0.weight 64x64x3x3
model.dec.8x8_in1.conv0.bias 64
model.dec.8x8_in1.affine.weight 128x128
model.dec.8x8_in1.affine.bias 128
model.dec.8x8_in1.norm1.weight 64
model.dec.8x8_in1.norm1.bias 64
model.dec.8x8_in1.conv1.weight 64x64x3x3
model.dec.8x8_in1.conv1.bias 64
model.dec.8x8_block0.norm0.weight 128
model.dec.8x8_block0.norm0.bias 128
model.dec.8x8_block0.conv0.weight 64x128x3x3
model.dec.8x8_block0.conv0.bias 64
model.dec.8x8_block0.affine.weight 128x128
model.dec.8x8_block0.affine.bias 128
model.dec.8x8_block0.norm1.weight 64
model.dec.8x8_block0.norm1.bias 64
model.dec.8x8_block0.conv1.weight 64x64x3x3
model.dec.8x8_block0.conv1.bias 64
model.dec.8x8_block0.skip.weight 64x128x1x1
model.dec.8x8_block0.skip.bias 64
model.dec.8x8_block0.norm2.weight 64
model.dec.8x8_block0.norm2.bias 64
model.dec.8x8_block0.qkv.weight 192x64x1x1
model.dec.8x8_block0.qkv.bias 192
model.dec.8x8_block0.proj.weight 64x64x1x1
model.dec.8x8_block0.proj.bias 64
model.dec.8x8_block1.norm0.weight 96
model.dec.8x8_block1.norm0.bias 96
model.dec.8x8_block1.conv0.weight 64x96x3x3
model.dec.8x8_block1.conv0.bias 64
model.dec.8x8_block1.affine.weight 128x128
model.dec.8x8_block1.affine.bias 128
model.dec.8x8_block1.norm1.weight 64
model.dec.8x8_block1.norm1.bias 64
model.dec.8x8_block1.conv1.weight 64x64x3x3
model.dec.8x8_block1.conv1.bias 64
model.dec.8x8_block1.skip.weight 64x96x1x1
model.dec.8x8_block1.skip.bias 64
model.dec.8x8_block1.norm2.weight 64
model.dec.8x8_block1.norm2.bias 64
model.dec.8x8_block1.qkv.weight 192x64x1x1
model.dec.8x8_block1.qkv.bias 192
model.dec.8x8_block1.proj.weight 64x64x1x1
model.dec.8x8_block1.proj.bias 64
model.dec.16x16_up.norm0.weight 64
model.dec.16x16_up.norm0.bias 64
model.dec.16x16_up.conv0.weight 64x64x3x3
model.dec.16x16_up.conv0.bias 64
model.dec.16x16_up.conv0.resample_filter 1x1x2x2
model.dec.16x16_up.affine.weight 128x128
model.dec.16x16_up.affine.bias 128
model.dec.16x16_up.norm1.weight 64
model.dec.16x16_up.norm1.bias 64
model.dec.16x16_up.conv1.weight 64x64x3x3
model.dec.16x16_up.conv1.bias 64
model.dec.16x16_up.skip.resample_filter 1x1x2x2
model.dec.16x16_block0.norm0.weight 96
model.dec.16x16_block0.norm0.bias 96
model.dec.16x16_block0.conv0.weight 32x96x3x3
model.dec.16x16_block0.conv0.bias 32
model.dec.16x16_block0.affine.weight 64x128
model.dec.16x16_block0.affine.bias 64
model.dec.16x16_block0.norm1.weight 32
model.dec.16x16_block0.norm1.bias 32
model.dec.16x16_block0.conv1.weight 32x32x3x3
model.dec.16x16_block0.conv1.bias 32
model.dec.16x16_block0.skip.weight 32x96x1x1
model.dec.16x16_block0.skip.bias 32
model.dec.16x16_block1.norm0.weight 64
model.dec.16x16_block1.norm0.bias 64
model.dec.16x16_block1.conv0.weight 32x64x3x3
model.dec.16x16_block1.conv0.bias 32
model.dec.16x16_block1.affine.weight 64x128
model.dec.16x16_block1.affine.bias 64
model.dec.16x16_block1.norm1.weight 32
model.dec.16x16_block1.norm1.bias 32
model.dec.16x16_block1.conv1.weight 32x32x3x3
model.dec.16x16_block1.conv1.bias 32
model.dec.16x16_block1.skip.weight 32x64x1x1
model.dec.16x16_block1.skip.bias 32
model.out_norm.weight 32
model.out_norm.bias 32
model.out_conv.weight 3x32x3x3
model.out_conv.bias 3
"""


def _parse(keys: str) -> dict[str, tuple[int, ...]]:
    rows = (line.split() for line in keys.strip().splitlines())
    return {name: tuple(int(s) for s in shape.split("x")) for name, shape in rows}


def _state_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _randomise(net: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Replace every parameter by noise so that zero-initialised layers cannot hide a mistake."""
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, std)
    return net.eval()


def _inputs(net, batch=3, dtype=torch.float32):
    x = torch.randn(batch, *net.sample_shape, dtype=dtype)
    c_noise = torch.randn(batch, dtype=dtype)
    labels = None
    if net.label_dim:
        labels = torch.eye(net.label_dim, dtype=dtype)[torch.arange(batch) % net.label_dim]
    return x, c_noise, labels


@pytest.mark.parametrize(
    ("cls", "options", "keys"),
    [(SongUNet, SONG_NCSNPP, EDM_SONG_NCSNPP_KEYS), (DhariwalUNet, ADM, EDM_ADM_KEYS)],
)
def test_state_dict_names_shapes_and_order_equal_edm(cls, options, keys):
    expected = _parse(keys)
    ours = _state_shapes(EDMPrecond(cls(**options)))
    assert list(ours) == list(expected)  # names and registration order
    assert ours == expected  # shapes


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (SongUNet, SONG_DDPMPP),
        (SongUNet, SONG_NCSNPP),
        (SongUNet, dict(SONG_DDPMPP, encoder_type="skip", decoder_type="skip", label_dim=4)),
        (DhariwalUNet, ADM),
        (DhariwalUNet, dict(ADM, label_dim=0, augment_dim=0)),
    ],
)
def test_forward_shape_dtype_and_determinism(cls, options):
    net = _randomise(cls(**options))
    x, c_noise, labels = _inputs(net)
    out = net(x, c_noise, labels)
    assert out.shape == (3, options["out_channels"], 16, 16) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(out, net(x, c_noise, labels))


@pytest.mark.parametrize(("cls", "options"), [(SongUNet, SONG_NCSNPP), (DhariwalUNet, ADM)])
def test_samples_do_not_interact_within_a_batch(cls, options):
    net = _randomise(cls(**options))
    x, c_noise, labels = _inputs(net, batch=4)
    full = net(x, c_noise, labels)
    alone = net(x[2:3], c_noise[2:3], labels[2:3])
    torch.testing.assert_close(alone, full[2:3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("cls", "options"), [(SongUNet, SONG_NCSNPP), (DhariwalUNet, ADM)])
def test_class_and_augment_labels_enter_the_output(cls, options):
    net = _randomise(cls(**options))
    x, c_noise, labels = _inputs(net)
    out = net(x, c_noise, labels)
    assert not torch.allclose(out, net(x, c_noise, labels.roll(1, dims=1)))
    assert not torch.allclose(out, net(x, c_noise, labels, augment_labels=torch.randn(3, 9)))
    assert not torch.allclose(out, net(x, c_noise + 1, labels))


@pytest.mark.parametrize(("cls", "options"), [(SongUNet, SONG_NCSNPP), (DhariwalUNet, ADM)])
def test_label_dropout_one_equals_zero_labels_in_training_only(cls, options):
    net = _randomise(cls(**dict(options, dropout=0.0, label_dropout=1.0)))
    x, c_noise, labels = _inputs(net)
    net.train()
    torch.testing.assert_close(net(x, c_noise, labels), net(x, c_noise, torch.zeros_like(labels)))
    net.eval()
    assert not torch.allclose(net(x, c_noise, labels), net(x, c_noise, torch.zeros_like(labels)))


def test_adm_output_is_zero_at_initialisation_and_song_output_is_tiny():
    # EDM zero-initialises ADM's out_conv and scales NCSN++/DDPM++'s last conv by 1e-5.
    adm = DhariwalUNet(**ADM).eval()
    x, c_noise, labels = _inputs(adm)
    assert torch.equal(adm(x, c_noise, labels), torch.zeros_like(x))
    song = SongUNet(**SONG_DDPMPP).eval()
    out = song(*_inputs(song))
    assert 0 < out.abs().max() < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("cls", "options"), [(SongUNet, SONG_NCSNPP), (DhariwalUNet, ADM)])
def test_output_follows_input_dtype_with_float32_parameters(cls, options, dtype):
    net = _randomise(cls(**options), std=0.1)
    x, c_noise, labels = _inputs(net)
    ref = net(x, c_noise, labels)
    out = net(x.to(dtype), c_noise.to(dtype), labels.to(dtype))
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float64 else 0.1
    assert (out.double() - ref.double()).abs().max() <= tol * (1 + ref.abs().max())


@pytest.mark.parametrize(("cls", "options"), [(SongUNet, SONG_NCSNPP), (DhariwalUNet, ADM)])
def test_gradient_checkpointing_gives_the_same_gradients(cls, options):
    net = _randomise(cls(**dict(options, dropout=0.0))).train()
    x, c_noise, labels = _inputs(net)
    grads = []
    for flag in (False, True):
        net.zero_grad()
        net.gradient_checkpointing = flag
        net(x, c_noise, labels).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize(("cls", "options"), [(SongUNet, SONG_NCSNPP), (DhariwalUNet, ADM)])
def test_init_kwargs_are_json_and_rebuild_the_same_architecture(cls, options):
    net = cls(**options)
    kwargs = json.loads(json.dumps(net.init_kwargs))
    rebuilt = cls(**kwargs)
    assert _state_shapes(rebuilt) == _state_shapes(net)
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    assert net.sample_shape == (3, 16, 16) and net.label_dim == 10


@pytest.mark.parametrize(("cls", "options"), [(SongUNet, SONG_NCSNPP), (DhariwalUNet, ADM)])
def test_init_kwargs_are_the_constructor_call_bound_to_its_signature(cls, options):
    """One record: every option of the signature, in its order, positional arguments by name."""
    positional = [options[k] for k in ("img_resolution", "in_channels", "out_channels")]
    rest = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items() if k not in
            ("img_resolution", "in_channels", "out_channels")}
    net = cls(*positional, **rest)
    assert tuple(net.init_kwargs) == constructor_options(cls) == tuple(inspect.signature(cls).parameters)
    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items() if k not in options}
    assert defaults and all(net.init_kwargs[k] == (list(v) if isinstance(v, tuple) else v)
                            for k, v in defaults.items())
    assert all(net.init_kwargs[k] == v for k, v in options.items())  # tuples came back as lists
    assert cls(**net.init_kwargs).init_kwargs == net.init_kwargs
    # the values take the annotated types, so the record is JSON whatever the caller passed
    assert type(cls(**dict(options, dropout=0)).init_kwargs["dropout"]) is float


@pytest.mark.parametrize(("cls", "options"), [(SongUNet, SONG_DDPMPP), (DhariwalUNet, ADM)])
def test_behind_edm_precond(cls, options):
    net = _randomise(cls(**options))
    D = EDMPrecond(net)
    assert D.sample_shape == net.sample_shape and D.label_dim == net.label_dim
    x = torch.randn(2, 3, 16, 16)
    sigma = torch.tensor([0.5, 2.0])
    labels = torch.tensor([1, 7]) if net.label_dim else None
    out = D(x, sigma, labels)
    assert out.shape == x.shape
    # EDM eq. 7 with the network called directly on the preconditioned input
    sd = 0.5
    s = sigma.view(-1, 1, 1, 1)
    one_hot = torch.nn.functional.one_hot(labels, net.label_dim).float() if net.label_dim else None
    F_x = net(x / (sd**2 + s**2).sqrt(), sigma.log() / 4, one_hot)
    expected = sd**2 / (s**2 + sd**2) * x + s * sd / (s**2 + sd**2).sqrt() * F_x
    torch.testing.assert_close(out, expected)
    with pytest.raises(ShapeError):
        D(torch.randn(2, 3, 8, 8), sigma, labels)


def test_shape_errors_name_the_expected_shape():
    net = SongUNet(**dict(SONG_DDPMPP, label_dim=4))
    x, c_noise, labels = _inputs(net)
    with pytest.raises(ShapeError, match=r"\(B, 3, H, W\)"):
        net(torch.randn(3, 4, 16, 16), c_noise, labels)
    with pytest.raises(ShapeError, match="divisible by 2"):
        net(torch.randn(3, 3, 15, 15), c_noise, labels)
    with pytest.raises(ShapeError, match="noise_labels"):
        net(x, c_noise[:2], labels)
    with pytest.raises(ShapeError, match="conditional"):
        net(x, c_noise, None)
    with pytest.raises(ShapeError, match=r"\(3, 4\)"):
        net(x, c_noise, labels[:, :3])
    with pytest.raises(ShapeError, match="unconditional"):
        SongUNet(**SONG_DDPMPP)(x, c_noise, labels)
    with pytest.raises(ShapeError, match="augment_labels"):
        DhariwalUNet(**ADM)(x, c_noise, torch.zeros(3, 10), augment_labels=torch.zeros(3, 8))


@pytest.mark.parametrize(
    ("cls", "bad", "match"),
    [
        (SongUNet, dict(embedding_type="sinusoid"), "embedding_type"),
        (SongUNet, dict(encoder_type="dense"), "encoder_type"),
        (SongUNet, dict(decoder_type="residual"), "decoder_type"),
        (SongUNet, dict(img_resolution=10, channel_mult=[1, 2, 2]), "divisible by"),
        (SongUNet, dict(model_channels=0), "model_channels"),
        (SongUNet, dict(model_channels=6), "GroupNorm"),
        (DhariwalUNet, dict(channel_mult=[]), "channel_mult"),
    ],
)
def test_invalid_options_raise_config_error(cls, bad, match):
    with pytest.raises(ConfigError, match=match):
        cls(**dict(SONG_DDPMPP, **bad))


# ---- layers against closed forms -------------------------------------------------------------

def test_resampling_with_box_filter_is_average_pooling_and_nearest_upsampling():
    x = torch.randn(2, 3, 8, 8)
    down = Conv2d(3, 3, kernel=0, down=True, resample_filter=[1, 1])
    torch.testing.assert_close(down(x), torch.nn.functional.avg_pool2d(x, 2))
    up = Conv2d(3, 3, kernel=0, up=True, resample_filter=[1, 1])
    torch.testing.assert_close(up(x), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    assert down.weight is None and up.bias is None and "resample_filter" in down.state_dict()


def test_resampling_with_binomial_filter_preserves_constants_away_from_the_border():
    x = torch.full((1, 2, 8, 8), 3.0)
    for conv in (Conv2d(2, 2, kernel=0, down=True, resample_filter=[1, 3, 3, 1]),
                 Conv2d(2, 2, kernel=0, up=True, resample_filter=[1, 3, 3, 1])):
        y = conv(x)
        torch.testing.assert_close(y[..., 1:-1, 1:-1], torch.full_like(y[..., 1:-1, 1:-1], 3.0))


def test_fused_downsampling_conv_equals_conv_then_filter():
    torch.manual_seed(1)
    fused = Conv2d(2, 4, kernel=3, down=True, resample_filter=[1, 3, 3, 1], fused_resample=True)
    plain = Conv2d(2, 4, kernel=3, resample_filter=[1, 3, 3, 1])
    pool = Conv2d(4, 4, kernel=0, down=True, resample_filter=[1, 3, 3, 1])
    plain.load_state_dict({"weight": fused.weight, "bias": fused.bias})
    x = torch.randn(1, 2, 8, 8)
    # equal away from the border, where the zero padding of the two orders differs
    torch.testing.assert_close(fused(x)[..., 1:-1, 1:-1], pool(plain(x))[..., 1:-1, 1:-1])


def test_positional_embedding_closed_form():
    x = torch.tensor([0.0, 0.3, -2.0])
    for endpoint in (False, True):
        emb = PositionalEmbedding(8, endpoint=endpoint)(x)
        denom = 3 if endpoint else 4
        w = torch.tensor([10000.0 ** (-j / denom) for j in range(4)])
        torch.testing.assert_close(emb, torch.cat([torch.cos(x[:, None] * w), torch.sin(x[:, None] * w)], 1))


def test_attention_matches_per_head_softmax_attention_with_edm_qkv_layout():
    torch.manual_seed(2)
    block = UNetBlock(8, 8, emb_channels=4, attention=True, num_heads=2)
    _randomise(block)
    x = torch.randn(2, 8, 4, 4)
    qkv = block.qkv(x).reshape(2, 2, 4, 3, 16)  # (B, heads, C/heads, {q,k,v}, HW)
    q, k, v = (qkv[:, :, :, i].transpose(-1, -2) for i in range(3))  # (B, heads, HW, C/heads)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1) @ v
    expected = attn.transpose(-1, -2).reshape(2, 8, 4, 4)
    torch.testing.assert_close(block._attention(x), expected)


def test_block_without_enough_channels_for_a_head_has_no_attention():
    block = UNetBlock(32, 32, emb_channels=8, attention=True, channels_per_head=64)
    assert block.num_heads == 0 and not hasattr(block, "qkv")


@pytest.mark.parametrize("mode", ["xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"])
def test_weight_init_variance(mode):
    w = weight_init([400, 500], mode, fan_in=100, fan_out=300)
    var = 2 / 400 if mode.startswith("xavier") else 1 / 100
    assert abs(w.var().item() / var - 1) < 0.02  # 2e5 draws: relative s.e. of the variance < 0.4%
    assert abs(w.mean().item()) < 5 * math.sqrt(var / w.numel())
    if mode.endswith("uniform"):
        assert w.abs().max() <= math.sqrt(3 * var)
    with pytest.raises(ConfigError):
        weight_init([2], "orthogonal", 1, 1)


def test_song_embedding_formula():
    # NCSN++ mapping: Fourier features ordered [sin | cos], labels scaled by sqrt(label_dim).
    net = _randomise(SongUNet(**SONG_NCSNPP))
    c_noise, y, a = torch.randn(3), torch.eye(10)[[0, 4, 9]], torch.randn(3, 9)
    phase = 2 * math.pi * c_noise[:, None] * net.map_noise.freqs  # (B, 16)
    h = torch.cat([phase.sin(), phase.cos()], dim=1)
    h = h + (math.sqrt(10) * y) @ net.map_label.weight.T + net.map_label.bias + a @ net.map_augment.weight.T
    h = torch.nn.functional.silu(h @ net.map_layer0.weight.T + net.map_layer0.bias)
    h = torch.nn.functional.silu(h @ net.map_layer1.weight.T + net.map_layer1.bias)
    torch.testing.assert_close(net.embedding(c_noise, y, a), h)


def test_adm_embedding_formula():
    # ADM mapping: positional features [cos | sin]; the (bias-free) label projection is added last.
    net = _randomise(DhariwalUNet(**ADM))
    c_noise, y, a = torch.randn(3), torch.eye(10)[[0, 4, 9]], torch.randn(3, 9)
    w = torch.tensor([10000.0 ** (-j / 16) for j in range(16)])
    h = torch.cat([(c_noise[:, None] * w).cos(), (c_noise[:, None] * w).sin()], dim=1)
    h = h + a @ net.map_augment.weight.T
    h = torch.nn.functional.silu(h @ net.map_layer0.weight.T + net.map_layer0.bias)
    h = h @ net.map_layer1.weight.T + net.map_layer1.bias + y @ net.map_label.weight.T
    torch.testing.assert_close(net.embedding(c_noise, y, a), torch.nn.functional.silu(h))
    assert net.map_label.bias is None and net.map_augment.bias is None


def test_decoder_blocks_take_the_encoder_skips_in_reverse_order():
    # Block names and channel counts of the decoder follow EDM's U-Net wiring.
    net = DhariwalUNet(**ADM)
    assert list(net.enc) == ["16x16_conv", "16x16_block0", "8x8_down", "8x8_block0"]
    assert list(net.dec) == ["8x8_in0", "8x8_in1", "8x8_block0", "8x8_block1", "16x16_up",
                             "16x16_block0", "16x16_block1"]
    # encoder outputs (the skips): 32 (conv), 32 (block0), 32 (down), 64 (8x8_block0), used last-first
    ins = [b.in_channels for b in net.dec.values()]
    assert ins == [64, 64, 64 + 64, 64 + 32, 64, 64 + 32, 32 + 32]
