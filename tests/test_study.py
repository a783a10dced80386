"""Long runs that survive (per-point results, resume, the teacher cache), seeds, and Delta E over
training: the experiment infrastructure of the copying study, at tiny scale.

Like tests/test_experiments.py these never assert a scientific outcome; they check that an
interrupted run resumes to the same file, that a seed reaches every random draw, and that the
curves and the statistics over seeds are what they say.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dmdcopy.cli import main
from dmdcopy.distill import DistillConfig
from dmdcopy.errors import ConfigError
from dmdcopy.experiments import (
    AblationConfig,
    DigitsConfig,
    SweepConfig,
    TeacherConfig,
    Variant,
    cached_teacher,
    format_seed_table,
    format_sweep_table,
    over_seeds,
    plot_curves,
    point_seeds,
    run_ablations,
    run_digits,
    run_dimension_sweep,
    strip_timing,
    train_teacher,
)
from dmdcopy.experiments.pipeline import distill_student, make_student
from dmdcopy.experiments.resume import config_diff
from dmdcopy.nets import MLP
from dmdcopy.precond import EDMPrecond

TINY_DISTILL = DistillConfig(
    num_steps=4, batch_size=16, generator_lr=1e-3, fake_score_lr=1e-3, ema_halflife_steps=None,
    progress_bar=False, log_every=10**9, checkpoint_every=10**9,
)
TINY_TEACHER = TeacherConfig(steps=6, batch=32, warmup=2)


def _tiny_sweep(**changes) -> SweepConfig:
    base = SweepConfig(dims=(2, 3), kinds=("power_law_gaussian",), hidden=16, depth=1, emb_dim=16,
                       teacher=TINY_TEACHER, distill=TINY_DISTILL, num_eval=24, n_boot=20, exact_ode_steps=16,
                       ode_steps=8, pairs_2d=10, eval_every=2)
    return dataclasses.replace(base, **changes)


class Interrupt(Exception):
    pass


def _stop_at(message_part: str):
    """A progress callback that raises when a stage whose message contains ``message_part`` starts."""
    def progress(message: str) -> None:
        if message_part in message and "(done)" not in message:
            raise Interrupt(message)
    return progress


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


# --- resume ----------------------------------------------------------------------------------


def test_interrupted_sweep_resumes_to_the_uninterrupted_results_file(tmp_path):
    cfg = _tiny_sweep(seeds=(0, 1))
    whole = tmp_path / "whole" / "results.json"
    run_dimension_sweep(cfg, out=whole, teacher_cache=tmp_path / "whole" / "teachers")

    cut = tmp_path / "cut" / "results.json"
    cache = tmp_path / "cut" / "teachers"
    # stop inside the first point: its teacher_init student is written, its scratch student is not
    with pytest.raises(Interrupt):
        run_dimension_sweep(cfg, out=cut, teacher_cache=cache,
                            progress=_stop_at("d=2 seed=0: student scratch"))
    partial = _read(cut)
    assert partial["complete"] is False
    assert [(p["dim"], sorted(p["students"])) for p in partial["points"]] == [(2, ["teacher_init"])]
    # a fresh run over it (no resume) would lose that point: refused, the file untouched
    before = cut.read_bytes()
    with pytest.raises(ConfigError, match="interrupted run's finished points; continue it with --resume"):
        run_dimension_sweep(cfg, out=cut, teacher_cache=cache)
    assert cut.read_bytes() == before
    # stop again later (seed 1), then finish; the second and third runs skip what is on disk
    with pytest.raises(Interrupt):
        run_dimension_sweep(cfg, out=cut, teacher_cache=cache, resume=True,
                            progress=_stop_at("d=3 seed=1: teacher"))
    assert len(_read(cut)["points"]) == 3
    stages: list[str] = []
    run_dimension_sweep(cfg, out=cut, teacher_cache=cache, resume=True, progress=stages.append)
    assert sum("(done)" not in m for m in stages) == 3  # only the last point's teacher and students ran
    assert len(stages) == 2 * 2 * 3  # the progress bar still counts every stage
    a, b = _read(whole), _read(cut)
    assert b["complete"] is True
    assert strip_timing(a) == strip_timing(b)


def test_resume_refuses_a_results_file_of_another_config(tmp_path, capsys):
    out = tmp_path / "results.json"
    cfg = _tiny_sweep(dims=(2,), students=("scratch",))
    run_dimension_sweep(cfg, out=out)
    changed = dataclasses.replace(cfg, distill=cfg.distill.replace(num_steps=6), num_eval=30)
    with pytest.raises(ConfigError, match=r"different config \(distill.num_steps, num_eval\)"):
        run_dimension_sweep(changed, out=out, resume=True)
    with pytest.raises(ConfigError, match="not a ablations results file"):
        run_ablations(AblationConfig(), out=out, resume=True)
    assert config_diff({"a": {"b": 1}, "c": 2}, {"a": {"b": 2}, "d": 2}) == ["a.b", "c", "d"]
    # without --resume the file is simply replaced
    run_dimension_sweep(changed, out=out)
    assert _read(out)["config"]["num_eval"] == 30
    # and from the command line it is one line
    demo = ["demo", "--quick", "--dims", "2", "--kinds", "gaussian_mixture", "--students", "scratch",
            "--teacher-steps", "3", "--distill-steps", "2", "--num-eval", "12", "--eval-every", "0",
            "--out", str(tmp_path / "cli"), "--no-progress", "--no-plot"]
    assert main(demo) == 0
    capsys.readouterr()
    assert main([*demo[:-4], "--num-eval", "16", *demo[-4:], "--resume"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different config (num_eval)" in err[0]



def test_a_second_demo_on_the_same_out_is_refused_and_a_damaged_finished_file_replaced(tmp_path, capsys):
    from dmdcopy.distill.rundir import writer_lock

    out = tmp_path / "cli"
    demo = ["demo", "--quick", "--dims", "2", "--kinds", "gaussian_mixture", "--students", "scratch",
            "--teacher-steps", "3", "--distill-steps", "2", "--num-eval", "12", "--eval-every", "0",
            "--out", str(out), "--no-progress", "--no-plot"]
    with writer_lock(out):  # as another `dmdcopy demo --out` still running would hold it
        assert main(demo) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pid {os.getpid()}" in err[0] and "is writing this directory" in err[0]
    assert not (out / "results.json").exists()
    (out / "results.json").write_text('{"experiment": "dimension_sw')  # a torn file from elsewhere
    assert main(demo) == 0  # nothing readable in it to keep: replaced
    assert _read(out / "results.json")["complete"] is True
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "teachers"]  # the lock is gone
    # an interrupted digits file is refused before the sweep that comes first in --experiment all
    (out / "digits.json").write_text(json.dumps({"experiment": "digits", "complete": False}))
    before = (out / "results.json").read_bytes()
    assert main([*demo, "--experiment", "all"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "digits.json holds an interrupted run's finished points" in err[0]
    assert (out / "results.json").read_bytes() == before


def test_digits_and_ablations_resume_per_level_and_per_variant(tmp_path):
    dcfg = DigitsConfig(hidden=16, depth=1, teacher=TeacherConfig(steps=4, batch=8, warmup=1),
                        levels=(0.5, 1.0),
                        distill=TINY_DISTILL.replace(batch_size=8, num_steps=2), num_eval=12, n_boot=10,
                        ode_steps=4, eval_every=1)
    whole = run_digits(dcfg)
    out = tmp_path / "digits.json"
    with pytest.raises(Interrupt):
        run_digits(dcfg, out=out, teacher_cache=tmp_path / "t", progress=_stop_at("step_4 teacher map"))
    assert list(_read(out)["teachers"]) == ["step_2"]
    run_digits(dcfg, out=out, teacher_cache=tmp_path / "t", resume=True)
    assert strip_timing(json.loads(json.dumps(_jsonable(whole)))) == strip_timing(
        {k: v for k, v in _read(out).items() if k != "complete"})

    variants = (Variant(name="baseline"), Variant(name="scratch", init="scratch"),
                Variant(name="memo_net", memorising_net=True))
    acfg = AblationConfig(dim=3, variants=variants, hidden=16, depth=1, emb_dim=16, teacher=TINY_TEACHER,
                          distill=TINY_DISTILL.replace(num_steps=2), num_train=20, num_pairs=8, ode_steps=8,
                          num_eval=16, n_boot=10, num_train_memorise=5, memorise_teacher=TINY_TEACHER,
                          eval_every=1)
    whole = tmp_path / "a_whole.json"
    run_ablations(acfg, out=whole)
    out = tmp_path / "ablations.json"
    with pytest.raises(Interrupt):
        run_ablations(acfg, out=out, teacher_cache=tmp_path / "t", progress=_stop_at("ablations: memo_net"))
    assert list(_read(out)["variants"]) == ["baseline", "scratch"]
    run_ablations(acfg, out=out, teacher_cache=tmp_path / "t", resume=True)
    assert strip_timing(_read(whole)) == strip_timing(_read(out))


def _jsonable(obj):
    from dmdcopy.experiments.report import to_jsonable

    return to_jsonable(obj)


_DEMO_SUBPROCESS = """
import sys
from dmdcopy.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_cli_run_killed_with_sigkill_resumes_to_the_same_results(tmp_path):
    args = ["demo", "--quick", "--dims", "2,3", "--kinds", "power_law_gaussian", "--teacher-steps", "40",
            "--distill-steps", "30", "--num-eval", "24", "--eval-every", "10", "--threads", "1",
            "--no-progress", "--no-plot"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-c", _DEMO_SUBPROCESS, *args, "--out", str(cut)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = cut / "results.json"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists() and _read(results)["points"]:  # the first student is on disk
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()!r}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    partial = _read(results)
    assert partial["complete"] is False
    assert main([*args, "--out", str(cut), "--resume"]) == 0
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    a, b = _read(tmp_path / "whole" / "results.json"), _read(results)
    assert a["complete"] and b["complete"]
    assert strip_timing(a) == strip_timing(b)


