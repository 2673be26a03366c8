"""Diagnostics built on top of the core library (the core never imports this package).

* :mod:`gradient_ratio` - the BatchNorm gradient-ratio experiment (SPEC 7), plotted by :mod:`plots`.
* :mod:`hessian` - matrix-free Hessian spectrum / trace for edge-of-stability measurements (SPEC 6);
  :mod:`sharpness` wraps it in one call.
* :mod:`itop` - exploration and topology health of a ``SparseTraining`` (SPEC 4).
* :mod:`tracking` - the same measurements as periodic callbacks of the experiment runner.
"""

from sparseopt.diagnostics.gradient_ratio import (format_table, gradient_ratio_experiment,
                                                  per_neuron_ratio_experiment)
from sparseopt.diagnostics.hessian import (EigenResult, HessianOperator, TraceResult, exact_hessian,
                                           hutchinson_trace, lanczos, power_iteration, stability_threshold)
from sparseopt.diagnostics.itop import factor_summary, itop_summary
from sparseopt.diagnostics.plots import plot_gradient_ratio
from sparseopt.diagnostics.sharpness import sharpness_report
from sparseopt.diagnostics.tracking import HessianTracker, ItopTracker, ScaleTracker

__all__ = ["EigenResult", "HessianOperator", "HessianTracker", "ItopTracker", "ScaleTracker", "TraceResult", "exact_hessian", "factor_summary", "format_table",
           "gradient_ratio_experiment", "hutchinson_trace", "itop_summary", "lanczos", "per_neuron_ratio_experiment",
           "plot_gradient_ratio", "power_iteration", "sharpness_report", "stability_threshold"]
