"""Hessian diagnostics (SPEC 6): Lanczos/power/Hutchinson against the exact Hessian (double backward, float64, and
independently checked by an analytic quadratic and finite differences), no side effects, bad input, divergence."""

import math

import pytest
import torch
from torch import nn

import sparseopt as so
from sparseopt.diagnostics import (HessianOperator, exact_hessian, hutchinson_trace, itop_summary, lanczos,
                                   power_iteration, sharpness_report, stability_threshold)


def _bn_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)


def _mask(seed=2):
    g = torch.Generator().manual_seed(seed)
    return so.random_mask((8, 6), 20, g)


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def test_exact_hessian_matches_analytic_quadratic():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 5, generator=g, dtype=torch.float64), torch.randn(30, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(5, 1, bias=False).double()
    op = HessianOperator(model, x, y, nn.functional.mse_loss, physical_batch=7)
    torch.testing.assert_close(exact_hessian(op), 2 * x.T @ x / 30, rtol=1e-12, atol=1e-12)


def test_exact_hessian_matches_finite_differences_through_train_mode_batchnorm(data):
    model, (x, y) = _bn_model(), data
    op = HessianOperator(model, x, y, physical_batch=16)
    h = exact_hessian(op)
    assert (h - h.T).abs().max() < 1e-12
    params = list(model.parameters())

    def grad_at(flat):
        torch.nn.utils.vector_to_parameters(flat, params)
        loss = sum(nn.functional.cross_entropy(model.train()(x[i:i + 16]), y[i:i + 16]) * len(x[i:i + 16]) / 40
                   for i in range(0, 40, 16))
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    w0 = torch.nn.utils.parameters_to_vector(params).detach().clone()
    eps = 1e-5
    for i in (0, 17, 50, 60, 90):              # first weight, bias, BN gamma/beta region, last layer
        e = torch.zeros_like(w0)
        e[i] = eps
        fd = (grad_at(w0 + e) - grad_at(w0 - e)) / (2 * eps)
        torch.testing.assert_close(h[i], fd, rtol=1e-6, atol=1e-7)
    torch.nn.utils.vector_to_parameters(w0, params)


def test_lanczos_top_and_bottom_eigenvalues_match_eigvalsh(data):
    op = HessianOperator(_bn_model(), *data, physical_batch=16)
    ev = torch.linalg.eigvalsh(exact_hessian(op))
    res = lanczos(op, k=4, smallest=2)
    assert res.status == "ok" and res.converged
    for got, want in zip(res.eigenvalues, ev.flip(0)[:4].tolist()):
        assert _rel(got, want) < 1e-6
    for got, want in zip(res.smallest, ev[:2].tolist()):
        assert _rel(got, want) < 1e-6
    assert max(res.residuals) < 1e-5 * abs(ev[-1]) and res.matvecs > 0 and res.seconds > 0


def test_restricted_operator_equals_principal_submatrix(data):
    model, mask = _bn_model(), _mask()
    full = exact_hessian(HessianOperator(model, *data, physical_batch=16))
    op = HessianOperator(model, *data, physical_batch=16, masks={"0.weight": mask})
    active = op.support()
    assert op.active_dim == op.dim - int((~mask).sum())
    want = torch.linalg.eigvalsh(full[active][:, active]).flip(0)
    res = lanczos(op, k=3)
    for got, w in zip(res.eigenvalues, want[:3].tolist()):
        assert _rel(got, w) < 1e-6
    assert res.eigenvalues[0] <= torch.linalg.eigvalsh(full)[-1] + 1e-9           # interlacing
    unrestricted = HessianOperator(model, *data, physical_batch=16, masks={"0.weight": mask}, restrict=False)
    assert unrestricted.active_dim == unrestricted.dim


def test_preconditioned_sharpness_uses_sqrt_factors(data):
    model, mask = _bn_model(), _mask()
    c = so.SparseOpt().factors({"0.weight": mask})["0.weight"]
    full = exact_hessian(HessianOperator(model, *data, physical_batch=16))
    scale = torch.ones(full.shape[0], dtype=torch.float64)
    scale[:48] = (torch.sqrt(c) * mask).reshape(-1)
    want = torch.linalg.eigvalsh(scale[:, None] * full * scale[None, :])[-1]
    op = HessianOperator(model, *data, physical_batch=16, masks={"0.weight": mask}, precondition={"0.weight": c})
    assert _rel(lanczos(op, k=1).eigenvalues[0], float(want)) < 1e-6


def test_hvp_is_exact_and_independent_of_physical_batch_without_batchnorm(data):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    a = HessianOperator(model, *data, physical_batch=7)
    b = HessianOperator(model, *data, physical_batch=1000)
    v = torch.randn(a.dim, dtype=torch.float64)
    torch.testing.assert_close(a(v), b(v), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a(v), exact_hessian(a) @ v, rtol=1e-10, atol=1e-12)


def test_power_iteration_and_hutchinson(data):
    op = HessianOperator(_bn_model(), *data, physical_batch=16)
    h = exact_hessian(op)
    ev = torch.linalg.eigvalsh(h)
    dominant = float(ev[ev.abs().argmax()])
    p = power_iteration(op, iters=1000, tol=1e-9)
    assert p.converged and _rel(p.eigenvalues[0], dominant) < 1e-6
    warm = power_iteration(op, iters=1000, tol=1e-9, v0=p.eigenvectors[0])
    assert warm.matvecs <= 2
    t = hutchinson_trace(op, 300, seed=3)
    assert t.stderr > 0 and abs(t.trace - float(torch.trace(h))) < 4 * t.stderr


def test_no_side_effects(data):
    x, y = data
    model = _bn_model()
    model.train()
    model(x)                                           # non-trivial running stats
    model.eval()
    model[3].train()                                   # mixed modes must come back as they were
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    op = HessianOperator(model, x, y, physical_batch=16)
    lanczos(op, k=2)
    power_iteration(op, iters=5)
    hutchinson_trace(op, 4)
    exact_hessian(op)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers))
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert torch.equal(torch.get_rng_state(), rng)


