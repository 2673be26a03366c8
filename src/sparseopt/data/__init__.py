"""Datasets and fast, resumable batch loaders for the experiments (the core library never imports this).

Entry point: ``build_datasets(name, root, **opts) -> DataBundle``.
"""

from .augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
    random_crop_flip,
)
from .cifar import CIFAR_SPECS, download_cifar, find_cifar_dir, load_cifar
from .errors import DataError
from .image_folder import ImageFolderDataset
from .image_transforms import EvalTransform, TrainTransform, random_resized_crop_box
from .loader import DatasetLoader, InMemoryLoader
from .mnist import MNIST_MEAN, MNIST_STD, load_mnist_subset, mnist_subset_path
from .registry import DATASET_NAMES, DataBundle, build_datasets, dataset_options
from .synthetic import make_synthetic

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR_SPECS",
    "DATASET_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "DataBundle",
    "DataError",
    "DatasetLoader",
    "EvalTransform",
    "ImageFolderDataset",
    "InMemoryLoader",
    "Normalize",
    "TrainTransform",
    "build_datasets",
    "dataset_options",
    "download_cifar",
    "find_cifar_dir",
    "load_cifar",
    "load_mnist_subset",
    "make_synthetic",
    "mnist_subset_path",
    "random_crop_flip",
    "random_resized_crop_box",
]
