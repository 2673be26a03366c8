"""Gradient preconditioners and optimizer extensions."""

from sparseopt.optim.sparseopt import SparseOpt

__all__ = ["SparseOpt"]
