"""Mixed precision, channels_last and torch.compile in the runner (on CPU: bf16, fp16 and inductor all work here)."""

import copy
import json

import pytest
import torch
from helpers import TINY, batch, convnet, mlp
from torch import nn

import sparseopt as so
from sparseopt.experiments.run.checkpoint import load_checkpoint
from sparseopt.experiments.config.load import from_dict
from sparseopt.experiments.run.precision import MixedPrecision
from sparseopt.experiments.run.runner import Runner
from sparseopt.experiments.config.schema import RunConfig


def config(**train):
    cfg = copy.deepcopy(TINY)
    cfg["train"].update(train)
    return from_dict(RunConfig, cfg)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_runs_train_and_checkpoint_the_scaler(tmp_path, precision):
    results = Runner(config(precision=precision), tmp_path, quiet=True).run()
    assert results["final"]["test_accuracy"] > 0.5  # four well-separated synthetic classes
    state = load_checkpoint(tmp_path / "checkpoints" / "ckpt-00000024.pt")
    assert (state["grad_scaler"] is not None) == (precision == "fp16")


def test_the_sparse_pipeline_sees_unscaled_gradients_under_fp16():
    net = mlp(widths=(10, 32, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    seen = {}
    # registered before SparseTraining's hook, so it sees the gradients masking/SparseOpt/RigL are given
    opt.register_step_pre_hook(lambda o, a, k: seen.update({n: p.grad.clone() for n, p in net.named_parameters()}))
    sparse = so.SparseTraining(net, opt, 0.5, preconditioner=so.SparseOpt())
    reference = copy.deepcopy(net)  # the same sparse weights, trained without loss scaling (and without hooks)
    amp = MixedPrecision("fp16", torch.device("cpu"))
    x, y = batch(net, 0)
    with torch.autocast("cpu", dtype=torch.float16):
        nn.functional.cross_entropy(reference(x), y).backward()
    with amp.autocast():
        loss = nn.functional.cross_entropy(net(x), y)
    amp.backward(loss, opt)
    amp.step(opt)
    assert amp.scaler.get_scale() == 2.0 ** 16 and len(seen) == len(list(net.parameters()))
    factors = sparse.factors()
    for name, r in reference.named_parameters():  # the true gradients, not 65536 times them
        expected = r.grad * sparse.masks[name] * factors[name].float() if name in sparse.masks else r.grad
        assert torch.allclose(seen[name], expected, rtol=1e-3, atol=1e-6), name


def test_an_overflow_step_does_not_advance_the_mask_schedule():
    net = convnet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sparse = so.SparseTraining(net, opt, 0.3, topology=so.RigL(update_every=2, end_step=50))
    amp = MixedPrecision("fp16", torch.device("cpu"))

    def step(i, overflow=False):
        x, y = batch(net, i)
        with amp.autocast():
            loss = nn.functional.cross_entropy(net(x), y) * (float("inf") if overflow else 1.0)
        opt.zero_grad()
        amp.backward(loss, opt)
        amp.step(opt)

    step(0)
    step(1)
    assert sparse.step_count == 2                      # the next optimizer step is a mask update
    masks = {n: m.clone() for n, m in sparse.masks.items()}
    weights = {n: p.detach().clone() for n, p in net.named_parameters()}
    scale = amp.scaler.get_scale()
    step(2, overflow=True)
    assert amp.scaler.get_scale() == scale / 2          # the scaler saw the overflow and skipped the step
    assert sparse.step_count == 2
    assert all(torch.equal(masks[n], sparse.masks[n]) for n in masks)
    assert all(torch.equal(weights[n], p) for n, p in net.named_parameters())
    step(3)
    assert sparse.step_count == 3
    assert any(not torch.equal(masks[n], sparse.masks[n]) for n in masks)  # the update happened now


def test_channels_last_trains_the_same_network(tmp_path):
    cfg = copy.deepcopy(TINY)
    cfg.update(model={"name": "cnn"}, data={**cfg["data"], "options": {**cfg["data"]["options"],
                                                                       "shape": [3, 8, 8]}})
    cfg["train"].update(epochs=1)
    seen = []
    runs = {}
    for channels_last in (False, True):
        cfg["train"]["channels_last"] = channels_last
        runner = Runner(from_dict(RunConfig, cfg), tmp_path / str(channels_last), quiet=True)
        runner.exp.model.register_forward_pre_hook(lambda m, args: seen.append(
            args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()))
        runs[channels_last] = runner.run()
    assert any(seen) and not all(seen)
    a, b = runs[False]["final"], runs[True]["final"]
    assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=0.05)
    assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-3)


def test_compiled_model_is_not_recompiled_at_mask_updates(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    runner = Runner(config(compile=True, epochs=2), tmp_path, quiet=True)  # RigL updates every 4 steps
    results = runner.run()
    sparse = runner.exp.sparse
    assert sparse.itop() > sparse.density() + 0.01                       # the masks did change
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert counters["frames"]["ok"] == 1, dict(counters["frames"])
    assert results["final"]["test_accuracy"] > 0.5
    json.dumps(results)
