"""Runner diagnostics (sparseopt.diagnostics.tracking): Hessian / scale / ITOP trackers, their config, resume, plots."""

import json
import shutil
import warnings

import pytest
import torch
import yaml
from helpers import TINY
from torch import nn

from sparseopt.cli import main
from sparseopt.diagnostics.hessian import HessianOperator, lanczos
from sparseopt.diagnostics.tracking import HessianTracker, ItopTracker, ScaleTracker
from sparseopt.experiments.run.build import build_callbacks, build_experiment
from sparseopt.experiments.run.callbacks import StepContext
from sparseopt.experiments.run.checkpoint import load_checkpoint
from sparseopt.experiments.config.load import from_dict, load_yaml
from sparseopt.experiments.config.schema import RunConfig

TRACKERS = ["--set", "diagnostics.hessian_every=4", "--set", "diagnostics.hessian_samples=200",
            "--set", "diagnostics.hessian_physical_batch=128", "--set", "diagnostics.scales_every=6",
            "--set", "diagnostics.itop_every=4"]


def _train(tmp_path, name, *extra):
    config = tmp_path / "config.yaml"
    if not config.exists():
        config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / name
    assert main(["train", str(config), "--out", str(out), "--quiet", *extra]) == 0
    return out


def _rows(run, split):
    return [r for r in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
            if r["split"] == split]


def _final_weights(run):
    return load_checkpoint(sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1])["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracking")
    return {"tracked": _train(tmp, "tracked", *TRACKERS), "plain": _train(tmp, "plain")}


def test_trackers_log_their_metrics(runs):
    hessian = _rows(runs["tracked"], "hessian")
    assert [r["step"] for r in hessian] == [4, 8, 12, 16, 20, 24]
    for r in hessian:
        assert r["lambda_1"] >= r["lambda_2"] >= r["lambda_3"] >= r["lambda_4"]
        assert r["converged"] == 1.0 and r["matvecs"] > 0 and r["seconds"] > 0
        assert "lambda_1_preconditioned" in r
    first = hessian[0]       # the threshold follows the scheduled lr of the next step
    assert first["threshold"] == pytest.approx((2 + 2 * 0.9) / first["lr"])
    assert "threshold" not in hessian[-1]   # cosine schedule reaches lr = 0 at the last step: no threshold

    scales = _rows(runs["tracked"], "scales")
    assert [r["step"] for r in scales] == [6, 12, 18, 24]
    keys = set(scales[0])
    for layer in ("net.1", "net.4"):
        assert {f"weight_norm/{layer}", f"act_rms/{layer}", f"act_mean_abs/{layer}", f"act_std/{layer}"} <= keys
    assert "zero_fanin/net.4" in keys and {"factor_min/net.4", "factor_max/net.4", "factor_mean/net.4"} <= keys
    assert any(k.startswith("grad_norm/") for r in scales for k in r)

    itop = _rows(runs["tracked"], "itop")
    assert len(itop) == 6 and all(0 < r["itop"] <= 1 and "itop/net.4" in r for r in itop)
    assert [r["itop"] for r in itop] == sorted(r["itop"] for r in itop)      # non-decreasing


def test_lambda_matches_a_direct_lanczos_on_the_checkpointed_state(runs):
    run = runs["tracked"]
    cfg = from_dict(RunConfig, load_yaml(run / "config.yaml"))
    state = load_checkpoint(run / "checkpoints" / "ckpt-00000024.pt")
    exp = build_experiment(cfg)
    exp.model.load_state_dict(state["model"])
    exp.sparse.load_state_dict(state["sparse"])
    x, y = exp.data.train.x[:200], exp.data.train.y[:200]
    op = HessianOperator(exp.model, x, y, physical_batch=128, masks=exp.sparse.masks)
    direct = lanczos(op, 4)
    logged = _rows(run, "hessian")[-1]
    for j in range(4):
        assert logged[f"lambda_{j + 1}"] == pytest.approx(direct.eigenvalues[j], rel=1e-4)
    pre = HessianOperator(exp.model, x, y, physical_batch=128, masks=exp.sparse.masks,
                          precondition=exp.sparse.factors())
    assert logged["lambda_1_preconditioned"] == pytest.approx(lanczos(pre, 1).eigenvalues[0], rel=1e-4)


def test_trackers_do_not_change_training(runs):
    tracked, plain = _final_weights(runs["tracked"]), _final_weights(runs["plain"])
    assert tracked.keys() == plain.keys()
    for name in plain:
        assert torch.equal(tracked[name], plain[name]), name
    assert ([r["loss"] for r in _rows(runs["tracked"], "train")] == [r["loss"] for r in _rows(runs["plain"], "train")])


