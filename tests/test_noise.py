"""Per-seed noise: the noise of seed i depends on i alone."""

import pytest
import torch

from dmdcopy.errors import ConfigError
from dmdcopy.noise import labels_for_seeds, noise_for_seeds, parse_seeds, split_seeds

SHAPE = (3, 4, 4)


def test_noise_of_a_seed_is_the_same_in_every_batch():
    seeds = list(range(100, 120))
    full = noise_for_seeds(seeds, SHAPE)
    assert full.shape == (20, *SHAPE) and full.dtype == torch.float32
    # batch splits
    parts = torch.cat([noise_for_seeds(seeds[i:i + 7], SHAPE) for i in range(0, 20, 7)])
    assert torch.equal(parts, full)
    # order of seeds
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0)).tolist()
    assert torch.equal(noise_for_seeds([seeds[p] for p in perm], SHAPE), full[perm])
    # a single seed alone
    assert torch.equal(noise_for_seeds([113], SHAPE)[0], full[13])


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_noise_is_the_same_whatever_the_number_of_devices(world_size):
    seeds = parse_seeds("0-22")
    reference = dict(zip(seeds, noise_for_seeds(seeds, (5,))))
    shares = [split_seeds(seeds, r, world_size) for r in range(world_size)]
    assert sorted(s for share in shares for s in share) == seeds  # every seed exactly once
    for share in shares:
        for i in range(0, len(share), 4):  # each rank in batches of 4
            batch = share[i:i + 4]
            for s, z in zip(batch, noise_for_seeds(batch, (5,))):
                assert torch.equal(z, reference[s])


def test_noise_is_standard_normal_and_seeds_differ():
    z = noise_for_seeds(range(2000), (16,))
    assert abs(z.mean().item()) < 0.02  # 32000 draws: std of the mean 0.0056
    assert abs(z.std().item() - 1) < 0.02
    assert not torch.equal(z[0], z[1])


def test_noise_dtype_and_device_are_cast_after_drawing():
    a = noise_for_seeds([5, 6], (3,))
    b = noise_for_seeds([5, 6], (3,), dtype=torch.float64, device="cpu")
    assert b.dtype == torch.float64
    assert torch.equal(b, a.double())
    assert torch.equal(noise_for_seeds(torch.tensor([5, 6]), (3,)), a)


def test_labels_for_seeds():
    seeds = list(range(3000))
    lab = labels_for_seeds(seeds, 10)
    assert lab.dtype == torch.int64 and lab.min() >= 0 and lab.max() < 10
    assert torch.equal(labels_for_seeds(seeds[500:510], 10), lab[500:510])
    counts = torch.bincount(lab, minlength=10).double()
    assert (counts - 300).abs().max() < 75  # binomial std ~16
    # the label stream is not a function of the noise: for class 0 the noise still varies
    z = noise_for_seeds(seeds[:200], (1,))[:, 0]
    assert z[lab[:200] == 0].std() > 0.5
    with pytest.raises(ConfigError, match="label_dim"):
        labels_for_seeds([1], 0)


def test_parse_and_split_seeds():
    assert parse_seeds("0-3,10") == [0, 1, 2, 3, 10]
    assert parse_seeds(" 7 ") == [7]
    assert parse_seeds("5-5,1-2") == [5, 1, 2]
    for bad in ("a-b", "3-1", "", "1,,2", "-1"):
        with pytest.raises(ConfigError):
            parse_seeds(bad)
    assert split_seeds(list(range(10)), 1, 3) == [1, 4, 7]
    with pytest.raises(ConfigError, match="rank"):
        split_seeds([1, 2], 3, 3)
    with pytest.raises(ConfigError, match="non-negative"):
        noise_for_seeds([-1], (2,))
    # torch generators take 64-bit seeds: the largest works, one more is a ConfigError, not an overflow
    assert noise_for_seeds([2**64 - 1], (2,)).shape == (1, 2)
    for bad in (2**64, -1):
        with pytest.raises(ConfigError, match=r"below 2\^64"):
            noise_for_seeds([0, bad], (2,))
        with pytest.raises(ConfigError, match=r"below 2\^64"):
            labels_for_seeds([bad], 3)
