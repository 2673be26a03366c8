"""The Lightning callback with the real lightning package: its DEFAULT automatic-optimization loop (no
``optimizer_step`` override, so Lightning calls ``optimizer.step(closure)``), a tiny random-init CNN."""

import runpy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

import sparseopt as so
from sparseopt.execution.training import ExecutionPolicy
from sparseopt.integrations.lightning import SparseTrainingCallback

EPOCHS, BATCHES, ACCUMULATE = 3, 6, 2  # 3 optimizer steps per epoch
MAX_NORM, LR = 0.05, 0.05


def images(n=BATCHES * 8, classes=5):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)


class Classifier(pl.LightningModule):
    def __init__(self, seed=0, momentum=0.9, scheduler=True, weight_decay=0.0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
        self.momentum, self.scheduler, self.weight_decay = momentum, scheduler, weight_decay

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=LR, momentum=self.momentum, weight_decay=self.weight_decay)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def sparse_options():
    return dict(density=0.3, topology=so.RigL(update_every=2, drop_fraction=0.5, end_step=EPOCHS * 3 - 1),
                preconditioner=so.SparseOpt())


def fit(tmp, module, ckpt_path=None, extra_callbacks=(), sparse=None, loader=None, **trainer_options):
    cb = SparseTrainingCallback(**(sparse or sparse_options()))
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    options = dict(max_epochs=EPOCHS, accumulate_grad_batches=ACCUMULATE, accelerator="cpu", devices=1,
                   logger=CSVLogger(tmp, name="logs"), log_every_n_steps=1, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=True, deterministic=True)
    trainer = pl.Trainer(callbacks=[cb, ckpt, *extra_callbacks], **{**options, **trainer_options})
    trainer.fit(module, loader or images(), ckpt_path=ckpt_path)
    return trainer, cb


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pl_full")
    module = Classifier()
    trainer, cb = fit(tmp, module)
    return tmp, module, trainer, cb


def test_default_loop_trains_sparse_and_checkpoints_the_sparse_state(uninterrupted):
    tmp, module, trainer, cb = uninterrupted
    sparse = cb.sparse
    assert sparse.optimizer is trainer.optimizers[0]
    assert sparse.step_count == EPOCHS * BATCHES // ACCUMULATE
    for p in sparse.params:
        assert not p.param[~sparse.masks[p.name]].any()
        assert int(sparse.masks[p.name].sum()) == sparse.target_nnz[p.name]
    saved = torch.load(tmp / "ckpt" / "epoch=0.ckpt", weights_only=False)["callbacks"][cb.state_key]
    assert saved["step"] == BATCHES // ACCUMULATE


def test_density_and_itop_reach_the_logger(uninterrupted):
    tmp, _, trainer, cb = uninterrupted
    import csv

    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    density = [float(r["sparseopt/density"]) for r in rows if r.get("sparseopt/density")]
    itop = [float(r["sparseopt/itop"]) for r in rows if r.get("sparseopt/itop")]
    assert len(density) >= EPOCHS and all(d == pytest.approx(cb.sparse.density()) for d in density)
    assert itop == sorted(itop) and itop[-1] == pytest.approx(cb.sparse.itop())


def assert_same_training(cb, module, full_cb, full_module):
    """Bit-identical step count, masks, ITOP record, weights and buffers."""
    assert cb.sparse.step_count == full_cb.sparse.step_count
    for name, mask in full_cb.sparse.masks.items():
        assert torch.equal(cb.sparse.masks[name], mask), name
        assert torch.equal(cb.sparse.fired[name], full_cb.sparse.fired[name]), name
    resumed = module.state_dict()
    for name, value in full_module.state_dict().items():
        assert torch.equal(resumed[name], value), name


def test_resume_from_ckpt_path_matches_the_uninterrupted_run_bit_identically(uninterrupted, tmp_path):
    full_tmp, full_module, _, full_cb = uninterrupted
    module = Classifier(seed=1)  # a different init: everything must come from the checkpoint
    _, cb = fit(tmp_path, module, ckpt_path=full_tmp / "ckpt" / "epoch=0.ckpt")
    assert_same_training(cb, module, full_cb, full_module)


