"""The teacher's pairs ``(seed, z, T(z))`` on disk: generated once, resumable, checked on reuse.

A pair store is a directory::

    manifest.json             the settings: seeds, sample shape, solver, sigma grid, teacher
                              fingerprint, labels, shard size (compared on every reuse)
    shard-00000.safetensors   seeds (n,) int64, x (n, ...) teacher samples, labels (n,) int64
    shard-00001.safetensors   when conditional, noise (n, ...) when store_noise=True
    ...

Seeds are cut, in the given order, into shards of ``shard_size``. Each shard is written
atomically (temporary file, then ``os.replace``) and carries the hash of the settings, so after a
kill :func:`generate_pairs` recomputes only the shards that are missing or fail to read back
(truncated, wrong seeds, wrong shape, non-finite). Under ``torchrun`` (``torch.distributed``
initialised) rank ``r`` of ``W`` computes shards ``r, r + W, ...``. Noise comes from
:func:`dmdcopy.noise.noise_for_seeds`, so a pair does not depend on the batch, device or rank.

The same store feeds Delta E (:mod:`dmdcopy.metrics`) and the distiller's regression loss.

(About 540 lines: the store's format, its reader and its resumable, locked writer are one file
format and change together.)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dmdcopy import contracts
from dmdcopy._atomic import locked, write_atomic
from dmdcopy.contracts import default_grid, dist_rank_world
from dmdcopy.errors import CheckpointError, ConfigError, ShapeError
from dmdcopy.noise import labels_for_seeds, noise_for_seeds, split_seeds
from dmdcopy.samplers import heun, teacher_ode

__all__ = ["PairStore", "default_sigmas", "generate_pairs", "teacher_fingerprint"]

FORMAT = "dmdcopy.pairs/1"
MANIFEST = "manifest.json"
LOCK = ".lock"  # the writers' advisory lock (dmdcopy._atomic.locked)
# Settings recorded for information only: they do not change a pair, so they may differ on reuse.
_INFO_KEY = "info"


def _hash_tensor(h, key: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{key}:{t.dtype}:{tuple(t.shape)}\n".encode())
    # reshape(-1): a 0-dim tensor (e.g. BatchNorm's num_batches_tracked) cannot be viewed as bytes
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def teacher_fingerprint(D: nn.Module) -> str:
    """SHA-256 of a module's class, ``repr`` (architecture and settings), every tensor of its
    state dict in key order, and its non-persistent buffers (an exact teacher such as
    :class:`~dmdcopy.teachers.EmpiricalTeacher` keeps its data there). Device-independent; any
    change to a weight or to such data changes it."""
    if not isinstance(D, nn.Module):
        raise ConfigError(f"teacher_fingerprint: expected an nn.Module, got {type(D).__name__}; "
                          "pass teacher_id= to identify a plain callable")
    h = hashlib.sha256()
    h.update(f"{type(D).__module__}.{type(D).__qualname__}\n{D!r}\n".encode())
    state = D.state_dict()
    for key, t in sorted(state.items()):
        _hash_tensor(h, key, t)
    extra = sorted(((k, b) for k, b in D.named_buffers() if k not in state), key=lambda kb: kb[0])
    if extra:  # only then, so the fingerprints of ordinary networks are unchanged
        h.update(b"non-persistent buffers\n")
        for key, t in extra:
            _hash_tensor(h, key, t)
    return h.hexdigest()


def default_sigmas(D: Any) -> torch.Tensor:
    """The grid :func:`dmdcopy.samplers.teacher_ode` uses by default
    (:func:`dmdcopy.contracts.default_grid`: Karras-18 in EDM's range clamped to ``D``'s); float64
    ``(19,)``."""
    return default_grid(D)


def _solver_name(solver: Callable) -> str:
    name = getattr(solver, "__qualname__", None) or getattr(solver, "__name__", None)
    if name is None:  # e.g. functools.partial: its repr names the function and bound arguments
        return repr(solver)
    return f"{getattr(solver, '__module__', '?')}.{name}"


def _seed_runs(seeds: Sequence[int]) -> list[list[int]]:
    """``[0, 1, 2, 7]`` -> ``[[0, 2], [7, 7]]``: the seed list, compactly and exactly."""
    runs: list[list[int]] = []
    for s in seeds:
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return runs


def _from_runs(runs: Iterable[Sequence[int]]) -> list[int]:
    return [s for lo, hi in runs for s in range(lo, hi + 1)]


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _current_names(manifest: dict) -> dict:
    """``manifest`` with the field names of today's stores (stores written before the class count
    was called ``label_dim`` name it ``num_classes``)."""
    labels = manifest.get("labels") if isinstance(manifest, dict) else None
    if isinstance(labels, dict) and "num_classes" in labels and "label_dim" not in labels:
        labels = dict(labels)
        labels["label_dim"] = labels.pop("num_classes")
        manifest = {**manifest, "labels": labels}
    return manifest


def _settings_sha(manifest: dict) -> str:
    core = {k: v for k, v in manifest.items() if k != _INFO_KEY}
    return _sha(json.dumps(core, sort_keys=True))


def _barrier() -> None:
    if dist_rank_world()[1] > 1:
        torch.distributed.barrier()


def _check_still_ours(out: Path, own_sha: str) -> None:
    """Raise unless the manifest on disk still has the settings (hash) this writer computes for."""
    try:
        on_disk = _settings_sha(_current_names(json.loads((out / MANIFEST).read_text())))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{out}: the pair store's manifest vanished or broke while this writer "
                              f"ran ({type(e).__name__}); nothing more was written") from e
    if on_disk != own_sha:
        raise ConfigError(f"{out}: another writer replaced this pair store's settings while this one "
                          "ran; nothing more was written (use one directory per teacher and settings)")


def _diff(old: dict, new: dict) -> list[str]:
    keys = sorted((set(old) | set(new)) - {_INFO_KEY})
    out = []
    for k in keys:
        if old.get(k) != new.get(k):
            a, b = json.dumps(old.get(k))[:60], json.dumps(new.get(k))[:60]
            out.append(f"{k}: cached {a}, requested {b}")
    return out


def _stored_labels(store: PairStore) -> Callable[[int], torch.Tensor] | None:
    """The class labels of shard ``k`` as the store's manifest defines them (None: unconditional)."""
    info = store.manifest["labels"]
    if info["kind"] == "none":
        return None
    if info["kind"] == "labels_for_seeds":
        return lambda k: labels_for_seeds(store.shard_seeds(k), int(info["label_dim"]))

    def read(k: int) -> torch.Tensor:  # labels given by the caller: only the shard itself has them
        return store._read_shard(k)["labels"]

    return read


