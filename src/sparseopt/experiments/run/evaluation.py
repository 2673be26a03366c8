"""Test-set evaluation, split over the ranks under torchrun: each evaluates its slice of every batch and the
three sums (loss, correct, count) are all-reduced once, so the result equals a single process's evaluation
(accuracy exactly; the loss up to float summation order) in 1/world of the time."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from sparseopt.experiments.run.distributed import DistInfo, sum_over_ranks

Prepare = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, dist: DistInfo = DistInfo(),
             prepare: Prepare | None = None,
             autocast: Callable[[], AbstractContextManager] = nullcontext) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` over ``loader`` (this rank's shard), totalled over all ranks.

    ``prepare(x, y)`` moves a batch to the device in the training step's layout; the sums stay on the device
    until the end (one host sync per evaluation, not one per batch).
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    for x, y in loader:
        if len(y) == 0:  # a shard of a batch smaller than the world
            continue
        x, y = prepare(x, y) if prepare is not None else (x.to(device), y.to(device))
        with autocast():
            logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        count += len(y)
    model.train(was_training)
    totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(count), dtype=torch.float64,
                                                                     device=device)])
    loss_total, correct_total, n = sum_over_ranks(dist, totals).tolist()
    return {"loss": loss_total / n, "accuracy": correct_total / n}
