"""dmdcopy.io: safetensors round trips, format detection, load reports, DMD2 state dicts, convert."""

import json
import struct

import pytest
import torch
from _nets import randomise, small_dhariwal, small_song
from safetensors.torch import save_file
from torch import nn

from dmdcopy.errors import CheckpointError, ConfigError
from dmdcopy.io import (
    convert,
    detect_format,
    load,
    load_dmd2_checkpoint,
    load_state_checked,
    module_spec,
    read_metadata,
    save,
)
from dmdcopy.io.architectures import check_wrapper_settings, edm_imagenet64_adm
from dmdcopy.io.dmd2 import dmd2_imagenet64
from dmdcopy.io.safetensors_io import read_safetensors
from dmdcopy.nets import MLP
from dmdcopy.pairs import teacher_fingerprint
from dmdcopy.precond import EDMPrecond, VEPrecond, VPPrecond
from dmdcopy.students import MultiStepStudent, OneStepStudent
from dmdcopy.teachers import EmpiricalTeacher, GaussianMixtureTeacher, GaussianTeacher


def outputs(D, label_dim, shape=(3, 8, 8)):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, *shape, generator=g)
    sigma = torch.tensor([0.01, 0.5, 2.0, 40.0])
    labels = torch.eye(label_dim)[torch.arange(4) % label_dim] if label_dim else None
    with torch.no_grad():
        return D(x, sigma, labels)


@pytest.mark.parametrize(
    "make, label_dim, shape",
    [
        (lambda L: EDMPrecond(MLP(2, hidden=16, depth=1, label_dim=L)), 0, (2,)),
        (lambda L: VPPrecond(MLP(2, hidden=16, depth=1, label_dim=L)), 3, (2,)),
        (lambda L: VEPrecond(MLP(2, hidden=16, depth=1, label_dim=L)), 0, (2,)),
        (lambda L: EDMPrecond(small_song(L)), 0, (3, 8, 8)),
        (lambda L: EDMPrecond(small_song(L)), 5, (3, 8, 8)),
        (lambda L: EDMPrecond(small_dhariwal(L)), 0, (3, 8, 8)),
        (lambda L: EDMPrecond(small_dhariwal(L)), 5, (3, 8, 8)),
    ],
)
def test_round_trip_rebuilds_identical_denoiser(tmp_path, make, label_dim, shape):
    net = randomise(make(label_dim))
    path = tmp_path / "net.safetensors"
    save(net, path)
    loaded = load(path)
    assert type(loaded) is type(net) and type(loaded.model) is type(net.model)
    assert module_spec(loaded) == module_spec(net)
    assert not loaded.training
    torch.testing.assert_close(
        outputs(loaded, label_dim, shape), outputs(net, label_dim, shape), rtol=0, atol=0
    )


def _exact_teachers():
    g = torch.Generator().manual_seed(5)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64)
    return [
        GaussianTeacher(torch.randn(6, generator=g), A @ A.T, sample_shape=(2, 3), sigma_max=40.0),
        GaussianMixtureTeacher(torch.randn(3, 2, generator=g), torch.rand(3, 2, generator=g) + 0.1,
                               torch.tensor([1.0, 2.0, 3.0]), conditional=True),
        EmpiricalTeacher(torch.randn(12, 2, 3, generator=g), chunk_size=5, compute_dtype=torch.float32,
                         labels=torch.arange(12) % 4),
        EmpiricalTeacher(torch.randn(7, 4, generator=g, dtype=torch.float64)),
    ]


@pytest.mark.parametrize("index", range(4))
def test_exact_teachers_round_trip_bit_for_bit(tmp_path, index):
    teacher = _exact_teachers()[index]
    path = tmp_path / "teacher.safetensors"
    save(teacher, path)
    loaded = load(path)
    assert type(loaded) is type(teacher) and repr(loaded) == repr(teacher)
    assert teacher_fingerprint(loaded) == teacher_fingerprint(teacher)  # a pair store made before reuses
    x = torch.randn(5, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.01, 0.3, 1.0, 5.0, 40.0])
    labels = torch.eye(teacher.label_dim)[torch.arange(5) % teacher.label_dim] if teacher.label_dim else None
    assert torch.equal(loaded(x, sigma, labels), teacher(x, sigma, labels))
    # into= a module of the same kind: a different data set is refused, the same one accepted
    load(path, into=_exact_teachers()[index])
    if isinstance(teacher, EmpiricalTeacher):
        other = EmpiricalTeacher(teacher.data.reshape(-1, *teacher.sample_shape) + 1, labels=teacher.labels)
        with pytest.raises(CheckpointError, match=r"constructor tensors .* differ"):
            load(path, into=other)


