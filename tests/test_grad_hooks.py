"""The gradient and weight masking computed on the floats' bits is torch.where(mask, t, 0) * row, bit for bit."""

import torch
from hypothesis import given, settings, strategies as st

from sparseopt.grad_hooks import scale_grad_, scaled_grad

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SPECIAL = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -1.5, 3e-39])


def reference(t, mask, row):
    out = torch.where(mask, t, torch.zeros((), dtype=t.dtype))
    return out if row is None else out * row


def same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(DTYPES), st.integers(1, 9), st.integers(1, 9), st.booleans(), st.booleans(),
       st.sampled_from(["contiguous", "transposed", "expanded"]), st.integers(0, 2**31 - 1))
def test_bitwise_masking_equals_where_for_any_values_and_layout(dtype, rows, cols, with_row, specials, layout,
                                                                seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g)
    if specials:  # NaN and inf where the mask drops them or keeps them, signed zeros, a subnormal
        flat = base.view(-1)
        idx = torch.randint(0, flat.numel(), (min(flat.numel(), 5),), generator=g)
        flat[idx] = SPECIAL[torch.randint(0, len(SPECIAL), (len(idx),), generator=g)]
    t = {"contiguous": base, "transposed": base.t().contiguous().t(),
         "expanded": base[:1].expand(rows, cols)}[layout].to(dtype)
    mask = torch.rand(rows, cols, generator=g) < 0.4
    row = (torch.rand(rows, 1, generator=g) * 2).to(dtype) if with_row else None
    expected = reference(t, mask, row)
    assert same_bits(scaled_grad(t, mask, row), expected)
    if layout != "expanded":  # in place needs a tensor that owns each element
        inplace = t.clone()
        assert scale_grad_(inplace, mask, row) is inplace and same_bits(inplace, expected)


def test_a_gradient_that_builds_a_graph_stays_differentiable():
    w = torch.randn(4, 3, requires_grad=True)
    mask = torch.rand(4, 3) < 0.5
    (g,) = torch.autograd.grad((w ** 3).sum(), w, create_graph=True)
    masked = scaled_grad(g, mask)
    (h,) = torch.autograd.grad(masked.sum(), w)
    assert torch.equal(h, torch.where(mask, 6 * w.detach(), 0.0))


def test_a_dtype_without_an_integer_twin_is_masked_by_where():
    t = torch.randn(3, 4, dtype=torch.complex64)
    mask = torch.rand(3, 4) < 0.5
    assert torch.equal(scaled_grad(t, mask), torch.where(mask, t, torch.zeros((), dtype=t.dtype)))