# --- teacher cache ---------------------------------------------------------------------------


def _teacher_parts(seed: int = 0):
    data = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))

    def sample(n, gen):
        return data[torch.randint(0, 64, (n,), generator=gen)]

    def build():
        torch.manual_seed(seed)
        return EDMPrecond(MLP(3, hidden=16, depth=1, emb_dim=16), sigma_data=0.5, sigma_min=0.002,
                          sigma_max=80.0)

    calls = []

    def train():
        calls.append(1)
        return train_teacher(sample, build().model, TINY_TEACHER, snapshot_steps=(3,),
                             generator=torch.Generator().manual_seed(seed))

    return build, train, calls


def test_teacher_cache_reuses_verifies_and_retrains_a_damaged_entry(tmp_path):
    build, train, calls = _teacher_parts()
    spec = dict(data="randn64", seed=0)
    first, status = cached_teacher(tmp_path, spec, train, build=build, config=TINY_TEACHER)
    assert status == "stored" and len(calls) == 1
    (entry,) = tmp_path.glob("*.safetensors")
    again, status = cached_teacher(tmp_path, spec, train, build=build, config=TINY_TEACHER)
    assert status == "cached" and len(calls) == 1  # read back, not retrained
    for a, b in zip(first.denoiser.state_dict().values(), again.denoiser.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert again.losses == first.losses and again.summary() == first.summary()
    assert set(again.snapshots) == {3, TINY_TEACHER.steps}
    for step, state in first.snapshots.items():
        assert all(torch.equal(state[k], again.snapshots[step][k]) for k in state)
    assert not again.denoiser.training and not any(p.requires_grad for p in again.denoiser.parameters())
    # another spec is another entry
    _, status = cached_teacher(tmp_path, dict(spec, seed=1), train, build=build, config=TINY_TEACHER)
    assert status == "stored" and len(list(tmp_path.glob("*.safetensors"))) == 2
    # a flipped byte in the tensor data: reported, retrained, replaced
    raw = bytearray(entry.read_bytes())
    raw[-3] ^= 0xFF
    entry.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="damaged.*sha256"):
        fixed, status = cached_teacher(tmp_path, spec, train, build=build, config=TINY_TEACHER)
    assert status == "retrained" and len(calls) == 3
    assert fixed.losses == first.losses
    # a truncated file too
    entry.write_bytes(entry.read_bytes()[:100])
    with pytest.warns(UserWarning, match="damaged"):
        _, status = cached_teacher(tmp_path, spec, train, build=build, config=TINY_TEACHER)
    assert status == "retrained"
    _, status = cached_teacher(tmp_path, spec, train, build=build, config=TINY_TEACHER)
    assert status == "cached"
    assert cached_teacher(None, spec, train, build=build, config=TINY_TEACHER)[1] == "trained"


