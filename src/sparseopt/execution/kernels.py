"""The three products of a sparse Linear layer on ``torch.sparse_csr`` tensors, each one call over the whole batch:
the hand-written kernels of :mod:`sparseopt.execution.native` for float32 with int32 indices (what
``SparseLinearLayout`` makes), else torch's (MKL's CSR x dense product, ``torch.sparse.sampled_addmm``).

All kernels read the dense operand *feature-major*: MKL's product wants ``x.T`` (in x batch) contiguous
(a column-major operand measured 5x slower), and ``sampled_addmm`` copies its operands into ``dy.T`` (out x batch)
and ``x.T`` (in x batch) unless they already are so. :func:`feature_major` makes that copy once, and the products
return their results in that layout, so a chain of sparse layers (and elementwise ops between them, which keep
strides) passes activations and gradients on without any transposing copy.

No batch blocking: on the AMD EPYC Zen4 development machine (2 MiB L2 per core) one whole-batch CSR product beat
64- and 128-column blocks at 4096², density 0.05, batch 256 (1 thread, benchmarks/README), so the blocks that paid
on the former Intel machine are gone. The CSR indices should be int32 (``SparseLinearLayout`` makes them so):
torch converts int64 ones to MKL's int32 on every call.
"""

from __future__ import annotations

import warnings

import torch

from sparseopt.execution import native


def csr_tensor(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``torch.sparse_csr_tensor`` without the beta warning (see :func:`to_csr`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def to_csr(dense: torch.Tensor) -> torch.Tensor:
    """``dense.to_sparse_csr()`` without torch's "CSR support is in beta" warning (it is the API we build on)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return dense.to_sparse_csr()


def feature_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` (rows x features) as a same-shaped view of a contiguous (features x rows) tensor, the layout the
    kernels read without copying; ``x`` itself when it already is (e.g. the output of :func:`csr_matmul_t`)."""
    return x if x.t().is_contiguous() else x.t().contiguous().t()


def csr_matmul_t(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` (batch x out) for a CSR ``w`` (out x in) and a dense ``x`` (batch x in), computed as
    ``w @ x.T`` and returned as its transposed view (feature-major, see :func:`feature_major`).

    On torch's kernels: ``addmm`` into an uninitialised result at ``beta=0`` (MKL overwrites it) instead of
    ``w @ x.T``, which zero fills a result and then copies that zero into a second one."""
    xt = feature_major(x).t()
    out = xt.new_empty(w.shape[0], xt.shape[1])
    lib = _native(w, x)
    if lib is not None:
        values = w.values().contiguous()
        lib.sparseopt_spmm_f32(w.crow_indices().data_ptr(), w.col_indices().data_ptr(), values.data_ptr(),
                               xt.data_ptr(), out.data_ptr(), w.shape[0], xt.shape[1], torch.get_num_threads())
    else:
        torch.addmm(out, w, xt, beta=0.0, out=out)
    return out.t()


def sddmm(w: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Values of ``dy.T @ x`` (out x in) at the non-zeros of the CSR ``w``, in ``w``'s value order: the weight
    gradient of ``y = x @ w.T`` restricted to the active entries, O(nnz · batch) work.

    Only ``w``'s structure is used (on torch's kernels its values are replaced by zeros: ``sampled_addmm`` reads
    them even at ``beta=0``, so a non-finite weight would otherwise turn its gradient into NaN)."""
    dyt, xt = feature_major(dy).t(), feature_major(x).t()
    lib = _native(w, dy, x)
    if lib is not None:
        out = dy.new_empty(w.values().shape)
        lib.sparseopt_sddmm_f32(w.crow_indices().data_ptr(), w.col_indices().data_ptr(), dyt.data_ptr(),
                                xt.data_ptr(), out.data_ptr(), w.shape[0], xt.shape[1], torch.get_num_threads())
        return out
    pattern = csr_tensor(w.crow_indices(), w.col_indices(), dy.new_zeros(w.values().shape), tuple(w.shape))
    return torch.sparse.sampled_addmm(pattern, dyt, xt.t(), beta=0.0).values()


def _native(w: torch.Tensor, *dense: torch.Tensor):
    """The native kernels when they apply: float32 CPU operands, int32 indices, no autograd through them."""
    if not (w.dtype == torch.float32 and w.device.type == "cpu" and w.crow_indices().dtype == torch.int32
            and all(d.dtype == torch.float32 and d.device.type == "cpu" for d in dense)):
        return None
    if torch.is_grad_enabled() and (w.requires_grad or any(d.requires_grad for d in dense)):
        return None
    return native.library()
