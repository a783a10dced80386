"""Teacher pair stores: content, resumption after a kill, corrupt shards, settings checks, ranks."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _dist import in_gloo_group, tcp_rendezvous
from torch import nn

from dmdcopy.errors import CheckpointError, ConfigError, ShapeError
from dmdcopy.noise import labels_for_seeds, noise_for_seeds
from dmdcopy.pairs import PairStore, generate_pairs, teacher_fingerprint
from dmdcopy.samplers import euler, heun, teacher_ode
from dmdcopy.schedules import karras_sigmas
from dmdcopy.teachers import EmpiricalTeacher, GaussianMixtureTeacher, GaussianTeacher

GRID = karras_sigmas(6)


def _teacher() -> GaussianTeacher:
    return GaussianTeacher(torch.tensor([0.5, -1.0, 0.0]), torch.diag(torch.tensor([1.0, 2.0, 0.25])))


class CountingDenoiser(nn.Module):
    """A real denoiser that also counts the samples it is asked to denoise."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.sample_shape, self.label_dim = inner.sample_shape, inner.label_dim
        self.sigma_min, self.sigma_max = inner.sigma_min, inner.sigma_max
        self.rows = 0

    def forward(self, x, sigma, class_labels=None):
        self.rows += x.shape[0]
        return self.inner(x, sigma, class_labels)


class Kill(Exception):
    pass


def test_store_holds_the_teacher_map(tmp_path):
    T = _teacher()
    store = generate_pairs(T, range(10, 21), tmp_path, sigmas=GRID, batch=4, shard_size=5, store_noise=True)
    assert len(store) == 11 and store.num_shards == 3 and store.sample_shape == (3,)
    seeds, x, labels = store.load()
    assert seeds.tolist() == list(range(10, 21)) and labels is None
    z = noise_for_seeds(range(10, 21), (3,))
    torch.testing.assert_close(x, teacher_ode(T, z, GRID, heun), rtol=1e-6, atol=1e-6)
    assert torch.equal(store.load_noise(), z)
    # a subset, in the requested order
    seeds, x_sub, _ = store.load([20, 11])
    assert seeds.tolist() == [20, 11] and torch.equal(x_sub, x[[10, 1]])
    with pytest.raises(ConfigError, match="not in the store"):
        store.load([3])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["steps"] == 6 and manifest["solver"].endswith("heun")
    assert manifest["teacher"] == teacher_fingerprint(T)


def test_noise_regenerated_when_not_stored(tmp_path):
    store = generate_pairs(_teacher(), [7, 3, 5], tmp_path, sigmas=GRID)
    assert not store.has_noise
    assert torch.equal(store.load_noise([5, 7]), noise_for_seeds([5, 7], (3,)))
    z, x = store.regression_pairs([5, 7])  # the distiller's regression_pairs= form
    assert torch.equal(z, noise_for_seeds([5, 7], (3,))) and torch.equal(x, store.load([5, 7])[1])