def test_sweep_reuses_cached_teachers_across_runs(tmp_path, monkeypatch):
    import dmdcopy.experiments.sweep as sweep

    cfg = _tiny_sweep(dims=(2,), students=("scratch",), eval_every=0)
    run_dimension_sweep(cfg, teacher_cache=tmp_path)
    trained = []
    monkeypatch.setattr(sweep, "train_teacher", lambda *a, **k: trained.append(1))
    # other distillation settings, same teacher: read from the cache
    run_dimension_sweep(dataclasses.replace(cfg, distill=cfg.distill.replace(num_steps=2)),
                        teacher_cache=tmp_path)
    assert trained == []


# --- seeds -----------------------------------------------------------------------------------


def test_same_seed_same_json_and_every_random_draw_follows_the_seed(tmp_path):
    cfg = _tiny_sweep(dims=(3,), seed=4)
    a, b = run_dimension_sweep(cfg), run_dimension_sweep(cfg)
    assert strip_timing(_jsonable(a)) == strip_timing(_jsonable(b))
    c = run_dimension_sweep(dataclasses.replace(cfg, seed=5))
    pa, pc = a["points"][0], c["points"][0]
    assert pa["seed"] == 4 and pc["seed"] == 5
    assert all(pa["rng"][k] != pc["rng"][k] for k in pa["rng"])  # every draw has its own seed
    assert set(pa["rng"]) >= {"data", "net", "teacher_training", "student", "distill"}
    # data, teacher, students and distillation all differ
    assert pa["teacher"]["quality_floor"] != pc["teacher"]["quality_floor"]  # other data
    assert pa["teacher"]["train"]["final_loss"] != pc["teacher"]["train"]["final_loss"]
    for init in ("teacher_init", "scratch"):
        sa, sc = pa["students"][init], pc["students"][init]
        assert sa["distill"]["seed"] == pa["rng"]["distill"] != sc["distill"]["seed"]
        assert sa["delta_e"]["delta_e"] != sc["delta_e"]["delta_e"]
    assert pa["students"]["scratch"]["delta_e_at_init"] != pc["students"]["scratch"]["delta_e_at_init"]
    assert point_seeds("power_law_gaussian", 3, 4) == pa["rng"]


