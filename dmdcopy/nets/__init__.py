"""Networks: raw ``F(x_in, c_noise, class_labels)`` modules to put behind :mod:`dmdcopy.precond`."""

from dmdcopy.nets.image_mlp import ImageMLP
from dmdcopy.nets.mlp import MLP
from dmdcopy.nets.unet import DhariwalUNet, SongUNet

__all__ = ["MLP", "DhariwalUNet", "ImageMLP", "SongUNet"]
