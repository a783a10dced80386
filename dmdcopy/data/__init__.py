"""Data that ships or is generated: power-law Gaussians, Gaussian mixtures, sklearn digits."""

from dmdcopy.data.digits import load_digits, split_digits
from dmdcopy.data.synthetic import (
    GaussianMixtureData,
    PowerLawGaussianData,
    gaussian_mixture,
    power_law_gaussian,
    power_law_spectrum,
    random_orthogonal,
)

__all__ = [
    "GaussianMixtureData",
    "PowerLawGaussianData",
    "gaussian_mixture",
    "load_digits",
    "power_law_gaussian",
    "power_law_spectrum",
    "random_orthogonal",
    "split_digits",
]
