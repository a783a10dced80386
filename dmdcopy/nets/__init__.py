"""Networks: raw ``F(x_in, c_noise, class_labels)`` modules to put behind :mod:`dmdcopy.precond`."""

from dmdcopy.nets.mlp import MLP

__all__ = ["MLP"]
