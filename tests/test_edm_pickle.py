"""EDM network pickles: imported to identical outputs, and never executed.

The pickles are written here in EDM's persistence layout (the facts are in the docstring of
``dmdcopy.io.edm_pickle``): a snapshot dict ``{"ema", "loss_fn", "augment_pipe",
"dataset_kwargs"}``; every EDM network class (precond, UNet and every layer) pickles as
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta = {"type": "class",
"version": 6, "module_src": <source>, "class_name": <EDM name>, "state": <__dict__ plus
_init_args/_init_kwargs>}``; ``torch.nn.ModuleDict`` and tensors pickle as torch pickles them.
To get exactly the GLOBAL opcodes EDM's files contain, stand-in modules named
``torch_utils.persistence`` and ``dnnlib.util`` are put into ``sys.modules`` while writing (the
reader never imports them: the test also checks they are absent while reading).
"""

import os
import pickle
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from _nets import randomise, small_dhariwal, small_song
from torch import nn

from dmdcopy._record import constructor_options
from dmdcopy.errors import CheckpointError
from dmdcopy.io import load, load_edm_pickle, read_edm_pickle
from dmdcopy.io.edm_pickle import PickledModule
from dmdcopy.nets.unet import DhariwalUNet, SongUNet
from dmdcopy.precond import EDMPrecond, VEPrecond, VPPrecond


def outputs(D, label_dim):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 8, 8, generator=g)
    sigma = torch.tensor([0.01, 0.5, 2.0, 40.0])
    labels = torch.eye(label_dim)[torch.arange(4) % label_dim] if label_dim else None
    with torch.no_grad():
        return D(x, sigma, labels)


def _reconstruct_persistent_obj(meta):  # stand-in for EDM's, only ever referenced by name
    raise AssertionError("the reader must never call this")


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


class EasyDict(dict):
    pass


EasyDict.__module__ = "dnnlib.util"
EasyDict.__qualname__ = "EasyDict"


@pytest.fixture
def edm_modules(monkeypatch):
    """Make ``torch_utils.persistence`` and ``dnnlib.util`` importable by pickle while writing."""
    persistence = types.ModuleType("torch_utils.persistence")
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = EasyDict
    for name, mod in [
        ("torch_utils", types.ModuleType("torch_utils")),
        ("torch_utils.persistence", persistence),
        ("dnnlib", types.ModuleType("dnnlib")),
        ("dnnlib.util", util),
    ]:
        monkeypatch.setitem(sys.modules, name, mod)  # undone after the test


def _precond_edm_kwargs(net):
    """What EDM's EDMPrecond/VPPrecond/VEPrecond record as _init_kwargs (and keep as attributes)."""
    unet = net.model
    kw = dict(
        img_resolution=unet.img_resolution,
        img_channels=unet.in_channels,
        label_dim=net.label_dim,
        use_fp16=False,
    )
    if isinstance(net, EDMPrecond):
        kw |= dict(sigma_min=net.sigma_min, sigma_max=net.sigma_max, sigma_data=net.sigma_data)
    elif isinstance(net, VPPrecond):
        kw |= dict(beta_d=net.beta_d, beta_min=net.beta_min, M=net.M, epsilon_t=1e-5)
    else:
        kw |= dict(sigma_min=net.sigma_min, sigma_max=net.sigma_max)
    model_kwargs = {
        k: v
        for k, v in unet.init_kwargs.items()
        if k not in ("img_resolution", "in_channels", "out_channels", "label_dim")
    }
    return kw, {**kw, "model_type": type(unet).__name__, **model_kwargs}


class EDMLayoutPickler(pickle.Pickler):
    """Writes dmdcopy's modules as EDM's persistent-class records (see the module docstring).

    ``module_src`` carries code that would create ``marker`` if anyone executed it.
    """

    def __init__(self, file, marker, positional_unet=False):
        super().__init__(file, protocol=4)
        self.module_src = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        self.positional_unet = positional_unet

    def reducer_override(self, obj):
        if not (isinstance(obj, nn.Module) and type(obj).__module__.startswith("dmdcopy.")):
            return NotImplemented  # tensors, containers, torch.nn classes: as torch pickles them
        state = dict(obj.__dict__)
        args, kwargs = (), {}
        if hasattr(obj, "coefficients"):  # a preconditioning wrapper
            attributes, kwargs = _precond_edm_kwargs(obj)
            state |= attributes
        elif isinstance(obj, (SongUNet, DhariwalUNet)):
            kwargs = dict(obj.init_kwargs)
            if self.positional_unet:
                args = tuple(kwargs.pop(k) for k in ("img_resolution", "in_channels", "out_channels"))
        if type(obj).__name__ == "UNetBlock":
            state["skip_scale"] = np.float64(np.sqrt(0.5))  # EDM keeps numpy scalars like this one
        state |= {"_init_args": args, "_init_kwargs": kwargs}
        meta = dict(
            type="class", version=6, module_src=self.module_src, class_name=type(obj).__name__, state=state
        )
        return _reconstruct_persistent_obj, (meta,)


