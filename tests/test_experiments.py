"""Data generators, teacher training and smoke tests of every experiment at tiny scale.

The experiment tests check that outputs exist, parse and hold sane values (finite Delta E, ordered
intervals, the 1:5 update rule); they never assert a scientific outcome.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from dmdcopy.cli import main
from dmdcopy.cli.demo import _ablation_stages, _digits_stages
from dmdcopy.data import (
    gaussian_mixture,
    load_digits,
    power_law_gaussian,
    power_law_spectrum,
    random_orthogonal,
)
from dmdcopy.distill import DistillConfig
from dmdcopy.errors import ConfigError
from dmdcopy.experiments import (
    DATA_KINDS,
    AblationConfig,
    DigitsConfig,
    GaussianMixtureKind,
    PowerLawGaussianKind,
    SweepConfig,
    TeacherConfig,
    Variant,
    format_ablation_table,
    format_digits_table,
    format_sweep_table,
    gaussian_frechet,
    map_error,
    memorisation_stats,
    mixed_training_sigmas,
    ode_map_error,
    plot_ablations,
    plot_digits,
    plot_sweep,
    run_ablations,
    run_digits,
    run_dimension_sweep,
    train_teacher,
    write_json,
)
from dmdcopy.experiments.common import DELTA_E_FIELDS, teacher_set
from dmdcopy.experiments.pipeline import evaluate_student
from dmdcopy.experiments.report import plot_digit_pairs, require_matplotlib, to_jsonable
from dmdcopy.nets import MLP, ImageMLP
from dmdcopy.noise import noise_for_seeds
from dmdcopy.precond import EDMPrecond
from dmdcopy.teachers import GaussianTeacher
from dmdcopy.w2 import sliced_wasserstein

TINY_DISTILL = DistillConfig(
    num_steps=2, batch_size=16, generator_lr=1e-4, fake_score_lr=1e-4, ema_halflife_steps=None,
    progress_bar=False, log_every=10**9, checkpoint_every=10**9,
)
TINY_TEACHER = TeacherConfig(steps=6, batch=32, warmup=2)


# --- data ------------------------------------------------------------------------------------


def test_power_law_spectrum_is_a_normalised_power_law():
    lam = power_law_spectrum(10, alpha=1.5, sigma_data=0.5, dtype=torch.float64)
    assert torch.allclose(lam.mean(), torch.tensor(0.25, dtype=torch.float64))
    k = torch.arange(1, 11, dtype=torch.float64)
    assert torch.allclose(lam / lam[0], k**-1.5)  # lambda_k / lambda_1 = k^-alpha exactly
    with pytest.raises(ConfigError, match="alpha"):
        power_law_spectrum(4, alpha=-1.0)


def test_random_orthogonal_is_orthogonal():
    q = random_orthogonal(7, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(q @ q.T, torch.eye(7, dtype=q.dtype), atol=1e-12)


def test_power_law_gaussian_covariance_matches_samples():
    data = power_law_gaussian(6, alpha=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(torch.linalg.eigvalsh(data.cov).flip(0), data.eigenvalues.double(), atol=1e-6)
    x = data.sample(40_000, generator=torch.Generator().manual_seed(1)).double()
    # sample covariance error is O(lambda_max / sqrt(N)) ~ 0.002 here
    assert (torch.cov(x.T) - data.cov).abs().max() < 0.02
    teacher = data.teacher()
    assert isinstance(teacher, GaussianTeacher)
    assert torch.allclose(teacher.cov, data.cov, atol=1e-6)


def test_gaussian_mixture_has_mean_zero_and_mean_variance_sigma_data_squared():
    gm = gaussian_mixture(5, 4, between_fraction=0.7, sigma_data=0.5,
                          generator=torch.Generator().manual_seed(0))
    m, s, w = gm.means.double(), gm.stds.double(), gm.weights.double()
    mean = w @ m
    avg_var = (w @ (m**2).mean(1)) + (w @ s**2) - (mean**2).mean()  # closed form of the mixture
    assert torch.allclose(mean, torch.zeros(5, dtype=torch.float64), atol=1e-6)
    assert math.isclose(float(avg_var), 0.25, rel_tol=1e-5)
    x, k = gm.sample(8, return_labels=True)
    assert x.shape == (8, 5) and k.shape == (8,)
    with pytest.raises(ConfigError, match="between_fraction"):
        gaussian_mixture(3, 2, between_fraction=1.0)


@pytest.mark.parametrize("res", [8, 16, 32])
def test_digits_shapes_and_range(res):
    x, y = load_digits(res, return_labels=True)
    assert x.shape == (1797, 1, res, res) and y.shape == (1797,)
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1 and x.max() == 1
    with pytest.raises(ConfigError, match="resolution"):
        load_digits(12)


# --- metrics helpers -------------------------------------------------------------------------


def test_sliced_wasserstein_of_a_shift_is_the_projected_shift():
    x = torch.randn(200, 3, dtype=torch.float64)
    shift = torch.tensor([0.3, 0.0, 0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(3, 256, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=0, keepdim=True)
    expected = float(((shift @ u) ** 2).mean().sqrt())  # sorting commutes with a shift
    got = sliced_wasserstein(x + shift, x, generator=torch.Generator().manual_seed(0))
    assert math.isclose(got, expected, rel_tol=1e-9)


def test_gaussian_frechet_of_exact_mean_and_scaled_covariance():
    # samples whitened to have exactly mean 0 and covariance I: distance to N(0, c^2 I) is (1 - c)^2
    x = torch.randn(500, 4, dtype=torch.float64)
    x = x - x.mean(0)
    L = torch.linalg.cholesky(torch.cov(x.T))
    x = x @ torch.linalg.inv(L).T
    got = gaussian_frechet(x, torch.zeros(4), 4.0 * torch.eye(4))
    assert math.isclose(got, (1 - 2.0) ** 2, rel_tol=1e-8)


def test_map_error_is_the_rms_per_coordinate_difference():
    exact = torch.zeros(10, 4, dtype=torch.float64)
    learned = torch.full((10, 4), 0.3, dtype=torch.float64)
    learned[:5] = -0.3  # every coordinate is 0.3 away: rmse 0.3 whatever the signs
    err = map_error(learned, exact, 0.5)
    assert math.isclose(err["rmse"], 0.3, rel_tol=1e-12)
    assert math.isclose(err["relative_rmse"], 0.6, rel_tol=1e-12)


def test_memorisation_stats_on_training_points():
    train = torch.randn(20, 5)
    stats = memorisation_stats(train[:7], train)
    assert stats["memorised_rate"] == 1.0 and stats["nearest_rms"] == 0.0


# --- data kinds ------------------------------------------------------------------------------


def test_data_kinds_by_name():
    assert DATA_KINDS == {"power_law_gaussian": PowerLawGaussianKind, "gaussian_mixture": GaussianMixtureKind}
    gm = GaussianMixtureKind(3, num_components=5, generator=torch.Generator().manual_seed(0))
    assert gm.describe()["num_components"] == 5 and gm.dim == 3


def test_gaussian_kind_exact_map_is_the_closed_form_and_quality_has_frechet():
    kind = PowerLawGaussianKind(4, alpha=1.5, generator=torch.Generator().manual_seed(0))
    z = noise_for_seeds(range(50), (4,))
    exact = kind.exact_set(range(50), z, sigma_max=80.0)
    assert exact.solver == "closed_form" and exact.sigmas.tolist() == [80.0, 0.0]
    assert torch.equal(exact.x, kind.teacher.ode_map(z.double(), 80.0).float())
    assert torch.equal(kind.exact_map(z, sigma_max=80.0), exact.x)
    ref = kind.sample(50, generator=torch.Generator().manual_seed(1))
    q = kind.quality(ref, ref, seed=0)
    assert set(q) == {"sliced_wasserstein", "frechet_per_dim"} and q["sliced_wasserstein"] == 0.0
    assert q["frechet_per_dim"] == gaussian_frechet(ref, kind.data.mean, kind.data.cov)


def test_mixture_kind_integrates_the_exact_denoiser_on_the_grid_asked_for():
    kind = GaussianMixtureKind(2, num_components=3, generator=torch.Generator().manual_seed(0))
    z = noise_for_seeds(range(64), (2,))
    coarse, fine = (kind.exact_set(range(64), z, num_steps=n) for n in (8, 64))
    assert coarse.sigmas.numel() == 9 and fine.sigmas.numel() == 65
    assert not torch.equal(coarse.x, fine.x)
    # the fine map ends on the data: every sample sits near one of the component means
    nearest = torch.cdist(fine.x.double(), kind.data.means.double()).min(1).values
    assert float(nearest.max()) < 6 * float(kind.data.stds[0])
    assert set(kind.quality(fine.x, fine.x, seed=0)) == {"sliced_wasserstein"}


# --- teacher training ------------------------------------------------------------------------


def test_mixed_training_sigmas_cover_the_whole_range():
    cfg = TeacherConfig(uniform_fraction=0.5)
    s = mixed_training_sigmas(4000, cfg, generator=torch.Generator().manual_seed(0))
    assert s.min() >= cfg.sigma_min * (1 - 1e-6) and s.max() <= cfg.sigma_max * (1 + 1e-6)
    # P(log-uniform draw > 20) = 0.5 * log(80/20) / log(80/0.002); the log-normal adds ~0
    expected = 0.5 * math.log(4) / math.log(80 / 0.002)
    assert abs(float((s > 20).double().mean()) - expected) < 0.02


def test_ode_map_error_of_the_exact_denoiser_is_solver_error_only():
    T = GaussianTeacher(torch.zeros(3), torch.diag(torch.tensor([0.5, 0.2, 0.05])))
    z = torch.randn(64, 3, dtype=torch.float64)
    errors = [ode_map_error(T, T.ode_map, z, num_steps=n)["rmse"] for n in (32, 64, 128)]
    # Heun is second order: doubling the steps divides the error by about 4
    assert errors[0] / errors[1] > 3 and errors[1] / errors[2] > 3
    assert errors[2] < 1e-3


def test_train_teacher_keeps_snapshots_and_records_losses():
    data = power_law_gaussian(3, generator=torch.Generator().manual_seed(0))
    trained = train_teacher(lambda n, g: data.sample(n, generator=g), MLP(3, hidden=16, depth=1),
                            TINY_TEACHER, generator=torch.Generator().manual_seed(0), snapshot_steps=(2,))
    assert sorted(trained.snapshots) == [2, 6] and len(trained.losses) == 6
    assert all(math.isfinite(v) for v in trained.losses)
    early = trained.at_step(2)
    x, s = torch.randn(4, 3), torch.full((4,), 1.0)
    assert early(x, s).shape == (4, 3)
    assert not torch.equal(early(x, s), trained.denoiser(x, s))
    with pytest.raises(ConfigError, match="snapshot"):
        trained.at_step(3)
    with pytest.raises(ConfigError, match="snapshot step"):
        train_teacher(lambda n, g: data.sample(n, generator=g), MLP(3, hidden=8, depth=1), TINY_TEACHER,
                      snapshot_steps=(99,))


def test_train_teacher_trains_a_conditional_network_on_labelled_data():
    # two classes at -1 and +1 (std 0.05): at a noise level that hides the class, only the label
    # can tell the denoiser which mean to return
    def sample(n, g):
        y = torch.randint(0, 2, (n,), generator=g)
        return (2.0 * y - 1.0).unsqueeze(1) + 0.05 * torch.randn(n, 1, generator=g), y

    torch.manual_seed(0)
    cfg = TeacherConfig(steps=300, batch=128, warmup=10, lr=3e-3, ema_halflife=20.0)
    trained = train_teacher(sample, MLP(1, hidden=32, depth=1, label_dim=2), cfg,
                            generator=torch.Generator().manual_seed(0))
    D = trained.denoiser
    assert isinstance(D, EDMPrecond) and D.label_dim == 2
    x, sigma = torch.zeros(2, 1), torch.full((2,), 10.0)
    with torch.no_grad():
        out = D(x, sigma, class_labels=torch.tensor([0, 1]))
    assert out[0, 0] < -0.5 and out[1, 0] > 0.5, out


def test_image_mlp_is_a_network_of_the_library():
    net = ImageMLP((1, 4, 4), hidden=16, depth=1)
    D = EDMPrecond(net)
    assert D(torch.zeros(3, 1, 4, 4), torch.ones(3)).shape == (3, 1, 4, 4)
    assert type(net)(**net.init_kwargs).init_kwargs == net.init_kwargs


def test_import_dmdcopy_stays_light():
    code = ("import dmdcopy, sys; "
            "heavy = [m for m in ('dmdcopy.experiments', 'matplotlib', 'sklearn') if m in sys.modules]; "
            "assert not heavy, heavy; "
            "import dmdcopy.experiments as e; assert dmdcopy.experiments is e")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    # the attribute imports it on first use
    code = ("import dmdcopy, sys; dmdcopy.experiments.SWEEP_PRESETS; "
            "assert 'dmdcopy.experiments' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@pytest.mark.parametrize("field,value", [("steps", 0), ("lr", -1.0), ("sigma_min", 100.0),
                                         ("uniform_fraction", 1.5)])
def test_teacher_config_rejects_bad_fields(field, value):
    with pytest.raises(ConfigError, match=field):
        TeacherConfig(**{field: value})


# --- experiments at tiny scale ---------------------------------------------------------------


def _check_delta_e(de: dict) -> None:
    assert set(de) == set(DELTA_E_FIELDS)
    assert math.isfinite(de["delta_e"])
    assert de["ci_low"] <= de["ci_high"]
    assert 0 <= de["resolution"] <= 1
    assert math.isfinite(de["delta_e_lower"]) and math.isfinite(de["delta_e_upper"])
    assert de["bracket_low"] <= de["bracket_high"]
    assert isinstance(de["warnings"], list)
    assert de["warning"] == ("; ".join(de["warnings"]) or None)


def _exact_gaussian(dim=3, n=40):
    """An exact Gaussian teacher's closed-form map of ``n`` seeded noises, as TeacherSamples."""
    T = GaussianTeacher(torch.zeros(dim), torch.diag(torch.linspace(0.1, 0.5, dim)))
    seeds = range(100, 100 + n)
    z = noise_for_seeds(seeds, (dim,))
    x = T.ode_map(z.double(), 80.0).float()
    return T, teacher_set(seeds, z, x, sigmas=torch.tensor([80.0, 0.0]), solver="closed_form")