def test_train_mode_uses_batch_statistics(data):
    model = _bn_model()
    model.eval()
    train = lanczos(HessianOperator(model, *data, physical_batch=40), k=1).eigenvalues[0]
    evald = lanczos(HessianOperator(model, *data, physical_batch=40, train_mode=False), k=1).eigenvalues[0]
    assert abs(train - evald) > 1e-3


def test_diverged_model_reports_not_finite(data):
    model = _bn_model()
    with torch.no_grad():
        model[3].weight.fill_(float("nan"))
    op = HessianOperator(model, *data)
    res = lanczos(op, k=2)
    assert res.status == "not finite" and all(math.isnan(v) for v in res.eigenvalues)
    assert power_iteration(op).status == "not finite"
    assert hutchinson_trace(op, 4).status == "not finite"


def test_bad_input(data):
    op = HessianOperator(_bn_model(), *data)
    with pytest.raises(ValueError, match="only 99 active"):
        lanczos(op, k=100)
    with pytest.raises(ValueError, match="unknown parameter"):
        HessianOperator(_bn_model(), *data, params=["nope"])
    with pytest.raises(ValueError, match="not in the operator"):
        HessianOperator(_bn_model(), *data, masks={"1.weight.x": torch.ones(8, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        HessianOperator(_bn_model(), *data, masks={"0.weight": torch.ones(6, 8, dtype=torch.bool)})


def test_active_dropout_is_refused_with_the_cause(data):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    with pytest.raises(ValueError, match=r"dropout is active in \['2'\].*not deterministic"):
        HessianOperator(model, *data)
    op = HessianOperator(model, *data, dropout="disable")
    v = torch.randn(op.dim, dtype=torch.float64)
    torch.testing.assert_close(op(v), op(v), rtol=0, atol=0)
    assert model[2].training
    with pytest.warns(RuntimeWarning, match="dropout"):
        HessianOperator(model, *data, dropout="allow")


@pytest.mark.parametrize("lr, beta, nesterov, want", [
    (0.1, 0.0, False, 20.0), (0.1, 0.9, False, 38.0), (0.1, 0.9, True, 38.0 / 2.8), (0.5, 0.0, True, 4.0)])
def test_stability_threshold(lr, beta, nesterov, want):
    assert stability_threshold(lr, beta, nesterov) == pytest.approx(want)


def test_stability_threshold_rejects_bad_values():
    with pytest.raises(ValueError):
        stability_threshold(0.0)
    with pytest.raises(ValueError):
        stability_threshold(0.1, momentum=1.0)


def test_sharpness_report_and_itop_summary_on_sparse_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    st = so.SparseTraining(model, opt, 0.3, distribution="uniform", prune_first_layer=True,
                           topology=so.RigL(update_every=2, end_step=10), preconditioner=so.SparseOpt())
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    summary = itop_summary(st)
    assert summary["itop"] == pytest.approx(st.itop()) and summary["itop"] > 0.3 - 1e-6
    first = summary["layers"][0]
    assert first["name"] == "0.weight" and 0 <= first["changed_fraction"] <= 1
    assert first["factors"]["min"] <= first["factors"]["median"] <= first["factors"]["max"]
    rep = sharpness_report(model, x, y, masks=st.masks, factors=st.factors(), k=2, lr=0.1, momentum=0.9,
                           trace_samples=4)
    assert rep["threshold"] == pytest.approx(38.0)
    assert rep["restricted"]["active_dim"] < rep["unrestricted"]["active_dim"]
    assert rep["restricted"]["eigenvalues"][0] <= rep["unrestricted"]["eigenvalues"][0] * (1 + 1e-4)
    assert rep["preconditioned"]["status"] == "ok" and "trace" in rep["preconditioned"]


def test_cached_single_batch_graph_is_rebuilt_after_parameters_change():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    cached = HessianOperator(model, x, y, physical_batch=100)      # one batch: graph reused across products
    v = torch.randn(cached.dim, dtype=torch.float64)
    first = cached(v)
    assert torch.allclose(cached(v), first)
    with torch.no_grad():
        model[0].weight.mul_(1.5)                                   # an in-place change invalidates the cache
    fresh = HessianOperator(model, x, y, physical_batch=7)          # several batches: nothing cached
    assert torch.allclose(cached(v), fresh(v), atol=1e-10)
    assert not torch.allclose(cached(v), first)
