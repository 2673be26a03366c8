"""Sparse training in a Lightning ``Trainer``: add one callback.

    trainer = lightning.pytorch.Trainer(callbacks=[SparseTrainingCallback(
        density=0.1, topology=sparseopt.RigL(update_every=100, end_step=int(0.75 * max_steps)),
        preconditioner=sparseopt.SparseOpt())])

The callback attaches :class:`~sparseopt.SparseTraining` to the LightningModule's optimizer when training starts
(after Lightning has restored weights and optimizer state from ``ckpt_path``), stores the sparse state in every
Lightning checkpoint (the callback's ``state_dict``), continues from it on ``trainer.fit(..., ckpt_path=...)``, and
logs ``sparseopt/density`` and ``sparseopt/itop`` through ``LightningModule.log`` to every logger.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities import CombinedLoader

from sparseopt.integrations._attach import attach, metrics
from sparseopt.pipeline import SparseTraining


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside a ``LightningOptimizer`` (what ``LightningModule.optimizers()`` returns)."""
    while isinstance(optimizer, LightningOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def warn_if_mid_epoch_resume_repeats_data(trainer: pl.Trainer) -> None:
    """Lightning restarts a dataloader without ``state_dict``/``load_state_dict`` at the FIRST batch of the epoch
    when resuming a mid-epoch checkpoint, so the rest of that epoch sees other batches than the uninterrupted run:
    the gradients, hence RigL's grow scores, the masks and the ITOP diverge. Say so instead of diverging silently."""
    batches = trainer.num_training_batches
    if trainer.ckpt_path is None or not isinstance(batches, int) or batches == 0:
        return
    steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
    loaders = CombinedLoader(trainer.train_dataloader).flattened
    if trainer.global_step % steps_per_epoch == 0 or all(isinstance(loader, _Stateful) for loader in loaders):
        return
    warnings.warn(f"resuming sparse training from {trainer.ckpt_path}, a MID-EPOCH checkpoint (step "
                  f"{trainer.global_step}, {steps_per_epoch} steps per epoch), with a dataloader that has no "
                  "state_dict/load_state_dict: Lightning restarts it at the epoch's first batch, so the rest of "
                  "this epoch trains on other batches than the uninterrupted run and the weights, masks and ITOP "
                  "will differ from it. Fix: a resumable dataloader (torchdata.stateful_dataloader."
                  "StatefulDataLoader, or state_dict/load_state_dict on your own), or resume from an end-of-epoch "
                  "checkpoint", UserWarning, stacklevel=2)


class SparseTrainingCallback(pl.Callback):
    """Sparsify the LightningModule and keep it sparse; the options are :class:`~sparseopt.SparseTraining`'s.

    ``optimizer_index`` picks the optimizer when ``configure_optimizers`` returns several (one callback each, with
    ``include``/``exclude`` splitting the weights). ``self.sparse`` is the attached ``SparseTraining``.
    ``sparse_execution=True`` included: each sparse-run Linear's values take its dense weight's place in the
    optimizer (same param group) before the first step, so ``gradient_clip_val`` clips them; checkpoints keep the
    masked-dense format. ``precision='bf16-mixed'`` (autocast) is refused for those layers.
    """

    def __init__(self, density: Any = 0.1, *, optimizer_index: int | None = None, **options: Any) -> None:
        self.options = {"density": density, **options}
        self.optimizer_index = optimizer_index
        self.sparse: SparseTraining | None = None
        self._saved: dict | None = None  # restored from a checkpoint, waiting for the optimizer

    @property
    def state_key(self) -> str:
        return self._generate_state_key(optimizer_index=self.optimizer_index)

    def _optimizer(self, trainer: pl.Trainer) -> torch.optim.Optimizer:
        optimizers = trainer.optimizers
        if self.optimizer_index is None:
            if len(optimizers) != 1:
                raise ValueError(f"configure_optimizers returned {len(optimizers)} optimizers; give "
                                 "SparseTrainingCallback(optimizer_index=i) for the one holding the sparse weights "
                                 "(one callback per optimizer, split with include=/exclude=)")
            return unwrap_optimizer(optimizers[0])
        if not 0 <= self.optimizer_index < len(optimizers):
            raise ValueError(f"optimizer_index={self.optimizer_index}, but configure_optimizers returned "
                             f"{len(optimizers)} optimizer(s); use 0..{len(optimizers) - 1}")
        return unwrap_optimizer(optimizers[self.optimizer_index])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = self._optimizer(trainer)
        saved, self._saved = self._saved, None
        if saved is None and trainer.ckpt_path is not None:
            raise ValueError(f"resuming from {trainer.ckpt_path}, which holds no sparse state for this callback "
                             f"(key {self.state_key!r}): it was not written with SparseTrainingCallback, so the "
                             "masks, schedule and ITOP of the sparse run cannot be restored")
        if self.sparse is not None:  # fit() again: the same model keeps its masks unless a checkpoint says otherwise
            if saved is None and self.sparse.model is pl_module:
                saved = self.sparse.state_dict()
            self.sparse.remove()
        self.sparse = attach(pl_module, optimizer, self.options, saved)
        warn_if_mid_epoch_resume_repeats_data(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self.sparse is not None:
            pl_module.log_dict(metrics(self.sparse), on_step=True, on_epoch=False)

    def state_dict(self) -> dict:
        if self.sparse is not None:
            return self.sparse.state_dict()
        return dict(self._saved or {})

    def load_state_dict(self, state_dict: dict) -> None:
        self._saved = dict(state_dict) if state_dict else None
