"""``dmdcopy distill CONFIG.toml`` with bad inputs: each is one line on stderr and exit 1, refused
before any network is built (no traceback, no allocation from a typo'd size, no work lost late)."""

import os

import pytest
import torch

import dmdcopy.nets
from dmdcopy.cli import main

# The smallest run that works (tests/test_distill_cli.py runs it); each case changes one value.
BASE = {
    "": {"out_dir": None, "device": '"cpu"'},
    "teacher": {"kind": '"gmm"', "means": "[[-1.0, 0.0], [1.0, 0.0]]", "stds": "[0.2, 0.2]"},
    "student": {"init": '"mlp"', "hidden": "16", "depth": "1"},
    "fake_score": {"init": '"mlp"', "hidden": "16", "depth": "1"},
    "distill": {"num_steps": "2", "batch_size": "8", "fake_score_steps": "1", "log_every": "1",
                "checkpoint_every": "2"},
}


def render(out_dir, **changes) -> str:
    """The base run file with ``table__key=raw TOML`` changes (``None`` removes the key)."""
    tables = {name: dict(keys) for name, keys in BASE.items()}
    tables[""]["out_dir"] = f'"{out_dir.as_posix()}"'
    for name, raw in changes.items():
        table, _, key = name.rpartition("__")
        tables.setdefault(table, {})[key] = raw
    lines = []
    for table, keys in tables.items():
        if table:
            lines.append(f"[{table}]")
        lines += [f"{k} = {v}" for k, v in keys.items() if v is not None]
    return "\n".join(lines) + "\n"


@pytest.fixture
def no_networks(monkeypatch):
    """Fail the test if a bad input gets as far as building an MLP."""
    def refuse(*args, **kwargs):
        raise AssertionError("a network was built for a bad input")

    monkeypatch.setattr(dmdcopy.nets, "MLP", refuse)


def one_line_error(capsys, argv) -> str:
    rc = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 1, (rc, captured.err)
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("dmdcopy distill: error: "), err
    return err


