"""Dynamic sparse training: SET and RigL are one drop-and-grow update that differ only in the grow score."""

from __future__ import annotations

import torch

from sparseopt.topology.base import Topology
from sparseopt.topology.schedules import UpdateSchedule


class _DropAndGrow(Topology):
    def __init__(
        self,
        update_every: int = 100,
        drop_fraction: float = 0.3,
        *,
        start_step: int = 0,
        end_step: int | None = None,
        annealing: str = "cosine",
        skip_step_on_update: bool = True,
    ) -> None:
        self.schedule = UpdateSchedule(update_every, drop_fraction, start_step, end_step, annealing)
        self.skip_step_on_update = skip_step_on_update

    def is_update_step(self, step: int) -> bool:
        return self.schedule.is_update_step(step)

    def drop_count(self, step: int, nnz: int) -> int:
        """k = floor(f(t) · nnz), as RigL TF."""
        return int(self.schedule.fraction(step) * nnz)

    def __repr__(self) -> str:
        s = self.schedule
        return (f"{type(self).__name__}(update_every={s.update_every}, drop_fraction={s.drop_fraction}, "
                f"start_step={s.start_step}, end_step={s.end_step}, annealing={s.annealing!r}, "
                f"skip_step_on_update={self.skip_step_on_update})")


class SET(_DropAndGrow):
    """Sparse Evolutionary Training in the DST-standard form: drop by |w|, grow at uniformly random positions."""

    def grow_score(self, weight, grad, generator):
        return torch.rand(weight.shape, generator=generator, device=weight.device)


class RigL(_DropAndGrow):
    """Rigged Lottery: drop by |w|, grow where the dense gradient |∂L/∂w| is largest."""

    needs_gradient = True

    def grow_score(self, weight, grad, generator):
        if grad is None:
            raise RuntimeError(
                "RigL needs the dense gradient at a mask-update step, but a sparse weight has no .grad; "
                "call loss.backward() before optimizer.step() and make sure every sparse layer is used"
            )
        return grad.abs()
