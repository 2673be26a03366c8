"""The training loop never waits for the device except at logging, evaluation and checkpoint steps.

Every way Python reads a tensor's value (item, bool, int, float, tolist) is counted, per training step.
"""

import copy
from collections import Counter

import pytest
import torch
from helpers import TINY

from sparseopt.experiments.config.load import from_dict
from sparseopt.experiments.run.runner import Runner
from sparseopt.experiments.config.schema import RunConfig

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_at_most_one_host_sync_per_logging_interval(tmp_path, monkeypatch, precision):
    cfg = copy.deepcopy(TINY)
    # mask updates every 3 steps fall between the logs (every 4) and evaluations (every 8)
    cfg["sparsity"].update(update_every=3)
    cfg["train"].update(log_every=4, eval_every=8, precision=precision)
    runner = Runner(from_dict(RunConfig, cfg), tmp_path, quiet=True)
    current = {"step": None}          # the training step whose code is running (None: before/after the loop)
    syncs = Counter()

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            syncs[current["step"]] += 1
            return original(self, *args, **kwargs)
        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    train_step, finish = runner._train_step, runner._finish

    def step(*args):
        current["step"] = runner.step + 1
        return train_step(*args)

    def done():
        current["step"] = None
        return finish()

    monkeypatch.setattr(runner, "_train_step", step)
    monkeypatch.setattr(runner, "_finish", done)
    runner.run()
    total = runner.exp.total_steps
    sync_steps = {s for s in range(1, total + 1) if s % 4 == 0 or s % 8 == 0 or s == total}
    outside = {s: n for s, n in syncs.items() if s is not None and s not in sync_steps}
    assert sum(syncs[s] for s in sync_steps) > 0   # the counter does see the logging steps' reads
    assert sum(outside.values()) <= total // 4, outside
