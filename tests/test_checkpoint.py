import io
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from sparseopt.experiments.run.checkpoint import (FORMAT, VERSION, CheckpointManager, atomic_write, load_checkpoint,
                                              save_checkpoint)
from sparseopt.experiments.errors import UserError


def training_state(step: int = 7) -> dict:
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for param in model.parameters():  # what opt.step() would leave, without importing torch._dynamo (slow)
        opt.state[param]["momentum_buffer"] = torch.randn_like(param)
    return {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "generator": torch.Generator().manual_seed(3).get_state()},
            "config": {"optim": {"lr": 0.1, "betas": (0.9, 0.99)}, "seeds": [0, 1], "name": "run"}}


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_round_trip_of_a_training_state_with_weights_only_load(tmp_path):
    state = training_state()
    save_checkpoint(state, tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert_same(state, loaded)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)  # the file itself is loadable without unpickling code
    assert (raw["format"], raw["version"]) == (FORMAT, VERSION)
    generator = torch.Generator()
    generator.set_state(loaded["rng"]["generator"])
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=torch.Generator().manual_seed(3)))


def test_state_that_would_not_load_is_refused_at_save_time(tmp_path):
    with pytest.raises(TypeError, match=r"state\['rng'\]\['numpy'\] is a numpy.ndarray"):
        save_checkpoint({"rng": {"numpy": np.zeros(3)}}, tmp_path / "c.pt")
    with pytest.raises(TypeError, match=r"state\['lr'\]\[1\] is a numpy.float64"):
        save_checkpoint({"lr": [0.1, np.float64(0.2)]}, tmp_path / "c.pt")
    assert files(tmp_path) == []


def test_failure_during_save_keeps_the_old_checkpoint_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint({"step": 1, "w": torch.zeros(10)}, path)
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise KeyboardInterrupt  # the harshest catchable interruption

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2, "w": torch.ones(10)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert files(tmp_path) == ["c.pt"]


def test_killed_writer_leaves_a_readable_checkpoint(tmp_path):
    path = tmp_path / "ckpt-00000001.pt"
    writer = (
        "import sys, torch\n"
        "from sparseopt.experiments.run.checkpoint import save_checkpoint\n"
        "save_checkpoint({'step': 0, 'w': torch.zeros(3)}, sys.argv[1])\n"
        "print('ready', flush=True)\n"
        "big = torch.ones(4_000_000)\n"
        "step = 1\n"
        "while True:\n"
        "    save_checkpoint({'step': step, 'w': big}, sys.argv[1])\n"
        "    step += 1\n")
    proc = subprocess.Popen([sys.executable, "-c", writer, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        while not any(name.endswith(".tmp") for name in os.listdir(tmp_path)):  # wait until a write is under way
            assert time.monotonic() < deadline, "writer never started a second checkpoint"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    state = load_checkpoint(path)
    if state["step"] == 0:
        assert torch.equal(state["w"], torch.zeros(3))
    else:
        assert state["w"].shape == (4_000_000,) and bool(state["w"].eq(1).all())
    manager = CheckpointManager(tmp_path)  # cleans up the killed write's temporary
    assert files(tmp_path) == ["ckpt-00000001.pt"]
    assert manager.latest() == path


def test_missing_corrupt_foreign_and_newer_files_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found: .*absent.pt"):
        load_checkpoint(tmp_path / "absent.pt")
    good = tmp_path / "good.pt"
    save_checkpoint(training_state(), good)
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(os.urandom(1000))
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("truncated.pt", "garbage.pt", "empty.pt"):
        with pytest.raises(UserError, match=rf"checkpoint .*{name} is corrupt or not a sparseopt checkpoint: .+; "
                                            "delete it or resume from another"):
            load_checkpoint(tmp_path / name)
    torch.save({"model": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="foreign.pt is corrupt or not a sparseopt checkpoint: no "
                                        "'sparseopt-checkpoint' header"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"format": FORMAT, "version": VERSION + 1, "meta": {}, "state": {}}, tmp_path / "newer.pt")
    with pytest.raises(UserError, match=f"has format version {VERSION + 1}, but this sparseopt reads version "
                                        f"{VERSION}"):
        load_checkpoint(tmp_path / "newer.pt")


def test_load_honours_map_location(tmp_path):
    save_checkpoint({"w": torch.arange(3.0)}, tmp_path / "c.pt")
    assert load_checkpoint(tmp_path / "c.pt", map_location=torch.device("meta"))["w"].device.type == "meta"


def test_manager_keeps_the_last_checkpoints_and_the_best(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2, metric_mode="max")
    assert manager.latest() is None and manager.load_latest() is None
    metrics = {100: 0.5, 200: 0.9, 300: 0.7, 400: float("nan"), 500: 0.8}
    for step, metric in metrics.items():
        assert manager.save({"step": step}, step, metric=metric).name == f"ckpt-{step:08d}.pt"
    assert files(manager.directory) == ["best.pt", "ckpt-00000400.pt", "ckpt-00000500.pt"]
    assert manager.latest().name == "ckpt-00000500.pt"
    assert manager.load_latest() == {"step": 500}
    assert load_checkpoint(manager.best_path) == {"step": 200}
    assert manager.best_metric == 0.9


def test_manager_resumes_best_tracking_and_supports_min_mode(tmp_path):
    first = CheckpointManager(tmp_path, keep_last=1, metric_mode="min")
    first.save({"loss": 2.0}, 1, metric=2.0)
    first.save({"loss": 1.0}, 2, metric=torch.tensor(1.0))
    first.save({"loss": 3.0}, 3)  # no metric: never the best
    resumed = CheckpointManager(tmp_path, keep_last=1, metric_mode="min")
    assert resumed.best_metric == 1.0
    resumed.save({"loss": 1.5}, 4, metric=1.5)
    assert load_checkpoint(resumed.best_path) == {"loss": 1.0}
    resumed.save({"loss": 0.5}, 5, metric=0.5)
    assert load_checkpoint(resumed.best_path) == {"loss": 0.5}
    assert files(tmp_path) == ["best.pt", "ckpt-00000005.pt"]


def test_latest_orders_by_step_and_ignores_temporaries(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5, keep_best=False)
    for step in (9, 10, 123_456_789):
        manager.save({"step": step}, step, metric=1.0)
    (tmp_path / ".ckpt-999999999.pt.0123456789ab.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("x")
    assert manager.latest().name == "ckpt-123456789.pt"
    assert [p.name for p in manager.checkpoints()] == ["ckpt-00000009.pt", "ckpt-00000010.pt", "ckpt-123456789.pt"]
    assert not manager.best_path.exists()


def test_manager_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="metric_mode"):
        CheckpointManager(tmp_path, metric_mode="maximum")


def test_atomic_write_text_and_failure(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    with atomic_write(path) as f:
        f.write("one\n")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write("two\n")
            raise RuntimeError("boom")
    assert path.read_text() == "one\n"
    assert files(path.parent) == ["f.txt"]
