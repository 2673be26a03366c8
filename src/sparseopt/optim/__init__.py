"""Gradient preconditioners and optimizer extensions."""

from sparseopt.optim.sparseopt import SparseOpt
from sparseopt.optim.renorm import RENORM_MODES, global_grad_norm, renormalize_
from sparseopt.optim.ham import HAM

__all__ = ["SparseOpt"]
__all__ += ["HAM", "RENORM_MODES", "global_grad_norm", "renormalize_"]