def test_exact_teacher_file_does_not_rebuild_without_its_tensors(tmp_path):
    teacher = _exact_teachers()[3]
    save(teacher, tmp_path / "t.safetensors")
    state, meta = read_safetensors(tmp_path / "t.safetensors")
    del state["dmdcopy.init/data"]
    save_file(state, str(tmp_path / "u.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"lacks 'dmdcopy\.init/data'"):
        load(tmp_path / "u.safetensors")


def test_round_trip_students(tmp_path):
    for G in (
        OneStepStudent(EDMPrecond(MLP(2, hidden=16, depth=1)), sigma_max=40.0),
        MultiStepStudent(EDMPrecond(MLP(2, hidden=16, depth=1)), sigmas=(80.0, 2.0)),
    ):
        randomise(G)
        save(G, tmp_path / "g.safetensors")
        H = load(tmp_path / "g.safetensors")
        assert type(H) is type(G) and H.sigma_max == G.sigma_max
        z = torch.randn(6, 2)
        torch.testing.assert_close(H(z), G(z), rtol=0, atol=0)


def test_non_finite_and_dtype_options_survive(tmp_path):
    net = EDMPrecond(MLP(2, hidden=8, depth=1), sigma_max=float("inf"), net_dtype=torch.bfloat16)
    save(net, tmp_path / "n.safetensors")
    loaded = load(tmp_path / "n.safetensors")
    assert loaded.sigma_max == float("inf") and loaded.net_dtype is torch.bfloat16


def test_float16_weights_keep_their_dtype(tmp_path):
    net = EDMPrecond(MLP(2, hidden=8, depth=1)).half()
    save(net, tmp_path / "h.safetensors")
    loaded = load(tmp_path / "h.safetensors")
    assert all(p.dtype is torch.float16 for p in loaded.parameters())
    for a, b in zip(loaded.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight  # tied
        self.register_buffer("view", torch.arange(10.0)[2:6])  # a view into a larger storage


def test_tied_and_view_tensors_are_saved_once_and_restored(tmp_path):
    m = Tied()
    save(m, tmp_path / "t.safetensors")
    raw = (tmp_path / "t.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert "b.weight" not in header and "a.weight" in header  # stored once
    assert json.loads(header["__metadata__"]["dmdcopy.aliases"]) == {"b.weight": "a.weight"}
    fresh = Tied()
    load(tmp_path / "t.safetensors", into=fresh)
    assert torch.equal(fresh.a.weight, m.a.weight) and fresh.a.weight is fresh.b.weight
    assert torch.equal(fresh.view, torch.arange(2.0, 6.0))


def test_wrapper_settings_the_file_records_are_checked_against_the_module_filled(tmp_path):
    """A state dict does not hold a wrapper's settings; the file's record of them is compared."""
    def mlp():
        return MLP(2, hidden=8, depth=1)

    def check(name, module):
        check_wrapper_settings(module, read_safetensors(tmp_path / name)[1], name)

    same = EDMPrecond(mlp(), sigma_min=0.002, sigma_max=80.0)
    save(same, tmp_path / "D.safetensors")
    save(OneStepStudent(same), tmp_path / "G.safetensors")
    check("D.safetensors", EDMPrecond(mlp(), sigma_min=0.002, sigma_max=80.0))  # the same settings
    check("G.safetensors", OneStepStudent(EDMPrecond(mlp(), sigma_min=0.002, sigma_max=80.0)))
    # other weights are not a setting (load_state_checked reports those)
    check("D.safetensors", EDMPrecond(MLP(2, hidden=16, depth=3), sigma_min=0.002, sigma_max=80.0))
    differ = [
        (EDMPrecond(mlp(), sigma_data=1.0, sigma_min=0.002, sigma_max=80.0),
         ["sigma_data: 0.5 in the file, 1.0 in the module"]),
        (EDMPrecond(mlp()), ["sigma_min: 0.002 in the file, 0.0 in the module",
                             "sigma_max: 80.0 in the file, inf in the module"]),
        (VEPrecond(mlp(), sigma_min=0.002, sigma_max=80.0),
         ["class: EDMPrecond in the file, VEPrecond in the module", "sigma_data: 0.5 in the file, absent"]),
    ]
    for module, fields in differ:
        with pytest.raises(CheckpointError, match=r"^D\.safetensors records settings that differ") as err:
            check("D.safetensors", module)
        assert all(f in str(err.value) for f in fields), str(err.value)
        with pytest.raises(CheckpointError) as err:  # the same wrapper inside a student
            check("G.safetensors", OneStepStudent(module, sigma_max=80.0))
        assert all(f"denoiser.{f}" in str(err.value) for f in fields), str(err.value)
    with pytest.raises(CheckpointError, match=r": sigma_max: 80.0 in the file, 40.0 in the module;"):
        check("G.safetensors", OneStepStudent(same, sigma_max=40.0))
    # nothing recorded to compare: a plain safetensors file; a user's own class is not compared
    check_wrapper_settings(VEPrecond(mlp()), {"format": "pt"}, "plain.safetensors")
    save(EDMPrecond(Tied(), sample_shape=(4,), sigma_min=0.002), tmp_path / "U.safetensors")
    check("U.safetensors", EDMPrecond(Tied(), sample_shape=(4,), sigma_min=0.002))
    with pytest.raises(CheckpointError, match=r"=: sigma_min: 0.002 in the file, 0.0 in the module; build"):
        check("U.safetensors", EDMPrecond(Tied(), sample_shape=(4,)))


def test_user_network_saves_and_needs_into(tmp_path):
    class MyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x, c_noise, class_labels=None):
            return self.fc(x) * c_noise[:, None]

    D = EDMPrecond(MyNet(), sample_shape=(2,))
    save(D, tmp_path / "u.safetensors")
    with pytest.raises(CheckpointError, match=r"user-defined classes .*MyNet.*into="):
        load(tmp_path / "u.safetensors")
    D2 = load(tmp_path / "u.safetensors", into=EDMPrecond(MyNet(), sample_shape=(2,)))
    assert torch.equal(D2.model.fc.weight, D.model.fc.weight)


def test_metadata_round_trip_and_validation(tmp_path):
    net = EDMPrecond(MLP(2, hidden=8, depth=1))
    save(net, tmp_path / "m.safetensors", metadata={"step": 7, "data": "digits"})
    assert read_metadata(tmp_path / "m.safetensors") == {"step": 7, "data": "digits"}
    with pytest.raises(ConfigError, match="JSON"):
        save(net, tmp_path / "bad.safetensors", metadata={"x": object()})
    assert not (tmp_path / "bad.safetensors").exists()


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "a.safetensors"
    save(EDMPrecond(MLP(2, hidden=8, depth=1)), path)
    before = path.read_bytes()

    class Unsavable(nn.Module):
        def state_dict(self, *a, **k):
            return {"x": "not a tensor"}

    with pytest.raises(Exception):  # noqa: B017 (whatever safetensors raises)
        save(Unsavable(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_mismatch_report_lists_every_offending_key(tmp_path):
    save(EDMPrecond(MLP(2, hidden=16, depth=2)), tmp_path / "a.safetensors")
    other = EDMPrecond(MLP(2, hidden=8, depth=3, label_dim=4))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load(tmp_path / "a.safetensors", into=other)
    message = str(err.value)
    own = other.state_dict()
    saved = EDMPrecond(MLP(2, hidden=16, depth=2)).state_dict()
    for key in own:
        if key not in saved or saved[key].shape != own[key].shape:
            assert key in message
    assert "model.blocks.2.fc1.weight" in message and "model.map_label.weight" in message
    assert "[16, 16] vs [8, 8]" in message
    # strict: nothing was loaded, not even the keys that fit (model.out.bias has shape (2,) in both)
    assert saved["model.out.bias"].shape == own["model.out.bias"].shape
    assert all(torch.equal(v, before[k]) for k, v in own.items())


def test_non_strict_load_fills_what_fits_and_warns(tmp_path):
    src = randomise(EDMPrecond(MLP(2, hidden=8, depth=2)))
    save(src, tmp_path / "a.safetensors")
    dst = EDMPrecond(MLP(2, hidden=8, depth=3))
    with pytest.warns(UserWarning, match=r"missing key.*\n(.*\n)*.*model\.blocks\.2\.fc1\.weight"):
        load(tmp_path / "a.safetensors", into=dst, strict=False)
    assert torch.equal(dst.model.blocks[1].fc1.weight, src.model.blocks[1].fc1.weight)


def test_load_state_checked_report():
    m = nn.Linear(3, 2)
    report = load_state_checked(m, {"weight": torch.zeros(2, 3), "bias": torch.ones(2)})
    assert report.ok and torch.equal(m.bias, torch.ones(2))


# ----------------------------------------------------------------------------- failure paths


def test_missing_empty_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load(tmp_path / "nope.safetensors")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        load(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        load(tmp_path)


@pytest.mark.parametrize(
    "content, what",
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(100), "a PNG image"),
        (json.dumps({"weights": [1, 2, 3]}).encode(), "a JSON document"),
        (b"hello, world\n", "a text file"),
        (b"\x1f\x8b\x08\x00" + bytes(40), "a gzip archive"),
        (b"\x00\x01\x02\x03\xfe\xff" * 4, "unrecognised binary file"),
    ],
)
def test_other_formats_say_what_they_are_and_what_was_expected(tmp_path, content, what):
    path = tmp_path / "teacher.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=what) as err:
        load(path)
    assert "expected a dmdcopy .safetensors file, an EDM network pickle" in str(err.value)


def test_truncated_safetensors(tmp_path):
    save(EDMPrecond(MLP(2, hidden=16, depth=1)), tmp_path / "a.safetensors")
    raw = (tmp_path / "a.safetensors").read_bytes()
    for cut in (len(raw) - 1, len(raw) // 2, 20):
        (tmp_path / "cut.safetensors").write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="truncated safetensors file"):
            load(tmp_path / "cut.safetensors")


def _safetensors_bytes(header: dict, payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


_ONE_TENSOR = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}


@pytest.mark.parametrize(
    "header",
    [
        {"w": 1},
        {"w": {"dtype": "F32", "shape": [1]}},
        {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}},
        {"w": {"dtype": "F32", "shape": [1], "data_offsets": "ab"}},
    ],
    ids=["entry-not-an-object", "no-data-offsets", "one-offset", "offsets-not-numbers"],
)
def test_corrupt_safetensors_header_is_a_checkpoint_error(tmp_path, header):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_safetensors_bytes(header, bytes(4)))
    for read in (load, read_metadata, detect_format):
        with pytest.raises(CheckpointError, match="corrupt header"):
            read(path)


@pytest.mark.parametrize(
    "arch, match",
    [
        ('{"class": "MLP", "kwargs": {"dim": "x"}}', r"cannot build MLP from the recorded options"),
        ('{"kwargs": {}}', "malformed architecture spec"),
        ("[1, 2]", "malformed architecture spec"),
        ('{"class": "EDMPrecond", "kwargs": {}, "children": [1]}', "malformed architecture spec"),
    ],
)
def test_corrupt_architecture_metadata_is_a_checkpoint_error(tmp_path, arch, match):
    path = tmp_path / "bad.safetensors"
    header = {"__metadata__": {"dmdcopy.architecture": arch}, **_ONE_TENSOR}
    path.write_bytes(_safetensors_bytes(header, bytes(4)))
    with pytest.raises(CheckpointError, match=match):
        load(path)


def test_corrupt_user_metadata_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    header = {"__metadata__": {"dmdcopy.metadata": "{oops"}, **_ONE_TENSOR}
    path.write_bytes(_safetensors_bytes(header, bytes(4)))
    with pytest.raises(CheckpointError, match=r"corrupt dmdcopy\.metadata"):
        read_metadata(path)


def test_state_dict_with_non_string_keys_is_described(tmp_path):
    torch.save({1: torch.zeros(1), "a": [1, 2]}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match=r"expected a state dict of tensors, found \['a', 1\]"):
        load(tmp_path / "mixed.pt", into=nn.Linear(1, 1))


def test_safetensors_without_dmdcopy_metadata_needs_into(tmp_path):
    from safetensors.torch import save_file

    m = nn.Linear(3, 2)
    save_file(m.state_dict(), str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match=r"without dmdcopy's architecture metadata.*into=module"):
        load(tmp_path / "plain.safetensors")
    m2 = load(tmp_path / "plain.safetensors", into=nn.Linear(3, 2))
    assert torch.equal(m2.weight, m.weight)


# ----------------------------------------------------------------------------- torch state dicts


def test_dmd2_state_dict_into_given_architecture(tmp_path):
    teacher = randomise(EDMPrecond(small_dhariwal(5)))
    torch.save(teacher.state_dict(), tmp_path / "pytorch_model.bin")
    assert detect_format(tmp_path / "pytorch_model.bin") == "torch-zip"
    with pytest.raises(CheckpointError, match="carries no architecture"):
        load(tmp_path / "pytorch_model.bin")
    got = load(tmp_path / "pytorch_model.bin", into=EDMPrecond(small_dhariwal(5))).eval()
    torch.testing.assert_close(outputs(got, 5), outputs(teacher, 5), rtol=0, atol=0)


def test_dmd2_imagenet64_is_built_in_one_place():
    from dmdcopy.cli.convert import _architecture

    with torch.device("meta"):  # 296M parameters, no storage
        net, cli = dmd2_imagenet64(), _architecture("imagenet64-adm")
    spec = module_spec(net)
    assert module_spec(cli) == spec
    assert spec["class"] == "EDMPrecond" and spec["kwargs"]["sigma_data"] == 0.5
    assert (spec["kwargs"]["sigma_min"], spec["kwargs"]["sigma_max"]) == (0.0, {"__float__": "inf"})
    adm = {**edm_imagenet64_adm(dropout=0.0), "attention_impl": "exact"}
    assert spec["children"]["model"] == {"class": "DhariwalUNet", "kwargs": adm}


def test_dmd2_critic_file_prefixes(tmp_path):
    real, fake = randomise(EDMPrecond(small_song())), randomise(EDMPrecond(small_song()))
    with torch.no_grad():
        for p in fake.parameters():
            p.add_(1.0)
    state = {f"real_unet.{k}": v for k, v in real.state_dict().items()}
    state |= {f"fake_unet.{k}": v for k, v in fake.state_dict().items()}
    state["cls_pred_branch.0.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "pytorch_model_1.bin")
    with pytest.raises(
        CheckpointError, match=r"\['cls_pred_branch\.', 'fake_unet\.', 'real_unet\.'\].*prefix='fake_unet\.'"
    ):
        load_dmd2_checkpoint(tmp_path / "pytorch_model_1.bin")
    got = load_dmd2_checkpoint(
        tmp_path / "pytorch_model_1.bin", EDMPrecond(small_song()), prefix="fake_unet."
    )
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), fake.state_dict().values()))
    with pytest.raises(CheckpointError, match=r"no key starts with 'critic\.'"):
        load_dmd2_checkpoint(tmp_path / "pytorch_model_1.bin", EDMPrecond(small_song()), prefix="critic.")


