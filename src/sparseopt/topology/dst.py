"""Dynamic sparse training: SET and RigL are one drop-and-grow update that differ only in the grow score."""

from __future__ import annotations

import torch

from sparseopt.health import neuron_norms
from sparseopt.masks import unit_of
from sparseopt.topology.base import Topology
from sparseopt.topology.schedules import UpdateSchedule


GROW_INITS = ("zeros", "random_normal", "random_uniform", "grad_scale", "grad_sign")
DROP_CRITERIA = ("magnitude", "neuron_normalized")


def neuron_normalized_magnitude(weight: torch.Tensor, active: torch.Tensor, out_axis: int = 0) -> torch.Tensor:
    """|w_ij| / ||w_i|| for the active entries (flat indices ``active``), ||w_i|| over output unit i's weights
    (along ``out_axis``: a Linear row, a Conv output channel, a Hugging Face Conv1D column).

    Under BatchNorm a neuron's output does not depend on the scale of its weight row, so raw |w| compares numbers
    that mean different things in different neurons: a neuron whose row is small loses all its weights first and
    dies. Dividing by the row norm makes the score scale-invariant per neuron. Inactive entries are 0, so the norm
    over the row is the norm over its active weights. A neuron whose active weights are all 0 scores 0 on each of
    them, like any zero weight under the magnitude criterion (0/0 is read as 0).
    """
    norms = neuron_norms(weight, out_axis).to(weight.dtype)
    inverse = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
    units = unit_of(active, weight.shape, out_axis)
    return weight.reshape(-1).index_select(0, active).abs().mul_(inverse.index_select(0, units))


class _DropAndGrow(Topology):
    """Shared by SET and RigL. ``grow_init`` sets the value of newly grown weights: ``"zeros"`` (the reference
    default); or, at the scale σ of the layer's surviving weights, ``"random_normal"`` N(0, σ²),
    ``"random_uniform"`` with the same variance, ``"grad_sign"`` −σ·sign(g), ``"grad_scale"`` −σ·g/std(g) over
    the grown entries (a first step against the gradient). The non-zero modes are RigL-TF parity knobs, default off.

    ``drop_criterion`` ranks the active weights to drop: ``"magnitude"`` |w_ij| (the reference), or
    ``"neuron_normalized"`` |w_ij| / ||w_i|| (scale-invariant per neuron under BatchNorm; see
    :func:`neuron_normalized_magnitude`).
    """

    def __init__(
        self,
        update_every: int = 100,
        drop_fraction: float = 0.3,
        *,
        start_step: int = 0,
        end_step: int | None = None,
        annealing: str = "cosine",
        skip_step_on_update: bool = True,
        grow_init: str = "zeros",
        drop_criterion: str = "magnitude",
    ) -> None:
        if grow_init not in GROW_INITS:
            raise ValueError(f"unknown grow_init {grow_init!r}; choose one of {GROW_INITS}")
        if drop_criterion not in DROP_CRITERIA:
            raise ValueError(f"unknown drop_criterion {drop_criterion!r}; choose one of {DROP_CRITERIA}")
        self.drop_criterion = drop_criterion
        self.schedule = UpdateSchedule(update_every, drop_fraction, start_step, end_step, annealing)
        self.skip_step_on_update = skip_step_on_update
        self.grow_init = grow_init

    @property
    def needs_gradient(self) -> bool:
        return self.grow_init in ("grad_scale", "grad_sign")

    def is_update_step(self, step: int) -> bool:
        return self.schedule.is_update_step(step)

    def drop_score(self, weight: torch.Tensor, active: torch.Tensor, out_axis: int = 0) -> torch.Tensor:
        if self.drop_criterion == "neuron_normalized":
            return neuron_normalized_magnitude(weight, active, out_axis)
        return super().drop_score(weight, active, out_axis)

    def drop_count(self, step: int, nnz: int) -> int:
        """k = floor(f(t) · nnz), as RigL TF."""
        return int(self.schedule.fraction(step) * nnz)

    def grow_values(self, weight: torch.Tensor, grad: torch.Tensor | None, mask: torch.Tensor,
                    added: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        """Values for the newly grown entries (flat indices ``added`` of the new ``mask``), or None for zeros."""
        if self.grow_init == "zeros" or added.numel() == 0:
            return None
        survived = mask.reshape(-1).clone()
        survived[added] = False
        kept = weight.reshape(-1)[survived]
        sigma = kept.std() if kept.numel() > 1 else weight.new_tensor(0.0)
        n = added.numel()
        if self.grow_init == "random_normal":
            return torch.randn(n, generator=generator, device=weight.device, dtype=weight.dtype) * sigma
        if self.grow_init == "random_uniform":
            u = torch.rand(n, generator=generator, device=weight.device, dtype=weight.dtype) * 2 - 1
            return u * sigma * 3 ** 0.5
        if grad is None:
            raise RuntimeError(f"grow_init={self.grow_init!r} needs the gradient at the mask-update step")
        g = grad.reshape(-1)[added]
        if self.grow_init == "grad_sign":
            return -sigma * torch.sign(g)
        scale = g.std() if g.numel() > 1 else g.abs().max()
        return -sigma * g / scale if scale > 0 else torch.zeros_like(g)

    def __repr__(self) -> str:
        s = self.schedule
        return (f"{type(self).__name__}(update_every={s.update_every}, drop_fraction={s.drop_fraction}, "
                f"start_step={s.start_step}, end_step={s.end_step}, annealing={s.annealing!r}, "
                f"skip_step_on_update={self.skip_step_on_update}, grow_init={self.grow_init!r}, "
                f"drop_criterion={self.drop_criterion!r})")


class SET(_DropAndGrow):
    """Sparse Evolutionary Training in the DST-standard form: drop by |w| (or ``drop_criterion``), grow at uniformly
    random positions."""

    def grow_score(self, weight, grad, generator, out=None):
        if out is None:
            return torch.rand(weight.shape, generator=generator, device=weight.device)
        return out.uniform_(generator=generator)


class RigL(_DropAndGrow):
    """Rigged Lottery: drop by |w| (or ``drop_criterion``), grow where the dense gradient |∂L/∂w| is largest."""

    @property
    def needs_gradient(self) -> bool:
        return True

    def grow_score(self, weight, grad, generator, out=None):
        self._check_gradient(grad)
        return torch.abs(grad, out=out) if out is not None else grad.abs()

    def grow_scores(self, weight, grad, generator, out=None):
        self._check_gradient(grad)
        return grad, True

    @staticmethod
    def _check_gradient(grad: torch.Tensor | None) -> None:
        if grad is None:
            raise RuntimeError(
                "RigL needs the dense gradient at a mask-update step, but a sparse weight has no .grad; "
                "call loss.backward() before optimizer.step() and make sure every sparse layer is used"
            )
