"""The Hugging Face Trainer callback, with the real transformers + accelerate and a tiny random-init HF ResNet."""

import runpy
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, ResNetConfig, ResNetForImageClassification,
                          Trainer, TrainerCallback, TrainingArguments)

import sparseopt as so
from sparseopt.execution.training import ExecutionPolicy
from sparseopt.integrations.transformers import STATE_FILE, SparseTrainingCallback

STEPS, SAVE_AT, MAX_NORM = 8, 4, 0.05
STEPS_PER_EPOCH = 6  # 48 images, batches of 4, accumulation 2


class Images(torch.utils.data.Dataset):
    """48 fixed random 16x16 images: 12 batches of 4, i.e. 6 optimizer steps per epoch with accumulation 2."""

    def __init__(self, n=48, classes=4):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, classes, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def resnet(seed=0):
    torch.manual_seed(seed)
    return ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                                     depths=[1, 1], layer_type="basic", num_labels=4))


def sparse_callback():
    return SparseTrainingCallback(density=0.3, topology=so.RigL(update_every=3, drop_fraction=0.5, end_step=STEPS),
                                  preconditioner=so.SparseOpt())


def trainer(out, callbacks, model=None, eval_dataset=None, train_dataset=None, **overrides):
    options = dict(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                   max_steps=STEPS, save_strategy="steps", save_steps=SAVE_AT, logging_steps=1, learning_rate=0.02,
                   lr_scheduler_type="linear", max_grad_norm=1.0, seed=0, report_to="none", use_cpu=True,
                   dataloader_num_workers=0, disable_tqdm=True)
    args = TrainingArguments(**{**options, **overrides})
    return Trainer(model=model or resnet(), args=args, train_dataset=train_dataset or Images(), eval_dataset=eval_dataset,
                   callbacks=callbacks)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_full")
    cb = sparse_callback()
    t = trainer(out, [cb])
    t.train()
    return out, cb, t


def test_trainer_trains_sparse_and_checkpoints_the_sparse_state(uninterrupted):
    out, cb, t = uninterrupted
    sparse = cb.sparse
    assert sparse.optimizer is t.optimizer.optimizer  # attached inside accelerate's AcceleratedOptimizer
    assert sparse.step_count == STEPS
    assert sum(sparse.changed.values()) > 0 or sparse.itop() > sparse.density()  # RigL did move the masks
    for p in sparse.params:
        assert int((p.param != 0).sum()) <= sparse.target_nnz[p.name]
        assert not p.param[~sparse.masks[p.name]].any()
    for step in (SAVE_AT, STEPS):
        saved = torch.load(out / f"checkpoint-{step}" / STATE_FILE, weights_only=True)
        assert saved["step"] == step


def test_density_and_itop_are_in_the_trainer_logs(uninterrupted):
    _, cb, t = uninterrupted
    train_logs = [entry for entry in t.state.log_history if "loss" in entry]
    assert len(train_logs) == STEPS
    assert all(entry["sparseopt/density"] == pytest.approx(cb.sparse.density()) for entry in train_logs)
    itops = [entry["sparseopt/itop"] for entry in train_logs]
    assert itops == sorted(itops) and itops[-1] == pytest.approx(cb.sparse.itop()) and itops[-1] > itops[0]