CASES = [
    # TOML types are strict
    ("conditional-string", dict(teacher__conditional='"false"'), "conditional must be true or false"),
    ("batch-float", dict(distill__batch_size="8.0"), "batch_size must be an int"),
    ("batch-string", dict(distill__batch_size='"8"'), "batch_size must be an int"),
    ("batch-bool", dict(distill__batch_size="true"), "batch_size must be an int"),
    ("num-steps-float", dict(distill__num_steps="2.5"), "num_steps must be an int"),
    ("hidden-float", dict(student__hidden="16.0"), "hidden must be an integer"),
    ("hidden-string", dict(student__hidden='"16"'), "hidden must be an integer"),
    ("depth-bool", dict(fake_score__depth="true"), "depth must be an integer"),
    ("lr-string", dict(distill__generator_lr='"1e-3"'), "generator_lr must be > 0"),
    ("lr-bool", dict(distill__fake_score_lr="true"), "fake_score_lr must be > 0"),
    ("k-range-float", dict(distill__generator_k_range="[20.5, 980]"), "generator_k_range must be a pair"),
    ("grad-clip-bool", dict(distill__grad_clip="true"), "grad_clip must be > 0"),
    ("grad-clip-huge-int", dict(distill__grad_clip="1" + "0" * 400), "grad_clip must be > 0"),
    ("progress-bar-string", dict(distill__progress_bar='"no"'), "progress_bar must be true or false"),
    ("gan-string", dict(distill__gan='"yes"'), "gan must be true or false"),
    ("regression-loss-list", dict(distill__regression_loss='["l2"]'), "regression_loss must be one of"),
    ("feature-module-int", dict(distill__gan_feature_module="3"), "gan_feature_module must be a string"),
    ("real-samples-float", dict(teacher__real_samples="10.5"), "real_samples must be an integer"),
    ("sigma-max-string", dict(teacher__sigma_max='"80"'), "sigma_max must be a finite number"),
    ("kind-int", dict(teacher__kind="1"), "kind must be one of"),
    ("init-list", dict(student__init='["mlp"]'), "init must be"),
    # sizes: negative, zero, past sane bounds, past the machine's memory
    ("hidden-negative", dict(student__hidden="-5"), "hidden must be in [1, "),
    ("depth-zero", dict(fake_score__depth="0"), "depth must be in [1, "),
    ("depth-huge", dict(student__depth="10000000"), "depth must be in [1, 1000]"),
    ("hidden-huge", dict(student__hidden="100000"), "of this machine's"),
    ("hidden-past-bound", dict(student__hidden="10000000000"), "hidden must be in [1, "),
    ("batch-huge", dict(distill__batch_size="10000000000"), "batch_size must be an int in [1, "),
    ("batch-zero", dict(distill__batch_size="0"), "batch_size must be an int in [1, "),
    ("num-sigmas-huge", dict(distill__num_sigmas="10000000000"), "num_sigmas must be an int in [1, "),
    ("seed-huge", dict(distill__seed="9223372036854775807"), None),  # the largest seed is fine: no error
    ("seed-negative", dict(distill__seed="-1"), "seed must be an int in [0, "),
    ("real-samples-zero", dict(teacher__real_samples="0"), "real_samples must be in [1, "),
    # teacher arrays
    ("means-empty", dict(teacher__means="[]"), "means must be numbers"),
    ("means-empty-rows", dict(teacher__means="[[], []]"), "means must be numbers"),
    ("means-flat", dict(teacher__means="[1.0, 2.0]"), "means must be numbers"),
    ("means-ragged", dict(teacher__means="[[0.0, 1.0], [2.0]]"), "means must be numbers"),
    ("means-nan", dict(teacher__means="[[nan, 0.0], [1.0, 0.0]]"), "means rows must be a non-empty array of"),
    ("means-inf", dict(teacher__means="[[inf, 0.0], [1.0, 0.0]]"), "finite numbers"),
    ("means-strings", dict(teacher__means='[["a", 0.0], [1.0, 0.0]]'), "finite numbers"),
    ("stds-wrong-length", dict(teacher__stds="[0.2, 0.2, 0.2]"), "stds must have shape (2,) or (2, 2)"),
    ("stds-wrong-shape", dict(teacher__stds="[[0.2], [0.2]]"), "stds must have shape (2,) or (2, 2)"),
    ("stds-zero", dict(teacher__stds="[0.0, 0.2]"), "stds must all be > 0"),
    ("stds-negative", dict(teacher__stds="[-0.2, 0.2]"), "stds must all be > 0"),
    ("stds-nan", dict(teacher__stds="[nan, 0.2]"), "stds must be a non-empty array of finite"),
    ("stds-empty", dict(teacher__stds="[]"), "stds must be a non-empty array"),
    ("weights-wrong-length", dict(teacher__weights="[1.0]"), "weights must have 2 values"),
    ("weights-negative", dict(teacher__weights="[-1.0, 2.0]"), "weights must be >= 0"),
    ("weights-zero", dict(teacher__weights="[0.0, 0.0]"), "weights must be >= 0 with a positive sum"),
    ("means-missing", dict(teacher__means=None), "needs means"),
    # student sigmas
    ("sigmas-empty", dict(student__sigmas="[]"), "sigmas must be a non-empty array"),
    ("sigmas-zero", dict(student__sigmas="[0.0]"), "sigmas must all be > 0"),
    ("sigmas-negative", dict(student__sigmas="[80.0, -1.0]"), "sigmas must all be > 0"),
    ("sigmas-nan", dict(student__sigmas="[nan]"), "sigmas must be a non-empty array of finite"),
    ("sigmas-increasing", dict(student__sigmas="[1.0, 80.0]"), "sigmas must be strictly decreasing"),
    ("sigmas-string", dict(student__sigmas='"80"'), "sigmas must be a non-empty array"),
    # [distill] values
    ("lr-negative", dict(distill__generator_lr="-1e-3"), "generator_lr must be > 0"),
    ("lr-nan", dict(distill__generator_lr="nan"), "generator_lr must be > 0"),
    ("lr-inf", dict(distill__fake_score_lr="inf"), "fake_score_lr must be > 0"),
    ("lr-huge", dict(distill__generator_lr="1e300"), "generator_lr must be <= 1e+06"),
    ("lr-huge-int", dict(distill__fake_score_lr="1" + "0" * 400), "fake_score_lr must be <= 1e+06"),
    ("weight-decay-huge", dict(distill__weight_decay="1e10"), "weight_decay must be <= 1e+06"),
    ("sigma-max-huge-int", dict(distill__sigma_max="9223372036854775808"), "sigma_max must be <= 1e+06"),
    ("min-normaliser-huge", dict(distill__min_normaliser="1e300"), "min_normaliser must be <= 1e+30"),
    ("dmd-weight-huge-int", dict(distill__dmd_weight="1" + "0" * 400), "dmd_weight must be <= 1e+30"),
    ("betas-huge-int", dict(distill__betas="[" + "1" * 400 + ", 0.9]"), "betas must be a pair of numbers"),
    ("student-sigma-huge", dict(student__sigmas="[1e300]"), "sigmas must be a non-empty array of finite"),
    ("student-sigma-large", dict(student__sigmas="[1e10]"), "sigmas must be <= 1e+06"),
    ("teacher-sigma-max-huge", dict(teacher__sigma_max="1e300"), "sigma_max must be a finite number in"),
    ("means-huge", dict(teacher__means="[[1e300, 0.0], [1.0, 0.0]]"), "finite numbers (|x| <= 1e30)"),
    ("regression-without-pairs", dict(distill__regression_weight="0.5"), "needs a [pairs] table"),
    ("fake-score-teacher-copy", dict(fake_score__init='"teacher"'), "[fake_score] init = 'teacher' needs"),
    ("student-teacher-copy", dict(student__init='"teacher"'), "[student] init = 'teacher' needs"),
    ("rho-zero", dict(distill__rho="0"), "rho must be > 0"),
    ("sigma-min-above-max", dict(distill__sigma_min="100.0"), "sigma_min must be < sigma_max"),
    ("betas-nan", dict(distill__betas="[nan, 0.9]"), "betas must be two numbers"),
    ("betas-one", dict(distill__betas="[0.9]"), "betas must be two numbers"),
    ("k-range-past-grid", dict(distill__generator_k_range="[0, 5000]"), "generator_k_range must be"),
    ("ema-negative", dict(distill__ema_halflife_steps="-1.0"), "ema_halflife_steps must be >= 0"),
    ("weight-decay-nan", dict(distill__weight_decay="nan"), "weight_decay must be >= 0"),
    ("unknown-distill-key", dict(distill__generator_lrr="1e-3"), "unknown key(s) ['generator_lrr']"),
    ("unknown-student-key", dict(student__width="16"), "unknown key(s) ['width']"),
    ("unknown-top-key", dict(**{"__outdir": '"x"'}), "unknown key(s) ['outdir']"),
    ("unknown-table", dict(extra__x="1"), "unknown key(s) ['extra']"),
    # output directory and device
    ("out-dir-int", dict(**{"__out_dir": "5"}), "out_dir must be a non-empty string"),
    ("out-dir-empty", dict(**{"__out_dir": '""'}), "out_dir must be a non-empty string"),
    ("device-int", dict(**{"__device": "0"}), "device must be a string"),
    ("device-unknown", dict(**{"__device": '"gpu0"'}), "not a torch device"),
    ("device-meta", dict(**{"__device": '"meta"'}), "use 'cpu', 'cuda', 'cuda:N' or 'auto'"),
    # files the run reads
    ("teacher-file-missing", dict(teacher__kind='"checkpoint"', teacher__means=None, teacher__stds=None,
                                  teacher__path='"no-such.safetensors"', student__init='"teacher"',
                                  fake_score__init='"teacher"'), "no-such.safetensors is no file"),
    ("teacher-file-directory", dict(teacher__kind='"checkpoint"', teacher__means=None, teacher__stds=None,
                                    teacher__path='"."', student__init='"teacher"'), ". is a directory"),
    ("teacher-path-bool", dict(teacher__kind='"checkpoint"', teacher__means=None, teacher__stds=None,
                               teacher__path="true"), "path must be a non-empty string"),
    ("pairs-missing-file", dict(pairs__path='"no-such.safetensors"'), "no-such.safetensors is no file"),
    ("pairs-path-int", dict(pairs__path="3"), "[pairs] path must be a non-empty string"),
]