def test_evaluate_student_pairs_each_noise_with_its_teacher_sample():
    T, ts = _exact_gaussian()

    def copy(z, class_labels=None):  # sends every noise where the teacher does
        return T.ode_map(z.double(), 80.0).float()

    rec, samples = evaluate_student(copy, ts, exact=ts, n_boot=10)
    assert rec["finite"] and rec["n"] == 40 and rec["n_nonfinite"] == 0
    for de in (rec["delta_e"], rec["delta_e_vs_exact"]):
        _check_delta_e(de)
        assert de["e_pair"] == pytest.approx(0.0, abs=1e-10) and de["delta_e"] == pytest.approx(0.0, abs=1e-9)
        assert de["own_pair_rate"] == 1.0
    assert torch.equal(samples, ts.x)
    # the same student on shuffled noise rows no longer matches its teacher sample
    perm = torch.roll(torch.arange(40), 1)
    shuffled = teacher_set(list(ts.seeds), ts.z[perm], ts.x, sigmas=ts.sigmas)
    assert evaluate_student(copy, shuffled, n_boot=0)[0]["delta_e"]["e_pair"] > 0.01


def test_evaluate_student_records_non_finite_samples_and_tables_say_so():
    _, ts = _exact_gaussian(n=24)

    def diverged(z, class_labels=None):
        x = z.clone()
        x[:3] = float("nan")
        return x

    rec, samples = evaluate_student(diverged, ts, exact=ts, quality=lambda s: {"never": 1.0})
    assert rec == dict(finite=False, n=24, n_nonfinite=3, delta_e=None, delta_e_vs_exact=None,
                       transport=None, quality=None)
    assert samples.shape == (24, 3) and torch.isnan(samples[:3]).all()
    table = format_ablation_table({"variants": {"diverged": rec}})
    assert "diverged               non-finite samples (3 of 24)" in table


