"""The sparseopt command end to end: configs, training, resume, clean stops, reports, and bad input."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from helpers import TINY

from sparseopt.cli import main
from sparseopt.experiments.run.checkpoint import load_checkpoint


def write_config(tmp_path, config=TINY, name="config.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def final_weights(run_dir):
    ckpts = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))
    return load_checkpoint(ckpts[-1])["model"]


def test_train_writes_a_complete_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", write_config(tmp_path), "--out", str(out), "--quiet"]) == 0
    assert "final test accuracy" in capsys.readouterr().out
    for name in ("config.yaml", "metrics.jsonl", "metrics.csv", "results.json", "sparsity.txt"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 24 and results["sparsity"]["density"] == pytest.approx(0.3, abs=0.01)
    assert results["final"]["test_accuracy"] > 0.5  # four well-separated synthetic classes
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert {"loss", "accuracy", "lr", "grad_norm", "itop", "density", "wall_time"} <= set(train_rows[0])
    assert any(k.startswith("density/") for k in next(r for r in rows if r["split"] == "test"))
    assert (out / "checkpoints" / "best.pt").is_file()


def test_set_overrides_and_saved_config(tmp_path):
    out = tmp_path / "run"
    assert main(["train", write_config(tmp_path), "--out", str(out), "--quiet", "--set", "sparsity.method=set",
                 "--set", "train.epochs=1"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["sparsity"]["method"] == "set" and saved["train"]["epochs"] == 1


def test_ctrl_c_checkpoints_and_resume_is_bit_identical(tmp_path, capsys):
    straight = tmp_path / "straight"
    config = write_config(tmp_path, {**TINY, "model": {"name": "cli_models:counting_mlp"}})
    assert main(["train", config, "--out", str(straight), "--quiet"]) == 0

    interrupted = tmp_path / "interrupted"
    config_int = write_config(tmp_path, {**TINY, "model": {"name": "cli_models:counting_mlp",
                                                           "options": {"interrupt_at": 11}}}, "int.yaml")
    assert main(["train", config_int, "--out", str(interrupted), "--quiet"]) == 130
    assert "checkpoint written" in capsys.readouterr().err
    step = load_checkpoint(sorted((interrupted / "checkpoints").glob("ckpt-*.pt"))[-1])["step"]
    assert 0 < step < 24
    # resume with the same architecture but no more interruptions (the counter restarts in a new process)
    cfg = yaml.safe_load((interrupted / "config.yaml").read_text())
    cfg["model"]["options"] = {}
    (interrupted / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--resume", str(interrupted), "--quiet"]) == 0
    a, b = final_weights(straight), final_weights(interrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (interrupted / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["step"], r["split"]) for r in rows]
    assert len(steps) == len(set(steps))  # no duplicated log lines after the resume


def test_non_finite_loss_stops_cleanly_keeping_the_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    config = write_config(tmp_path, {**TINY, "model": {"name": "cli_models:counting_mlp",
                                                       "options": {"nan_at": 15}}})
    assert main(["train", config, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "loss became nan" in err and "Traceback" not in err
    assert load_checkpoint(out / "checkpoints" / "best.pt")["step"] == 8
    assert not (out / "results.json").exists()


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("sparsity.density=1.5", "sparsity.density: got 1.5"),
    ("sparsity.distribution=erkk", "did you mean 'erk'"),
    ("train.epochs=abc", "train.epochs"),
])
def test_bad_config_values_are_named_and_nothing_is_written(tmp_path, capsys, override, message):
    out = tmp_path / "never"
    assert main(["train", write_config(tmp_path), "--out", str(out), "--set", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_malformed_yaml_and_missing_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    assert main(["train", str(bad)]) == 2
    assert "malformed YAML" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2


def test_existing_run_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path, {**TINY, "train": {**TINY["train"], "epochs": 1}})
    assert main(["train", config, "--out", str(out), "--quiet"]) == 0
    assert main(["train", config, "--out", str(out), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", config, "--out", str(out), "--quiet", "--overwrite"]) == 0


def test_missing_cifar_folder_names_the_expected_file(tmp_path, capsys):
    config = write_config(tmp_path, {**TINY, "data": {"name": "cifar10", "root": str(tmp_path / "data")}})
    assert main(["train", config, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "cifar-10-batches-py" in err and "download" in err
    assert not (tmp_path / "run").exists()


def test_corrupt_checkpoint_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path, {**TINY, "train": {**TINY["train"], "epochs": 1}})
    assert main(["train", config, "--out", str(out), "--quiet"]) == 0
    latest = sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]
    latest.write_bytes(latest.read_bytes()[:100])
    (out / "results.json").unlink()  # unfinished: resume must read the checkpoint (a finished run needs none)
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_cifar_training_on_a_generated_pickle_folder(tmp_path):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8),
                         b"labels": rng.integers(0, 10, 8).tolist()}, f)
    config = write_config(tmp_path, {**TINY, "data": {"name": "cifar10", "root": str(tmp_path / "data"),
                                                      "batch_size": 8},
                                     "model": {"name": "resnet20", "options": {"skip_connections": False}},
                                     "train": {"epochs": 1, "log_every": 1}})
    assert main(["train", config, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 5


def test_report_pools_seeds_and_draws_plots(tmp_path, capsys):
    config = write_config(tmp_path, {**TINY, "train": {**TINY["train"], "epochs": 2}})
    dirs = []
    for seed in (0, 1):
        dirs.append(str(tmp_path / f"s{seed}"))
        assert main(["train", config, "--out", dirs[-1], "--quiet", "--set", f"train.seed={seed}"]) == 0
    assert main(["report", *dirs, "--out", str(tmp_path / "rep"), "--target", "0.5"]) == 0
    table = capsys.readouterr().out
    assert "| tiny | 2 |" in table
    for name in ("report.md", "report.json", "train_loss.png", "test_accuracy.png"):
        assert (tmp_path / "rep" / name).is_file()
    assert (tmp_path / "rep" / "test_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_console_script_exit_code_and_message():
    proc = subprocess.run([sys.executable, "-m", "sparseopt.cli", "train", "/no/such.yaml"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_runs_all_methods_and_writes_its_outputs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seeds", "2", "--epochs", "1", "--workers", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| dense | 2 |" in printed and "| rigl+sparseopt | 2 |" in printed and "paired over 2 seeds" in printed
    summary = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in summary["rows"]] == ["dense", "rigl", "rigl+sparseopt"]
    assert all(r["final_test_accuracy"] > 0.8 for r in summary["rows"])
    assert (out / "test_accuracy.png").is_file() and len(list((out / "runs").iterdir())) == 6
    assert main(["demo", "--out", str(out), "--seeds", "1", "--epochs", "1", "--quiet"]) == 2


def test_diagnose_grad_ratio_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "gr"
    assert main(["diagnose", "grad-ratio", "--out", str(out), "--seeds", "2", "--sparsities", "0.5,0.9",
                 "--batches", "10"]) == 0
    assert "slope" in capsys.readouterr().out
    assert (out / "grad_ratio.png").read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((out / "results.json").read_text())["rows"]
    bn = next(r for r in rows if r["norm"] == "batch" and r["s"] == 0.9)
    assert abs(bn["mean"] / 10 ** 0.5 - 1) < 0.15
    assert main(["diagnose", "grad-ratio", "--out", str(out), "--sparsities", "1.5"]) == 2


def test_diagnose_hessian_on_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path, {**TINY, "train": {**TINY["train"], "epochs": 1}})
    assert main(["train", config, "--out", str(out), "--quiet"]) == 0
    assert main(["diagnose", "hessian", str(out), "--samples", "64", "--k", "2"]) == 0
    result = json.loads((out / "hessian.json").read_text())
    assert result["restricted"]["status"] == "ok" and len(result["restricted"]["eigenvalues"]) == 2
    assert main(["diagnose", "hessian", str(tmp_path / "nothing")]) == 2


def test_pruning_at_init_ham_and_renorm_are_reachable_from_configs(tmp_path):
    from sparseopt.experiments.run.build import build_experiment
    from sparseopt.experiments.config.load import from_dict
    from sparseopt.experiments.config.schema import RunConfig

    config = {**TINY, "sparsity": {"method": "static", "density": 0.3, "initial_mask": "snip", "pai_batches": 2},
              "optim": {**TINY["optim"], "ham": True}, "sparseopt": {"enabled": True, "renormalize": "clip"},
              "train": {**TINY["train"], "epochs": 1}}
    out = tmp_path / "run"
    assert main(["train", write_config(tmp_path, config), "--out", str(out), "--quiet"]) == 0
    fresh = build_experiment(from_dict(RunConfig, config))     # same seed: the same SNIP mask at step 0
    assert type(fresh.optimizer).__name__ == "HAM" and fresh.sparse.renormalize == "clip"
    saved = load_checkpoint(sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1])["sparse"]["masks"]
    assert all(torch.equal(saved[n], fresh.sparse.masks[n]) for n in saved)  # static: the SNIP mask is kept
    random = build_experiment(from_dict(RunConfig, {**config, "sparsity": {**config["sparsity"],
                                                                           "initial_mask": "random"}}))
    assert any(not torch.equal(saved[n], random.sparse.masks[n]) for n in saved)
    assert main(["train", write_config(tmp_path, {**config, "sparsity": {"method": "dense",
                                                                         "initial_mask": "snip"}}, "d.yaml"),
                 "--out", str(tmp_path / "dense")]) == 2


def test_config_prints_a_complete_template_that_validates(tmp_path, capsys):
    from sparseopt.experiments.config.load import from_dict
    from sparseopt.experiments.config.schema import RunConfig

    assert main(["config", "--set", "sparsity.density=0.05"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["sparsity"]["density"] == 0.05 and from_dict(RunConfig, data).sparsity.density == 0.05


def test_diagnose_coord_check_and_sweep(tmp_path, capsys):
    cc = tmp_path / "cc"
    assert main(["diagnose", "coord-check", "--out", str(cc), "--widths", "32,64", "--densities", "1,0.25",
                 "--steps", "2", "--seeds", "1"]) == 0
    assert "supar across density" in capsys.readouterr().out
    assert json.loads((cc / "results.json").read_text())["spread"]["density"]["supar"]
    assert (cc / "coord_check.png").is_file()
    sw = tmp_path / "sw"
    assert main(["sweep", "--out", str(sw), "--lrs", "0.001,0.01", "--densities", "1,0.25", "--steps", "4",
                 "--base-width", "32", "--workers", "1"]) == 0
    result = json.loads((sw / "results.json").read_text())
    assert set(result["optimum_shift"]) == {"sp", "supar"} and (sw / "lr_sweep.png").is_file()
    assert len(result["results"][0]["rows"]) == 4


# ---- sparsity.execution: sparse -----------------------------------------------------------------------------------
#: both Linear layers of TINY's MLP (and of counting_mlp) sparse and eligible for the CSR kernels, whatever their size
SPARSE_RUN = {**TINY["sparsity"], "prune_first_layer": True, "execution": "sparse", "execution_max_density": 1.0,
              "execution_min_numel": 0}


def rows_of(run_dir, split):
    return [r for r in (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["split"] == split]


def test_sparse_execution_trains_like_the_masked_run_and_names_its_sparse_layers(tmp_path):
    """Compiled too (train.compile): the sparse layers run eagerly inside the compiled model."""
    runs = {}
    for execution, compile_ in (("masked", False), ("sparse", True)):
        config = {**TINY, "sparsity": {**SPARSE_RUN, "execution": execution},
                  "train": {**TINY["train"], "compile": compile_}, "diagnostics": {"scales_every": 4}}
        runs[execution] = out = tmp_path / execution
        assert main(["train", write_config(tmp_path, config, f"{execution}.yaml"), "--out", str(out), "--quiet"]) == 0
    results = json.loads((runs["sparse"] / "results.json").read_text())
    layers = results["sparsity"]["layers"]
    assert [(r["name"], r["execution"]) for r in layers] == [("net.1.weight", "sparse"), ("net.4.weight", "sparse")]
    assert results["final"]["test_accuracy"] > 0.5
    assert "2 sparse" in (runs["sparse"] / "sparsity.txt").read_text()
    masked = json.loads((runs["masked"] / "results.json").read_text())["sparsity"]["layers"]
    assert {r["execution"] for r in masked} == {"masked"}
    # the logged gradient norms include the sparse layers' values gradients: the same as the masked run's
    for split, keys in (("train", ["grad_norm"]), ("scales", ["grad_norm/net.1", "grad_norm/net.4"])):
        sparse, dense = rows_of(runs["sparse"], split), rows_of(runs["masked"], split)
        assert len(sparse) == len(dense) > 0
        for a, b in zip(sparse, dense):
            assert all(a[k] == pytest.approx(b[k], rel=1e-4) for k in keys), (a, b)
    a, b = final_weights(runs["sparse"]), final_weights(runs["masked"])
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5) for k in a)


def test_sparse_execution_resumes_bit_identically_and_diagnose_reads_its_checkpoints(tmp_path, capsys):
    model = {"name": "cli_models:counting_mlp"}
    straight = tmp_path / "straight"
    config = write_config(tmp_path, {**TINY, "model": model, "sparsity": SPARSE_RUN})
    assert main(["train", config, "--out", str(straight), "--quiet"]) == 0
    layers = json.loads((straight / "results.json").read_text())["sparsity"]["layers"]
    assert [r["execution"] for r in layers] == ["sparse", "sparse"]

    interrupted = tmp_path / "interrupted"
    config_int = write_config(tmp_path, {**TINY, "model": {**model, "options": {"interrupt_at": 11}},
                                         "sparsity": SPARSE_RUN}, "int.yaml")
    assert main(["train", config_int, "--out", str(interrupted), "--quiet"]) == 130
    assert "checkpoint written" in capsys.readouterr().err
    cfg = yaml.safe_load((interrupted / "config.yaml").read_text())
    cfg["model"]["options"] = {}
    (interrupted / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--resume", str(interrupted), "--quiet"]) == 0
    a, b = final_weights(straight), final_weights(interrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(r["grad_norm"] == s["grad_norm"]
               for r, s in zip(rows_of(straight, "train"), rows_of(interrupted, "train")))
    # the checkpoints are masked-dense: the Hessian diagnosis (which needs the dense weights) reads them
    assert main(["diagnose", "hessian", str(straight), "--samples", "64", "--k", "2"]) == 0
    assert json.loads((straight / "hessian.json").read_text())["restricted"]["status"] == "ok"
