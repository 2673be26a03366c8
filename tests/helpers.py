"""Small models and a deterministic training loop shared by the core tests."""

import torch
from torch import nn


def mlp(widths=(12, 16, 10), norm=True, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=not norm))
        if i < len(widths) - 2:
            layers += [nn.BatchNorm1d(b), nn.ReLU()] if norm else [nn.ReLU()]
    return nn.Sequential(*layers)


def convnet(channels=(3, 6, 8), classes=5, seed=0):
    torch.manual_seed(seed)
    c0, c1, c2 = channels
    return nn.Sequential(nn.Conv2d(c0, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(),
                         nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, classes))


def batch(model, step, n=16, classes=None):
    """The batch for a step depends only on the step: resumed and uninterrupted runs see the same data."""
    g = torch.Generator().manual_seed(1000 + step)
    first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    if isinstance(first, nn.Conv2d):
        x = torch.randn(n, first.in_channels, 6, 6, generator=g)
    else:
        x = torch.randn(n, first.in_features, generator=g)
    y = torch.randint(0, classes or last.out_features, (n,), generator=g)
    return x, y


def train_step(model, opt, step, scheduler=None):
    x, y = batch(model, step)
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if scheduler is not None:
        scheduler.step()
    return loss.item()


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
}


# A run config that trains in about a second: synthetic data, a BatchNorm MLP, RigL + SparseOpt.
TINY = {
    "name": "tiny",
    "data": {"name": "synthetic", "batch_size": 32, "options": {"n_train": 256, "n_test": 64, "shape": [1, 6, 6],
                                                               "num_classes": 4}},
    "model": {"name": "mlp", "options": {"hidden": [32], "norm": "batch"}},
    "sparsity": {"method": "rigl", "density": 0.3, "update_every": 4},
    "sparseopt": {"enabled": True},
    "optim": {"lr": 0.05, "warmup_epochs": 0.5},
    "train": {"epochs": 3, "log_every": 2, "eval_every": 8},
    "logging": {"tensorboard": False},
}