def test_resuming_a_checkpoint_without_sparse_state_is_an_error(uninterrupted, tmp_path):
    full_tmp, _, _, cb = uninterrupted
    ckpt = torch.load(full_tmp / "ckpt" / "epoch=0.ckpt", weights_only=False)
    del ckpt["callbacks"][cb.state_key]
    torch.save(ckpt, tmp_path / "dense.ckpt")
    with pytest.raises(ValueError, match="holds no sparse state"):
        fit(tmp_path, Classifier(), ckpt_path=tmp_path / "dense.ckpt")


def test_a_second_fit_continues_with_the_same_masks(tmp_path):
    module, cb = Classifier(), SparseTrainingCallback(**sparse_options())

    class AtStart(pl.Callback):  # runs after cb's on_train_start
        def on_train_start(self, trainer, pl_module):
            self.sparse, self.masks = cb.sparse, {n: m.clone() for n, m in cb.sparse.masks.items()}

    probe = AtStart()
    options = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, callbacks=[cb, probe], accumulate_grad_batches=ACCUMULATE)
    pl.Trainer(max_epochs=1, **options).fit(module, images())
    first, step = {n: m.clone() for n, m in cb.sparse.masks.items()}, cb.sparse.step_count
    assert any(not torch.equal(first[n], probe.masks[n]) for n in first)  # RigL moved the masks
    pl.Trainer(max_epochs=1, **options).fit(module, images())  # a second fit on the same module
    assert probe.sparse is cb.sparse and cb.sparse.step_count == 2 * step
    for name, mask in first.items():
        assert torch.equal(probe.masks[name], mask), name


def plain_loop(module, steps):
    """The same training written by hand: accumulate 2 micro-batches (loss / 2), step, schedule."""
    opt_config = module.configure_optimizers()
    opt, sched = opt_config["optimizer"], opt_config["lr_scheduler"]["scheduler"]
    sparse = so.SparseTraining(module, opt, **sparse_options())
    batches = list(images())
    module.train()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        for x, y in batches[(step * ACCUMULATE) % BATCHES:][:ACCUMULATE]:
            (module.training_step((x, y), 0) / ACCUMULATE).backward()
        opt.step()
        sched.step()
    return sparse


def test_default_loop_equals_the_same_training_in_a_plain_loop(uninterrupted):
    _, full_module, _, full_cb = uninterrupted
    module = Classifier()
    sparse = plain_loop(module, EPOCHS * BATCHES // ACCUMULATE)
    for name, mask in sparse.masks.items():
        assert torch.equal(full_cb.sparse.masks[name], mask), name
    for name, value in module.state_dict().items():
        assert torch.equal(full_module.state_dict()[name], value), name


def test_sparseopt_changes_the_default_loop_result(uninterrupted, tmp_path):
    _, full_module, _, _ = uninterrupted
    module = Classifier()
    fit(tmp_path, module, sparse={**sparse_options(), "preconditioner": None})
    diff = max(float((a - b).abs().max()) for a, b in zip(module.parameters(), full_module.parameters()))
    assert diff > 1e-3


class UpdateNorms(pl.Callback):
    """Per optimizer step: the norm of the gradient right before clipping (``on_before_optimizer_step`` runs
    between backward and clipping) and of the update actually applied, ||Δw|| / lr (plain SGD, constant lr)."""

    def __init__(self, sparse_cb):
        self.sparse_cb, self.rows, self._before = sparse_cb, [], None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self._before = ([p.detach().clone() for p in pl_module.parameters()], self.sparse_cb.sparse.step_count,
                        float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._before is None:
            return
        weights, step, grad_norm = self._before
        delta = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.detach() - w) for p, w in zip(pl_module.parameters(), weights)]))
        self.rows.append((step, grad_norm, float(delta) / LR))
        self._before = None


def test_gradient_clip_val_bounds_the_applied_update(tmp_path):
    cb = SparseTrainingCallback(**sparse_options())
    probe = UpdateNorms(cb)
    trainer = pl.Trainer(callbacks=[cb, probe], max_epochs=1, accumulate_grad_batches=ACCUMULATE, accelerator="cpu",
                         devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, gradient_clip_val=MAX_NORM)
    trainer.fit(Classifier(momentum=0.0, scheduler=False), images())
    checked = 0
    for step, grad_norm, applied in probe.rows:
        if cb.sparse.topology.is_update_step(step):
            continue  # the update step is skipped: nothing is applied
        assert applied == pytest.approx(min(grad_norm, MAX_NORM), rel=1e-4), step
        checked += 1
    assert checked >= 1 and max(g for _, g, _ in probe.rows) > MAX_NORM