def _tiny_sweep(**changes) -> SweepConfig:
    base = SweepConfig(dims=(2, 3), hidden=16, depth=1, emb_dim=16, teacher=TINY_TEACHER,
                       distill=TINY_DISTILL, num_eval=24, n_boot=20, exact_ode_steps=16, ode_steps=8,
                       pairs_2d=10)
    return dataclasses.replace(base, **changes)


def test_dimension_sweep_smoke(tmp_path):
    results = run_dimension_sweep(_tiny_sweep())
    assert [(p["kind"], p["dim"]) for p in results["points"]] == [
        ("power_law_gaussian", 2), ("power_law_gaussian", 3),
        ("gaussian_mixture", 2), ("gaussian_mixture", 3)]
    for p in results["points"]:
        _check_delta_e(p["teacher"]["delta_e_vs_exact"])
        assert math.isfinite(p["teacher"]["ode_error"]["relative_rmse"])
        for st in p["students"].values():
            assert st["finite"]
            _check_delta_e(st["delta_e"])
            _check_delta_e(st["delta_e_vs_exact"])
            assert st["distill"]["generator_updates"] == 2
            assert st["distill"]["fake_score_updates"] == 2 * 5  # the 1:5 rule
    assert len(results["pairs_2d"]["gaussian_mixture"]["student_scratch"]) == 10
    path = write_json(tmp_path / "r.json", results)
    parsed = json.loads(path.read_text())
    assert parsed["points"][0]["students"]["teacher_init"]["delta_e"]["n"] == 24
    assert parsed["eval_seeds"] == [1_000_000, 1_000_023]  # the 24 noises every figure is measured on
    table = format_sweep_table(parsed)
    assert "Delta E" in table and "bracket 95%" in table
    de0 = parsed["points"][0]["students"]["teacher_init"]["delta_e"]
    for lo, hi in (("ci_low", "ci_high"), ("delta_e_lower", "delta_e_upper"),
                   ("bracket_low", "bracket_high")):
        assert f"[{de0[lo]:.3f}, {de0[hi]:.3f}]" in table.splitlines()[2]  # the first row
    # warnings: each distinct text printed once under the table, rows carry its number
    for p in parsed["points"]:
        for st in p["students"].values():
            st["delta_e"]["warnings"] = []
    assert format_sweep_table(parsed).endswith("warnings: none")
    warned = [p["students"]["scratch"]["delta_e"] for p in parsed["points"][:2]]
    for de in warned:
        de["warnings"] = ["the bracket is too wide"]
    warned[1]["warnings"].append("resolution is low")
    table = format_sweep_table(parsed)
    assert table.count("the bracket is too wide") == 1 and "  [2] resolution is low" in table
    rows = [line for line in table.splitlines() if line.startswith(f"{parsed['points'][1]['kind']:<18}")]
    assert rows[1].endswith("  1") and rows[3].endswith("  1,2")  # scratch rows of the first two points
    png = plot_sweep(parsed, tmp_path / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a save that dies halfway (disk full, a kill) leaves the previous picture whole, no temp file
    from matplotlib.figure import Figure

    before = png.read_bytes()

    def torn(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(before[:100])
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Figure, "savefig", torn)
        with pytest.raises(OSError, match="No space left"):
            plot_sweep(parsed, png)
    assert png.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))
    assert plot_sweep(parsed, tmp_path / "sweep.svg").read_bytes().lstrip().startswith(b"<?xml")

    # A student whose samples were not finite (evaluate_student's record) and a sweep without
    # teacher-initialised students: the table and the figure still come out.
    p0 = parsed["points"][0]
    p0["students"]["scratch"] = dict(finite=False, n=24, delta_e=None, delta_e_vs_exact=None,
                                     transport=None, quality=None, delta_e_at_init=0.5)
    table = format_sweep_table(parsed)
    assert f"{p0['kind']:<18} {p0['dim']:>5} {'scratch':<13} non-finite samples" in table
    for p in parsed["points"]:
        del p["students"]["teacher_init"]
    for pic in parsed["pairs_2d"].values():
        del pic["student_teacher_init"]
        pic["student_scratch"][0] = [None, None]  # NaN, as JSON writes it
    assert plot_sweep(parsed, tmp_path / "scratch_only.png").stat().st_size > 0


