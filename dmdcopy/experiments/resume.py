"""Results files written point by point, and resumed.

An experiment builds its JSON document as its points finish and hands it to
:meth:`ResultsFile.write` after each one (``complete: false``); the last write holds the whole
document (``complete: true``). Each write replaces the file atomically (temp file + rename,
:func:`dmdcopy._atomic.write_atomic`), so a crash leaves the document as it was after the last
finished point: at most the point in progress is lost.

With ``resume=True`` an existing file is read back (:attr:`ResultsFile.previous`) and the
experiment skips the points it already holds, but only when it was written by the same experiment
with the same config; otherwise :class:`~dmdcopy.errors.ConfigError` names the fields that differ.
Every figure of a point is a deterministic function of the config and the seeds, so a resumed run
ends with the document an uninterrupted one writes (timing fields aside). Without ``resume``, a
file left by an interrupted run is refused rather than overwritten.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dmdcopy.errors import ConfigError

__all__ = ["ResultsFile", "config_diff", "refuse_interrupted", "seed_section", "seeds_document",
           "strip_timing"]

# Keys whose values are wall-clock measurements: they differ between two runs of the same config.
TIMING_KEYS = frozenset({"seconds", "timings", "time_s"})


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def config_diff(old: dict, new: dict) -> list[str]:
    """Dotted names of the fields that differ between two JSON configs (missing counts as differing)."""
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, ...) != b.get(k, ...))


def strip_timing(obj: Any) -> Any:
    """``obj`` without the :data:`TIMING_KEYS` entries, at every depth (to compare two runs)."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def refuse_interrupted(path: str | os.PathLike, doc: Any = None) -> None:
    """Raise :class:`ConfigError` when the results file at ``path`` (or its parsed ``doc``) holds
    an interrupted run, which a fresh run would overwrite; a missing, finished or unreadable file
    passes."""
    if doc is None:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return
    if isinstance(doc, dict) and doc.get("complete") is False:
        raise ConfigError(f"{path} holds an interrupted run's finished points; continue it with "
                          "--resume (resume=True), or remove the file to start over")


class ResultsFile:
    """The results file of one experiment run.

    Args:
        path: the JSON file; ``None`` writes nothing and resumes nothing.
        experiment: the document's ``experiment`` field (``"dimension_sweep"``, ...).
        config: the run's config as JSON (``config.to_dict()``).
        resume: read an existing file at ``path`` and offer its points (:attr:`previous`). Without
            it, a finished (``complete: true``) or unreadable file is replaced.

    Raises:
        ConfigError: when resuming from a file that is not JSON, belongs to another experiment or
            was written with another config (one line naming the differing fields); and, without
            ``resume``, when the file holds an interrupted run (its points would be lost).
    """

    def __init__(self, path: str | os.PathLike | None, experiment: str, config: dict, *,
                 resume: bool = False) -> None:
        from dmdcopy.experiments.report import to_jsonable

        self.path = Path(path) if path is not None else None
        self.experiment = experiment
        self.config = to_jsonable(config)
        self.previous: dict | None = None
        if self.path is None or not self.path.exists():
            return
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            if not resume:  # nothing readable to lose: the run replaces it
                return
            raise ConfigError(f"--resume: cannot read {self.path} ({e}); remove it or drop --resume"
                              ) from None
        if not resume:
            refuse_interrupted(self.path, doc)
            return
        if not isinstance(doc, dict) or doc.get("experiment") != experiment:
            raise ConfigError(f"--resume: {self.path} is not a {experiment} results file")
        diff = config_diff(doc.get("config") or {}, self.config)
        if diff:
            shown = ", ".join(diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
            raise ConfigError(f"--resume: {self.path} was written with a different config ({shown}); "
                              "use another --out or drop --resume")
        self.previous = doc

    def write(self, doc: dict, *, complete: bool) -> None:
        """Replace the file with ``doc`` (plus ``complete``), atomically."""
        if self.path is None:
            return
        from dmdcopy.experiments.report import write_json

        write_json(self.path, {**doc, "complete": complete})


def seeds_document(head: dict, sections: dict[int, dict], seeds: Sequence[int]) -> dict:
    """A multi-seed results document, the layout :func:`seed_section` reads: ``head`` with the
    first seed's section merged in, and the other seeds' finished sections under ``more_seeds``."""
    doc = dict(head)
    if seeds[0] in sections:
        doc.update(sections[seeds[0]])
    doc["more_seeds"] = {str(s): sections[s] for s in seeds[1:] if s in sections}
    return doc


def seed_section(doc: dict | None, seed: int, first: int) -> dict | None:
    """The part of a multi-seed results document that belongs to ``seed``: the document itself for
    the ``first`` seed, ``doc["more_seeds"][str(seed)]`` for the others (``None`` when absent)."""
    if not doc:
        return None
    return doc if seed == first else (doc.get("more_seeds") or {}).get(str(seed))