def test_density_and_itop_reach_tensorboard_when_the_callback_goes_first(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = sparse_callback()
    t = trainer(tmp_path, [cb], report_to="tensorboard", save_strategy="no", max_steps=2)
    handler = t.callback_handler
    handler.callbacks.insert(0, handler.pop_callback(cb))  # the README's recipe
    t.train()
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*"))))
    events.Reload()
    density = events.Scalars("train/sparseopt/density")
    assert {e.step for e in density} == {1, 2} and density[0].value == pytest.approx(cb.sparse.density())
    assert "train/sparseopt/itop" in events.Tags()["scalars"]


def test_resume_from_checkpoint_matches_the_uninterrupted_run_bit_identically(uninterrupted, tmp_path):
    full_out, full_cb, full = uninterrupted
    out = tmp_path / "resumed"
    shutil.copytree(full_out / f"checkpoint-{SAVE_AT}", out / f"checkpoint-{SAVE_AT}")
    saved = torch.load(out / f"checkpoint-{SAVE_AT}" / STATE_FILE, weights_only=False)
    topology = full_cb.sparse.topology  # the checkpoint falls mid-epoch, between two mask updates
    assert SAVE_AT % STEPS_PER_EPOCH != 0
    assert topology.is_update_step(SAVE_AT - 1) and topology.is_update_step(SAVE_AT + 2)
    assert not any(topology.is_update_step(s) for s in range(SAVE_AT, SAVE_AT + 2))
    # and the masks moved after it: the resumed run's own RigL update is under test
    assert any(not torch.equal(saved["masks"][n], m) for n, m in full_cb.sparse.masks.items())
    cb = sparse_callback()
    t = trainer(out, [cb], model=resnet(seed=1))  # a different init: everything must come from the checkpoint
    t.train(resume_from_checkpoint=True)
    assert cb.sparse.step_count == STEPS
    for name, mask in full_cb.sparse.masks.items():
        assert torch.equal(cb.sparse.masks[name], mask), name
        assert torch.equal(cb.sparse.fired[name], full_cb.sparse.fired[name]), name
    resumed = dict(t.model.named_parameters())
    for name, p in full.model.named_parameters():
        assert torch.equal(resumed[name], p), name
    for name, b in full.model.named_buffers():
        assert torch.equal(dict(t.model.named_buffers())[name], b), name


def test_resuming_a_checkpoint_without_sparse_state_is_an_error(uninterrupted, tmp_path):
    full_out, _, _ = uninterrupted
    out = tmp_path / "no_state"
    shutil.copytree(full_out / f"checkpoint-{SAVE_AT}", out / f"checkpoint-{SAVE_AT}")
    (out / f"checkpoint-{SAVE_AT}" / STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        trainer(out, [sparse_callback()]).train(resume_from_checkpoint=True)


def test_sparse_state_of_another_run_is_refused(uninterrupted, tmp_path):
    full_out, _, _ = uninterrupted
    out = tmp_path / "mixed"
    shutil.copytree(full_out / f"checkpoint-{SAVE_AT}", out / f"checkpoint-{SAVE_AT}")
    state_path = out / f"checkpoint-{SAVE_AT}" / STATE_FILE
    state = torch.load(state_path, weights_only=True)
    state["masks"] = {n: m.roll(1, 0) for n, m in state["masks"].items()}
    torch.save(state, state_path)
    with pytest.raises(ValueError, match="different checkpoints"):
        trainer(out, [sparse_callback()]).train(resume_from_checkpoint=True)


def test_a_second_train_continues_with_the_same_masks(tmp_path):
    cb = sparse_callback()
    t = trainer(tmp_path, [cb], save_strategy="no", max_steps=4)
    t.train()
    first, step = {n: m.clone() for n, m in cb.sparse.masks.items()}, cb.sparse.step_count
    t.args.max_steps = 1
    t.train()
    assert cb.sparse.step_count == step + 1
    if not cb.sparse.topology.is_update_step(step):
        for name, mask in first.items():
            assert torch.equal(cb.sparse.masks[name], mask), name


def test_load_best_model_at_end_brings_the_best_checkpoints_masks(tmp_path):
    cb = sparse_callback()
    # here the best eval loss is at the first checkpoint, not the last: the masks must really be swapped back
    t = trainer(tmp_path, [cb], eval_strategy="steps", eval_steps=SAVE_AT, load_best_model_at_end=True,
                metric_for_best_model="eval_loss", greater_is_better=False, eval_dataset=Images(n=16))
    t.train()
    best = torch.load(f"{t.state.best_model_checkpoint}/{STATE_FILE}", weights_only=True)
    last = torch.load(tmp_path / f"checkpoint-{STEPS}" / STATE_FILE, weights_only=True)
    assert best["step"] != last["step"]
    assert any(not torch.equal(best["masks"][n], last["masks"][n]) for n in best["masks"])
    for p in cb.sparse.params:
        assert torch.equal(cb.sparse.masks[p.name], best["masks"][p.name]), p.name
        assert not p.param[~best["masks"][p.name]].any(), p.name


class AppliedGradNorm(TrainerCallback):
    """Records the global norm of the gradients the optimizer is about to apply: its step pre-hook is registered
    after SparseTraining's (this callback comes later), so it runs last, right before the update."""

    def __init__(self, sparse_cb):
        self.sparse_cb, self.norms = sparse_cb, []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        inner = optimizer.optimizer

        def record(opt, *_):
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            step = self.sparse_cb.sparse.step_count
            self.norms.append((step, float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads]))) if grads else None))

        inner.register_step_pre_hook(record)