def test_example_runs(capsys):
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "lightning_trainer.py"), run_name="__main__")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("resumed to step") and "density 0.2" in last



MID_EPOCH_STEP = 5  # epoch 1 holds steps 4..6; RigL updates at 2, 4 (before the checkpoint) and 6, 8 (after)


class ResumableLoader(torch.utils.data.DataLoader):
    """A DataLoader with Lightning's ``state_dict``/``load_state_dict`` interface: it remembers how many batches of
    the epoch it gave out, and a restored one skips them (what ``torchdata``'s ``StatefulDataLoader`` does)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._given, self._skip = 0, 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._given = skip
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                self._given = i + 1
                yield batch

    def state_dict(self):
        return {"given": self._given}

    def load_state_dict(self, state):
        self._skip = state["given"]


def resumable_images():
    plain = images()
    return ResumableLoader(plain.dataset, batch_size=plain.batch_size, shuffle=False)


def mid_epoch_checkpoint(tmp, loader):
    steps = ModelCheckpoint(dirpath=tmp / "steps", save_top_k=-1, every_n_train_steps=MID_EPOCH_STEP,
                            filename="{step}")
    fit(tmp / "first", Classifier(), extra_callbacks=[steps], max_steps=MID_EPOCH_STEP, loader=loader)
    mid = tmp / "steps" / f"step={MID_EPOCH_STEP}.ckpt"
    saved = torch.load(mid, weights_only=False)
    assert saved["global_step"] == MID_EPOCH_STEP
    return mid, saved


def test_resume_from_a_mid_epoch_checkpoint_matches_the_uninterrupted_run_bit_identically(uninterrupted, tmp_path):
    full_tmp, full_module, _, full_cb = uninterrupted
    mid, saved = mid_epoch_checkpoint(tmp_path, resumable_images())
    sparse_state = saved["callbacks"][full_cb.state_key]
    assert sparse_state["step"] == MID_EPOCH_STEP and MID_EPOCH_STEP % (BATCHES // ACCUMULATE) != 0
    # the masks moved after the checkpoint too: the resumed run's own RigL updates are under test
    assert any(not torch.equal(sparse_state["masks"][n], m) for n, m in full_cb.sparse.masks.items())
    module = Classifier(seed=1)
    _, cb = fit(tmp_path / "resumed", module, ckpt_path=mid, loader=resumable_images())
    assert_same_training(cb, module, full_cb, full_module)


def test_a_mid_epoch_resume_with_a_plain_dataloader_warns_that_it_diverges(uninterrupted, tmp_path):
    _, full_module, _, _ = uninterrupted
    mid, _ = mid_epoch_checkpoint(tmp_path, images())
    module = Classifier(seed=1)
    with pytest.warns(UserWarning, match="MID-EPOCH checkpoint.*StatefulDataLoader"):
        fit(tmp_path / "resumed", module, ckpt_path=mid)
    # what the warning says: Lightning fed the epoch's first batches again, so the run differs
    assert any(not torch.equal(module.state_dict()[n], v) for n, v in full_module.state_dict().items())


def test_resuming_at_an_epoch_boundary_or_with_a_resumable_dataloader_does_not_warn(uninterrupted, tmp_path):
    import warnings

    full_tmp, _, _, _ = uninterrupted
    mid, _ = mid_epoch_checkpoint(tmp_path, resumable_images())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path / "boundary", Classifier(), ckpt_path=full_tmp / "ckpt" / "epoch=0.ckpt")
        fit(tmp_path / "resumable", Classifier(), ckpt_path=mid, loader=resumable_images())
    assert not [w for w in caught if "MID-EPOCH" in str(w.message)]


# ---- sparse_execution=True: the sparse Linear layers of an MLP train their active values only ---------------------
EVERY_LAYER = ExecutionPolicy(max_density=1.0, min_numel=0, min_batch=0)  # the tiny layers run sparse too


class MLPClassifier(Classifier):
    """Classifier's training, on three Linear layers (all sparse and run sparse), with weight decay."""

    def __init__(self, seed=0):
        super().__init__(seed, weight_decay=5e-3)
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                 nn.Linear(64, 5))


