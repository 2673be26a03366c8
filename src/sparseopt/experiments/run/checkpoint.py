"""Checkpoints that survive being killed mid-write, and refuse clearly when they cannot be read.

Every file goes to a temporary name in the same directory, is fsynced, then renamed over the target with
`os.replace`, which is atomic: a crash or Ctrl-C at any moment leaves either the previous file or the complete new
one, never a truncated checkpoint under the real name.

Checkpoints are read with `torch.load(..., weights_only=True)`, which cannot execute code from the file. The state
must therefore hold only tensors, numbers, strings, bytes, None, dtypes/devices and dicts/lists/tuples/sets of
those -- model/optimizer `state_dict()`s and generator states (`ByteTensor`s, `random.getstate()` tuples) qualify;
numpy arrays and arbitrary objects do not (convert them to tensors or lists). `save_checkpoint` checks this up front,
so a bad state fails when saved rather than when a run tries to resume from it.
"""

from __future__ import annotations

import collections
import math
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, Literal

import torch

from sparseopt.experiments.errors import UserError

FORMAT = "sparseopt-checkpoint"
VERSION = 1

_CHECKPOINT = re.compile(r"ckpt-(\d+)\.pt")
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")
_LEAF_TYPES = (int, float, complex, bool, str, bytes, type(None), torch.dtype, torch.device)
_CONTAINER_TYPES = (list, tuple, set, torch.Size)


@contextmanager
def atomic_write(path: str | os.PathLike[str], binary: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing; on success fsync it and rename it over `path`.

    On any exception (including KeyboardInterrupt) the temporary file is removed and `path` is untouched.
    Text mode is UTF-8 without newline translation.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") if binary else open(tmp, "x", encoding="utf-8", newline="") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with suppress(OSError):  # make the rename itself durable; not supported on every platform
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str], *, meta: dict[str, Any] | None = None) -> None:
    """Atomically write `state` (plus small `meta` facts such as step and metric) under a format/version header."""
    _check_weights_only(state, "state")
    _check_weights_only(meta, "meta")
    payload = {"format": FORMAT, "version": VERSION, "meta": dict(meta or {}), "state": state}
    with atomic_write(path, binary=True) as f:
        torch.save(payload, f)


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Return the `state` given to `save_checkpoint`; any unreadable file becomes a `UserError` saying what to do."""
    return _load_payload(Path(path), map_location)["state"]


class CheckpointManager:
    """Numbered checkpoints `ckpt-{step:08d}.pt` in one folder, the last `keep_last` kept, plus `best.pt`.

    `best.pt` is a full checkpoint of the state with the best metric so far ("max" or "min" per `metric_mode`);
    its metric is stored inside it, so a resumed run keeps comparing against the true best.
    """

    def __init__(self, directory: str | os.PathLike[str], keep_last: int = 2, keep_best: bool = True,
                 metric_mode: Literal["max", "min"] = "max") -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if metric_mode not in ("max", "min"):
            raise ValueError(f"metric_mode must be 'max' or 'min', got {metric_mode!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.metric_mode = metric_mode
        for leftover in self.directory.iterdir():  # temporaries of writes that were killed; never valid
            if _TEMPORARY.fullmatch(leftover.name):
                leftover.unlink(missing_ok=True)
        self.best_metric: float | None = None
        if keep_best and self.best_path.is_file():
            self.best_metric = _load_payload(self.best_path, "cpu")["meta"].get("metric")

    @property
    def best_path(self) -> Path:
        return self.directory / "best.pt"

    def save(self, state: dict[str, Any], step: int, metric: float | None = None) -> Path:
        """Write the checkpoint for `step`, refresh `best.pt` if `metric` improved, prune old checkpoints."""
        metric = None if metric is None else float(metric)
        meta = {"step": int(step), "metric": metric}
        path = self.directory / f"ckpt-{step:08d}.pt"
        save_checkpoint(state, path, meta=meta)
        if self.keep_best and metric is not None and self._improves(metric):
            save_checkpoint(state, self.best_path, meta=meta)
            self.best_metric = metric
        for old in self.checkpoints()[:-self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def checkpoints(self) -> list[Path]:
        """Complete numbered checkpoints, oldest step first (temporary files never match)."""
        return find_checkpoints(self.directory)

    def latest(self) -> Path | None:
        """The checkpoint with the highest step, or None if there is none yet."""
        found = self.checkpoints()
        return found[-1] if found else None

    def load_latest(self, map_location: Any = "cpu") -> dict[str, Any] | None:
        path = self.latest()
        return None if path is None else load_checkpoint(path, map_location)

    def _improves(self, metric: float) -> bool:
        if math.isnan(metric):
            return False
        if self.best_metric is None:
            return True
        return metric > self.best_metric if self.metric_mode == "max" else metric < self.best_metric


def find_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """The numbered checkpoints in ``directory``, oldest step first; [] if it does not exist. Reads only, unlike
    `CheckpointManager`, which creates its folder: for commands that must not write into a run they inspect."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _CHECKPOINT.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """The step in a numbered checkpoint's name (``ckpt-00000024.pt`` -> 24), without loading it."""
    match = _CHECKPOINT.fullmatch(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a numbered checkpoint (ckpt-<step>.pt)")
    return int(match.group(1))


def _load_payload(path: Path, map_location: Any) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files; all mean the same to the user
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _corrupt(path, reason) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise _corrupt(path, f"no '{FORMAT}' header")
    if payload.get("version") != VERSION:
        raise UserError(f"checkpoint {path} has format version {payload.get('version')!r}, but this sparseopt "
                        f"reads version {VERSION}; resume with the sparseopt version that wrote it or start afresh")
    return payload


def _corrupt(path: Path, reason: str) -> UserError:
    return UserError(f"checkpoint {path} is corrupt or not a sparseopt checkpoint: {reason}; "
                     "delete it or resume from another")


def _check_weights_only(obj: Any, where: str) -> None:
    """Raise TypeError naming the first value that `torch.load(weights_only=True)` would refuse."""
    if isinstance(obj, torch.Tensor) or type(obj) in _LEAF_TYPES:
        return
    if type(obj) in (dict, collections.OrderedDict):
        for key, value in obj.items():
            _check_weights_only(key, f"{where} key {key!r}")
            _check_weights_only(value, f"{where}[{key!r}]")
    elif type(obj) in _CONTAINER_TYPES:
        for i, value in enumerate(obj):
            _check_weights_only(value, f"{where}[{i}]")
    else:
        raise TypeError(f"checkpoint {where} is a {type(obj).__module__}.{type(obj).__qualname__}; store only "
                        "tensors, numbers, strings and dicts/lists/tuples of them so it loads with weights_only=True")
