"""Hostile sizes: a file of a few KB never drives the process to gigabytes.

Each file here declares far more than it holds: an architecture whose widths its tensors do not
have, EDM tensors rebuilt with stride 0 from one stored element, headers announcing more bytes
than the file has. Each is read in a fresh process whose address space is capped at 1 GiB above
what ``import dmdcopy.io`` uses: the reader must end with one ``CheckpointError`` (not a
``MemoryError`` or torch's allocation failure), and its peak resident memory may grow by at most
150 MB while reading.
"""

import collections
import io
import json
import pickle
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch
from _nets import small_song
from safetensors import safe_open
from safetensors.torch import save_file
from test_edm_pickle import edm_modules, write_edm_pickle  # noqa: F401 (a fixture)

from dmdcopy.errors import CheckpointError
from dmdcopy.io import load, save
from dmdcopy.nets import MLP
from dmdcopy.precond import EDMPrecond

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and RLIMIT_AS")

_GROWTH_LIMIT = 150 << 20

_READER = """
import json, resource, sys
import torch, dmdcopy.io
from dmdcopy.errors import CheckpointError

vm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize")) * 1024
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
soft = vm + (1 << 30)
resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
action, path = sys.argv[1], sys.argv[2]
try:
    if action == "load":
        dmdcopy.io.load(path)
    elif action == "state":
        dmdcopy.io.read_torch_state(path)
    else:
        dmdcopy.io.convert(path, path + ".out.safetensors")
    outcome = "loaded"
except CheckpointError as e:
    outcome = "CheckpointError: " + " ".join(str(e).split())
except BaseException as e:
    outcome = type(e).__name__ + ": " + " ".join(str(e).split())
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({"outcome": outcome, "grown": grown}))
"""