def test_batch_size_does_not_change_pairs(tmp_path):
    a = generate_pairs(_teacher(), range(12), tmp_path / "a", sigmas=GRID, batch=12).load()[1]
    b = generate_pairs(_teacher(), range(12), tmp_path / "b", sigmas=GRID, batch=5).load()[1]
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_resume_after_kill_and_truncated_shard(tmp_path):
    seeds = range(40)
    reference = generate_pairs(_teacher(), seeds, tmp_path / "ref", sigmas=GRID, batch=5, shard_size=10)
    D = CountingDenoiser(_teacher())
    calls = []

    def progress(done, total):
        calls.append(done)
        if done >= 25:  # killed in the middle of the third shard
            raise Kill

    with pytest.raises(Kill):
        generate_pairs(D, seeds, tmp_path / "run", sigmas=GRID, batch=5, shard_size=10, progress=progress)
    store = PairStore(tmp_path / "run")
    assert store.missing_shards() == [2, 3]
    with pytest.raises(CheckpointError, match="incomplete"):
        store.load()
    rows_per_sample = D.rows // 25
    assert rows_per_sample * 25 == D.rows

    # A partially written shard (as a crash during a non-atomic copy would leave it)
    shard1 = store.shard_path(1)
    shard1.write_bytes(shard1.read_bytes()[:-7])
    assert store.missing_shards() == [1, 2, 3]
    inode0 = os.stat(store.shard_path(0)).st_ino

    D.rows = 0
    done = []
    store = generate_pairs(D, seeds, tmp_path / "run", sigmas=GRID, batch=5, shard_size=10,
                           progress=lambda d, t: done.append((d, t)))
    assert D.rows == rows_per_sample * 30  # shards 1, 2, 3 recomputed, shard 0 reused
    assert os.stat(store.shard_path(0)).st_ino == inode0
    assert done[0] == (10, 40) and done[-1] == (40, 40)
    assert store.missing_shards() == []
    assert torch.equal(store.load()[1], reference.load()[1])
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_corrupt_shards_are_detected(tmp_path):
    store = generate_pairs(_teacher(), range(6), tmp_path, sigmas=GRID, shard_size=3)
    path = store.shard_path(0)
    path.write_bytes(b"not a safetensors file")
    assert not store.shard_ok(0) and store.shard_ok(1)
    # A valid file holding another shard's pairs
    store.shard_path(1).rename(path)
    assert store.missing_shards() == [0, 1]
    generate_pairs(_teacher(), range(6), tmp_path, sigmas=GRID, shard_size=3)
    assert store.missing_shards() == []


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(sigmas=karras_sigmas(7)), "sigmas"),
        (dict(solver=euler), "solver"),
        (dict(seeds=range(9)), "seeds"),
        (dict(shard_size=4), "shard_size"),
        (dict(store_noise=True), "store_noise"),
        (dict(teacher=GaussianTeacher(torch.zeros(3), torch.eye(3))), "teacher"),
    ],
)
def test_cache_made_with_other_settings_is_refused(tmp_path, change, field):
    generate_pairs(_teacher(), range(8), tmp_path, sigmas=GRID, shard_size=3)
    kwargs = dict(sigmas=GRID, shard_size=3)
    teacher = change.pop("teacher", _teacher())
    seeds = change.pop("seeds", range(8))
    kwargs.update(change)
    with pytest.raises(ConfigError, match=f"other settings.*{field}"):
        generate_pairs(teacher, seeds, tmp_path, **kwargs)


def test_conditional_labels(tmp_path):
    M = GaussianMixtureTeacher(torch.randn(3, 2, generator=torch.Generator().manual_seed(0)),
                               torch.full((3,), 0.2), conditional=True)
    store = generate_pairs(M, range(9), tmp_path / "drawn", sigmas=GRID, shard_size=4)
    _, x, labels = store.load()
    assert torch.equal(labels, labels_for_seeds(range(9), 3))
    z = noise_for_seeds(range(9), (2,))
    torch.testing.assert_close(x, teacher_ode(M, z, GRID, class_labels=labels), rtol=1e-6, atol=1e-6)
    given = torch.tensor([2, 2, 1, 0, 0, 1, 2, 0, 1])
    store = generate_pairs(M, range(9), tmp_path / "given", sigmas=GRID, class_labels=given)
    assert torch.equal(store.load()[2], given)
    with pytest.raises(ConfigError, match="labels"):
        generate_pairs(M, range(9), tmp_path / "given", sigmas=GRID, class_labels=given.flip(0))
    with pytest.raises(ShapeError, match="class_labels"):
        generate_pairs(M, range(9), tmp_path / "bad", sigmas=GRID, class_labels=given[:4])


def test_a_store_written_with_the_old_class_count_name_is_read_and_reused(tmp_path):
    M = GaussianMixtureTeacher(torch.randn(3, 2, generator=torch.Generator().manual_seed(0)),
                               torch.full((3,), 0.2), conditional=True)
    generate_pairs(M, range(9), tmp_path, sigmas=GRID, shard_size=4)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["labels"]["num_classes"] = manifest["labels"].pop("label_dim")  # as older stores name it
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.safetensors")}
    store = generate_pairs(M, range(9), tmp_path, sigmas=GRID, shard_size=4)  # reused, not refused
    assert store.label_dim == 3
    assert torch.equal(store.load()[2], labels_for_seeds(range(9), 3))
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.safetensors")} == stamps


