"""Small networks and fixed inputs shared by the checkpoint tests."""

import torch

from dmdcopy.nets.unet import DhariwalUNet, SongUNet


def small_song(label_dim=0):
    return SongUNet(
        img_resolution=8,
        in_channels=3,
        out_channels=3,
        label_dim=label_dim,
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
        dropout=0.0,
    )


def small_dhariwal(label_dim=0):
    return DhariwalUNet(
        img_resolution=8,
        in_channels=3,
        out_channels=3,
        label_dim=label_dim,
        model_channels=32,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
        dropout=0.0,
    )


def randomise(module):
    """Non-default weights everywhere (zero-initialised output layers would hide a failed load)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()
