"""User model factories for the CLI tests (loaded through model.name = "cli_models:<factory>")."""

import math
import os
import signal

from torch import nn


class _Counting(nn.Sequential):
    """An MLP with BatchNorm that can misbehave at its n-th forward call, to test clean stops for real."""

    def __init__(self, in_features, classes, interrupt_at=None, nan_at=None, signal_name="SIGINT", signal_rank=None):
        super().__init__(nn.Flatten(), nn.Linear(in_features, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Linear(32, classes))
        self.calls, self.interrupt_at, self.nan_at = 0, interrupt_at, nan_at
        self.signal = getattr(signal, signal_name)
        if signal_rank is not None and os.environ.get("RANK") != str(signal_rank):
            self.interrupt_at = None  # under torchrun: only this rank gets the signal

    def forward(self, x):
        self.calls += 1
        if self.calls == self.interrupt_at:
            os.kill(os.getpid(), self.signal)  # as if the user pressed Ctrl-C (or SLURM preempted) in this step
        out = super().forward(x)
        return out * math.nan if self.nan_at is not None and self.calls >= self.nan_at else out


def counting_mlp(num_classes, in_shape, interrupt_at=None, nan_at=None, signal_name="SIGINT", signal_rank=None):
    return _Counting(math.prod(in_shape), num_classes, interrupt_at, nan_at, signal_name, signal_rank)


def needs_width(num_classes, in_shape, width):
    """A factory with a required option (model.options.width)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), width), nn.Linear(width, num_classes))


def one_class_too_many(num_classes, in_shape):
    """A factory whose classifier does not match the data's class count."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes + 1))


def raises_a_bug(num_classes, in_shape):
    """A factory with a bug of its own (not a config mistake): the CLI must say so in one line, exit 1."""
    return {}["no such key"]
