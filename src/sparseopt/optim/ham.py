"""HAM: Hyperbolic Aware Minimization (SPEC 2), a multiplicative mirror step after any base optimizer's step.

    θ ← BaseStep(θ, g)
    θ ← θ ⊙ exp(clamp(−η · (α · sign(θ) ⊙ g + β), −5, 5))      on tensors with ndim ≥ 2

``g`` is the minibatch gradient as ``.grad`` held it when ``step()`` was called (with SparseTraining: after masking
and SparseOpt, SPEC 1.7), and ``η`` the group's current learning rate. Zeros stay zero, so masks are preserved.
HAM is itself a ``torch.optim.Optimizer`` that shares the base optimizer's ``param_groups`` and ``state``, so step
hooks (SparseTraining), LR schedulers and mask-update state resets act on both at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

EXPONENT_CLAMP = 5.0


class HAM(torch.optim.Optimizer):
    """Wrap ``base`` (SGD, Adam, AdamW, ...) with the HAM step.

    Args:
        base: the optimizer doing the ordinary step; HAM shares its parameter groups and state.
        alpha: strength α of the hyperbolic metric (inverse metric ``1 + α|θ|`` to first order).
        beta: multiplicative decay β, scaled by the learning rate.
        max_weight_norm: after the step, clip every parameter tensor (all of them, as the author wrapper) to this
            L2 norm; ``None`` disables it.
        post_step_grad_clip: after the step, ``clip_grad_norm_`` of each group's gradients to this value (parity
            with the author wrapper; it changes ``.grad``, not the current update); ``None`` (default) disables it.
    """

    def __init__(
        self,
        base: torch.optim.Optimizer,
        alpha: float = 200.0,
        beta: float = 1e-3,
        *,
        max_weight_norm: float | None = 1000.0,
        post_step_grad_clip: float | None = None,
    ) -> None:
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"HAM wraps a torch.optim.Optimizer, got {type(base).__name__}; build the base "
                            "optimizer first, e.g. HAM(torch.optim.SGD(model.parameters(), lr=0.1))")
        if isinstance(base, HAM):
            raise TypeError("HAM(HAM(...)) would apply the HAM step twice; wrap the base optimizer once")
        for value, what in ((max_weight_norm, "max_weight_norm"), (post_step_grad_clip, "post_step_grad_clip")):
            if value is not None and value <= 0:
                raise ValueError(f"{what} must be positive or None, got {value}")
        self.base = base
        self.alpha = alpha
        self.beta = beta
        self.max_weight_norm = max_weight_norm
        self.post_step_grad_clip = post_step_grad_clip
        super().__init__(base.param_groups, {})
        self._link()

    def _link(self) -> None:
        """Share (not copy) the base's group list and state, so every change reaches both optimizers."""
        self.param_groups = self.base.param_groups
        self.state = self.base.state

    def options(self) -> dict[str, float | None]:
        return {"alpha": self.alpha, "beta": self.beta, "max_weight_norm": self.max_weight_norm,
                "post_step_grad_clip": self.post_step_grad_clip}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        """Evaluate ``closure`` (if any), run the base step, then the HAM step. Returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # the HAM step needs the gradient of this step as it is now: some base optimizers could change .grad
        grads = {p: p.grad.clone() for group in self.param_groups for p in group["params"]
                 if p.grad is not None and p.dim() >= 2}
        self.base.step()
        for group in self.param_groups:
            for p in group["params"]:
                if p in grads:
                    self._ham_(p, grads[p], group["lr"])
        if self.max_weight_norm is not None:
            for group in self.param_groups:
                for p in group["params"]:
                    p.mul_((self.max_weight_norm / torch.linalg.vector_norm(p)).clamp(max=1.0))
        if self.post_step_grad_clip is not None:
            for group in self.param_groups:
                torch.nn.utils.clip_grad_norm_(group["params"], self.post_step_grad_clip)
        return loss

    def _ham_(self, p: torch.Tensor, grad: torch.Tensor, lr: float | torch.Tensor) -> None:
        if torch.isnan(p).any() or torch.isnan(grad).any():
            return  # NaN guard: leave the tensor to the base step alone
        exponent = (-lr * (self.alpha * torch.sign(p) * grad + self.beta)).clamp_(-EXPONENT_CLAMP, EXPONENT_CLAMP)
        new = p * torch.exp(exponent)
        if not torch.isnan(new).any():  # NaN guard: revert the HAM step
            p.copy_(new)

    def state_dict(self) -> dict:  # type: ignore[override]
        return {"base": self.base.state_dict(), "ham": self.options()}

    def load_state_dict(self, state_dict: Mapping) -> None:  # type: ignore[override]
        if not isinstance(state_dict, Mapping) or set(state_dict) != {"base", "ham"}:
            raise ValueError("not a HAM state dict: save with HAM.state_dict() and load that dict (it holds the base "
                             "optimizer's state under 'base' and the HAM options under 'ham')")
        self.base.load_state_dict(state_dict["base"])
        self._link()  # the base rebinds its param_groups and state on load
        for name in self.options():
            setattr(self, name, state_dict["ham"][name])

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"HAM({self.base!r}, {opts})"