def test_sweep_config_rejects_unknown_names():
    with pytest.raises(ConfigError, match="unknown data kind"):
        _tiny_sweep(kinds=("swiss_roll",))
    with pytest.raises(ConfigError, match="unknown student"):
        _tiny_sweep(students=("lazy",))
    with pytest.raises(ConfigError, match="sigma_max"):
        _tiny_sweep(teacher=TeacherConfig(sigma_max=10.0))


@pytest.mark.parametrize("network", ["mlp", "unet"])
def test_digits_smoke(tmp_path, network):
    # levels 0.4 and 0.5 of 4 steps both round to step 2: two convergence levels, not three
    cfg = DigitsConfig(network=network, hidden=16, depth=1, unet_channels=8,
                       teacher=TeacherConfig(steps=4, batch=8, warmup=1), levels=(0.4, 0.5, 1.0),
                       distill=TINY_DISTILL.replace(batch_size=8), num_eval=12, n_boot=10, ode_steps=4)
    messages = []
    results = run_digits(cfg, progress=messages.append)
    assert len(messages) == _digits_stages(cfg)  # the demo's progress bar ends exactly full
    assert set(results["teachers"]) == {"step_2", "step_4", "memorising"}
    assert results["eval_seeds"] == [2_000_000, 2_000_011]
    assert set(results["teachers"]["step_4"]["students"]) == {"teacher_init", "scratch"}
    for rec in results["teachers"].values():
        assert 0 <= rec["quality"]["memorised_rate"] <= 1
        for st in rec["students"].values():
            assert st["finite"]
            _check_delta_e(st["delta_e"])
    # the memorising teacher's ODE ends on training images
    assert results["teachers"]["memorising"]["quality"]["memorised_rate"] == 1.0
    parsed = json.loads(write_json(tmp_path / "d.json", results).read_text())
    assert "memorising" in format_digits_table(parsed)
    assert plot_digits(parsed, tmp_path / "d.png").exists()
    # the picture of copying: teacher and student images of the first evaluation noises, per student
    pic = parsed["teachers"]["step_4"]["students"]["teacher_init"]["pictures"]
    shape = list(load_digits(8).shape[1:])
    assert [list(torch.tensor(pic[k]).shape) for k in ("teacher", "student")] == [[8, *shape]] * 2
    assert pic["seeds"] == [2_000_000, 2_000_007]
    from matplotlib import image as mpimg

    img = mpimg.imread(plot_digit_pairs(parsed, tmp_path / "pairs.png"))
    assert img[..., :3].std() > 0.01  # not blank
    assert plot_digit_pairs({"teachers": {}}, tmp_path / "none.png") is None