def test_distill_config_seed_drives_the_distillation_draws():
    torch.manual_seed(0)
    teacher = EDMPrecond(MLP(3, hidden=16, depth=1, emb_dim=16), sigma_data=0.5, sigma_min=0.002,
                         sigma_max=80.0).eval().requires_grad_(False)

    def student_after(seed: int) -> torch.Tensor:
        G = make_student(teacher, "scratch", seed=7)
        distill_student(teacher, G, TINY_DISTILL.replace(seed=seed), seed=0)
        return torch.cat([p.detach().flatten() for p in G.parameters()])

    s0, s0_again, s1 = student_after(0), student_after(0), student_after(1)
    assert torch.equal(s0, s0_again) and not torch.equal(s0, s1)


def test_over_seeds_is_the_student_t_interval_of_the_mean():
    r = over_seeds([1.0, 2.0, 3.0, None])
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} * sd / sqrt(n), sd = 1
    assert r["n"] == 3 and r["mean"] == 2.0 and math.isclose(r["sd"], 1.0)
    assert math.isclose(r["t_low"], 2.0 - half, rel_tol=1e-9)
    assert math.isclose(r["t_high"], 2.0 + half, rel_tol=1e-9)
    assert (r["min"], r["max"], r["values"]) == (1.0, 3.0, [1.0, 2.0, 3.0, None])
    one = over_seeds([0.5])
    assert one["mean"] == 0.5 and one["t_low"] is None and one["sd"] is None
    assert over_seeds([None])["mean"] is None


def test_several_seeds_give_per_seed_figures_and_intervals(tmp_path):
    cfg = _tiny_sweep(dims=(2,), students=("scratch",), seeds=(0, 1, 2), eval_every=0)
    results = run_dimension_sweep(cfg)
    assert [p["seed"] for p in results["points"]] == [0, 1, 2] and results["seeds"] == [0, 1, 2]
    (row,) = results["over_seeds"]
    values = [p["students"]["scratch"]["delta_e"]["delta_e"] for p in results["points"]]
    assert row["delta_e"]["values"] == values and row["delta_e"]["n"] == 3
    assert row["delta_e"]["t_low"] <= row["delta_e"]["mean"] <= row["delta_e"]["t_high"]
    for key in ("delta_e_lower", "delta_e_upper", "bracket_low", "bracket_high"):
        assert row[key]["values"] == [p["students"]["scratch"]["delta_e"][key] for p in results["points"]]
    table = format_seed_table(results)
    assert "power_law_gaussian d=2 scratch" in table and "Student-t" in table
    assert " ".join(f"{v:.3f}" for v in values) in table
    assert "seed" in format_sweep_table(results).splitlines()[0]
    from dmdcopy.experiments import plot_sweep

    assert plot_sweep(_jsonable(results), tmp_path / "s.png").stat().st_size > 0
    # digits and ablations: the first seed at the top level, the others under more_seeds
    acfg = AblationConfig(dim=3, variants=(Variant(name="baseline"),), hidden=16, depth=1, emb_dim=16,
                          teacher=TINY_TEACHER, distill=TINY_DISTILL.replace(num_steps=1), num_train=20,
                          num_pairs=8, ode_steps=8, num_eval=16, n_boot=10, seeds=(3, 4), eval_every=0)
    ab = run_ablations(acfg)
    assert list(ab["more_seeds"]) == ["4"] and ab["over_seeds"][0]["delta_e"]["values"] == [
        ab["variants"]["baseline"]["delta_e"]["delta_e"],
        ab["more_seeds"]["4"]["variants"]["baseline"]["delta_e"]["delta_e"]]
    assert "baseline" in format_seed_table(ab)
    rng3, rng4 = ab["rng"], ab["more_seeds"]["4"]["rng"]
    assert all(rng3[k] != rng4[k] for k in rng3)
    assert ab["variants"]["baseline"]["distill"]["seed"] == rng3["distill"]


