"""Model zoo for the experiments: MLPs, a small MNIST CNN, CIFAR ResNets (with a no-skip switch), ResNet-50.

Entry point: ``build_model(name, num_classes, in_shape, **kwargs)``.
"""

from .cnn import SmallCNN
from .gpt import GPT, GPTConfig
from .mlp import MLP, mlp_bn_mnist
from .registry import MODEL_NAMES, build_model
from .resnet_cifar import BasicBlock, CifarResNet, resnet20, resnet32, resnet56
from .resnet_imagenet import Bottleneck, ResNet50, resnet50

__all__ = [
    "MODEL_NAMES",
    "GPT",
    "GPTConfig",
    "MLP",
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "ResNet50",
    "SmallCNN",
    "build_model",
    "mlp_bn_mnist",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet50",
]