def test_digits_config_rejects_bad_fields():
    with pytest.raises(ConfigError, match="resolution"):
        DigitsConfig(resolution=64)
    with pytest.raises(ConfigError, match="levels"):
        DigitsConfig(levels=(0.0,))


def test_ablations_smoke(tmp_path):
    variants = (Variant(name="baseline"), Variant(name="gan_on", gan=True),
                Variant(name="regression_on", regression=True), Variant(name="scratch", init="scratch"),
                Variant(name="early", teacher_level=0.5),
                Variant(name="memo", memorising=True, init="scratch"),
                Variant(name="memo_net", memorising_net=True))
    cfg = AblationConfig(dim=3, variants=variants, hidden=16, depth=1, emb_dim=16, teacher=TINY_TEACHER,
                         distill=TINY_DISTILL, num_train=20, num_pairs=16, ode_steps=8, num_eval=24,
                         n_boot=10, num_train_memorise=5, memorise_teacher=TINY_TEACHER)
    messages = []
    results = run_ablations(cfg, progress=messages.append)
    assert len(messages) == _ablation_stages(cfg)
    assert list(results["variants"]) == [v.name for v in variants]
    assert results["variants"]["early"]["teacher_step"] == 3
    assert results["eval_seeds"] == [3_000_000, 3_000_023]
    assert results["regression_pair_seeds"] == [4_000_000, 4_000_015]
    for rec in results["variants"].values():
        assert rec["finite"]
        _check_delta_e(rec["delta_e"])
        assert rec["distill"]["fake_score_updates"] == 5 * rec["distill"]["generator_updates"]
    mem = results["variants"]["memo_net"]["memorisation"]
    assert mem["num_train"] == 5 and math.isfinite(mem["teacher_ode_vs_empirical"])
    for key in ("teacher_memorised_rate", "student_memorised_rate", "same_point_as_empirical"):
        assert 0 <= mem[key] <= 1
    assert "memorisation" not in results["variants"]["baseline"]
    parsed = json.loads(write_json(tmp_path / "a.json", results).read_text())
    assert "regression_on" in format_ablation_table(parsed)
    assert plot_ablations(parsed, tmp_path / "a.png").exists()
    with pytest.raises(ConfigError, match="distinct names"):
        AblationConfig(variants=(Variant(name="a"), Variant(name="a")))
    with pytest.raises(ConfigError, match="exclude each other"):
        Variant(name="a", memorising=True, memorising_net=True)


