"""Preconditioned weight decay (SPEC 1.3, 1.10): let SparseOpt's factor multiply the coupled decay term too.

Coupled decay (SGD, Adam, RMSprop, ... with ``weight_decay``) adds λW to the gradient inside ``step()``, after
SparseOpt has scaled the gradient, so the update is ``−η(D∇L + λW)``. At the equilibrium between gradient growth and
decay, the angular step of a neuron does not depend on a per-neuron gradient multiplier, which cancels SparseOpt.
Folding the decay into the gradient *before* the multiply and switching the group's decay off for that one step
gives ``−η·D(∇L + λW)`` for any such optimizer, without knowing its class: the momentum buffer, Adam's moments and
every later use of the gradient see the preconditioned sum. The group's ``weight_decay`` is restored after the step.

Decoupled decay (``decoupled_weight_decay=True`` in the group, as AdamW) is a separate shrink ``W ← (1 − ηλ)W``
that never enters the gradient; it is left unchanged, and :func:`decoupled_groups` lets the caller warn about it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sparseopt.grad_hooks import scaled_grad


def is_decoupled(group: dict) -> bool:
    """Whether the group's decay is a multiplicative shrink outside the gradient (AdamW, Adam(decoupled=True))."""
    return bool(group.get("decoupled_weight_decay", False))


def decoupled_groups(optimizer: torch.optim.Optimizer) -> list[int]:
    """Indices of the groups with non-zero decoupled decay."""
    return [i for i, g in enumerate(optimizer.param_groups) if is_decoupled(g) and g.get("weight_decay", 0)]


@torch.no_grad()
def fold_coupled_weight_decay_(optimizer: torch.optim.Optimizer,
                               scales: Mapping[int, tuple[torch.Tensor, torch.Tensor | None]] | None = None
                               ) -> list[tuple[dict, float]]:
    """``grad ← grad + λ·s⊙W`` for every parameter with a gradient in a group with coupled decay λ ≠ 0, and set
    that group's ``weight_decay`` to 0. ``s`` is ``mask · row`` from ``scales[id(param)] = (mask, row)``
    (SparseTraining's mask and per-neuron factors, ``row`` None for none: its gradients are already scaled so, as
    backward accumulated them), 1 for parameters not in ``scales``. Returns
    ``(group, λ)`` pairs for :func:`restore_weight_decay`.

    Under ``maximize=True`` optimizers negate the gradient before adding λW, so the folded term is ``−λW``."""
    scales = scales or {}
    saved = []
    for group in optimizer.param_groups:
        decay = group.get("weight_decay", 0)
        if not decay or is_decoupled(group):
            continue
        alpha = -decay if group.get("maximize", False) else decay
        for p in group["params"]:
            if p.grad is not None:
                scale = scales.get(id(p))
                p.grad.add_(_scaled(p, scale), alpha=alpha)
        saved.append((group, decay))
        group["weight_decay"] = 0.0
    return saved


def _scaled(p: torch.Tensor, scale: tuple[torch.Tensor | None, torch.Tensor | None] | None) -> torch.Tensor:
    """``s ⊙ W``; a mask of None is all-active (the active values of a sparse-run layer)."""
    if scale is None:
        return p
    mask, row = scale
    if mask is not None:
        return scaled_grad(p, mask, row)
    return p if row is None else p * row


def restore_weight_decay(saved: list[tuple[dict, float]]) -> None:
    for group, decay in saved:
        group["weight_decay"] = decay