def test_store_serves_a_subset_of_its_seeds(tmp_path):
    D = CountingDenoiser(_teacher())
    reference = generate_pairs(D, range(20), tmp_path / "s", sigmas=GRID, batch=5, shard_size=5).load()[1]
    per_sample = D.rows // 20
    D.rows = 0
    subset = [17, 3, 4, 12]  # any order, shards 0, 2 and 3
    store = generate_pairs(D, subset, tmp_path / "s", sigmas=GRID, batch=5, shard_size=5)
    assert D.rows == 0 and len(store) == 20  # nothing recomputed; the store is the whole store
    assert torch.equal(store.load(subset)[1], reference[subset])
    # a missing shard that holds requested seeds is completed, the others are left alone
    store.shard_path(3).unlink()
    store.shard_path(1).unlink()
    done = []
    generate_pairs(D, subset, tmp_path / "s", sigmas=GRID, batch=5, shard_size=5,
                   progress=lambda d, t: done.append((d, t)))
    assert store.missing_shards() == [1] and done[-1] == (15, 15)
    assert D.rows == 5 * per_sample  # shard 3 only
    assert torch.equal(store.load(subset)[1], reference[subset])
    # seeds outside the store, or other settings, still fail with the settings diff
    with pytest.raises(ConfigError, match=r"other settings.*seeds"):
        generate_pairs(D, [3, 20], tmp_path / "s", sigmas=GRID, batch=5, shard_size=5)
    with pytest.raises(ConfigError, match=r"other settings.*solver"):
        generate_pairs(D, subset, tmp_path / "s", sigmas=GRID, shard_size=5, solver=euler)


def test_subset_with_given_class_labels(tmp_path):
    M = GaussianMixtureTeacher(torch.randn(3, 2, generator=torch.Generator().manual_seed(0)),
                               torch.full((3,), 0.2), conditional=True)
    drawn = generate_pairs(M, range(9), tmp_path / "drawn", sigmas=GRID, shard_size=4)
    labels = drawn.load()[2]
    sub = [8, 1, 5]
    # labels given for a subset of a labels_for_seeds store: equal to the stored ones, served
    store = generate_pairs(M, sub, tmp_path / "drawn", sigmas=GRID, shard_size=4, class_labels=labels[sub])
    assert torch.equal(store.load(sub)[2], labels[sub])
    wrong = labels[sub].clone()
    wrong[1] = (wrong[1] + 1) % 3
    with pytest.raises(ConfigError, match="differ from the stored labels for 1 of the 3"):
        generate_pairs(M, sub, tmp_path / "drawn", sigmas=GRID, shard_size=4, class_labels=wrong)
    # a store made with given labels serves subsets with the same labels
    given = torch.tensor([2, 2, 1, 0, 0, 1, 2, 0, 1])
    generate_pairs(M, range(9), tmp_path / "given", sigmas=GRID, shard_size=4, class_labels=given)
    store = generate_pairs(M, sub, tmp_path / "given", sigmas=GRID, shard_size=4, class_labels=given[sub])
    assert torch.equal(store.load(sub)[2], given[sub])
    with pytest.raises(ConfigError, match="differ from the stored labels"):
        generate_pairs(M, sub, tmp_path / "given", sigmas=GRID, shard_size=4,
                       class_labels=(given[sub] + 1) % 3)
    with pytest.raises(ConfigError, match=r"other settings.*labels"):  # drawn labels were not what it holds
        generate_pairs(M, sub, tmp_path / "given", sigmas=GRID, shard_size=4)
    store.shard_path(2).unlink()  # its labels exist nowhere else: cannot be completed from a subset
    with pytest.raises(ConfigError, match="shard 2 holding requested seeds is missing"):
        generate_pairs(M, sub, tmp_path / "given", sigmas=GRID, shard_size=4, class_labels=given[sub])


