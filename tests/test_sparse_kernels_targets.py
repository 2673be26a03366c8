"""The native CSR kernels at every vector width they compile to: ``sparse_kernels.cpp`` uses 16 floats with
AVX-512, 8 with AVX, else 4, and ``-march=native`` builds only this CPU's width. Here the same source is also
built with the wider instruction sets switched off, so the 8- and 4-wide loops (users' AVX2 and older CPUs) are
checked too, on batches that hit each remainder branch of both kernels at each width.

Each build reads back the width it was compiled with (a probe that includes the source and returns its ``VW``),
so flags that fail to switch the target off fail here instead of testing the native width twice."""

import ctypes
import platform
import warnings

import pytest
import torch
from hypothesis import given, strategies as st

from sparseopt import native as native_build
from sparseopt.execution import native

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                                reason="the -mno-avx* target flags are x86 flags")

NO_AVX512 = ["-mno-avx512f"]                     # GCC and clang drop every AVX-512 extension with it
NO_AVX = ["-mno-avx", "-mno-avx2", "-mno-avx512f", "-mno-fma"]
PROBE = '#include "{source}"\nextern "C" int sparseopt_test_vector_width() {{ return VW; }}\n'


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """Vector width -> library, for the native build and the two narrower ones, built in a private cache (the
    special builds must not land in the user's)."""
    root = tmp_path_factory.mktemp("targets")
    probe = root / "sparse_kernels_probe.cpp"
    probe.write_text(PROBE.format(source=native.SOURCE.resolve()))
    signatures = {name: (native._ARGS, None) for name in ("sparseopt_spmm_f32", "sparseopt_sddmm_f32")}
    signatures["sparseopt_test_vector_width"] = ([], ctypes.c_int)
    libs = {}
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        mp.setenv("SPARSEOPT_CACHE_DIR", str(root / "cache"))
        mp.setenv("SPARSEOPT_NATIVE_KERNELS", "1")
        warnings.simplefilter("error")           # a failed build must fail, not fall back
        for flags in ([], NO_AVX512, NO_AVX):
            lib = native_build.load(probe, signatures, "none: this test fails", extra_flags=flags)
            assert lib is not None
            libs[tuple(flags)] = lib
    widths = {flags: lib.sparseopt_test_vector_width() for flags, lib in libs.items()}
    top = widths[()]
    assert top in (4, 8, 16)
    assert widths[tuple(NO_AVX512)] == min(8, top), f"{NO_AVX512} did not switch AVX-512 off: {widths}"
    assert widths[tuple(NO_AVX)] == 4, f"{NO_AVX} did not switch AVX off: {widths}"
    return {widths[flags]: lib for flags, lib in libs.items()}


def batches(vw):
    """Widths that hit every branch: 4-vector slices (two of them), the 3/2/1-vector slices, the scalar tail
    alone and after each, and the same splits in the dot product's 4-vector, 1-vector and scalar loops."""
    return sorted({1, 3, vw - 1, vw, vw + 1, 2 * vw + 1, 3 * vw + 2, 4 * vw, 4 * vw + 5, 2 * 4 * vw + vw + 3})


def random_csr(rows, cols, density, seed, empty_rows=()):
    """Mask (with ``empty_rows`` forced empty), float64 weight on it, and its int32 CSR arrays (float32 values)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < density
    mask[list(empty_rows)] = False
    weight = torch.randn(rows, cols, generator=g, dtype=torch.float64) * mask
    crow = torch.zeros(rows + 1, dtype=torch.int32)
    crow[1:] = mask.sum(1).cumsum(0)
    col = mask.nonzero()[:, 1].to(torch.int32).contiguous()
    return mask, weight, crow, col, weight[mask].float().contiguous()


def guarded(n, pad=64):
    """A NaN-filled output of ``n`` floats followed by ``pad`` more: unwritten entries and writes past the end
    both show."""
    return torch.full((n + pad,), float("nan"))


def assert_within_float32(got, want, scale, guard):
    """|got - want| <= 1e-5 * (|want| + sum of the |terms|), the float32 accumulation error (so exact zero for
    empty sums), and the guard after the output untouched."""
    assert torch.isnan(guard).all(), "the kernel wrote past the end of its output"
    err = (got.double() - want).abs()
    ok = err <= 1e-5 * scale + 1e-5 * want.abs()
    assert bool(ok.all()), f"{int((~ok).sum())} of {ok.numel()} wrong; worst err {err.max().item():.3g}"


def check_kernels(lib, mask, weight, crow, col, val, batch, seed):
    """spmm against the dense product on the masked weight, sddmm against the dense product at the active
    entries (float64 references, bounded by the float32 error of the same sums)."""
    rows, cols = mask.shape
    g = torch.Generator().manual_seed(seed)
    xt = torch.randn(cols, batch, generator=g)
    dyt = torch.randn(rows, batch, generator=g)

    yt = guarded(rows * batch)
    lib.sparseopt_spmm_f32(crow.data_ptr(), col.data_ptr(), val.data_ptr(), xt.data_ptr(), yt.data_ptr(),
                           rows, batch, 1)
    x64 = xt.double()
    assert_within_float32(yt[:rows * batch].reshape(rows, batch), weight @ x64, weight.abs() @ x64.abs(),
                          yt[rows * batch:])

    nnz = int(mask.sum())
    out = guarded(nnz)
    lib.sparseopt_sddmm_f32(crow.data_ptr(), col.data_ptr(), dyt.data_ptr(), xt.data_ptr(), out.data_ptr(),
                            rows, batch, 1)
    dy64 = dyt.double()
    assert_within_float32(out[:nnz], (dy64 @ x64.t())[mask], (dy64.abs() @ x64.abs().t())[mask], out[nnz:])


@pytest.mark.parametrize("shape", [(1, 37), (45, 1), (30, 23)])
def test_every_batch_remainder(targets, shape):
    """1-row, 1-column and a general matrix (a third of its rows empty) at every branch-hitting batch."""
    mask, weight, crow, col, val = random_csr(*shape, 0.5, seed=shape[0], empty_rows=range(0, shape[0], 3)[1:])
    if shape[0] > 1:
        assert (mask.sum(1) == 0).any() and mask.any()
    for vw, lib in targets.items():
        for batch in batches(vw):
            check_kernels(lib, mask, weight, crow, col, val, batch, seed=batch)


@given(rows=st.integers(1, 60), cols=st.integers(1, 60), density=st.floats(0.02, 0.5), seed=st.integers(0, 2**16),
       pick=st.integers(0, 2**16))
def test_random_shapes(targets, rows, cols, density, seed, pick):
    for vw, lib in targets.items():
        options = batches(vw)
        csr = random_csr(rows, cols, density, seed, empty_rows=range(1, rows, 4))
        check_kernels(lib, *csr, options[pick % len(options)], seed=seed + 1)