def write_edm_pickle(path, net, marker, **kw):
    loss_fn = types.SimpleNamespace(P_mean=-1.2, P_std=1.2, sigma_data=0.5)
    snapshot = dict(
        ema=net,
        loss_fn=loss_fn,
        augment_pipe=None,
        dataset_kwargs=EasyDict(
            class_name="training.dataset.ImageFolderDataset", path="x.zip", use_labels=True
        ),
    )

    class Pickler(EDMLayoutPickler):
        def reducer_override(self, obj):
            if obj is loss_fn:  # EDMLoss is a persistent class too (not a module)
                meta = dict(
                    type="class",
                    version=6,
                    module_src=self.module_src,
                    class_name="EDMLoss",
                    state={**vars(obj), "_init_args": (), "_init_kwargs": {}},
                )
                return _reconstruct_persistent_obj, (meta,)
            return super().reducer_override(obj)

    with open(path, "wb") as f:
        Pickler(f, marker, **kw).dump(snapshot)


def _check_no_edm_modules():
    assert not any(name.split(".")[0] in ("torch_utils", "dnnlib", "training") for name in sys.modules)


@pytest.mark.parametrize(
    "make, label_dim",
    [
        (lambda L: EDMPrecond(small_song(L)), 0),
        (lambda L: EDMPrecond(small_song(L)), 4),
        (lambda L: EDMPrecond(small_dhariwal(L)), 0),
        (lambda L: EDMPrecond(small_dhariwal(L)), 4),
        (lambda L: VPPrecond(small_song(L)), 0),
        (lambda L: VEPrecond(small_song(L)), 3),
    ],
)
def test_edm_layout_pickle_imports_to_identical_outputs(tmp_path, edm_modules, monkeypatch, make, label_dim):
    net = randomise(make(label_dim))
    marker = tmp_path / "executed"
    write_edm_pickle(tmp_path / "network-snapshot.pkl", net, marker)
    for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"):
        monkeypatch.delitem(sys.modules, name)
    _check_no_edm_modules()

    got = load_edm_pickle(tmp_path / "network-snapshot.pkl")
    _check_no_edm_modules()
    assert not marker.exists()  # module_src was never run
    assert type(got) is type(net) and type(got.model) is type(net.model)
    assert got.model.init_kwargs == net.model.init_kwargs
    assert (got.label_dim, got.sample_shape) == (label_dim, (3, 8, 8))
    assert (got.sigma_min, got.sigma_max) == (net.sigma_min, net.sigma_max)
    assert not got.training
    torch.testing.assert_close(outputs(got, label_dim), outputs(net, label_dim), rtol=0, atol=0)
    # the same through the format-detecting load, and into a user's module
    torch.testing.assert_close(
        outputs(load(tmp_path / "network-snapshot.pkl"), label_dim), outputs(net, label_dim), rtol=0, atol=0
    )
    into = load(tmp_path / "network-snapshot.pkl", into=make(label_dim).eval())
    torch.testing.assert_close(outputs(into, label_dim), outputs(net, label_dim), rtol=0, atol=0)


def test_record_tree_and_positional_init_args(tmp_path, edm_modules):
    net = randomise(EDMPrecond(small_dhariwal(2)))
    write_edm_pickle(tmp_path / "n.pkl", net, tmp_path / "executed", positional_unet=True)
    record = read_edm_pickle(tmp_path / "n.pkl")
    assert isinstance(record, PickledModule) and record.class_name == "EDMPrecond"
    assert record.children["model"].class_name == "DhariwalUNet"
    assert record.children["model"].init_args == (8, 3, 3)
    assert record.children["model"].children["enc"].class_name == "torch.nn.modules.container.ModuleDict"
    state = record.state_dict()
    assert state.keys() == net.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    got = load_edm_pickle(tmp_path / "n.pkl")
    torch.testing.assert_close(outputs(got, 2), outputs(net, 2), rtol=0, atol=0)