def test_input_errors(tmp_path):
    with pytest.raises(ConfigError, match="distinct"):
        generate_pairs(_teacher(), [1, 1], tmp_path, sigmas=GRID)
    with pytest.raises(ConfigError, match="ending in 0"):
        generate_pairs(_teacher(), [1, 2], tmp_path, sigmas=[80.0, 1.0])
    with pytest.raises(ConfigError, match="sample_shape"):
        generate_pairs(lambda x, s: x, [1, 2], tmp_path, sigmas=GRID, teacher_id="f")
    with pytest.raises(ConfigError, match="teacher_id"):
        generate_pairs(lambda x, s: x, [1, 2], tmp_path, sigmas=GRID, sample_shape=(2,))
    with pytest.raises(CheckpointError, match="not a pair store"):
        PairStore(tmp_path / "nothing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text('{"format": "dmdcopy.pairs/1"}')
    with pytest.raises(CheckpointError, match="incomplete manifest"):
        PairStore(tmp_path / "broken")
    (tmp_path / "broken" / "manifest.json").write_text('{"format": ')
    with pytest.raises(CheckpointError, match="corrupt manifest"):
        PairStore(tmp_path / "broken")
    store = generate_pairs(_teacher(), [1, 2], tmp_path / "ok", sigmas=GRID)
    store.check_teacher(_teacher())
    with pytest.raises(ConfigError, match="another teacher"):
        store.check_teacher(GaussianTeacher(torch.zeros(3), torch.eye(3)))


def test_fingerprint_sees_exact_teachers_data_and_scalar_buffers(tmp_path):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(10, 3, generator=g), torch.randn(10, 3, generator=g)
    # EmpiricalTeacher keeps its data in non-persistent buffers (not in the state dict)
    assert teacher_fingerprint(EmpiricalTeacher(a)) == teacher_fingerprint(EmpiricalTeacher(a.clone()))
    assert teacher_fingerprint(EmpiricalTeacher(a)) != teacher_fingerprint(EmpiricalTeacher(b))
    generate_pairs(EmpiricalTeacher(a), range(4), tmp_path, sigmas=GRID)
    with pytest.raises(ConfigError, match=r"other settings.*teacher"):
        generate_pairs(EmpiricalTeacher(b), range(4), tmp_path, sigmas=GRID)
    # a 0-dim entry in the state dict (BatchNorm's num_batches_tracked) is hashed, not a crash
    bn = nn.BatchNorm1d(3)
    before = teacher_fingerprint(bn)
    bn.num_batches_tracked += 1
    assert teacher_fingerprint(bn) != before
    # ordinary networks keep the fingerprint of the state dict alone
    assert teacher_fingerprint(_teacher()) == teacher_fingerprint(_teacher())


def _rank_worker(rank: int, out_dir: str) -> None:
    D = CountingDenoiser(_teacher())
    generate_pairs(D, range(30), out_dir, sigmas=GRID, batch=5, shard_size=5)
    torch.save(D.rows, os.path.join(out_dir, f"rows{rank}.pt"))


@pytest.mark.slow
def test_ranks_split_the_shards(tmp_path):
    args = (2, tcp_rendezvous(), _rank_worker, str(tmp_path / "dist"))
    # fork: no re-import, fast
    torch.multiprocessing.start_processes(in_gloo_group, args=args, nprocs=2, start_method="fork")
    rows = [torch.load(tmp_path / "dist" / f"rows{r}.pt") for r in range(2)]
    assert rows[0] == rows[1] > 0  # 3 shards each
    single = generate_pairs(_teacher(), range(30), tmp_path / "one", sigmas=GRID, batch=5, shard_size=5)
    assert torch.equal(PairStore(tmp_path / "dist").load()[1], single.load()[1])


# ---------------------------------------------------------------------------------------------
# Two writers on one directory


def _racer(rank: int, directory: str, barrier, results) -> None:
    torch.set_num_threads(1)
    teacher = GaussianTeacher(torch.full((3,), 5.0 * rank), torch.eye(3) * (1 + rank))  # two teachers
    barrier.wait()
    try:
        generate_pairs(teacher, range(48), directory, sigmas=GRID, batch=4, shard_size=4)
        results[rank] = "ok"
    except ConfigError as e:
        results[rank] = f"refused: {e}"


@pytest.mark.slow
def test_two_writers_with_different_teachers_never_mix_their_pairs(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    teachers = {teacher_fingerprint(GaussianTeacher(torch.full((3,), 5.0 * r), torch.eye(3) * (1 + r))): r
                for r in range(2)}
    wrong = 0
    for trial in range(20):
        directory = tmp_path / f"race{trial}"
        barrier, results = ctx.Barrier(2), ctx.Manager().dict()
        procs = [ctx.Process(target=_racer, args=(r, str(directory), barrier, results)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        outcome = dict(results)
        assert sorted(v.split(":")[0] for v in outcome.values()) == ["ok", "refused"], outcome
        store = PairStore(directory)
        winner = teachers[store.manifest["teacher"]]
        assert outcome[winner] == "ok"
        T = GaussianTeacher(torch.full((3,), 5.0 * winner), torch.eye(3) * (1 + winner))
        seeds, x, _ = store.load()
        expected = teacher_ode(T, noise_for_seeds(seeds.tolist(), (3,)), GRID, heun)
        wrong += int((~torch.isclose(x, expected, rtol=1e-5, atol=1e-5).all(dim=1)).sum())
    assert wrong == 0


def test_a_file_or_unwritable_place_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ConfigError, match="not a directory"):
        generate_pairs(_teacher(), range(4), tmp_path / "file", sigmas=GRID)
    with pytest.raises(ConfigError, match="cannot create"):
        generate_pairs(_teacher(), range(4), tmp_path / "file" / "below", sigmas=GRID)