def test_resume_with_trackers_is_bit_identical(runs, tmp_path):
    straight = runs["tracked"]
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    (resumed / "checkpoints" / "ckpt-00000024.pt").unlink()
    (resumed / "results.json").unlink()
    saved = load_checkpoint(resumed / "checkpoints" / "ckpt-00000016.pt")["callbacks"]["hessian"]
    assert isinstance(saved["v"], torch.Tensor) and isinstance(saved["v_pre"], torch.Tensor)
    assert main(["train", "--resume", str(resumed), "--quiet"]) == 0
    a, b = _final_weights(straight), _final_weights(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    for split in ("hessian", "scales", "itop"):
        strip = [{k: v for k, v in r.items() if k != "seconds"} for r in _rows(straight, split)]
        again = [{k: v for k, v in r.items() if k != "seconds"} for r in _rows(resumed, split)]
        assert strip == again, split


def test_report_draws_sharpness_and_itop(runs, tmp_path):
    out = tmp_path / "rep"
    assert main(["report", str(runs["tracked"]), str(runs["plain"]), "--out", str(out), "--target", "0.5"]) == 0
    assert (out / "sharpness.png").stat().st_size > 0 and (out / "itop.png").stat().st_size > 0
    assert {"sharpness.png", "itop.png"} <= set(json.loads((out / "report.json").read_text())["plots"])
    only_plain = tmp_path / "rep_plain"
    assert main(["report", str(runs["plain"]), "--out", str(only_plain), "--target", "0.5"]) == 0
    assert not (only_plain / "sharpness.png").exists() and (only_plain / "itop.png").exists()


def test_t_band_is_a_90_percent_t_interval():
    from scipy import stats

    from sparseopt.experiments.report.eos import t_band
    steps, mean, low, high = t_band([{0: 1.0, 5: 2.0}, {0: 3.0, 5: 2.0}, {0: 2.0}])
    assert steps == [0] and mean == [2.0]
    assert high[0] - mean[0] == pytest.approx(stats.t.ppf(0.95, 2) * 1.0 / 3 ** 0.5)


# ---- unit level: side effects, hooks, edge cases -------------------------------------------------------------------
def _ctx(model, x=None, y=None, sparse=None, step=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    return StepContext(step, model, opt, sparse, x, y, torch.device("cpu"))


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(16, 3))


def test_scale_tracker_removes_hooks_and_leaves_no_trace():
    model = _bn_model()
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    nn.functional.cross_entropy(model(x), y).backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    metrics = ScaleTracker(1, batch=32)(_ctx(model, x, y))
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert torch.equal(rng, torch.get_rng_state()) and model.training
    assert {"grad_norm/1", "weight_norm/1", "act_rms/1", "act_std/5", "act_mean_abs/5"} <= set(metrics)
    assert metrics["grad_norm/5"] == pytest.approx(float(model[5].weight.grad.norm()))


def test_hessian_tracker_threshold_warm_start_and_no_side_effects():
    model = _bn_model()
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    tracker = HessianTracker(1, k=2, samples=48, physical_batch=16)
    first = tracker(_ctx(model, x, y))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state()) and all(p.grad is None for p in model.parameters())
    assert first["threshold"] == pytest.approx((2 + 1.8) / (2.8 * 0.1))    # Nesterov, beta 0.9
    op = HessianOperator(model, x[:48], y[:48], physical_batch=16, dropout="disable")
    assert first["lambda_1"] == pytest.approx(lanczos(op, 2).eigenvalues[0], rel=1e-4)
    state = tracker.state_dict()
    assert state["v"].shape == (op.dim,)
    again = HessianTracker(1, k=2, samples=48, physical_batch=16)
    again.load_state_dict(state)
    second = again(_ctx(model, x, y, step=2))              # warm start: same eigenvalues, fewer products
    assert second["lambda_1"] == pytest.approx(first["lambda_1"], rel=1e-5)
    assert second["matvecs"] <= first["matvecs"]


def test_warm_started_lanczos_agrees_with_a_cold_start():
    model = _bn_model()
    x, y = torch.randn(40, 12), torch.randint(0, 3, (40,))
    op = HessianOperator(model, x, y, dropout="disable")
    ref = lanczos(op, 3, return_vectors=True)
    warm = lanczos(op, 3, v0=ref.eigenvectors[0] + 0.1 * torch.randn(op.dim))
    assert warm.eigenvalues == pytest.approx(ref.eigenvalues, rel=1e-4) and warm.converged


def test_trackers_without_data_or_sparsity_skip_quietly():
    model = _bn_model()
    tracker = HessianTracker(1)
    with pytest.warns(RuntimeWarning, match="no in-memory"):
        assert tracker(_ctx(model)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # the warning is given once
        assert tracker(_ctx(model)) is None
    assert ItopTracker(1)(_ctx(model)) is None
    metrics = ScaleTracker(1)(_ctx(model))            # no data: norms only
    assert "weight_norm/1" in metrics and not any(k.startswith("act_") for k in metrics)


def test_diagnostics_config_builds_callbacks_and_validates(tmp_path, capsys):
    cfg = from_dict(RunConfig, {"diagnostics": {"hessian_every": 5, "itop_every": 2}})
    names = [(c.name, c.every) for c in build_callbacks(cfg)]
    assert names == [("hessian", 5), ("itop", 2)]
    assert build_callbacks(RunConfig()) == []
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(config), "--out", str(tmp_path / "bad"), "--quiet",
                 "--set", "diagnostics.hessian_k=0"]) == 2
    assert "diagnostics.hessian_k" in capsys.readouterr().err


def test_raw_uint8_training_sets_are_normalised_like_the_batches():
    model = _bn_model()
    raw, y = torch.randint(0, 256, (32, 12), dtype=torch.uint8), torch.randint(0, 3, (32,))
    with pytest.warns(RuntimeWarning, match="no in-memory"):           # no way to normalise: skipped
        assert HessianTracker(1, k=1)(_ctx(model, raw, y)) is None
    ctx = _ctx(model, raw, y)
    ctx.normalize = lambda t: (t.float() - 128) / 64                   # what the runner passes (loader.normalize)
    got = HessianTracker(1, k=1)(ctx)
    op = HessianOperator(model, (raw.float() - 128) / 64, y, dropout="disable")
    assert got["lambda_1"] == pytest.approx(lanczos(op, 1).eigenvalues[0], rel=1e-4)
