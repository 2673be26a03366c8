"""CIFAR-10/100 from the official python-pickle archives, kept as uint8 tensors in memory.

Downloading happens only when asked (``download=True``): the archive is md5-checked and extracted into a
temporary directory next to the target, then renamed into place, so an interrupted download never leaves a
half-extracted dataset that later loads silently.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CifarSpec:
    """Where a CIFAR variant lives on disk and on the web."""

    folder: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int


CIFAR_SPECS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key=b"labels",
        num_classes=10,
    ),
    "cifar100": CifarSpec(
        folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train_files=("train",),
        test_files=("test",),
        label_key=b"fine_labels",
        num_classes=100,
    ),
}


def _spec(name: str) -> CifarSpec:
    try:
        return CIFAR_SPECS[name]
    except KeyError:
        raise DataError(f"unknown CIFAR variant {name!r}; expected one of {sorted(CIFAR_SPECS)}") from None


def find_cifar_dir(name: str, root: str | os.PathLike[str]) -> Path | None:
    """The extracted folder, whether ``root`` is its parent or the folder itself; None if absent."""
    spec, root = _spec(name), Path(root).expanduser()
    for candidate in (root / spec.folder, root):
        if (candidate / spec.train_files[0]).is_file():
            return candidate
    return None


def load_cifar(
    name: str, root: str | os.PathLike[str], download: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images uint8 (N, 3, 32, 32), labels int64."""
    spec = _spec(name)
    folder = find_cifar_dir(name, root)
    if folder is None:
        if not download:
            expected = Path(root).expanduser() / spec.folder / spec.train_files[0]
            raise DataError(
                f"{name} not found: expected {expected}. Set `download: true` (download=True) to fetch it, "
                f"or download {spec.url} and extract it into {Path(root).expanduser()}"
            )
        folder = download_cifar(name, root)
    x_train, y_train = _read_batches(folder, spec.train_files, spec)
    x_test, y_test = _read_batches(folder, spec.test_files, spec)
    return x_train, y_train, x_test, y_test


def _read_batches(folder: Path, files: tuple[str, ...], spec: CifarSpec) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [_read_batch(folder / f, spec) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


def _read_batch(path: Path, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"missing CIFAR file {path}; re-extract {spec.url} (or use `download: true`)")
    try:
        with path.open("rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data = np.asarray(entry[b"data"], dtype=np.uint8)
        labels = np.asarray(entry[spec.label_key], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise DataError(f"corrupt CIFAR file {path} ({type(exc).__name__}: {exc}); delete and re-extract it") from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f"corrupt CIFAR file {path}: data shape {data.shape}, {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DataError(f"corrupt CIFAR file {path}: labels outside [0, {spec.num_classes})")
    return data.reshape(-1, 3, 32, 32), labels


def download_cifar(name: str, root: str | os.PathLike[str]) -> Path:
    """Fetch, md5-verify and atomically extract the official archive into ``root``; returns the folder."""
    spec, root = _spec(name), Path(root).expanduser()
    target = root / spec.folder
    if (target / spec.train_files[0]).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{spec.folder}-download-") as tmp:
        archive = Path(tmp) / "archive.tar.gz"
        log.info("downloading %s to %s", spec.url, target)
        digest = _fetch(spec.url, archive)
        if digest != spec.md5:
            raise DataError(f"md5 mismatch for {spec.url}: got {digest}, expected {spec.md5}; try again")
        extracted = Path(tmp) / "extracted"
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(extracted, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise DataError(f"could not extract {spec.url}: {exc}") from exc
        if not (extracted / spec.folder / spec.train_files[0]).is_file():
            raise DataError(f"archive from {spec.url} does not contain {spec.folder}/{spec.train_files[0]}")
        if target.exists():  # an incomplete folder would otherwise shadow the fresh copy
            raise DataError(f"{target} exists but is incomplete; remove it and retry")
        os.rename(extracted / spec.folder, target)
    return target


def _fetch(url: str, dest: Path) -> str:
    """Stream ``url`` to ``dest`` and return its md5 hex digest."""
    md5 = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, dest.open("wb") as out:
            while chunk := response.read(1 << 20):
                md5.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(
            f"could not download {url} ({exc}); download it manually and extract it into {dest.parent.parent}"
        ) from exc
    return md5.hexdigest()
