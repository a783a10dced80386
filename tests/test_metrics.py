"""Delta E, transport inefficiency and copy diagnostics against closed forms and known pairings."""

from __future__ import annotations

import itertools
import json
import math
import os
import socket

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dmdcopy.errors import ConfigError, ShapeError
from dmdcopy.metrics import (
    PairingInefficiency,
    copy_diagnostics,
    optimal_assignment,
    pairing_inefficiency,
    pairwise_cost,
    transport_inefficiency,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _derangement(n: int, g: torch.Generator) -> torch.Tensor:
    """A random permutation without fixed points (a cyclic shift of a random order)."""
    order = torch.randperm(n, generator=g)
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(1)
    return perm


# ---------------------------------------------------------------------------------------------
# Known pairings


def test_identical_is_exactly_zero():
    t = torch.randn(200, 3, 4, 4, generator=_gen(1))
    r = pairing_inefficiency(t, t.clone(), n_boot=50)
    assert r.delta_e == 0.0 and r.e_pair == 0.0 and r.e_opt == 0.0
    assert (r.ci_low, r.ci_high) == (0.0, 0.0)
    assert r.own_pair_rate == 1.0 and r.pair_ind_ratio == 0.0
    assert r.resolution == 1.0 and r.warning is None
    assert r.n == 200 and r.dim == 48 and r.n_blocks == 1 and r.block_size == 200
    blocked = pairing_inefficiency(t, t, n_boot=20, block_size=64)
    assert blocked.delta_e == 0.0 and blocked.n_blocks == 4 and blocked.block_size == 50
    assert blocked.block_delta_e == (0.0,) * 4


def test_shuffled_pairing_is_about_one():
    g = _gen(2)
    t = torch.randn(400, 4, generator=g)
    s = t[_derangement(400, g)]
    r = pairing_inefficiency(s, t, n_boot=300)
    assert r.e_opt == 0.0  # the same set: the inverse shuffle costs nothing
    assert r.ci_low <= 1.0 <= r.ci_high
    assert abs(r.delta_e - 1) < 0.1
    assert r.own_pair_rate == 0.0
    # With E_opt = 0, Delta E is E_pair / E_ind
    assert r.delta_e == pytest.approx(r.pair_ind_ratio, rel=1e-12)


def test_small_noise_gives_small_growing_delta_e():
    g = _gen(3)
    t = torch.randn(300, 8, generator=g)
    e = torch.randn(300, 8, generator=g)
    values = [pairing_inefficiency(t + eps * e, t, n_boot=0).delta_e for eps in (0.5, 1.0, 2.0, 4.0)]
    assert 0 <= values[0] < 0.05
    assert all(a < b for a, b in itertools.pairwise(values)), values
    assert values[-1] < 1


def test_mode_relabelling_matches_closed_form():
    # K tight clusters; half of each cluster's students land in the next cluster. Then E_opt is
    # the within-cluster jitter only, and Delta E = (E_pair - E_opt) / (E_ind - E_opt) follows
    # from the cluster distances.
    n, K, jitter = 1280, 4, 1e-3
    centers = torch.tensor([[3.0, 3.0], [3.0, -3.0], [-3.0, -3.0], [-3.0, 3.0]])
    idx = torch.arange(n)
    c = idx % K
    moved = (idx // K) % 2 == 0
    c_student = torch.where(moved, (c + 1) % K, c)
    g = _gen(4)
    t = centers[c] + jitter * torch.randn(n, 2, generator=g)
    s = centers[c_student] + jitter * torch.randn(n, 2, generator=g)
    # Closed form (jitter -> 0): neighbours in the cycle are 6 apart -> cost 36 / 2 = 18
    e_pair = 0.5 * 18.0
    d2 = torch.cdist(centers, centers).square() / 2  # (K, K)
    e_ind = float(d2.mean())
    whole = pairing_inefficiency(s, t, n_boot=200)
    assert whole.delta_e == pytest.approx(e_pair / e_ind, rel=1e-3)
    # Blockwise and whole-set estimates agree within their intervals
    blocked = pairing_inefficiency(s, t, n_boot=200, block_size=320)
    assert blocked.n_blocks == 4
    assert blocked.ci_low <= whole.delta_e <= blocked.ci_high
    assert whole.ci_low <= blocked.delta_e <= whole.ci_high
    assert blocked.block_std < 0.05


def test_blocks_can_only_raise_e_opt():
    # Block-diagonal matchings are matchings of the whole set, so pooled block optima are never
    # below the whole-set optimum; E_pair does not depend on blocks at all.
    g = _gen(16)
    t = torch.randn(300, 4, generator=g)
    s = t + torch.randn(300, 4, generator=g)
    whole = pairing_inefficiency(s, t, n_boot=0)
    for block_size in (150, 100, 37):
        blocked = pairing_inefficiency(s, t, n_boot=0, block_size=block_size)
        assert blocked.e_opt >= whole.e_opt - 1e-12
        assert blocked.e_pair == pytest.approx(whole.e_pair, rel=1e-12)
        assert blocked.n_blocks == -(-300 // block_size)
        assert sum(1 for _ in blocked.block_delta_e) == blocked.n_blocks


def test_one_dimensional_optimum_is_sorted_matching():
    g = _gen(5)
    s = torch.randn(257, 1, generator=g) * 2 + 0.3
    t = torch.rand(257, 1, generator=g)
    r = pairing_inefficiency(s, t, n_boot=0)
    sorted_cost = float((s.double().sort(0).values - t.double().sort(0).values).square().mean())
    assert r.e_opt == pytest.approx(sorted_cost, rel=1e-12)
    e_ind = float((s.double() - t.double().T).square().mean())
    assert r.e_ind == pytest.approx(e_ind, rel=1e-10)
    assert r.e_pair == pytest.approx(float((s.double() - t.double()).square().mean()), rel=1e-12)


def test_optimal_assignment_beats_every_permutation_small():
    cost = np.random.default_rng(0).random((6, 6))
    perm = optimal_assignment(cost)
    best = min(sum(cost[i, p[i]] for i in range(6)) for p in itertools.permutations(range(6)))
    assert sum(cost[i, perm[i]] for i in range(6)) == pytest.approx(best)


def test_pairwise_cost_matches_direct_differences():
    g = _gen(6)
    a = torch.randn(37, 2, 3, generator=g) + 100.0  # far from 0: the centring keeps this accurate
    b = torch.randn(29, 2, 3, generator=g) + 100.0
    direct = (a.double().flatten(1)[:, None] - b.double().flatten(1)[None]).square().mean(-1)
    cost = pairwise_cost(a, b, chunk=8)
    assert cost.shape == (37, 29) and cost.dtype == np.float64
    np.testing.assert_allclose(cost, direct.numpy(), rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# Invariances


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.05, 20.0),
    shift=st.floats(-50.0, 50.0),
)
def test_invariant_to_common_scaling_translation_rotation(seed, scale, shift):
    g = _gen(seed)
    n, d = 48, 5
    t = torch.randn(n, d, generator=g, dtype=torch.float64)
    s = t + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))  # orthogonal
    offset = shift * torch.randn(d, generator=g, dtype=torch.float64)
    ref = pairing_inefficiency(s, t, n_boot=0)
    moved = pairing_inefficiency(scale * s @ q + offset, scale * t @ q + offset, n_boot=0)
    assert moved.delta_e == pytest.approx(ref.delta_e, rel=1e-6, abs=1e-9)
    assert moved.e_opt == pytest.approx(scale**2 * ref.e_opt, rel=1e-6)
    assert moved.resolution == pytest.approx(ref.resolution, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Transport inefficiency, diagnostics


def test_transport_monotone_map_is_optimal_and_reversal_is_not():
    z = torch.randn(300, 1, generator=_gen(7))
    assert transport_inefficiency(z, 3 * z - 1, n_boot=0).value == 0.0
    x = -z  # an anti-monotone map; the optimum in 1-D is the sorted matching
    r = transport_inefficiency(z, x, n_boot=100)
    e_model = float((x.double() - z.double()).square().mean())
    e_opt = float((x.double().sort(0).values - z.double().sort(0).values).square().mean())
    assert r.value == pytest.approx((e_model - e_opt) / e_opt, rel=1e-10)
    assert r.ci_low <= r.value <= r.ci_high


def test_transport_of_a_permuted_copy_is_infinite_and_json_safe():
    # samples that are the noises themselves, relabelled: E_opt = 0 < E_model, so the ratio is inf
    z = torch.randn(50, 3, generator=_gen(17))
    r = transport_inefficiency(z, z[_derangement(50, _gen(18))], n_boot=20)
    assert r.e_opt == 0.0 and r.e_model > 0 and r.value == math.inf
    d = r.to_dict()
    assert d["value"] is None
    json.dumps(d, allow_nan=False)  # strict JSON: no NaN, no Infinity


def test_copy_diagnostics():
    g = _gen(8)
    t = torch.randn(100, 6, generator=g)
    assert copy_diagnostics(t, t) == {"own_pair_rate": 1.0, "chance_rate": 0.01, "pair_ind_ratio": 0.0}
    shuffled = t[_derangement(100, g)]
    d = copy_diagnostics(shuffled, t)
    assert d["own_pair_rate"] == 0.0  # each student's exact twin is another teacher sample
    assert 0.8 < d["pair_ind_ratio"] < 1.2
    blocked = copy_diagnostics(shuffled, t, block_size=50)  # twins may fall in the other block
    assert blocked["chance_rate"] == 0.02 and blocked["own_pair_rate"] < 0.1


def test_low_resolution_is_flagged():
    # Independent high-dimensional Gaussians: all distances concentrate, E_opt ~ E_ind.
    g = _gen(9)
    r = pairing_inefficiency(torch.randn(20, 4000, generator=g), torch.randn(20, 4000, generator=g),
                             n_boot=0)
    assert r.resolution < 0.05 and r.warning is not None and "resolution" in r.warning
    assert not r.reliable


def test_degenerate_teacher_is_undefined_not_a_number_silently():
    t = torch.zeros(10, 3)
    r = pairing_inefficiency(torch.randn(10, 3, generator=_gen(10)), t, n_boot=10)
    assert math.isnan(r.delta_e) and "undefined" in r.warning


def test_result_to_dict_is_json_ready():
    t = torch.randn(30, 2, generator=_gen(11))
    d = pairing_inefficiency(t + 0.1, t, n_boot=10, block_size=10).to_dict()
    json.dumps(d)
    assert d["n_blocks"] == 3 and len(d["block_delta_e"]) == 3 and d["bootstrap"]


def test_bootstrap_is_reproducible_and_follows_generator():
    g = _gen(12)
    t = torch.randn(100, 3, generator=g)
    s = t + torch.randn(100, 3, generator=g)
    a, b = pairing_inefficiency(s, t, n_boot=50), pairing_inefficiency(s, t, n_boot=50)
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    c = pairing_inefficiency(s, t, n_boot=50, generator=_gen(99))
    assert (c.ci_low, c.ci_high) != (a.ci_low, a.ci_high)
    assert pairing_inefficiency(s, t, n_boot=0).ci_low != pairing_inefficiency(s, t, n_boot=0).ci_low  # NaN


# ---------------------------------------------------------------------------------------------
# Failure paths


def test_shape_and_value_errors():
    t = torch.randn(10, 3)
    with pytest.raises(ShapeError, match="same shape"):
        pairing_inefficiency(torch.randn(10, 4), t)
    with pytest.raises(ShapeError, match="at least 2 dims"):
        pairing_inefficiency(torch.randn(10), torch.randn(10))
    with pytest.raises(ShapeError, match="at least 2 pairs"):
        pairing_inefficiency(t[:1], t[:1])
    bad = t.clone()
    bad[4, 1] = float("nan")
    with pytest.raises(ShapeError, match=r"student has non-finite.*index 4"):
        pairing_inefficiency(bad, t)
    with pytest.raises(ShapeError, match="teacher has non-finite"):
        pairing_inefficiency(t, bad)
    with pytest.raises(ShapeError, match="floating-point"):
        pairing_inefficiency(torch.ones(10, 3, dtype=torch.long), t)
    with pytest.raises(ConfigError, match="block_size"):
        pairing_inefficiency(t, t, block_size=1)
    with pytest.raises(ConfigError, match="n_boot"):
        pairing_inefficiency(t, t, n_boot=-1)
    with pytest.raises(ShapeError, match="noise"):
        transport_inefficiency(torch.randn(5, 2), torch.randn(6, 2))


# ---------------------------------------------------------------------------------------------
# Accumulator


def test_accumulator_equals_one_shot():
    g = _gen(13)
    t = torch.randn(150, 2, 3, generator=g)
    s = t + 0.7 * torch.randn(150, 2, 3, generator=g)
    m = PairingInefficiency(n_boot=100, block_size=60)
    for lo in range(0, 150, 40):
        m.update(s[lo : lo + 40], t[lo : lo + 40])
    assert m.n == 150
    assert m.compute() == pairing_inefficiency(s, t, n_boot=100, block_size=60)
    m.reset()
    with pytest.raises(ShapeError, match="no pairs"):
        m.compute()
    with pytest.raises(ShapeError, match="same shape"):
        m.update(s[:3], t[:4])
    m.update(s[:3], t[:3])
    with pytest.raises(ShapeError, match="per-sample shape"):
        m.update(torch.randn(3, 6), torch.randn(3, 6))
    with pytest.raises(ConfigError, match="unknown options"):
        PairingInefficiency(blocksize=10)


def test_inputs_that_require_grad_are_fine():
    t = torch.randn(20, 3, generator=_gen(15))
    s = (t + 0.1).requires_grad_()
    assert pairing_inefficiency(s, t, n_boot=0) == pairing_inefficiency(s.detach(), t, n_boot=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        g = _gen(14)
        t = torch.randn(90, 4, generator=g)
        s = t + 0.5 * torch.randn(90, 4, generator=g)
        m = PairingInefficiency(n_boot=20)
        bounds = [(0, 50), (50, 90)][rank]  # unequal shares exercise the padded gather
        m.update(s[bounds[0] : bounds[1]], t[bounds[0] : bounds[1]])
        r = m.compute()
        torch.save(r.to_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_accumulator_gathers_across_processes(tmp_path):
    torch.multiprocessing.start_processes(_dist_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                                         start_method="fork")  # fork: no re-import, fast
    g = _gen(14)
    t = torch.randn(90, 4, generator=g)
    s = t + 0.5 * torch.randn(90, 4, generator=g)
    expected = json.dumps(pairing_inefficiency(s, t, n_boot=20).to_dict())  # JSON: NaN == NaN
    for rank in range(2):
        assert json.dumps(torch.load(tmp_path / f"rank{rank}.pt")) == expected