@pytest.mark.parametrize("changes, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_values_are_one_line_errors(tmp_path, capsys, no_networks, changes, message):
    path = tmp_path / "run.toml"
    path.write_text(render(tmp_path / "out", **changes))
    if message is None:  # a valid edge value: it gets as far as building networks
        with pytest.raises(AssertionError, match="a network was built"):
            main(["distill", str(path)])
        return
    err = one_line_error(capsys, ["distill", str(path)])
    assert message in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_memory_estimate_uses_the_machines_memory(tmp_path, capsys, no_networks, monkeypatch):
    import dmdcopy.cli.distill as cli

    monkeypatch.setattr(cli, "_physical_memory", lambda: 2**30)  # a 1 GiB machine
    path = tmp_path / "run.toml"
    path.write_text(render(tmp_path / "out", student__hidden="4096", student__depth="10"))
    err = one_line_error(capsys, ["distill", str(path)])
    assert "hidden = 4096, depth = 10" in err and "1 GiB of memory" in err
    path.write_text(render(tmp_path / "out", distill__batch_size="100000000"))
    assert "batch_size = 100000000 needs about" in one_line_error(capsys, ["distill", str(path)])


@pytest.mark.parametrize("where", ["file", "under-file", "not-writable"])
def test_unusable_out_dir_is_refused_at_start(tmp_path, capsys, no_networks, monkeypatch, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    out = {"file": blocker, "under-file": blocker / "run", "not-writable": tmp_path / "ro" / "run"}[where]
    if where == "not-writable":
        (tmp_path / "ro").mkdir()
        real_access = os.access
        # chmod does not bind root, so say what a read-only directory says to os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path / "ro")
                            else real_access(p, mode))
    path = tmp_path / "run.toml"
    path.write_text(render(out))
    err = one_line_error(capsys, ["distill", str(path)])
    expected = {"file": "exists and is not a directory", "under-file": "is a file, so no directory",
                "not-writable": "is not writable"}[where]
    assert expected in err and blocker.read_text() == "a file"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
@pytest.mark.parametrize("how", ["file", "flag", "flag-index"])
def test_cuda_without_cuda_is_a_clear_error(tmp_path, capsys, no_networks, how):
    path = tmp_path / "run.toml"
    path.write_text(render(tmp_path / "out", **({"__device": '"cuda"'} if how == "file" else {})))
    argv = ["distill", str(path)] + {"file": [], "flag": ["--device", "cuda"],
                                     "flag-index": ["--device", "cuda:1"]}[how]
    assert "CUDA is not available" in one_line_error(capsys, argv)


@pytest.mark.parametrize("kind, message", [
    ("directory", "is a directory, not a TOML config file"),
    ("binary", "a binary file, not a TOML config file"),
    ("latin-1", "not UTF-8 text"),
    ("invalid", "not valid TOML"),
    ("deep", "not valid TOML"),
    ("missing", "no config file at"),
    ("empty", "missing table [teacher]"),
])
def test_unreadable_config_files_are_one_line_errors(tmp_path, capsys, kind, message):
    path = tmp_path / "run.toml"
    if kind == "directory":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "latin-1":
        path.write_bytes('out_dir = "caf\u00e9"\n'.encode("latin-1"))
    elif kind == "invalid":
        path.write_text("out_dir = \n[teacher\n")
    elif kind == "deep":
        path.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    elif kind == "empty":
        path.write_text("")
    assert message in one_line_error(capsys, ["distill", str(path)])


def test_the_example_config_still_validates(monkeypatch, no_networks, tmp_path):
    """examples/configs/gmm2d.toml passes every check (it gets as far as building its networks)."""
    from dmdcopy.cli.distill import build_run, load_toml

    spec = load_toml(os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "gmm2d.toml"))
    spec["out_dir"] = str(tmp_path / "out")
    with pytest.raises(AssertionError, match="a network was built"):
        build_run(spec, device="cpu")
