"""Sparse training in a Hugging Face ``Trainer``: add one callback.

    trainer = Trainer(model, args, train_dataset=..., callbacks=[SparseTrainingCallback(
        density=0.1, topology=sparseopt.RigL(update_every=100, end_step=int(0.75 * max_steps)),
        preconditioner=sparseopt.SparseOpt())])

The callback attaches :class:`~sparseopt.SparseTraining` to the Trainer's optimizer when training begins (inside
accelerate's ``AcceleratedOptimizer``), writes the sparse state into every checkpoint folder
(``checkpoint-N/sparseopt_state.pt``), continues from it on ``trainer.train(resume_from_checkpoint=...)``, and adds
``sparseopt/density`` and ``sparseopt/itop`` to the Trainer's logs.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate.optimizer import AcceleratedOptimizer
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from sparseopt.integrations._attach import attach, check_consistent, metrics
from sparseopt.pipeline import SparseTraining

STATE_FILE = "sparseopt_state.pt"
CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (which has no step hooks of its own)."""
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def checkpoint_dir(args: TrainingArguments, state: TrainerState) -> str:
    """The folder the Trainer writes for (or resumed from, in ``output_dir``) the current global step."""
    return os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")


class SparseTrainingCallback(TrainerCallback):
    """Sparsify the Trainer's model and keep it sparse; the options are :class:`~sparseopt.SparseTraining`'s.

    ``sparse_execution=True`` included: each sparse-run Linear's values take its dense weight's place in the param
    group the Trainer built by name (so its weight decay), at the first forward, before the first ``max_grad_norm``
    clip (which sees them: they are parameters of the model); checkpoints keep the masked-dense format.
    ``bf16=True`` (autocast) is refused for those layers. ``self.sparse`` is the attached ``SparseTraining`` once
    training has begun (for ``report()``, masks, ...).
    """

    def __init__(self, density: Any = 0.1, **options: Any) -> None:
        self.options = {"density": density, **options}
        self.sparse: SparseTraining | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, *,
                       model=None, optimizer=None, **kwargs) -> None:
        if model is None or optimizer is None:
            raise ValueError("SparseTrainingCallback needs the Trainer's model and optimizer at on_train_begin; "
                             "add it to a transformers.Trainer (callbacks=[...])")
        optimizer = unwrap_optimizer(optimizer)
        saved = self._resumed_state(args, state)
        if self.sparse is not None:  # train() again: the same model keeps its masks unless a checkpoint says otherwise
            if saved is None and self.sparse.model is model:
                saved = self.sparse.state_dict()
            self.sparse.remove()
        self.sparse = attach(model, optimizer, self.options, saved)

    @staticmethod
    def _resumed_state(args: TrainingArguments, state: TrainerState) -> dict | None:
        """On resume the Trainer has loaded ``trainer_state.json`` (global_step > 0) but does not tell callbacks
        from which folder; it is ``output_dir/checkpoint-<global_step>`` for ``resume_from_checkpoint=True`` and
        for any checkpoint of this output_dir."""
        if state.global_step == 0:
            return None
        path = os.path.join(checkpoint_dir(args, state), STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"resuming at global step {state.global_step}, but {path} does not exist, so the masks, schedule "
                "and ITOP of the sparse run cannot be restored. Resume from a checkpoint that SparseTrainingCallback "
                "wrote, with output_dir set to the folder that holds it")
        return torch.load(path, map_location="cpu", weights_only=True)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self.sparse is None or not state.is_world_process_zero:
            return
        folder = checkpoint_dir(args, state)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"the Trainer's checkpoint folder {folder} does not exist, so the sparse state "
                                    "cannot be saved beside it")
        tmp = os.path.join(folder, STATE_FILE + ".tmp")
        torch.save(self.sparse.state_dict(), tmp)
        os.replace(tmp, os.path.join(folder, STATE_FILE))  # a crash mid-write leaves no truncated state

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None,
               **kwargs) -> None:
        """Adds density and ITOP to ``logs`` (seen by the callbacks after this one: the console printer and any
        ``report_to`` integration listed later) and to ``state.log_history``."""
        if self.sparse is None or logs is None:
            return
        values = metrics(self.sparse)
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        """With ``load_best_model_at_end`` the Trainer has just loaded the best checkpoint's weights: load its masks
        too, so the report and any further training describe the model that is there."""
        if self.sparse is None or not (args.load_best_model_at_end and state.best_model_checkpoint):
            return
        path = os.path.join(state.best_model_checkpoint, STATE_FILE)
        saved = torch.load(path, map_location="cpu", weights_only=True)
        check_consistent(self.sparse.model, saved)
        self.sparse.load_state_dict(saved)
