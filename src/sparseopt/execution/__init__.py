"""Sparse kernels for Linear layers: CSR products that cost O(nnz · batch) instead of O(weights · batch)."""

from sparseopt.execution.inference import CSRLinear, csr_for_inference
from sparseopt.execution.kernels import csr_matmul_t, sddmm
from sparseopt.execution.training import ExecutionPolicy, SparseExecution

__all__ = ["CSRLinear", "ExecutionPolicy", "SparseExecution", "csr_for_inference", "csr_matmul_t", "sddmm"]