def test_cli_seeds_options(tmp_path, capsys):
    base = ["demo", "--quick", "--dims", "2", "--kinds", "gaussian_mixture", "--students", "scratch",
            "--teacher-steps", "3", "--distill-steps", "2", "--num-eval", "12", "--eval-every", "1",
            "--no-progress"]
    assert main([*base, "--num-seeds", "2", "--seed", "3", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "over seeds" in out
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["seeds"] == [3, 4] and results["config"]["seeds"] == [3, 4]
    assert (tmp_path / "a" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "a" / "teachers").is_dir()
    assert main([*base, "--seeds", "0,x", "--out", str(tmp_path / "b")]) == 1
    assert "--seeds" in capsys.readouterr().err
    assert main([*base, "--seeds", "1,1", "--out", str(tmp_path / "b")]) == 1
    assert main([*base, "--num-seeds", "0", "--out", str(tmp_path / "b")]) == 1


# --- Delta E over training -------------------------------------------------------------------


def test_students_record_delta_e_and_quality_over_training(tmp_path):
    cfg = _tiny_sweep(dims=(2, 3), distill=TINY_DISTILL.replace(num_steps=5), eval_every=2)
    results = run_dimension_sweep(cfg)
    for p in results["points"]:
        for st in p["students"].values():
            curve = st["curve"]
            assert curve["step"] == [0, 2, 4]
            n = len(curve["step"])
            for key in ("delta_e", "delta_e_lower", "delta_e_upper", "quality", "nonfinite"):
                assert len(curve[key]) == n
            assert curve["delta_e"][0] == st["delta_e_at_init"]  # step 0 is the untrained student
            assert all(lo <= de + 1e-12 for lo, de in zip(curve["delta_e_lower"], curve["delta_e"]))
            assert curve["quality_floor"] == p["teacher"]["quality_floor"]["sliced_wasserstein"]
            assert all(q > 0 for q in curve["quality"])
    # the curve's measurement at the last step is the final evaluation's (same noises, same metric)
    cfg4 = dataclasses.replace(cfg, dims=(2,), students=("scratch",), distill=TINY_DISTILL)
    st = run_dimension_sweep(cfg4)["points"][0]["students"]["scratch"]
    assert st["curve"]["step"][-1] == 4
    assert math.isclose(st["curve"]["delta_e"][-1], st["delta_e"]["delta_e"], rel_tol=1e-9)
    assert math.isclose(st["curve"]["delta_e_upper"][-1], st["delta_e"]["delta_e_upper"], rel_tol=1e-9)
    assert math.isclose(st["curve"]["quality"][-1], st["quality"]["sliced_wasserstein"], rel_tol=1e-9)
    png = plot_curves(_jsonable(results), tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "curve" not in run_dimension_sweep(dataclasses.replace(cfg4, eval_every=0))["points"][0][
        "students"]["scratch"]


def test_delta_e_callback_takes_the_teacher_samples_it_is_given():
    from dmdcopy.distill.callbacks import DeltaECallback
    from dmdcopy.experiments.common import teacher_set
    from dmdcopy.noise import noise_for_seeds

    z = noise_for_seeds(range(8), (2,))
    ts = teacher_set(range(8), z, 2 * z, sigmas=torch.tensor([80.0, 0.0]))
    cb = DeltaECallback(1, range(8), teacher=ts)
    assert cb.teacher_samples(object()) is ts  # no ODE, no pair store
    with pytest.raises(ConfigError, match="other seeds"):
        DeltaECallback(1, range(1, 9), teacher=ts)
