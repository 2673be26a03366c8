"""Re-masking the weights after each step is skipped for optimizers that keep zeros: the trajectory must equal the
re-masking one bit for bit, and every way a zero can still move (another optimizer, weights or state written
outside the step, a tampered state) must end with the weights masked, warned where it is unexpected."""

import warnings

import pytest
import torch
from torch import nn

import sparseopt as so
from sparseopt.pipeline import ZERO_CHECK_EVERY
from helpers import batch, mlp, train_step

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-4, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-4),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, initial_accumulator_value=0.1),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-2, weight_decay=1e-4),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=1e-2, decoupled_weight_decay=True, weight_decay=0.01),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=1e-2),
}


def run(make_opt, steps, force_remask=False):
    model = mlp(widths=(12, 16, 16, 10))
    opt = make_opt(model.parameters())
    sparse = so.SparseTraining(model, opt, 0.3, topology=so.RigL(update_every=4, drop_fraction=0.3, end_step=100),
                               preconditioner=so.SparseOpt())
    if force_remask:
        sparse._remask_each_step = True
    for step in range(steps):
        train_step(model, opt, step)
    return model, opt, sparse


def inactive_are_zero(sparse):
    return all(not p.param.masked_select(~sparse.masks[p.name]).any() for p in sparse.params)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_zero_preserving_optimizers_train_exactly_as_with_remasking(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model, _, sparse = run(OPTIMIZERS[name], 3 * ZERO_CHECK_EVERY + 3)
    reference, _, ref_sparse = run(OPTIMIZERS[name], 3 * ZERO_CHECK_EVERY + 3, force_remask=True)
    assert not sparse._remask_each_step and sparse.step_count == ref_sparse.step_count
    assert any(sparse.changed.values()), "the masks must have moved for the comparison to mean something"
    for n in sparse.masks:
        assert torch.equal(sparse.masks[n], ref_sparse.masks[n])
    for (n, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), n
    assert inactive_are_zero(sparse)


class NoisySGD(torch.optim.SGD):
    """Moves every entry, inactive ones too (as weight noise or a perturbation would)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(1e-3)
        return loss


def test_an_optimizer_outside_the_list_is_remasked_after_every_step():
    model = mlp()
    opt = NoisySGD(model.parameters(), lr=0.1)
    sparse = so.SparseTraining(model, opt, 0.3)
    assert sparse._remask_each_step
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for step in range(3):
            train_step(model, opt, step)
            assert inactive_are_zero(sparse)


def sgd_run():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse = so.SparseTraining(model, opt, 0.3)
    train_step(model, opt, 0)
    return model, opt, sparse


def test_weights_written_between_steps_are_remasked_at_the_next_step():
    model, opt, sparse = sgd_run()
    with torch.no_grad():
        for p in sparse.params:
            p.param.add_(1.0)  # an edit outside the optimizer: a load, a perturbation
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        train_step(model, opt, 1)
    assert inactive_are_zero(sparse)


def test_loaded_optimizer_state_is_masked_at_the_next_step():
    model, opt, sparse = sgd_run()
    state = opt.state_dict()
    for s in state["state"].values():  # another run's momentum: nonzero where this run's masks are off
        s["momentum_buffer"] = torch.ones_like(s["momentum_buffer"])
    opt.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for step in range(1, ZERO_CHECK_EVERY + 2):
            train_step(model, opt, step)
    assert inactive_are_zero(sparse)
    for p in sparse.params:
        assert not opt.state[p.param]["momentum_buffer"].masked_select(~sparse.masks[p.name]).any()


def test_a_moved_inactive_weight_is_warned_and_remasking_resumes():
    model, opt, sparse = sgd_run()
    p = sparse.params[0]
    inactive = (~sparse.masks[p.name]).nonzero()[0].tolist()
    opt.state[p.param]["momentum_buffer"][tuple(inactive)] = 1.0  # edited in place: no load, no version change
    with pytest.warns(RuntimeWarning, match=rf"SGD.step\(\) moved inactive .*{p.name}.*re-masks the weights after"):
        for step in range(1, ZERO_CHECK_EVERY + 1):
            train_step(model, opt, step)
    assert sparse._remask_each_step and inactive_are_zero(sparse)
    train_step(model, opt, ZERO_CHECK_EVERY + 1)
    assert inactive_are_zero(sparse)