# --- report and CLI --------------------------------------------------------------------------


def test_to_jsonable_maps_nan_to_null(tmp_path):
    obj = {"a": float("nan"), "b": torch.tensor([1.0, float("inf")]), "c": (1, "x")}
    assert to_jsonable(obj) == {"a": None, "b": [1.0, None], "c": [1, "x"]}
    assert json.loads(write_json(tmp_path / "x.json", obj).read_text())["a"] is None


def test_missing_matplotlib_is_a_clear_error(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ConfigError, match="pip install"):
        require_matplotlib()


def test_cli_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--quick", "--dims", "2", "--kinds", "gaussian_mixture", "--teacher-steps", "4",
               "--distill-steps", "2", "--num-eval", "16", "--out", str(out), "--no-progress"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["preset"] == "quick" and results["config"]["dims"] == [2]
    _check_delta_e(results["points"][0]["students"]["teacher_init"]["delta_e"])
    assert (out / "sweep.png").stat().st_size > 0
    assert "gaussian_mixture" in capsys.readouterr().out


def test_cli_demo_bad_arguments_give_one_line_errors(tmp_path, capsys):
    assert main(["demo", "--dims", "2,x", "--out", str(tmp_path)]) == 1
    assert "--dims" in capsys.readouterr().err
    assert main(["demo", "--kinds", "swiss_roll", "--out", str(tmp_path), "--no-progress"]) == 1
    assert "unknown data kind" in capsys.readouterr().err
    assert main(["demo", "--device", "gpu", "--out", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device 'gpu'" in err[0]  # one line, no traceback


def test_cli_demo_all_experiments_tiny(tmp_path):
    out = tmp_path / "all"
    rc = main(["demo", "--quick", "--experiment", "all", "--dims", "3", "--teacher-steps", "4",
               "--distill-steps", "1", "--num-eval", "16", "--out", str(out), "--no-progress", "--no-plot"])
    assert rc == 0
    for name in ("results.json", "digits.json", "ablations.json"):
        assert json.loads((out / name).read_text())["preset"] == "quick"
    ablations = json.loads((out / "ablations.json").read_text())
    assert ablations["data"]["dim"] == 3
    for rec in ablations["variants"].values():
        _check_delta_e(rec["delta_e"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cli_demo_cuda_without_gpu_is_a_one_line_error(tmp_path, capsys):
    assert main(["demo", "--device", "cuda", "--out", str(tmp_path), "--no-progress"]) == 1
    assert "CUDA" in capsys.readouterr().err


def test_experiments_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    run_dimension_sweep(_tiny_sweep(dims=(2,), kinds=("power_law_gaussian",), students=("scratch",)))
    assert torch.equal(torch.random.get_rng_state(), before)
