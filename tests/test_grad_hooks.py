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
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


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


# ---- the hooks in a training step: in place into an empty .grad, a transformed copy otherwise -----------------------
import pytest  # noqa: E402
from torch import nn  # noqa: E402

import sparseopt as so  # noqa: E402
import sparseopt.grad_hooks as grad_hooks  # noqa: E402
from helpers import batch, mlp  # noqa: E402
from sparseopt.native.gradient_masking import hooks_class  # noqa: E402


@pytest.fixture(params=["native", "python"])
def backend(request, monkeypatch):
    """Every hook test runs on the C++ hooks and on the Python fallback (a failed build, or
    SPARSEOPT_NATIVE_KERNELS=0)."""
    if request.param == "native":
        assert hooks_class() is not None, "the C++ gradient hooks did not build (see the warning)"
    else:
        monkeypatch.setattr(grad_hooks, "hooks_class", lambda: None)
    return request.param


def sparse_mlp(seed=0):
    model = mlp(widths=(12, 16, 16, 10), seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse = so.SparseTraining(model, opt, 0.3, topology=so.Static(), preconditioner=so.SparseOpt())
    return model, opt, sparse


def expected_grad(sparse, p, raw):
    """where(mask, raw, 0) * c_row, the gradient the step must apply."""
    return scaled_grad(raw, sparse.masks[p.name], sparse._row_scale.get(p.name))


def raw_grads(model, sparse, step):
    x, y = batch(model, step)
    return torch.autograd.grad(nn.functional.cross_entropy(model(x), y), [p.param for p in sparse.params])


def test_an_empty_grad_keeps_autograds_tensor_masked_in_place(backend):
    model, opt, sparse = sparse_mlp()
    assert sparse._row_scale, "the test needs SparseOpt row factors"
    assert sparse._gradients.native == (backend == "native")
    arrived = {}
    if backend == "python":  # a leaf hook sees the gradient AccumulateGrad receives; hold no reference to it
        for p in sparse.params:
            p.param.register_hook(lambda g, name=p.name: arrived.__setitem__(name, g.data_ptr()) or None)
    raw = raw_grads(model, sparse, 0)
    x, y = batch(model, 0)
    nn.functional.cross_entropy(model(x), y).backward()
    for p, r in zip(sparse.params, raw):
        if backend == "python":
            assert p.param.grad.data_ptr() == arrived[p.name], f"{p.name}: a second gradient tensor was allocated"
        assert same_bits(p.param.grad, expected_grad(sparse, p, r))
    if backend == "native":  # the C++ hook counts what it could not mask in place (a Python probe would hold it)
        assert sparse._gradients._native.copies() == 0


def test_a_gradient_someone_else_holds_is_masked_on_a_copy(backend):
    """A Python hook that keeps the arriving gradient (or any other holder) must not see it change."""
    model, opt, sparse = sparse_mlp()
    kept = {}
    for p in sparse.params:
        p.param.register_hook(lambda g, name=p.name: kept.__setitem__(name, g) or None)
    raw = raw_grads(model, sparse, 0)
    x, y = batch(model, 0)
    nn.functional.cross_entropy(model(x), y).backward()
    for p, r in zip(sparse.params, raw):
        assert torch.equal(kept[p.name], r), f"{p.name}: the held gradient was masked in place"
        assert same_bits(p.param.grad, expected_grad(sparse, p, r))
    if backend == "native":
        assert sparse._gradients._native.copies() == len(sparse.params)


def test_accumulating_into_an_existing_grad_scales_each_backward_once(backend):
    model, opt, sparse = sparse_mlp()
    raw = [raw_grads(model, sparse, s) for s in (0, 1, 2)]
    for s in (0, 1, 2):
        x, y = batch(model, s)
        nn.functional.cross_entropy(model(x), y).backward()
    for i, p in enumerate(sparse.params):
        want = sum(expected_grad(sparse, p, r[i]) for r in raw)
        torch.testing.assert_close(p.param.grad, want, rtol=1e-6, atol=1e-7)
        assert torch.all(p.param.grad[~sparse.masks[p.name]] == 0)


def test_zero_grad_without_set_to_none_is_masked_too(backend):
    model, opt, sparse = sparse_mlp()
    x, y = batch(model, 0)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    raw = raw_grads(model, sparse, 1)
    x, y = batch(model, 1)
    nn.functional.cross_entropy(model(x), y).backward()
    for p, r in zip(sparse.params, raw):
        assert same_bits(p.param.grad, expected_grad(sparse, p, r))


@pytest.mark.parametrize("registered", ["before", "after"])
def test_another_post_accumulate_hook_sees_the_masked_gradient(registered, backend):
    """DDP's Python reducer and FSDP2 read .grad in post-accumulate hooks: registered before SparseTraining they run
    before any hook of ours, so those weights must arrive masked already."""
    model = mlp(widths=(12, 16, 16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = {}

    def watch():
        for name, w in model.named_parameters():
            if w.dim() == 2:
                w.register_post_accumulate_grad_hook(lambda t, name=name: seen.__setitem__(name, t.grad.clone()))
    if registered == "before":
        watch()
    sparse = so.SparseTraining(model, opt, 0.3, topology=so.Static(), preconditioner=so.SparseOpt())
    if registered == "after":
        watch()
    raw = raw_grads(model, sparse, 0)
    x, y = batch(model, 0)
    nn.functional.cross_entropy(model(x), y).backward()
    for p, r in zip(sparse.params, raw):
        assert same_bits(seen[p.name], expected_grad(sparse, p, r)), p.name
        assert same_bits(p.param.grad, expected_grad(sparse, p, r))


def test_a_gradient_that_builds_a_graph_stays_differentiable_through_the_hooks(backend):
    model, opt, sparse = sparse_mlp()
    x, y = batch(model, 0)
    nn.functional.cross_entropy(model(x), y).backward(create_graph=True)
    for p in sparse.params:
        g = p.param.grad
        assert g.requires_grad and torch.all(g[~sparse.masks[p.name]] == 0), p.name
        (second,) = torch.autograd.grad(g.pow(2).sum(), p.param, retain_graph=True)
        assert torch.isfinite(second).all()


def train(backend_choice, monkeypatch, steps=8):
    """RigL (updates every 2 steps) + SparseOpt on a BatchNorm MLP, two accumulated backward passes on odd steps:
    masks and factors change as training goes, so stale masks or factors in a hook would show."""
    if backend_choice == "python":
        monkeypatch.setattr(grad_hooks, "hooks_class", lambda: None)
    else:
        monkeypatch.setattr(grad_hooks, "hooks_class", hooks_class)
    model = mlp(widths=(12, 24, 24, 10), seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    sparse = so.SparseTraining(model, opt, 0.3, topology=so.RigL(update_every=2, end_step=100),
                               preconditioner=so.SparseOpt())
    assert sparse._gradients.native == (backend_choice == "native")
    for step in range(steps):
        opt.zero_grad()
        for micro in range(1 + step % 2):
            x, y = batch(model, 10 * step + micro)
            nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, sparse


def test_the_cpp_and_python_hooks_train_bit_identically(monkeypatch):
    assert hooks_class() is not None
    native_model, native = train("native", monkeypatch)
    python_model, python = train("python", monkeypatch)
    assert sum(native.changed.values()) > 0, "the test needs mask updates"
    for (name, a), b in zip(native_model.state_dict().items(), python_model.state_dict().values()):
        assert same_bits(a, b), name
    for name in native.masks:
        assert torch.equal(native.masks[name], python.masks[name]), name


def test_a_failed_build_warns_and_the_python_hooks_mask(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SPARSEOPT_CACHE_DIR", str(tmp_path))
    hooks_class.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not build the native gradient masking.*Python autograd hooks"):
            model, opt, sparse = sparse_mlp()
        assert not sparse._gradients.native
        raw = raw_grads(model, sparse, 0)
        x, y = batch(model, 0)
        nn.functional.cross_entropy(model(x), y).backward()
        for p, r in zip(sparse.params, raw):
            assert same_bits(p.param.grad, expected_grad(sparse, p, r))
    finally:
        hooks_class.cache_clear()