def test_wrapper_prefix_and_legacy_torch_format(tmp_path):
    net = randomise(EDMPrecond(MLP(2, hidden=8, depth=1)))
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save(state, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert detect_format(tmp_path / "old.pt") == "torch-legacy"
    got = load_dmd2_checkpoint(tmp_path / "old.pt", EDMPrecond(MLP(2, hidden=8, depth=1)))
    assert torch.equal(got.model.out.weight, net.model.out.weight)


def test_torch_file_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": torch.zeros(1), "x": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        load(tmp_path / "evil.bin", into=nn.Linear(1, 1))


def test_truncated_torch_file(tmp_path):
    torch.save(nn.Linear(30, 30).state_dict(), tmp_path / "a.bin")
    raw = (tmp_path / "a.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged zip"):
        load(tmp_path / "cut.bin", into=nn.Linear(30, 30))


def test_convert_torch_state_dict(tmp_path):
    net = randomise(EDMPrecond(small_song(3)))
    torch.save(net.state_dict(), tmp_path / "pytorch_model.bin")
    convert(
        tmp_path / "pytorch_model.bin", tmp_path / "out.safetensors", architecture=EDMPrecond(small_song(3))
    )
    assert read_metadata(tmp_path / "out.safetensors") == {"converted_from": "pytorch_model.bin"}
    torch.testing.assert_close(
        outputs(load(tmp_path / "out.safetensors"), 3), outputs(net, 3), rtol=0, atol=0
    )


def test_saved_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through a temp file; the result must not stay private (0600) like one."""
    import os

    path = tmp_path / "net.safetensors"
    save(MLP(2, hidden=8, depth=1), path)
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_load_into_checks_the_recorded_settings(tmp_path):
    from dmdcopy.students import OneStepStudent

    save(OneStepStudent(EDMPrecond(MLP(2, hidden=8, depth=1))), tmp_path / "a.safetensors")
    other = OneStepStudent(EDMPrecond(MLP(2, hidden=8, depth=1), sigma_data=1.0))
    with pytest.raises(CheckpointError, match=r"denoiser\.sigma_data: 0\.5 in the file, 1\.0 in the module"):
        load(tmp_path / "a.safetensors", into=other)


def test_image_mlp_round_trips_by_its_recorded_architecture(tmp_path):
    from dmdcopy.nets import ImageMLP

    torch.manual_seed(0)
    D = EDMPrecond(ImageMLP((1, 8, 8), hidden=16, depth=1, label_dim=3))
    save(D, tmp_path / "d.safetensors")
    E = load(tmp_path / "d.safetensors")
    assert type(E.model) is ImageMLP and E.model.init_kwargs == D.model.init_kwargs
    x, sigma, y = torch.randn(2, 1, 8, 8), torch.ones(2), torch.tensor([0, 2])
    assert torch.equal(D(x, sigma, class_labels=y), E(x, sigma, class_labels=y))
