"""sparseopt: sparse training that converges like dense.

Sparsify any ``nn.Module`` and keep training it with your own optimizer and loop::

    sparse = sparseopt.SparseTraining(model, opt, density=0.1, distribution="erk",
                                      topology=sparseopt.RigL(update_every=100, end_step=int(0.75 * steps)),
                                      preconditioner=sparseopt.SparseOpt())
"""

from sparseopt.distributions import layer_nnz
from sparseopt.init import sparse_init_
from sparseopt.layouts import Layout, layout_of, register_layout
from sparseopt.masks import random_mask, select_sparse_params
from sparseopt.optim import SparseOpt
from sparseopt.optim import HAM
from sparseopt.parameterization import Parameterization
from sparseopt.pipeline import SparseTraining
from sparseopt.report import SparsityReport
from sparseopt.topology import SET, RigL, Static, UpdateSchedule
from sparseopt.topology import prune_at_init

__version__ = "0.1.0"
__all__ = ["RigL", "SET", "SparseOpt", "SparseTraining", "SparsityReport", "Static", "UpdateSchedule",
           "layer_nnz", "random_mask", "select_sparse_params", "sparse_init_"]
__all__ += ["HAM", "prune_at_init"]
__all__ += ["Parameterization"]
__all__ += ["Layout", "layout_of", "register_layout"]
