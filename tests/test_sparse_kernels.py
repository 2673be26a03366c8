"""The sparse kernels and SparseLinearLayout compute the dense masked products (forward, input gradient, SDDMM),
on the native kernels (float32) and on torch's (float64, or float32 with the native ones switched off)."""

import warnings

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

from sparseopt.execution import kernels, native
from sparseopt.execution.kernels import csr_matmul_t, feature_major, sddmm
from sparseopt.execution.layout import SparseLinearLayout


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch):
    """Which kernels the float32 products run on (float64 ones always run torch's)."""
    if request.param == "torch":
        monkeypatch.setattr(kernels.native, "library", lambda: None)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # a failed build must fail this test, not skip to torch's kernels
            assert native.library() is not None
    return request.param


def layer(out_f, in_f, density, seed=0, dtype=torch.float64, empty_rows=(), empty_cols=()):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(out_f, in_f, generator=g) < density
    mask[list(empty_rows)] = False
    mask[:, list(empty_cols)] = False
    weight = torch.randn(out_f, in_f, generator=g, dtype=dtype) * mask
    layout = SparseLinearLayout(nn.Linear(in_f, out_f, bias=False), mask)
    return mask, weight, layout, weight.reshape(-1)[layout.flat]


def check_products(mask, weight, layout, values, batch, seed=1):
    """All three products, through the layout and through the kernels, against float64 dense masked products."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, layout.in_features, generator=g, dtype=weight.dtype)
    dy = torch.randn(batch, layout.out_features, generator=g, dtype=weight.dtype)
    w64, x64, dy64 = weight.double(), x.double(), dy.double()
    want_y, want_dx = (x64 @ w64.t()).to(x.dtype), (dy64 @ w64).to(x.dtype)
    want_dw = (dy64.t() @ x64).reshape(-1)[layout.flat].to(x.dtype)
    rtol, atol = (1e-10, 1e-10) if x.dtype == torch.float64 else (1e-5, 1e-4)
    xf, dyf = feature_major(x), feature_major(dy)
    for y, dx, dw in [(layout.forward(values, x), layout.input_grad(values, dy), layout.weight_grad(dy, x)),
                      (layout.forward(values, xf), layout.input_grad(values, dyf), layout.weight_grad(dyf, xf)),
                      (csr_matmul_t(layout.csr(values), x), csr_matmul_t(layout.csr_t(values), dy),
                       sddmm(layout.csr(values), dy, x))]:
        assert y.shape == (batch, layout.out_features) and dx.shape == (batch, layout.in_features)
        assert dw.shape == (int(mask.sum()),)
        torch.testing.assert_close(y, want_y, rtol=rtol, atol=atol)
        torch.testing.assert_close(dx, want_dx, rtol=rtol, atol=atol)
        torch.testing.assert_close(dw, want_dw, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", [(64, 48), (33, 97), (128, 128)])
@pytest.mark.parametrize("density", [0.3, 0.05, 0.01])
@pytest.mark.parametrize("batch", [1, 7, 64, 130])
def test_products_equal_the_dense_masked_ones(shape, density, batch):
    check_products(*layer(*shape, density), batch)


# batch widths that hit every part of the native loops: 64-wide slices, 48/32/16-wide ones, and a scalar tail
@pytest.mark.parametrize("batch", [1, 5, 16, 33, 64, 100, 256, 257])
@pytest.mark.parametrize("density", [0.2, 0.02])
def test_float32_products(path, density, batch):
    check_products(*layer(96, 80, density, dtype=torch.float32), batch)


def test_float32_products_on_two_threads(path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:    # big enough for the native kernels to split the rows between threads
        check_products(*layer(256, 200, 0.5, dtype=torch.float32, empty_rows=range(100, 180)), batch=40)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_empty_rows_and_columns_of_the_mask(path, dtype):
    mask, weight, layout, values = layer(40, 30, 0.3, dtype=dtype, empty_rows=range(0, 40, 3),
                                         empty_cols=range(1, 30, 4))
    assert not mask[::3].any() and not mask[:, 1::4].any()
    check_products(mask, weight, layout, values, batch=9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_an_all_zero_mask_gives_zero_products(path, dtype):
    mask, weight, layout, values = layer(16, 24, 0.0, dtype=dtype)
    assert layout.nnz == 0
    check_products(mask, weight, layout, values, batch=5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_weight_gradient_reads_only_the_structure(path, dtype):
    """A non-finite weight must not leak into its own gradient (sampled_addmm reads values even at beta=0)."""
    mask, weight, layout, values = layer(32, 32, 0.2, dtype=dtype)
    bad = values.clone()
    bad[::2] = float("nan")
    x, dy = torch.randn(8, 32, dtype=dtype), torch.randn(8, 32, dtype=dtype)
    want = (dy.t() @ x).reshape(-1)[layout.flat]
    torch.testing.assert_close(sddmm(layout.csr(bad), dy, x), want)


def test_feature_major_copies_only_when_needed():
    x = torch.randn(6, 5)
    xf = feature_major(x)
    assert xf.t().is_contiguous() and torch.equal(xf, x) and xf.data_ptr() != x.data_ptr()
    assert feature_major(xf) is xf
    row = torch.randn(1, 5)
    assert feature_major(row) is row
    _, _, layout, values = layer(7, 5, 0.5, dtype=torch.float32)
    y = layout.forward(values, xf)
    assert feature_major(y) is y


def test_mkl_addmm_at_beta_zero_overwrites_its_output():
    """csr_matmul_t relies on it: it hands MKL an uninitialised result."""
    _, weight, layout, values = layer(30, 20, 0.3, dtype=torch.float32)
    xt = torch.randn(20, 4)
    out = torch.full((30, 4), float("nan"))
    torch.addmm(out, layout.csr(values), xt, beta=0.0, out=out)
    torch.testing.assert_close(out, weight @ xt)


def test_indices_are_mkl_int32():
    _, _, layout, _ = layer(20, 30, 0.2)
    assert {t.dtype for t in (layout.crow, layout.col, layout.t_crow, layout.t_col)} == {torch.int32}


def test_rebuild_follows_a_new_mask():
    mask, weight, layout, values = layer(48, 40, 0.1)
    new_mask = torch.rand(48, 40, generator=torch.Generator().manual_seed(5)) < 0.25
    new_weight = torch.randn(48, 40, dtype=torch.float64) * new_mask
    layout.rebuild(new_mask)
    check_products(new_mask, new_weight, layout, new_weight.reshape(-1)[layout.flat], batch=6)


def test_flat_is_the_row_major_order_of_the_nonzeros():
    mask, _, layout, _ = layer(20, 30, 0.2)
    torch.testing.assert_close(layout.flat, mask.reshape(-1).nonzero().squeeze(1))
    # W^T's CSR holds the same entries (tagged here by their flat index in W), in W^T's row-major order
    torch.testing.assert_close(layout.csr_t(layout.flat.double()).to_dense(),
                               (torch.arange(600).reshape(20, 30) * mask).t().double())


@given(out_f=st.integers(1, 70), in_f=st.integers(1, 70), density=st.floats(0.0, 1.0), batch=st.integers(1, 40),
       seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_products_on_random_shapes(out_f, in_f, density, batch, seed, dtype):
    check_products(*layer(out_f, in_f, density, seed=seed, dtype=dtype), batch, seed=seed + 1)


def test_a_failed_native_build_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SPARSEOPT_CACHE_DIR", str(tmp_path))
    native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not build the native sparse kernels"):
            assert native.library() is None
        check_products(*layer(30, 20, 0.3, dtype=torch.float32), batch=4)   # on torch's kernels
    finally:
        native.library.cache_clear()


def test_the_native_build_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEOPT_CACHE_DIR", str(tmp_path))
    first = native._build()
    mtime = first.stat().st_mtime_ns
    assert native._build() == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