def execution_options(execution):
    return {**sparse_options(), "prune_first_layer": True, "sparse_execution": execution}


class GradNorms(pl.Callback):
    """The global gradient norm right before Lightning clips it (``on_before_optimizer_step``, in the closure)."""

    def __init__(self):
        self.norms = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))


@pytest.fixture(scope="module")
def execution_fits(tmp_path_factory):
    """The same training masked-dense and with sparse execution, with gradient_clip_val."""
    runs = {}
    for execution in (False, EVERY_LAYER):
        tmp, module, probe = tmp_path_factory.mktemp("pl_execution"), MLPClassifier(), GradNorms()
        trainer, cb = fit(tmp, module, sparse=execution_options(execution), extra_callbacks=[probe],
                          gradient_clip_val=MAX_NORM)
        runs[execution] = tmp, module, trainer, cb, probe
    return runs


def assert_close_tensors(fast, dense, rel=1e-5):
    assert fast.keys() == dense.keys()
    for name, value in dense.items():
        assert fast[name].shape == value.shape, name
        assert (fast[name] - value).float().norm() <= rel * value.float().norm() + 1e-7, name


def test_sparse_execution_in_lightning_follows_the_masked_dense_trajectory(execution_fits):
    _, dense_module, _, dense_cb, dense_probe = execution_fits[False]
    _, module, trainer, cb, probe = execution_fits[EVERY_LAYER]
    assert [r.execution for r in cb.sparse.report().layers] == ["sparse"] * 3
    held = [q for g in trainer.optimizers[0].param_groups for q in g["params"]]
    for p in cb.sparse.params:
        assert any(q is cb.sparse.execution.values_of(p.name) for q in held)
        assert not any(q is p.param for q in held)
    for name, mask in dense_cb.sparse.masks.items():
        assert torch.equal(cb.sparse.masks[name], mask), name
    assert any(cb.sparse.changed.values()) or cb.sparse.itop() > cb.sparse.density()
    assert_close_tensors(module.state_dict(), dense_module.state_dict())
    # Lightning clipped the optimizer's parameters, the values, from the first step on
    assert probe.norms == pytest.approx(dense_probe.norms, rel=1e-5) and max(probe.norms) > MAX_NORM


def test_sparse_execution_lightning_checkpoints_have_the_masked_dense_format(execution_fits):
    dense_tmp = execution_fits[False][0]
    tmp = execution_fits[EVERY_LAYER][0]
    saved, dense_saved = (torch.load(t / "ckpt" / "epoch=0.ckpt", weights_only=False) for t in (tmp, dense_tmp))
    MLPClassifier(seed=1).load_state_dict(saved["state_dict"])  # strict: no weight_values in it
    assert_close_tensors(saved["state_dict"], dense_saved["state_dict"])
    (opt,), (dense_opt,) = saved["optimizer_states"], dense_saved["optimizer_states"]
    assert opt["state"].keys() == dense_opt["state"].keys()
    for i, state in dense_opt["state"].items():
        assert_close_tensors(opt["state"][i], state)


def test_sparse_execution_resumes_from_ckpt_path_as_the_uninterrupted_run(execution_fits, tmp_path):
    full_tmp, full_module, _, full_cb, _ = execution_fits[EVERY_LAYER]
    module = MLPClassifier(seed=1)
    _, cb = fit(tmp_path, module, ckpt_path=full_tmp / "ckpt" / "epoch=0.ckpt",
                sparse=execution_options(EVERY_LAYER), gradient_clip_val=MAX_NORM)
    assert_same_training(cb, module, full_cb, full_module)


def test_sparse_execution_under_bf16_mixed_precision_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match=r"net.1.weight ran under torch.autocast"):
        fit(tmp_path, MLPClassifier(), sparse=execution_options(EVERY_LAYER), precision="bf16-mixed", max_steps=1)
