"""`torchrun --nproc_per_node=2 -m sparseopt.cli train ...` on CPU (gloo) matches a single-process run.

Robust on a loaded machine (the suite runs next to other jobs on 2 cores): the 2-rank run took 11 s alone and
about 60 s with five more copies of this test running, so the old 120 s limit could be hit; the limit is now
generous and, if reached, the whole process group is killed and both logs are shown. The launcher gets a clean
environment (no distributed variables leaked by earlier in-process tests) and a loopback address, so it never
depends on the host's name resolution. Ports are chosen by the OS at bind time (`--standalone` binds port 0).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from sparseopt.cli import main
from sparseopt.experiments.run.checkpoint import load_checkpoint

CONFIG = {
    "name": "ddp",
    "data": {"name": "synthetic", "batch_size": 32, "options": {"n_train": 256, "n_test": 64, "shape": [1, 6, 6],
                                                               "num_classes": 4}},
    # no BatchNorm: the mean of the two half-batch gradients is then exactly the full-batch gradient
    "model": {"name": "mlp", "options": {"hidden": [32], "norm": "none"}},
    "sparsity": {"method": "static", "density": 0.3},
    "sparseopt": {"enabled": True},
    "optim": {"lr": 0.05},
    "train": {"epochs": 2, "log_every": 4, "eval_every": 8},
    "logging": {"tensorboard": False},
}
DISTRIBUTED_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                         "MASTER_ADDR", "MASTER_PORT")


def torchrun(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in DISTRIBUTED_VARIABLES and not k.startswith(("TORCHELASTIC_", "TORCH_ELASTIC_"))}
    env = {**base, "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--local-addr=127.0.0.1", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
        out, err = proc.communicate()
        raise AssertionError(f"torchrun did not finish in {timeout} s\nstdout:\n{out[-2000:]}\n"
                             f"stderr:\n{err[-4000:]}") from None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def test_two_ranks_train_like_one_process(tmp_path):
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main(["train", str(config), "--out", str(single), "--quiet"]) == 0
    proc = torchrun("-m", "sparseopt.cli", "train", str(config), "--out", str(multi), "--quiet")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    results = json.loads((multi / "results.json").read_text())
    assert results["steps"] == 16
    a = load_checkpoint(single / "checkpoints" / "ckpt-00000016.pt")
    b = load_checkpoint(multi / "checkpoints" / "ckpt-00000016.pt")
    for name in a["model"]:
        assert torch.allclose(a["model"][name], b["model"][name], atol=1e-5), name
    for name, mask in a["sparse"]["masks"].items():
        assert torch.equal(mask, b["sparse"]["masks"][name])
    # evaluation is split over the two ranks and all-reduced: the same accuracy as one process
    expected = json.loads((single / "results.json").read_text())
    assert results["final"]["test_accuracy"] == expected["final"]["test_accuracy"]
    lines = (multi / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines))  # one writer


def test_reproduce_under_torchrun_trains_each_run_on_both_ranks_and_reports_once(tmp_path):
    out = tmp_path / "repro"
    proc = torchrun("-m", "sparseopt.cli", "reproduce", "paper000-table1", "--out", str(out), "--seeds", "0",
                    "--quiet", "--set", "train.epochs=1", "--set", "data.batch_size=512")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.stdout.count("written:") == 1          # one rank printed, one rank wrote the report
    summary = json.loads((out / "results.json").read_text())
    assert summary["runs_state"] == {"new": 6, "partial": 0, "done": 0}
    assert (out / "report.md").is_file()
    for run in (out / "runs").iterdir():
        assert json.loads((run / "results.json").read_text())["steps"] > 0


def test_sigterm_on_one_rank_stops_both_at_the_next_logging_step_and_resume_finishes(tmp_path):
    run = tmp_path / "preempted"
    config = {**CONFIG, "model": {"name": "cli_models:counting_mlp",
                                  "options": {"interrupt_at": 8, "signal_name": "SIGTERM", "signal_rank": 1}}}
    path = tmp_path / "preempt.yaml"
    path.write_text(yaml.safe_dump(config))
    env_path = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = torchrun("-m", "sparseopt.cli", "train", str(path), "--out", str(run), "--quiet", env=env_path)
    assert proc.returncode != 0
    assert proc.stderr.count("interrupted by SIGTERM; checkpoint written") == 2, proc.stderr[-4000:]
    step = load_checkpoint(sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1])["step"]
    # the signal arrived in one of rank 1's middle steps (pre-flight forwards come first); both ranks stopped
    # together at the next logging step (log_every 4): no collective ran on the steps in between
    assert step % 4 == 0 and 0 < step < 16
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["model"]["options"] = {}
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    proc = torchrun("-m", "sparseopt.cli", "train", "--resume", str(run), "--quiet", env=env_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((run / "results.json").read_text())["steps"] == 16
