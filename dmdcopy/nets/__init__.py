"""Networks: raw ``F(x_in, c_noise, class_labels)`` modules to put behind :mod:`dmdcopy.precond`, and
EDM2's network with its own preconditioning (:class:`EDM2Precond`, a denoiser)."""

from dmdcopy.nets.edm2 import EDM2Precond, EDM2UNet
from dmdcopy.nets.image_mlp import ImageMLP
from dmdcopy.nets.mlp import MLP
from dmdcopy.nets.unet import DhariwalUNet, SongUNet, set_attention_impl

__all__ = ["MLP", "DhariwalUNet", "EDM2Precond", "EDM2UNet", "ImageMLP", "SongUNet", "set_attention_impl"]