def _read_in_capped_process(path, action="load"):
    proc = subprocess.run(
        [sys.executable, "-c", _READER, action, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_refused(path, match, action="load"):
    result = _read_in_capped_process(path, action)
    assert result["outcome"].startswith("CheckpointError: "), result["outcome"][:500]
    assert match in result["outcome"], result["outcome"][:500]
    assert result["grown"] < _GROWTH_LIMIT, f"{result['grown']:,} bytes of peak memory growth"
    return result["outcome"]


def _respec(src, dst, edit):
    """A copy of the dmdcopy file ``src`` whose recorded architecture ``edit`` changed."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    spec = json.loads(meta["dmdcopy.architecture"])
    edit(spec)
    meta["dmdcopy.architecture"] = json.dumps(spec)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _mlp_file(tmp_path):
    path = tmp_path / "mlp.safetensors"
    save(EDMPrecond(MLP(2, hidden=8, depth=1)), path)
    return path


def test_a_recorded_width_the_tensors_lack_is_refused_before_building(tmp_path):
    def wide(spec):
        spec["children"]["model"]["kwargs"]["hidden"] = 12000

    path = _respec(_mlp_file(tmp_path), tmp_path / "wide.safetensors", wide)
    assert path.stat().st_size < 20_000
    outcome = _assert_refused(path, "does not fit the file's tensors, refused before building it")
    assert "model.map_emb.2.weight: [8, 8] in the file vs [12000, 12000]" in outcome
    # the same in this process: one CheckpointError, and the untouched file still loads
    with pytest.raises(CheckpointError, match="mismatched shapes"):
        load(path)
    assert isinstance(load(tmp_path / "mlp.safetensors"), EDMPrecond)


@pytest.mark.parametrize(
    "depth, match",
    [(10**7, "builds more than"), (1e7, "cannot build MLP"), (-5, "does not fit")],
    ids=["ten-million-blocks", "float-depth", "negative-depth"],
)
def test_a_recorded_depth_is_refused_before_building(tmp_path, depth, match):
    def deep(spec):
        spec["children"]["model"]["kwargs"]["depth"] = depth

    _assert_refused(_respec(_mlp_file(tmp_path), tmp_path / "deep.safetensors", deep), match)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("hidden", [-5, 0], ids=["negative", "zero"])
def test_a_recorded_width_that_cannot_be_built_is_a_checkpoint_error(tmp_path, hidden):
    def bad(spec):
        spec["children"]["model"]["kwargs"]["hidden"] = hidden

    with pytest.raises(CheckpointError):
        load(_respec(_mlp_file(tmp_path), tmp_path / "bad.safetensors", bad))


def test_recorded_unet_channels_the_tensors_lack_are_refused(tmp_path):
    path = tmp_path / "unet.safetensors"
    save(EDMPrecond(small_song()), path)

    def wide(spec):
        spec["children"]["model"]["kwargs"]["model_channels"] = 2048

    _assert_refused(_respec(path, tmp_path / "wide.safetensors", wide), "refused before building it")


def test_edm_pickle_recording_wider_unet_than_its_tensors_is_refused(tmp_path, edm_modules):  # noqa: F811
    net = EDMPrecond(small_song())
    net.model.init_kwargs = {**net.model.init_kwargs, "model_channels": 2048}
    write_edm_pickle(tmp_path / "wide.pkl", net, tmp_path / "executed")
    _assert_refused(tmp_path / "wide.pkl", "refused before building it", action="convert")
    assert not (tmp_path / "executed").exists()


# ----------------------------------------------------------------------------- EDM tensor geometry


class _Storage:
    """Pickles as ``torch.storage._load_from_bytes(<legacy torch.save stream>)``, as torch does."""

    def __init__(self, tensor):
        self.tensor = tensor

    def __reduce__(self):
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage is deprecated; EDM's files hold them
            torch.save(self.tensor.storage(), buf, _use_new_zipfile_serialization=False)
        return torch.storage._load_from_bytes, (buf.getvalue(),)


class _Tensor:
    """Pickles as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, {})``."""

    def __init__(self, storage, size, stride, offset=0):
        self.args = (storage, offset, size, stride)

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (*self.args, False, collections.OrderedDict())


def _write_pickle(path, tensors):
    data = pickle.dumps({"ema": tensors}, protocol=4)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "size, stride, offset, match",
    [
        ((12000, 12000), (0, 0), 0, "repeats storage elements"),
        ((12000, 12000), (1, 0), 0, "repeats storage elements"),
        ((4, 4), (1, 1), 0, "repeats storage elements"),  # overlapping rows
        ((3000, 3000), (3000, 1), 0, "reaches past its storage"),
        ((2,), (1,), 15, "reaches past its storage"),
    ],
    ids=["stride-0", "one-stride-0", "overlapping", "far-above-storage", "offset-past-end"],
)
def test_edm_tensors_that_would_copy_more_than_their_storage_are_refused(tmp_path, size, stride, offset,
                                                                         match):
    storage = _Storage(torch.arange(16.0))
    tensors = {f"w{i}": _Tensor(storage, size, stride, offset) for i in range(4)}
    path = _write_pickle(tmp_path / "h.pkl", tensors)
    assert path.stat().st_size < 1000
    outcome = _assert_refused(path, match, action="convert")
    assert "refused before allocating it" in outcome or "reaches past" in outcome


def test_edm_storage_referenced_over_and_over_is_refused(tmp_path):
    # 64 KB of storage, copied as a view 4000 times: 256 MB from a small file
    storage = _Storage(torch.arange(16384.0))
    views = {f"w{i}": _Tensor(storage, (16383,), (1,), 1) for i in range(4000)}
    path = _write_pickle(tmp_path / "many.pkl", views)
    assert path.stat().st_size < 400_000
    _assert_refused(path, "beyond twice the file's size", action="convert")


def test_legitimate_edm_views_still_read(tmp_path):
    from dmdcopy.io.edm_pickle import _unpickle

    base = torch.arange(24.0)
    storage = _Storage(base)
    tensors = {
        "whole": _Tensor(storage, (4, 6), (6, 1)),
        "transposed": _Tensor(storage, (6, 4), (1, 6)),
        "strided": _Tensor(storage, (2, 3), (1, 4), 5),
        "broadcast-size-1": _Tensor(storage, (1, 5), (0, 1), 2),
    }
    got = _unpickle(_write_pickle(tmp_path / "ok.pkl", tensors))["ema"]
    assert torch.equal(got["whole"], base.view(4, 6))
    assert torch.equal(got["transposed"], base.view(4, 6).t())
    assert torch.equal(got["strided"], base.as_strided((2, 3), (1, 4), 5))
    assert torch.equal(got["broadcast-size-1"], base[2:7].view(1, 5))


# ----------------------------------------------------------------------------- declared byte sizes


def test_safetensors_header_announcing_more_than_the_file_is_refused(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 4]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "big.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(4))
    _assert_refused(path, "safetensors")


def _zip_bomb(tmp_path):
    """An 8 MB ``torch.save`` archive re-packed with deflate: ``(plain, bomb)``."""
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2_000_000)}, plain)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    return plain, bomb


def test_compressed_torch_zip_is_refused_before_inflating(tmp_path):
    plain, bomb = _zip_bomb(tmp_path)
    assert bomb.stat().st_size < plain.stat().st_size // 50
    with pytest.raises(CheckpointError, match=r"unpack to .* torch.save never compresses"):
        load(bomb, into=torch.nn.Linear(1, 1))
    from dmdcopy.io import convert

    with pytest.raises(CheckpointError, match="refused before reading it"):
        convert(bomb, tmp_path / "out.safetensors", architecture=torch.nn.Linear(1, 1))
    # an ordinary torch.save archive passes the check and reads as before
    with pytest.raises(CheckpointError, match="does not fit Linear"):
        load(plain, into=torch.nn.Linear(1, 1))


@pytest.mark.parametrize("numel", [10**9, 2**40])
def test_legacy_torch_file_declaring_huge_storages_is_refused_before_allocating(tmp_path, numel):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(7)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    assert data.count(b"K\x07N") == 1  # the storage's element count (BININT1 7) before its NONE
    path.write_bytes(data.replace(b"K\x07N", pickle.dumps(numel, protocol=2)[2:-1] + b"N"))
    outcome = _assert_refused(path, "legacy torch.save file declaring", action="state")
    assert f"{numel * 4:,} bytes of tensor storage" in outcome
    # the unedited file still reads
    ok = tmp_path / "ok.pt"
    torch.save({"w": torch.arange(7.0)}, ok, _use_new_zipfile_serialization=False)
    from dmdcopy.io import read_torch_state

    assert torch.equal(read_torch_state(ok)["w"], torch.arange(7.0))


def test_compressed_torch_zip_is_refused_by_the_plain_state_reader(tmp_path):
    _, bomb = _zip_bomb(tmp_path)
    _assert_refused(bomb, "torch.save never compresses", action="state")