def test_unet_options_a_pickle_may_set_are_those_dmdcopys_network_records(tmp_path, edm_modules):
    net = randomise(EDMPrecond(small_song(0)))

    class Pickler(EDMLayoutPickler):  # an EDM fork whose SongUNet takes one more option
        def reducer_override(self, obj):
            reduced = super().reducer_override(obj)
            if isinstance(obj, SongUNet):
                reduced[1][0]["state"]["_init_kwargs"]["fused_attention"] = True
            return reduced

    with open(tmp_path / "n.pkl", "wb") as f:
        Pickler(f, tmp_path / "executed").dump({"ema": net})
    with pytest.raises(CheckpointError, match=r"SongUNet records options \['fused_attention'\] that dmdcopy"):
        load_edm_pickle(tmp_path / "n.pkl")
    # the allow-list is dmdcopy's record of the network, which EDM's options fill exactly
    recorded = set(read_edm_pickle(tmp_path / "n.pkl").children["model"].init_kwargs)
    assert recorded - {"fused_attention"} == set(constructor_options(SongUNet)) == set(net.model.init_kwargs)


def test_float16_tensors_and_tensor_views(tmp_path, edm_modules):
    net = randomise(EDMPrecond(small_song())).half()
    write_edm_pickle(tmp_path / "h.pkl", net, tmp_path / "executed")
    state = read_edm_pickle(tmp_path / "h.pkl").state_dict()
    assert all(v.dtype is torch.float16 for v in state.values() if v.is_floating_point())
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    # a view with an offset and strides into a larger storage
    base = torch.arange(24.0)
    view = base[3:].as_strided((2, 3), (1, 4), 5)
    with open(tmp_path / "v.pkl", "wb") as f:
        pickle.dump({"ema": view}, f, protocol=4)
    from dmdcopy.io.edm_pickle import _RestrictedUnpickler

    with open(tmp_path / "v.pkl", "rb") as f:
        assert torch.equal(_RestrictedUnpickler(f).load()["ema"], view)


def test_missing_key_and_unsupported_network(tmp_path, edm_modules):
    net = EDMPrecond(small_song())
    write_edm_pickle(tmp_path / "n.pkl", net, tmp_path / "executed")
    with pytest.raises(
        CheckpointError, match=r"no entry 'net'; its keys are \['augment_pipe', 'dataset_kwargs'"
    ):
        load_edm_pickle(tmp_path / "n.pkl", key="net")
    with pytest.raises(CheckpointError, match="expected a network module, found NoneType"):
        load_edm_pickle(tmp_path / "n.pkl", key="augment_pipe")
    with pytest.raises(CheckpointError, match="loss_fn: EDMLoss is not a torch module"):
        load_edm_pickle(tmp_path / "n.pkl", key="loss_fn")
    write_edm_pickle(tmp_path / "bare.pkl", net.model, tmp_path / "executed")
    with pytest.raises(CheckpointError, match=r"an EDM SongUNet; dmdcopy rebuilds EDMPrecond.*into="):
        load_edm_pickle(tmp_path / "bare.pkl")
    assert load(tmp_path / "bare.pkl", into=small_song()) is not None  # any module through into=


def test_shape_mismatch_lists_every_offending_key(tmp_path, edm_modules):
    net = EDMPrecond(small_song(0))
    write_edm_pickle(tmp_path / "n.pkl", net, tmp_path / "executed")
    other = EDMPrecond(
        SongUNet(
            img_resolution=8,
            in_channels=3,
            out_channels=3,
            label_dim=6,
            model_channels=32,
            channel_mult=[1, 2],
            num_blocks=1,
            attn_resolutions=[4],
        )
    )
    with pytest.raises(CheckpointError) as err:
        load(tmp_path / "n.pkl", into=other)
    message = str(err.value)
    theirs, ours = net.state_dict(), other.state_dict()
    offending = [k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape]
    assert len(offending) > 10
    assert all(k in message for k in offending)
    assert "model.map_label.weight" in message


# ----------------------------------------------------------------------------- security


class Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker):
    touch = f"import pathlib; pathlib.Path({str(marker)!r}).touch()"
    return {
        "posix.system": Payload(os.system, f"touch {marker}"),
        "builtins.eval": Payload(eval, touch),
        "builtins.exec": Payload(exec, touch),
        "subprocess.Popen": Payload(subprocess.Popen, ["touch", str(marker)]),
        "builtins.getattr": Payload(getattr, 0, "real"),  # the first step of most gadget chains
    }


