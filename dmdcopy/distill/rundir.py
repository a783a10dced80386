"""A run directory belongs to one run: the writer's lock, the fresh-start check, temp-file cleanup.

``Distiller.train`` holds :func:`writer_lock` on ``out_dir`` for the whole run (rank 0), removes the
temp files interrupted writes left (:func:`remove_temp_files`) and, for a fresh run, refuses a
directory that holds another run (:func:`check_fresh`) unless asked to move that run aside
(:func:`move_aside`). Nothing here deletes a checkpoint or a log.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from dmdcopy.errors import ConfigError
from dmdcopy.io.run_checkpoint import list_checkpoints

__all__ = ["LOCK_NAME", "check_fresh", "move_aside", "remove_temp_files", "run_files", "writer_lock"]

LOCK_NAME = ".dmdcopy-writer.lock"
# What a run writes into its directory (moved aside together by ``overwrite``).
_RUN_FILES = ("log.jsonl", "tensorboard", "student.safetensors", "student_ema.safetensors",
              "teacher.safetensors")


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']}, host {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid and host unknown"


@contextlib.contextmanager
def writer_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on ``directory/.dmdcopy-writer.lock`` (which
    records this process's PID and host) for the ``with`` block, and remove the file at the end;
    a second writer gets a :class:`ConfigError` at once. The kernel drops the lock when its
    process dies, so a killed run's leftover file never blocks. A no-op where there is no
    ``fcntl`` (Windows); advisory, and perhaps not honoured on some network file systems."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"{directory}: another run ({_holder(path)}) is writing this directory; "
                              "wait for it to end or use another out_dir") from None
        try:  # the holder before us may have removed the file between our open and our lock
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        yield
    finally:
        # Remove the file while still holding the lock (a waiter then sees a new file), then
        # release; a killed run leaves the file, unlocked, and the next writer takes it over.
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def remove_temp_files(directory: Path) -> list[Path]:
    """Remove the hidden temp files interrupted writes leave (``.checkpoint-*.tmp``, write_atomic's
    ``.NAME.XXXX.tmp``, ``.tmp*``, ``.log.jsonl.tmp``); call it only while holding the lock."""
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.iterdir():
        if p.name.startswith(".") and ".tmp" in p.name and p.name != LOCK_NAME and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def run_files(directory: Path) -> list[Path]:
    """The files of a run in ``directory``: its checkpoints and what :data:`_RUN_FILES` names."""
    found = [p for _, p in list_checkpoints(directory)]
    return found + [directory / n for n in _RUN_FILES if (directory / n).exists()]


def check_fresh(directory: Path) -> None:
    """Refuse to start a fresh run in a directory that holds another run's checkpoints or log."""
    n = len(list_checkpoints(directory))
    has_log = (directory / "log.jsonl").exists()
    if n or has_log:
        held = ", ".join(([f"{n} checkpoint(s)"] if n else []) + (["log.jsonl"] if has_log else []))
        raise ConfigError(f"{directory} holds another run ({held}); resume it (train(resume='latest'), "
                          "`dmdcopy distill --resume`), use a new out_dir, or pass overwrite=True "
                          "(`--overwrite`) to move the old run into a timestamped subfolder")


def move_aside(directory: Path) -> Path | None:
    """Move the run in ``directory`` (see :func:`run_files`) into ``directory/previous-<UTC time>/``;
    return that folder (``None`` if there was nothing to move)."""
    files = run_files(directory)
    if not files:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest, i = directory / f"previous-{stamp}", 1
    while dest.exists():
        dest, i = directory / f"previous-{stamp}-{i}", i + 1
    dest.mkdir()
    for p in files:
        os.replace(p, dest / p.name)
    return dest