def _subset_shards(
    store: PairStore, manifest: dict, seeds: list[int], given_labels: torch.Tensor | None
) -> list[int] | None:
    """The shards of ``store`` that hold ``seeds`` when the request differs from the store only in
    asking for a subset of its seeds (and, with ``given_labels``, in how the labels were made);
    ``None`` when the request is not such a subset (the caller reports the settings that differ).
    Given labels must equal the stored labels of those seeds."""
    old = store.manifest
    others = (set(old) | set(manifest)) - {_INFO_KEY, "seeds", "labels"}
    if any(old.get(k) != manifest.get(k) for k in others):
        return None
    index = {s: i for i, s in enumerate(store.seeds)}
    if any(s not in index for s in seeds):
        return None
    shards = sorted({index[s] // store.shard_size for s in seeds})
    if given_labels is None:
        return shards if old["labels"] == manifest["labels"] else None
    label_dim = int(old["labels"]["label_dim"])
    if label_dim < 1 or int(given_labels.max()) >= label_dim or int(given_labels.min()) < 0:
        return None
    if old["labels"]["kind"] == "given":
        missing = [k for k in shards if not store.shard_ok(k)]
        if missing:
            raise ConfigError(f"{store.directory}: shard {missing[0]} holding requested seeds is missing and "
                              "the store's class labels were given when it was made; complete it with "
                              "generate_pairs on the store's own seeds and class_labels")
        stored = store.load(seeds)[2]
    else:
        stored = labels_for_seeds(seeds, label_dim)
    differ = torch.nonzero(stored.cpu() != given_labels.cpu()).flatten()
    if differ.numel():
        i = int(differ[0])
        raise ConfigError(f"{store.directory}: class_labels differ from the stored labels for "
                          f"{differ.numel()} of the {len(seeds)} requested seeds (seed {seeds[i]}: stored "
                          f"{int(stored[i])}, given {int(given_labels[i])})")
    return shards


class PairStore:
    """Read a pair store written by :func:`generate_pairs`.

    Attributes: ``manifest`` (dict), ``seeds`` (list of int, in store order), ``sample_shape``,
    ``label_dim`` (0 = unconditional), ``has_noise``, ``num_shards``.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise CheckpointError(f"{self.directory}: not a pair store (no {MANIFEST}); "
                                  "create it with dmdcopy.pairs.generate_pairs")
        try:
            self.manifest = _current_names(json.loads(path.read_text()))
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt manifest: {e}") from e
        if self.manifest.get("format") != FORMAT:
            raise CheckpointError(f"{path}: unknown pair-store format {self.manifest.get('format')!r}, "
                                  f"expected {FORMAT!r}")
        try:
            self.seeds = _from_runs(self.manifest["seeds"])
            self.sample_shape = tuple(self.manifest["sample_shape"])
            self.label_dim = int(self.manifest["labels"]["label_dim"])
            self.has_noise = bool(self.manifest["store_noise"])
            self.shard_size = int(self.manifest["shard_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: incomplete manifest ({type(e).__name__}: {e})") from e
        self.num_shards = -(-len(self.seeds) // self.shard_size)
        self.settings_sha = _settings_sha(self.manifest)

    def __len__(self) -> int:
        return len(self.seeds)

    def __repr__(self) -> str:
        return (f"PairStore({str(self.directory)!r}, n={len(self)}, sample_shape={self.sample_shape}, "
                f"solver={self.manifest['solver']}, steps={self.manifest['steps']})")

    def shard_path(self, k: int) -> Path:
        return self.directory / f"shard-{k:05d}.safetensors"

    def shard_seeds(self, k: int) -> list[int]:
        return self.seeds[k * self.shard_size : (k + 1) * self.shard_size]

    def _read_shard(self, k: int) -> dict[str, torch.Tensor]:
        """The tensors of shard ``k``, fully checked; ``CheckpointError`` says what is wrong."""
        path = self.shard_path(k)
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as e:  # safetensors raises several types on truncated files
            raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
        if meta.get("settings") != self.settings_sha or meta.get("shard") != str(k):
            raise CheckpointError(f"{path}: written for other settings or another shard")
        seeds = self.shard_seeds(k)
        n = len(seeds)
        expected = {"seeds": (n,), "x": (n, *self.sample_shape)}
        if self.label_dim:
            expected["labels"] = (n,)
        if self.has_noise:
            expected["noise"] = (n, *self.sample_shape)
        if set(tensors) != set(expected):
            raise CheckpointError(f"{path}: holds {sorted(tensors)}, expected {sorted(expected)}")
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != shape:
                raise CheckpointError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, "
                                      f"expected {shape}")
        if tensors["seeds"].tolist() != seeds:
            raise CheckpointError(f"{path}: holds other seeds than shard {k} should")
        if not bool(torch.isfinite(tensors["x"]).all()):
            raise CheckpointError(f"{path}: teacher samples contain NaN or inf")
        return tensors

    def shard_ok(self, k: int) -> bool:
        """Whether shard ``k`` exists and reads back complete and consistent."""
        try:
            self._read_shard(k)
        except CheckpointError:
            return False
        return True

    def missing_shards(self) -> list[int]:
        """Shards still to compute (missing or failing :meth:`shard_ok`)."""
        return [k for k in range(self.num_shards) if not self.shard_ok(k)]

    def _select(self, seeds: Iterable[int] | torch.Tensor | None) -> tuple[list[int], list[int]]:
        """Store positions of ``seeds`` (all when None), and the shards they live in."""
        if seeds is None:
            pos = list(range(len(self.seeds)))
        else:
            seeds = seeds.tolist() if isinstance(seeds, torch.Tensor) else [int(s) for s in seeds]
            index = {s: i for i, s in enumerate(self.seeds)}
            absent = [s for s in seeds if s not in index]
            if absent:
                raise ConfigError(f"{self.directory}: {len(absent)} requested seeds are not in the store "
                                  f"(first {absent[0]}); the store holds {len(self.seeds)} seeds")
            pos = [index[s] for s in seeds]
        return pos, sorted({p // self.shard_size for p in pos})

    def _gather(self, keys: Sequence[str], seeds, device) -> tuple[list[int], dict[str, torch.Tensor]]:
        """Store positions of ``seeds`` and ``{key: (N, ...)}`` rows, each shard read once."""
        pos, shards = self._select(seeds)
        if not pos:
            raise ConfigError(f"{self.directory}: no seeds requested")
        parts = {}
        for k in shards:
            try:
                parts[k] = self._read_shard(k)
            except CheckpointError as e:
                raise CheckpointError(f"{e}; the store is incomplete, finish it with generate_pairs") from e
        # position in the concatenation of the read shards (in shard order)
        offset = {k: j * self.shard_size for j, k in enumerate(shards)}
        index = torch.tensor([offset[p // self.shard_size] + p % self.shard_size for p in pos])
        out = {key: torch.cat([parts[k][key] for k in shards])[index].to(device) for key in keys}
        return pos, out

    def load(
        self, seeds: Iterable[int] | torch.Tensor | None = None, *, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The stored pairs for ``seeds`` (all, in store order, when None).

        Returns: ``(seeds (N,) int64, x (N, *sample_shape), labels (N,) int64 or None)``.
        """
        keys = ["x", "labels"] if self.label_dim else ["x"]
        pos, got = self._gather(keys, seeds, device)
        seed_t = torch.tensor([self.seeds[p] for p in pos], dtype=torch.int64, device=device)
        return seed_t, got["x"], got.get("labels")

    def load_noise(
        self, seeds: Iterable[int] | torch.Tensor | None = None, *, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """``(N, *sample_shape)`` noise of ``seeds``: stored, or regenerated bit-exactly from the seeds."""
        if self.has_noise:
            return self._gather(["noise"], seeds, device)[1]["noise"]
        pos, _ = self._select(seeds)
        return noise_for_seeds([self.seeds[p] for p in pos], self.sample_shape, device=device)

    def regression_pairs(
        self, seeds: Iterable[int] | torch.Tensor | None = None, *, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, ...]:
        """``(z, x)`` or, for a conditional store, ``(z, x, labels)``: the form the distiller's
        ``regression_pairs=`` takes."""
        _, x, labels = self.load(seeds, device=device)
        z = self.load_noise(seeds, device=device).to(x.dtype)
        return (z, x) if labels is None else (z, x, labels)

    def check_teacher(self, D: nn.Module) -> None:
        """Raise :class:`ConfigError` unless the store was made by a teacher with these weights."""
        found = teacher_fingerprint(D)
        if found != self.manifest["teacher"]:
            raise ConfigError(f"{self.directory}: the pairs were made by another teacher "
                              f"(fingerprint {self.manifest['teacher'][:12]}, this one {found[:12]})")


def generate_pairs(
    D: Callable[..., torch.Tensor],
    seeds: Iterable[int] | torch.Tensor,
    out_dir: str | os.PathLike,
    *,
    sample_shape: Sequence[int] | None = None,
    sigmas: torch.Tensor | Sequence[float] | None = None,
    solver: Callable[..., torch.Tensor] = heun,
    batch: int = 256,
    shard_size: int = 4096,
    class_labels: torch.Tensor | None = None,
    label_dim: int | None = None,
    store_noise: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    teacher_id: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PairStore:
    """Compute the teacher's pairs ``T(z_seed)`` for ``seeds`` into ``out_dir``; resume if started.

    Args:
        D: the teacher denoiser ``D(x, sigma, class_labels=None)``.
        seeds: ``N`` distinct non-negative seeds; noise of seed ``i`` is ``noise_for_seeds([i])``.
        out_dir: the store directory (created). A store there made with the same settings is
            completed, reusing every shard that reads back correctly. A store holding more seeds
            than requested (``seeds`` a subset of its seeds, in any order, all else equal) serves
            them: only the shards holding them are completed if missing, and given
            ``class_labels`` must equal its labels for those seeds. Any other difference (seeds
            outside the store, shape, solver, grid, teacher weights, labels, shard size, noise
            storage) is a :class:`ConfigError` listing the differences.
        sample_shape: per-sample shape; default ``D.sample_shape``.
        sigmas: ``(steps + 1,)`` grid ending in 0; default :func:`default_sigmas` (that of
            :func:`dmdcopy.samplers.teacher_ode`). Recorded exactly in the manifest.
        solver: a sampler of :mod:`dmdcopy.samplers` (recorded by its qualified name).
        batch: samples per teacher call; does not change the result.
        shard_size: seeds per shard file (the unit of resumption).
        class_labels: ``(N,)`` int labels for the seeds, or ``None`` to draw them with
            :func:`dmdcopy.noise.labels_for_seeds` when the teacher is conditional.
        label_dim: classes for drawn labels; default ``D.label_dim`` (0 = unconditional).
        store_noise: also store ``z`` (it can always be regenerated from the seed).
        device: where ``D`` runs (``D`` must already be there); default CPU.
        dtype: dtype of ``z`` fed to the solver and of the stored samples.
        teacher_id: identifies the teacher in the manifest; default :func:`teacher_fingerprint`
            (required when ``D`` is not an ``nn.Module``).
        progress: called as ``progress(done, total)`` with this rank's pair counts after
            every batch and every reused shard (the CLI passes a tqdm update).

    Returns: a :class:`PairStore` on the directory (after every rank has finished); it may hold
    more seeds than requested, so read them with ``store.load(seeds)``.

    Runs under ``torch.no_grad()``: pairs are data, never differentiated.
    """
    seed_list = seeds.tolist() if isinstance(seeds, torch.Tensor) else [int(s) for s in seeds]
    if not seed_list:
        raise ConfigError("generate_pairs: no seeds")
    if len(set(seed_list)) != len(seed_list) or min(seed_list) < 0:
        raise ConfigError("generate_pairs: seeds must be distinct non-negative integers")
    if sample_shape is None:
        sample_shape = contracts.sample_shape(D)
        if sample_shape is None:
            raise ConfigError("generate_pairs: pass sample_shape= (the teacher has no sample_shape)")
    sample_shape = tuple(int(s) for s in sample_shape)
    for name, v in (("batch", batch), ("shard_size", shard_size)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"generate_pairs: {name} must be a positive int, got {v!r}")
    grid = default_sigmas(D) if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float64)
    if grid.ndim != 1 or grid.numel() < 2 or float(grid[-1]) != 0.0:
        raise ConfigError(f"generate_pairs: sigmas must be a 1-D grid ending in 0, got {grid.tolist()}")

    n = len(seed_list)
    if label_dim is None:
        label_dim = contracts.label_dim(D)
    if class_labels is not None:
        labels_all = torch.as_tensor(class_labels).cpu()
        if labels_all.shape != (n,) or labels_all.is_floating_point():
            raise ShapeError(f"generate_pairs: class_labels must be ({n},) integers, one per seed, "
                             f"got {tuple(labels_all.shape)} {labels_all.dtype}")
        labels_all = labels_all.long()
        if label_dim < 1:
            label_dim = int(labels_all.max()) + 1
        label_info = {"kind": "given", "label_dim": label_dim,
                      "sha": _sha(labels_all.numpy().tobytes())}
    elif label_dim:
        labels_all = labels_for_seeds(seed_list, label_dim)
        label_info = {"kind": "labels_for_seeds", "label_dim": label_dim}
    else:
        labels_all = None
        label_info = {"kind": "none", "label_dim": 0}

    if teacher_id is None:
        teacher_id = teacher_fingerprint(D)
    manifest = {
        "format": FORMAT,
        "seeds": _seed_runs(seed_list),
        "sample_shape": list(sample_shape),
        "dtype": str(dtype).removeprefix("torch."),
        "solver": _solver_name(solver),
        "steps": grid.numel() - 1,
        "sigmas": [float(s) for s in grid],
        "teacher": teacher_id,
        "labels": label_info,
        "store_noise": bool(store_noise),
        "shard_size": shard_size,
        _INFO_KEY: {"device": str(torch.device(device) if device is not None else "cpu")},
    }

    out = Path(out_dir)
    path = out / MANIFEST
    rank, world = dist_rank_world()
    needed: list[int] | None = None  # shards a subset request needs (None: every shard)
    # Two writers may start on one directory at once: the check-or-create of the manifest, and
    # every shard write below, hold the directory's lock, and each shard is written only while the
    # manifest on disk still carries this writer's settings.
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a directory; give the pair store a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{out}: cannot create the pair store directory ({e.strerror or e})") from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"{out}: the pair store directory is not writable")
    with locked(out / LOCK):
        if path.is_file():
            old_store = PairStore(out)
            diffs = _diff(old_store.manifest, manifest)
            if diffs:
                needed = _subset_shards(old_store, manifest, seed_list,
                                        labels_all if class_labels is not None else None)
                if needed is None:
                    raise ConfigError(f"{out}: this pair cache was made with other settings ("
                                      + "; ".join(diffs) + "); use another directory or delete this one")
        elif rank == 0:
            write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
    _barrier()

    store = PairStore(out)
    own_sha = store.settings_sha  # the settings this writer's shards are made with
    if needed is None:
        needed = list(range(store.num_shards))
        shard_labels = None if labels_all is None else (
            lambda k: labels_all[k * shard_size : k * shard_size + len(store.shard_seeds(k))])
    else:
        shard_labels = _stored_labels(store)
    mine = split_seeds(needed, rank, world)  # this rank's shards, a strided share
    total = sum(len(store.shard_seeds(k)) for k in mine)
    done = 0
    with torch.no_grad():
        for k in mine:
            shard = store.shard_seeds(k)
            if store.shard_ok(k):
                done += len(shard)
                if progress is not None:
                    progress(done, total)
                continue
            labels_k = shard_labels(k) if shard_labels is not None else None
            xs, zs = [], []
            for b in range(0, len(shard), batch):
                chunk = shard[b : b + batch]
                z = noise_for_seeds(chunk, sample_shape, device=device, dtype=dtype)
                y = None
                if labels_k is not None:
                    y = labels_k[b : b + len(chunk)].to(device)
                x = teacher_ode(D, z, grid, solver, class_labels=y)
                xs.append(x.to(device="cpu", dtype=dtype))
                if store_noise:
                    zs.append(z.cpu())
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            tensors = {"seeds": torch.tensor(shard, dtype=torch.int64), "x": torch.cat(xs).contiguous()}
            if not bool(torch.isfinite(tensors["x"]).all()):
                raise ConfigError(f"generate_pairs: the teacher produced NaN or inf for shard {k} "
                                  f"(seeds {shard[0]}..{shard[-1]}); nothing was written for it")
            if labels_k is not None:
                tensors["labels"] = labels_k.clone()
            if store_noise:
                tensors["noise"] = torch.cat(zs).contiguous()
            meta = {"settings": own_sha, "shard": str(k)}
            with locked(out / LOCK):
                _check_still_ours(out, own_sha)
                write_atomic(store.shard_path(k),
                             lambda tmp, t=tensors, m=meta: save_file(t, tmp, metadata=m))
    _barrier()
    return store
