"""The interface the training pipeline drives: a topology decides whether and how masks change at a step."""

from __future__ import annotations

import torch

from sparseopt.native.selection import gather_at


class Topology:
    """Base of all topologies. Dynamic ones override :meth:`is_update_step`, :meth:`drop_count` and
    :meth:`grow_score`; schedules are pure functions of the step, so a topology holds no state to checkpoint."""

    needs_gradient = False
    #: Skip the optimizer step on mask-update steps (RigL TF and JaxPruner do).
    skip_step_on_update = True

    def is_update_step(self, step: int) -> bool:
        return False

    def drop_count(self, step: int, nnz: int) -> int:
        return 0

    def drop_score(self, weight: torch.Tensor, active: torch.Tensor, out_axis: int = 0) -> torch.Tensor:
        """Score of each active weight (flat indices ``active`` of ``weight``), in that order; the smallest drop.
        ``out_axis``: the weight's output-unit axis (:mod:`sparseopt.layouts`), for per-neuron criteria."""
        return gather_at(weight, active, absolute=True)

    def grow_values(self, weight: torch.Tensor, grad: torch.Tensor | None, mask: torch.Tensor,
                    added: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        """Values for newly grown entries (flat indices ``added``), or None to leave them at 0."""
        return None

    def grow_score(self, weight: torch.Tensor, grad: torch.Tensor | None, generator: torch.Generator,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """Score of every entry (full-size, written into ``out`` when given); the largest non-kept ones grow."""
        raise NotImplementedError

    def grow_scores(self, weight: torch.Tensor, grad: torch.Tensor | None, generator: torch.Generator,
                    out: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        """What the update's grow selection reads: (s, absolute), the scores being s, or |s| when ``absolute``.
        By default :meth:`grow_score` and False; RigL hands over the gradient itself with True, so the selection
        takes |g| on the fly instead of writing a full-size |g| first. ``s`` is only read."""
        return self.grow_score(weight, grad, generator, out=out), False


class Static(Topology):
    """Static sparsity: the initial mask (random, ERK/uniform, or from pruning at initialisation) never changes."""

    def __repr__(self) -> str:
        return "Static()"
