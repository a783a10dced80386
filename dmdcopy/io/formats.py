"""Recognise a checkpoint file's format from its bytes, never from its name."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

from torch.serialization import MAGIC_NUMBER

from dmdcopy.errors import CheckpointError

__all__ = ["EDM_PICKLE", "SAFETENSORS", "TORCH_LEGACY", "TORCH_ZIP", "check_torch_sizes", "detect_format"]

SAFETENSORS = "safetensors"
EDM_PICKLE = "pickle"  # a plain pickle: EDM's network snapshots
TORCH_ZIP = "torch-zip"  # torch.save (zip container, torch >= 1.6): DMD2's pytorch_model.bin
TORCH_LEGACY = "torch-legacy"  # torch.save(_use_new_zipfile_serialization=False)

# torch.save's legacy format starts with a pickled magic number (a 10-byte LONG1).
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + MAGIC_NUMBER.to_bytes(10, "little")

_EXPECTED = (
    "expected a dmdcopy .safetensors file, an EDM network pickle (.pkl) "
    "or a torch.save state dict (.bin/.pt/.pth)"
)

# Magic numbers of formats people hand in by mistake.
_OTHER_FORMATS = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x89HDF", "an HDF5 file"),
    (b"%PDF", "a PDF document"),
    (b"version https://git-lfs", "a Git LFS pointer (the real file was not downloaded)"),
)


def _describe_text(head: bytes) -> str:
    text = head.lstrip()
    if text[:1] in (b"{", b"["):
        try:
            json.loads(head)
            return "a JSON document"
        except ValueError:
            return "JSON-like text"
    if text.startswith(b"<"):
        return "an HTML/XML document (a download error page?)"
    return "a text file"


def _safetensors_header(path: Path, head: bytes, size: int) -> dict | None:
    """The parsed header if the file is a complete safetensors file; None if it is not one."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (n,) = struct.unpack("<Q", head[:8])
    if n > 100_000_000:
        return None
    if size < 8 + n:
        raise CheckpointError(
            f"{path}: truncated safetensors file: the header alone needs {8 + n} bytes, the file has {size}"
        )
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{path}: safetensors file with a corrupt JSON header ({e})") from e
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, TypeError, KeyError, IndexError, ValueError) as e:
        # valid JSON, but not a header of {name: {dtype, shape, data_offsets: [begin, end]}}
        raise CheckpointError(
            f"{path}: safetensors file with a corrupt header: an entry lacks data_offsets [begin, end] "
            f"({type(e).__name__}: {e})"
        ) from e
    if size < 8 + n + end:
        raise CheckpointError(
            f"{path}: truncated safetensors file: its header announces {8 + n + end} bytes, "
            f"the file has {size}"
        )
    return header


def detect_format(path: str | os.PathLike) -> str:
    """One of :data:`SAFETENSORS`, :data:`EDM_PICKLE`, :data:`TORCH_ZIP`, :data:`TORCH_LEGACY`.

    Raises :class:`~dmdcopy.errors.CheckpointError` saying what the file is instead (missing,
    empty, truncated, a PNG, JSON, ...) and what was expected.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; {_EXPECTED}")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; {_EXPECTED}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file; {_EXPECTED}")
    with open(path, "rb") as f:
        head = f.read(64)
    if _safetensors_header(path, head, size) is not None:
        return SAFETENSORS
    if head.startswith(_TORCH_LEGACY_MAGIC):
        return TORCH_LEGACY
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode, protocol 2..5
        return EDM_PICKLE
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile as e:
            raise CheckpointError(f"{path}: truncated or damaged zip archive ({e}); {_EXPECTED}") from e
        if any(name.endswith("data.pkl") for name in names):
            return TORCH_ZIP
        raise CheckpointError(
            f"{path}: a zip archive that is not a torch.save file (no data.pkl); {_EXPECTED}"
        )
    for magic, what in _OTHER_FORMATS:
        if head.startswith(magic):
            raise CheckpointError(f"{path}: this is {what}; {_EXPECTED}")
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        text = path.read_bytes() if size < 1_000_000 else head
        raise CheckpointError(f"{path}: this is {_describe_text(text)}; {_EXPECTED}")
    raise CheckpointError(f"{path}: unrecognised binary file (starts with {head[:8].hex()}); {_EXPECTED}")


# --- torch.save files: what they would allocate, checked before torch.load -----------------------


class _Inert:
    """Whatever a scanned pickle names or builds: accepts calls and items, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


# Bytes per element of the typed storages a legacy file names (``torch.FloatStorage``, ...).
_ITEMSIZE = {"Float": 4, "Double": 8, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2,
             "Char": 1, "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16}


class _StorageSizeScan(pickle.Unpickler):
    """Reads a legacy ``torch.save`` pickle without building anything, adding up the bytes of the
    storages it declares (``('storage', StorageClass, key, location, numel)``)."""

    nbytes = 0

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name.endswith("Storage"):
            return ("storage-type", _ITEMSIZE.get(name[: -len("Storage")], 16))  # unknown: the widest
        return _Inert

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            itemsize = pid[1][1] if isinstance(pid[1], tuple) and len(pid[1]) == 2 else 16
            numel = pid[4]
            if not isinstance(numel, int) or numel < 0:
                raise pickle.UnpicklingError(f"storage of {numel!r} elements")
            self.nbytes += numel * itemsize
        return _Inert()


def check_torch_sizes(path: str | os.PathLike) -> None:
    """Refuse a ``torch.save`` file that would allocate more than its own bytes back.

    - Zip archives: ``torch.save`` stores entries uncompressed, but ``torch.load`` inflates deflated
      ones, so a 200 KB archive could unpack to gigabytes.
    - Legacy files: ``torch.load`` allocates each storage at its declared size before reading its
      bytes, so a few KB could ask for gigabytes; the declarations are added up first.
    """
    fmt = detect_format(path)
    size = os.path.getsize(path)
    if fmt == TORCH_ZIP:
        try:
            with zipfile.ZipFile(path) as z:
                infos = z.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{path}: truncated or damaged zip archive ({e})") from e
        packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
        total = sum(i.file_size for i in infos)
        if packed or total > size:
            raise CheckpointError(
                f"{path}: a torch.save archive whose entries unpack to {total:,} bytes from {size:,}"
                + (f" (compressed entries {packed[:3]}; torch.save never compresses)" if packed else "")
                + "; refused before reading it: the file is corrupt or hostile")
    elif fmt == TORCH_LEGACY:
        with open(path, "rb") as f:
            try:
                for _ in range(3):  # magic number, protocol version, system info
                    _StorageSizeScan(f).load()
                scan = _StorageSizeScan(f)
                scan.load()
            except Exception as e:  # any failure of a hostile stream is one error
                raise CheckpointError(f"{path}: unreadable legacy torch.save file "
                                      f"({type(e).__name__}: {e})") from e
        if scan.nbytes > size:
            raise CheckpointError(
                f"{path}: a legacy torch.save file declaring {scan.nbytes:,} bytes of tensor storage "
                f"in {size:,} bytes; refused before reading it: the file is corrupt or hostile")