@pytest.mark.parametrize(
    "name", ["posix.system", "builtins.eval", "builtins.exec", "subprocess.Popen", "builtins.getattr"]
)
def test_code_execution_payloads_are_refused(tmp_path, name):
    if name == "posix.system" and os.name != "posix":
        pytest.skip("posix only")
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ema": _payloads(marker)[name]}, f, protocol=4)
    refused = rf"refused global {re.escape(name)}"
    with pytest.raises(CheckpointError, match=refused + ".*nothing from the file was executed"):
        load(path)
    with pytest.raises(CheckpointError, match=refused):
        read_edm_pickle(path)
    assert not marker.exists()


def test_payload_hidden_inside_a_genuine_looking_network_is_refused(tmp_path, edm_modules):
    marker = tmp_path / "pwned"
    net = EDMPrecond(small_song())
    net.model.note = Payload(os.system, f"touch {marker}")  # an attribute deep in the record's state
    write_edm_pickle(tmp_path / "n.pkl", net, tmp_path / "executed")
    with pytest.raises(CheckpointError, match=r"refused global posix\.system"):
        load(tmp_path / "n.pkl")
    assert not marker.exists() and not (tmp_path / "executed").exists()


def test_numpy_scalars_pass_and_object_arrays_are_refused(tmp_path, edm_modules):
    write_edm_pickle(tmp_path / "n.pkl", EDMPrecond(small_song()), tmp_path / "executed")
    block = read_edm_pickle(tmp_path / "n.pkl").children["model"].children["enc"].children["8x8_block0"]
    assert block.attributes["skip_scale"] == np.float64(np.sqrt(0.5))
    with open(tmp_path / "o.pkl", "wb") as f:
        pickle.dump({"ema": np.array([print], dtype=object)}, f, protocol=4)
    with pytest.raises(CheckpointError, match=r"refused global numpy\.\w+\.multiarray\._reconstruct"):
        load(tmp_path / "o.pkl")


def test_non_class_names_from_edm_modules_are_refused(tmp_path):
    # EDM's own module names are allowed only for classes, which become inert placeholders.
    with open(tmp_path / "p.pkl", "wb") as f:
        f.write(b"\x80\x04\x8c\x17torch_utils.persistence\x8c\x0e_src_to_module\x93\x8c\x011\x85R.")
    with pytest.raises(CheckpointError, match=r"refused global torch_utils\.persistence\._src_to_module"):
        load(tmp_path / "p.pkl")


def test_truncated_pickle(tmp_path, edm_modules):
    write_edm_pickle(tmp_path / "n.pkl", EDMPrecond(small_song()), tmp_path / "executed")
    raw = (tmp_path / "n.pkl").read_bytes()
    for cut in (len(raw) - 1, len(raw) // 2, 10):
        (tmp_path / "cut.pkl").write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="truncated, corrupt or not an EDM network"):
            load(tmp_path / "cut.pkl")


def test_other_format_given_to_load_edm_pickle(tmp_path):
    from dmdcopy.io import save

    save(EDMPrecond(small_song()), tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match="expected an EDM network pickle, this is a safetensors file"):
        load_edm_pickle(tmp_path / "a.safetensors")


# ----------------------------------------------------------------------------- CLI


def test_cli_convert_edm_pickle(tmp_path, edm_modules, capsys):
    from dmdcopy.cli import main
    from dmdcopy.io import read_metadata

    net = randomise(EDMPrecond(small_dhariwal(4)))
    write_edm_pickle(tmp_path / "net.pkl", net, tmp_path / "executed")
    assert main(["convert", str(tmp_path / "net.pkl"), str(tmp_path / "net.safetensors")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert read_metadata(tmp_path / "net.safetensors") == {"converted_from": "net.pkl"}
    torch.testing.assert_close(
        outputs(load(tmp_path / "net.safetensors"), 4), outputs(net, 4), rtol=0, atol=0
    )


def test_cli_convert_errors_are_one_line(tmp_path, capsys):
    from dmdcopy.cli import main

    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    assert main(["convert", str(tmp_path / "pytorch_model.bin"), str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "without an architecture; pass --arch (imagenet64-adm)" in err and err.count("\n") == 1
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    assert main(["convert", str(tmp_path / "x.png"), str(tmp_path / "o.safetensors")]) == 1
    assert "this is a PNG image" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "x.png"), str(tmp_path / "o.pt")]) == 1
    assert "must be a .safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()