def test_max_grad_norm_clips_and_logs_the_applied_gradient(tmp_path):
    cb = sparse_callback()
    probe = AppliedGradNorm(cb)
    t = trainer(tmp_path, [cb, probe], max_grad_norm=MAX_NORM, save_strategy="no")
    t.train()
    logged = [entry["grad_norm"] for entry in t.state.log_history if "loss" in entry]
    topology = cb.sparse.topology
    checked = 0
    for (step, applied), grad_norm in zip(probe.norms, logged, strict=True):
        if topology.is_update_step(step):
            continue  # the update step is skipped: nothing is applied
        assert applied == pytest.approx(min(grad_norm, MAX_NORM), rel=1e-5), step
        checked += 1
    assert checked >= STEPS // 2 and max(logged) > MAX_NORM  # clipping was active


def test_example_runs(capsys):
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "hf_trainer.py"), run_name="__main__")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("step 16:") and "density 0.2" in last


# ---- sparse_execution=True: the sparse Linear layers of a tiny BERT train their active values only ----------------
EVERY_LAYER = ExecutionPolicy(max_density=1.0, min_numel=0, min_batch=0)  # the tiny layers run sparse too
DECAY = 0.1


class Tokens(torch.utils.data.Dataset):
    """48 fixed random sequences of 12 tokens: 6 optimizer steps per epoch, as Images."""

    def __init__(self, n=48, classes=4):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randint(0, 50, (n, 12), generator=g), torch.randint(0, classes, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


def bert(seed=0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, num_labels=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def execution_trainer(out, execution, model=None):
    """The Trainer's defaults otherwise: fused AdamW, weight decay grouped by name (not on biases, LayerNorm)."""
    cb = SparseTrainingCallback(density=0.3, topology=so.RigL(update_every=3, drop_fraction=0.5, end_step=STEPS),
                                preconditioner=so.SparseOpt(), sparse_execution=execution)
    return trainer(out, [cb], model=model or bert(), train_dataset=Tokens(), weight_decay=DECAY,
                   max_grad_norm=MAX_NORM), cb


def assert_close_tensors(fast, dense, rel=1e-5):
    """Same keys and shapes; values within ``rel`` of each tensor's norm (1e-6 absolute: the attention key biases,
    whose gradient is 0 up to rounding, stay at ~1e-7)."""
    assert fast.keys() == dense.keys()
    for name, value in dense.items():
        assert fast[name].shape == value.shape, name
        assert (fast[name] - value).float().norm() <= rel * value.float().norm() + 1e-6, name


@pytest.fixture(scope="module")
def execution_runs(tmp_path_factory):
    """The same training masked-dense and with sparse execution."""
    runs = {}
    for execution in (False, EVERY_LAYER):
        out = tmp_path_factory.mktemp("hf_execution")
        t, cb = execution_trainer(out, execution)
        t.train()
        runs[execution] = out, cb, t
    return runs


def test_sparse_execution_in_the_trainer_follows_the_masked_dense_trajectory(execution_runs):
    _, dense_cb, dense = execution_runs[False]
    _, cb, t = execution_runs[EVERY_LAYER]
    assert t.args.optim == "adamw_torch_fused"  # whose step does not bump the values' version counter
    layers = cb.sparse.report().layers
    assert len(layers) >= 10 and all(r.execution == "sparse" for r in layers)
    groups = t.optimizer.optimizer.param_groups
    for p in cb.sparse.params:
        values = cb.sparse.execution.values_of(p.name)
        # the values took the dense weight's place in the group HF built by name: the one with weight decay
        assert [g["weight_decay"] for g in groups if any(q is values for q in g["params"])] == [DECAY]
        assert not any(q is p.param for g in groups for q in g["params"])
    assert any(n.endswith(".weight_values") for n, _ in t.model.named_parameters())  # what HF clips
    for name, mask in dense_cb.sparse.masks.items():
        assert torch.equal(cb.sparse.masks[name], mask), name
    assert sum(cb.sparse.changed.values()) > 0 or cb.sparse.itop() > cb.sparse.density()
    assert_close_tensors(t.model.state_dict(), dense.model.state_dict())
    # the clip saw the values' gradients from the first step on (the swap happens at the first forward)
    norms = [[e["grad_norm"] for e in run.state.log_history if "loss" in e] for run in (dense, t)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-5) and max(norms[0]) > MAX_NORM
    # model.num_parameters() counts the values too (the Trainer's total_flos estimate with it)
    nnz = sum(int(m.sum()) for m in cb.sparse.masks.values())
    assert t.model.num_parameters() == dense.model.num_parameters() + nnz


def test_sparse_execution_checkpoints_have_the_masked_dense_format(execution_runs):
    dense_out, _, _ = execution_runs[False]
    out, _, _ = execution_runs[EVERY_LAYER]
    folder = out / f"checkpoint-{SAVE_AT}"
    model, info = BertForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys: no weight_values saved
    reference = BertForSequenceClassification.from_pretrained(dense_out / f"checkpoint-{SAVE_AT}")
    assert_close_tensors(model.state_dict(), reference.state_dict())
    opt, dense_opt = (torch.load(o / f"checkpoint-{SAVE_AT}" / "optimizer.pt", weights_only=True)
                      for o in (out, dense_out))
    assert opt["param_groups"] == dense_opt["param_groups"]
    for i, state in dense_opt["state"].items():
        assert_close_tensors(opt["state"][i], state)


def test_sparse_execution_resumes_from_checkpoint_as_the_uninterrupted_run(execution_runs, tmp_path):
    full_out, full_cb, full = execution_runs[EVERY_LAYER]
    out = tmp_path / "resumed"
    shutil.copytree(full_out / f"checkpoint-{SAVE_AT}", out / f"checkpoint-{SAVE_AT}")
    t, cb = execution_trainer(out, EVERY_LAYER, model=bert(seed=1))
    t.train(resume_from_checkpoint=True)
    assert cb.sparse.step_count == STEPS
    for name, mask in full_cb.sparse.masks.items():
        assert torch.equal(cb.sparse.masks[name], mask), name
        assert torch.equal(cb.sparse.fired[name], full_cb.sparse.fired[name]), name
    resumed = dict(t.model.named_parameters())
    for name, p in full.model.named_parameters():
        assert torch.equal(resumed[name], p), name


def test_sparse_execution_under_bf16_autocast_is_an_error(tmp_path):
    t = trainer(tmp_path, [SparseTrainingCallback(density=0.3, sparse_execution=EVERY_LAYER)], model=bert(),
                train_dataset=Tokens(), bf16=True, max_steps=1, save_strategy="no")
    try:
        with pytest.raises(RuntimeError, match=r"attention.self.query.weight ran under torch.autocast"):
            t.train()
    finally:  # accelerate keeps bf16 in its process-wide state: later Accelerators would inherit it
        from accelerate.state import AcceleratorState, GradientState
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
