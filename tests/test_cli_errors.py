"""Wrong input, typed or in a file, through the real `sparseopt` command: one clear line, exit 2, nothing touched.

Each case runs the CLI's ``main()`` (the code behind the console script) in a fresh folder and asserts the exit
status, that stderr names the key (and the fix), that no traceback escaped, and that the folder tree -- every file's
bytes and every directory -- is exactly as before. A few cases run ``python -m sparseopt.cli`` in a subprocess to
check the same from the outside (exit codes and tracebacks as a user sees them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from helpers import TINY

from sparseopt.cli import main


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a checksum of its bytes ("dir" for a folder): any change shows up."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def tiny(**sections) -> dict:
    """TINY with some sections' keys replaced (``optim={"lr": 1}`` keeps TINY's other optim keys)."""
    config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values} if isinstance(values, dict) else values
    return config


@dataclass
class Case:
    id: str
    argv: list[str]
    expect: list[str]                                   # substrings of stderr (the key, the value, the fix)
    files: dict[str, str | dict] = field(default_factory=dict)   # written before: text, or a config dict
    code: int = 2
    damage: Callable[[Path], None] | None = None       # applied to the copied runs before the command

    def __repr__(self) -> str:
        return self.id


def prepare(root: Path, files: dict[str, str | dict]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))


def check(case: Case, root: Path, capsys, monkeypatch) -> str:
    prepare(root, case.files)
    monkeypatch.chdir(root)
    before = tree(root)
    try:
        code = main(case.argv)
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == case.code, err
    for text in case.expect:
        assert text in err, f"{text!r} not in {err!r}"
    assert "Traceback" not in err
    assert tree(root) == before
    return err


TRAIN = ["train", "c.yaml", "--quiet", "--out", "out"]

CONFIG_CASES = [
    Case("empty-file", TRAIN, ["c.yaml is empty", "sparseopt config >"], {"c.yaml": ""}),
    Case("comment-only-file", TRAIN, ["c.yaml is empty"], {"c.yaml": "# sparsity:\n#   density: 0.05\n\n"}),
    Case("null-document", TRAIN, ["c.yaml is empty"], {"c.yaml": "---\n~\n"}),
    Case("top-level-list", TRAIN, ["top level must be a mapping", "got list"], {"c.yaml": "- name: x\n"}),
    Case("duplicate-key", TRAIN, ["key 'optim.lr' is given twice (lines 3 and 4)"],
         {"c.yaml": "name: tiny\noptim:\n  lr: 0.05\n  lr: 0.1\n"}),
    Case("repeated-section", TRAIN, ["key 'optim' is given twice (lines 1 and 4)", "merge them into one section"],
         {"c.yaml": "optim:\n  lr: 0.05\nname: tiny\noptim:\n  momentum: 0.5\n"}),
    Case("duplicate-top-level-value", TRAIN, ["key 'name' is given twice (lines 1 and 2)"],
         {"c.yaml": "name: a\nname: b\n"}),
    Case("duplicate-in-set-value", [*TRAIN, "--set", "optim={lr: 0.1, lr: 0.2}"], ["key 'lr' is given twice"],
         {"c.yaml": TINY}),
    Case("malformed-yaml", TRAIN, ["c.yaml:3:1: malformed YAML"], {"c.yaml": "optim:\n  lr: [0.1\n"}),
    Case("missing-file", ["train", "nope.yaml", "--out", "out"], ["config file not found: nope.yaml"]),
    Case("folder-as-config", ["train", "sub", "--out", "out"], ["cannot read config file sub"],
         {"sub/keep.txt": "x"}),
    Case("inf-lr-in-file", TRAIN, ["optim.lr: got inf, expected a finite number"],
         {"c.yaml": "name: tiny\noptim:\n  lr: .inf\n"}),
    Case("inf-weight-decay", TRAIN, ["optim.weight_decay: got inf"], {"c.yaml": "optim:\n  weight_decay: .inf\n"}),
    Case("inf-epochs", TRAIN, ["train.epochs: got inf, expected a finite number"],
         {"c.yaml": "train:\n  epochs: .inf\n"}),
    Case("nan-momentum", TRAIN, ["optim.momentum: got nan"], {"c.yaml": "optim:\n  momentum: .nan\n"}),
    Case("inf-by-set", [*TRAIN, "--set", "optim.lr=inf"], ["optim.lr: got 'inf', expected a finite number"],
         {"c.yaml": TINY}),
    Case("minus-inf-by-set", [*TRAIN, "--set", "sparsity.erk_power_scale=-.inf"],
         ["sparsity.erk_power_scale: got -inf"], {"c.yaml": TINY}),
    Case("nan-epochs-by-set", [*TRAIN, "--set", "train.epochs=nan"], ["train.epochs: got 'nan'"], {"c.yaml": TINY}),
    Case("inf-in-model-options", [*TRAIN, "--set", "model.options.hidden=[.inf]"],
         ["model.options.hidden[0]: got inf, expected a finite number"], {"c.yaml": TINY}),
    Case("inf-in-data-options", [*TRAIN, "--set", "data.options.noise=.inf"], ["data.options.noise: got inf"],
         {"c.yaml": TINY}),
    Case("inf-in-list", [*TRAIN, "--set", "optim.betas=[0.9, .inf]"], ["optim.betas[1]: got inf"], {"c.yaml": TINY}),
    Case("density-as-percent", [*TRAIN, "--set", "sparsity.density=90"],
         ["sparsity.density: got 90", "did you mean 0.9?"], {"c.yaml": TINY}),
    Case("drop-fraction-as-percent", [*TRAIN, "--set", "sparsity.drop_fraction=30"], ["did you mean 0.3?"],
         {"c.yaml": TINY}),
    Case("unknown-key", [*TRAIN, "--set", "optim.lrr=0.1"], ["unknown key 'optim.lrr' (did you mean 'optim.lr'?)"],
         {"c.yaml": TINY}),
    Case("unknown-section", TRAIN, ["unknown key 'optimizer' (did you mean 'optim'?)"],
         {"c.yaml": "optimizer:\n  lr: 0.1\n"}),
    Case("wrong-type", [*TRAIN, "--set", "train.epochs=abc"], ["train.epochs: got 'abc' (str), expected float"],
         {"c.yaml": TINY}),
    Case("bool-for-number", [*TRAIN, "--set", "data.batch_size=yes"], ["data.batch_size: got True (bool)"],
         {"c.yaml": TINY}),
    Case("choice-typo", [*TRAIN, "--set", "sparsity.method=rigll"], ["did you mean 'rigl'?"], {"c.yaml": TINY}),
    Case("set-without-equals", [*TRAIN, "--set", "optim.lr"], ["--set 'optim.lr': expected key.sub=value"],
         {"c.yaml": TINY}),
    Case("set-into-a-value", [*TRAIN, "--set", "optim.lr.x=1"], ["'optim.lr' is a value, not a section"],
         {"c.yaml": TINY}),
    Case("same-key-set-twice", [*TRAIN, "--set", "sparsity.density=0.1", "--set", "sparsity.density = 0.2"],
         ["--set sparsity.density is given twice ('sparsity.density=0.1', then 'sparsity.density = 0.2')"],
         {"c.yaml": TINY}),
    Case("inf-as-a-huge-number", [*TRAIN, "--set", "train.epochs=1e400"], ["train.epochs: got '1e400', expected a "
                                                                           "finite number"], {"c.yaml": TINY}),
    Case("python-tag", TRAIN, ["malformed YAML", "python/object"], {"c.yaml": "name: !!python/object:os.system x\n"}),
    Case("reproduce-set-a-swept-key", ["reproduce", "paper001-table1", "--set", "sparsity.density=0.1"],
         ["--set sparsity.density=0.1: the preset sweeps it over [0.1, 0.05]"]),
    Case("reproduce-set-the-seed", ["reproduce", "paper001-table1", "--set", "train.seed=3"],
         ["--set train.seed=3: seeds come from --seeds"]),
    Case("several-errors-each-named", [*TRAIN, "--set", "optim.lr=-1", "--set", "train.seedd=1"],
         ["optim.lr: got -1", "unknown key 'train.seedd' (did you mean 'train.seed'?)"], {"c.yaml": TINY}),
    Case("config-command-inf", ["config", "--set", "optim.lr=.inf"], ["optim.lr: got inf"]),
    Case("config-command-empty-file", ["config", "c.yaml"], ["c.yaml is empty"], {"c.yaml": "# nothing\n"}),
    Case("report-target-inf", ["report", "r", "--target", "inf"], ["--target: expected a finite number"]),
    Case("demo-epochs-nan", ["demo", "--epochs", "nan"], ["--epochs: expected a finite number"]),
    Case("sweep-lrs-inf", ["sweep", "--lrs", "0.1,inf"], ["--lrs: expected finite numbers"]),
    Case("no-config-no-resume", ["train"], ["give a config file"]),
]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=repr)
def test_config_mistakes_are_refused_naming_the_key(case, tmp_path, capsys, monkeypatch):
    err = check(case, tmp_path, capsys, monkeypatch)
    if not any(flag in " ".join(case.argv) for flag in ("--target", "--epochs", "--lrs")):  # argparse's own usage
        assert all(line.startswith("error: ") for line in err.splitlines()), err


def setting(*overrides: str) -> list[str]:
    return [*TRAIN, *(a for o in overrides for a in ("--set", o))]


#: sparse execution of both Linear layers of TINY's MLP (the thresholds make its small layers eligible)
SPARSE = ("sparsity.execution=sparse", "sparsity.prune_first_layer=true", "sparsity.execution_max_density=1",
          "sparsity.execution_min_numel=0")

PREFLIGHT_CASES = [
    Case("out-is-a-file", TRAIN, ["output folder out exists and is a file"], {"c.yaml": TINY, "out": "x"}),
    Case("out-under-a-file", [*TRAIN[:-1], "f/run"], ["output folder f/run cannot be created: f is a file"],
         {"c.yaml": TINY, "f": "x"}),
    Case("out-in-proc", [*TRAIN[:-1], "/proc/sparseopt-test/run"], ["output folder /proc/sparseopt-test/run cannot be "
                                                                    "created or written"], {"c.yaml": TINY}),
    Case("model-option-typo", setting("model.options.hiden=[8]"),
         ["unknown key 'model.options.hiden' (did you mean 'model.options.hidden'?)"], {"c.yaml": TINY}),
    Case("model-option-of-another-model", setting("model.name=cnn"),
         ["unknown key 'model.options.hidden' (model 'cnn' takes: norm)"], {"c.yaml": TINY}),
    Case("model-option-num-classes", setting("model.options.num_classes=100"),
         ["model.options.num_classes: set from the data (data.options.num_classes)"], {"c.yaml": TINY}),
    Case("model-option-in-shape", setting("model.options.in_shape=[36]"),
         ["model.options.in_shape: set from the data (data.options.shape)"], {"c.yaml": TINY}),
    Case("user-model-option-typo", setting("model.name=cli_models:counting_mlp", "model.options={nan_att: 3}"),
         ["unknown key 'model.options.nan_att' (did you mean 'model.options.nan_at'?)"], {"c.yaml": TINY}),
    Case("user-model-required-option", setting("model.name=cli_models:needs_width", "model.options={}"),
         ["missing required key 'model.options.width'"], {"c.yaml": TINY}),
    Case("model-option-bad-value", setting("model.options.norm=batchnorm"),
         ["model.options", "norm must be one of"], {"c.yaml": TINY}),
    Case("unknown-model", setting("model.name=mlpp"), ["model.name: unknown model 'mlpp'. Did you mean 'mlp'"],
         {"c.yaml": TINY}),
    Case("unimportable-model", setting("model.name=no_such_module:f"), ["cannot import module 'no_such_module'"],
         {"c.yaml": TINY}),
    Case("conv-model-on-flat-data", setting("model.name=cnn", "model.options={}", "data.options.shape=[36]"),
         ["model.name 'cnn'", "cannot take the inputs of data.name 'synthetic' (inputs of shape (36,)"],
         {"c.yaml": TINY}),
    Case("model-output-not-the-class-count", setting("model.name=cli_models:one_class_too_many", "model.options={}"),
         ["outputs (2, 5)", "needs (2, 4)"], {"c.yaml": TINY}),
    Case("data-option-typo", setting("data.options.n_trian=10"),
         ["unknown key 'data.options.n_trian' (did you mean 'data.options.n_train'?)"], {"c.yaml": TINY}),
    Case("data-option-shadowing-a-key", setting("data.options.batch_size=8"),
         ["data.options.batch_size: set it with data.batch_size"], {"c.yaml": TINY}),
    Case("start-after-last-update", setting("sparsity.start_step=100"),
         ["sparsity.start_step 100 is not before the last mask update at step 18", "method 'rigl'"], {"c.yaml": TINY}),
    Case("start-at-last-update", setting("sparsity.method=set", "sparsity.start_step=9", "sparsity.end_fraction=0.375"),
         ["sparsity.start_step 9 is not before the last mask update at step 9", "method 'set'"], {"c.yaml": TINY}),
    Case("end-fraction-too-small", setting("sparsity.end_fraction=0.01"),
         ["sparsity.start_step 0 is not before the last mask update at step 0"], {"c.yaml": TINY}),
    Case("drop-fraction-zero", setting("sparsity.drop_fraction=0"), ["sparsity.drop_fraction 0 never changes a mask"],
         {"c.yaml": TINY}),
    Case("density-one-but-sparse", setting("sparsity.density=1"), ["sparsity.density 1 keeps every weight"],
         {"c.yaml": TINY}),
    Case("warmup-longer-than-run", setting("optim.warmup_epochs=5"), ["optim.warmup_epochs 5 is not shorter"],
         {"c.yaml": TINY}),
    Case("min-lr-above-lr", setting("optim.min_lr=0.5"), ["optim.min_lr 0.5 is above the peak optim.lr 0.05"],
         {"c.yaml": TINY}),
    Case("diagnostic-never-due", setting("diagnostics.hessian_every=1000"),
         ["diagnostics.hessian_every 1000 is longer than the run (24 steps"], {"c.yaml": TINY}),
    Case("output-classes-without-weights", setting("sparsity.density=0.00001"),
         ["leaves 3 of 4 classes (0, 2, 3) without a weight in the output layer 'net.4.weight'"], {"c.yaml": TINY}),
    Case("layer-without-weights", setting("sparsity.density=0.0001", "sparsity.prune_first_layer=true",
                                          "model.options.hidden=[32, 32]", "data.options.shape=[1, 28, 28]"),
         ["sparsity.density 0.0001 (erk) leaves layer(s) 'net.4.weight' (32x32), 'net.7.weight' (4x32) with 0 "
          "weights", "raise sparsity.density to at least 0.0"], {"c.yaml": TINY}),
    Case("pruning-at-init-keeps-nothing", setting("sparsity.method=static", "sparsity.initial_mask=snip",
                                                  "sparsity.density=0.0001"),
         ["initial_mask 'snip'", "keeps no weight"], {"c.yaml": TINY}),
    Case("exclude-matches-nothing", setting("sparsity.exclude=[fc.*]"), ["exclude ['fc.*']", "matches no"],
         {"c.yaml": TINY}),
    Case("sparseopt-on-a-dense-model", setting("sparsity.method=dense"), ["sparseopt.enabled"], {"c.yaml": TINY}),
    Case("input-with-no-values", setting("data.options.shape=[3, 0]"),
         ["data.name 'synthetic' (inputs of shape (3, 0), 4 classes) has inputs with no values"], {"c.yaml": TINY}),
    Case("layer-of-width-zero", setting("model.options.hidden=[0]"),
         ["has layers without weights: 'net.1.weight' (0x36)"], {"c.yaml": TINY}),
    Case("data-option-of-the-wrong-kind", setting("data.options.shape=abc"),
         ["data.options", "do not fit data.name 'synthetic'"], {"c.yaml": TINY}),
    Case("nesterov-without-momentum", setting("optim.nesterov=true", "optim.momentum=0"),
         ["optim.nesterov: true needs optim.momentum above 0"], {"c.yaml": TINY}),
    Case("beta-out-of-range", setting("optim.name=adamw", "optim.betas=[0.9, 1.5]"),
         ["optim.betas[1]: got 1.5, expected float with x >= 0 and x < 1"], {"c.yaml": TINY}),
    Case("batchnorm-last-batch-of-one", setting("data.options.n_train=257"),
         ["the last batch of each epoch (257 training examples, data.batch_size 32) holds 1 example, and BatchNorm "
          "'net.2'", "data.options.drop_last: true"], {"c.yaml": TINY}),
    Case("batchnorm-batch-of-one", setting("data.batch_size=1", "train.epochs=1", "optim.warmup_epochs=0"),
         ["data.batch_size 1: BatchNorm 'net.2'", "at least 2"], {"c.yaml": TINY}),
    Case("missing-cifar", setting("data.name=cifar10", "data.options={}", "data.root=nowhere"),
         ["cifar-10-batches-py"], {"c.yaml": TINY}),
    Case("sparse-execution-of-a-dense-model", setting(*SPARSE, "sparsity.method=dense", "sparseopt.enabled=false"),
         ["sparsity.execution 'sparse' needs sparse layers and sparsity.method 'dense' has none"], {"c.yaml": TINY}),
    Case("sparse-execution-in-bf16", setting(*SPARSE, "train.precision=bf16"),
         ["sparsity.execution 'sparse' does not combine with train.precision 'bf16'", "set train.precision: fp32"],
         {"c.yaml": TINY}),
    Case("sparse-execution-in-fp16", setting(*SPARSE, "train.precision=fp16"),
         ["sparsity.execution 'sparse' does not combine with train.precision 'fp16'"], {"c.yaml": TINY}),
    Case("sparse-execution-with-hessian", setting(*SPARSE, "diagnostics.hessian_every=4"),
         ["sparsity.execution 'sparse' does not combine with diagnostics.hessian_every 4",
          "set diagnostics.hessian_every: 0", "sparsity.execution: masked"], {"c.yaml": TINY}),
]


@pytest.mark.parametrize("case", PREFLIGHT_CASES, ids=repr)
def test_what_can_be_checked_before_training_is_checked_before_the_folder_exists(case, tmp_path, capsys,
                                                                                  monkeypatch):
    if case.id == "out-in-proc" and not Path("/proc/self").exists():
        pytest.skip("needs Linux /proc")
    err = check(case, tmp_path, capsys, monkeypatch)
    errors = [line for line in err.splitlines() if not line.startswith("warning: ")]  # torch's own, e.g. width 0
    assert len(errors) == 1 and errors[0].startswith("error: "), err


def test_sparse_execution_under_torchrun_is_refused_before_joining_the_process_group(tmp_path, capsys, monkeypatch):
    """WORLD_SIZE is what torchrun sets; the refusal comes before any collective, so no peer is needed here (the
    real ``torchrun --nproc_per_node=2`` prints the same line on each rank and exits 2 on each)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    case = Case("sparse-under-torchrun", setting(*SPARSE), ["sparsity.execution 'sparse' does not combine with "
                                                            "torchrun (WORLD_SIZE 2)", "sparsity.execution: masked"],
                {"c.yaml": TINY})
    err = check(case, tmp_path, capsys, monkeypatch)
    assert err.splitlines() == [err.splitlines()[0]] and err.startswith("error: "), err


def test_settings_that_never_take_effect_are_warned_about(tmp_path, capsys, monkeypatch):
    prepare(tmp_path, {"c.yaml": tiny(train={"log_every": 500, "epochs": 1})})
    monkeypatch.chdir(tmp_path)
    assert main(TRAIN) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == ["warning: train.log_every 500 is longer than the run (8 steps (train.epochs 1 x 8 "
                                "batches)): no training metrics will be logged"]


SUBPROCESS_CASES = [
    Case("resume-with-another-density", ["train", "--resume", "done", "--set", "sparsity.density=0.2"],
         ["cannot resume done with a different config: sparsity.density 0.3 -> 0.2"]),
    Case("a-bug-is-one-line-too", ["train", "c.yaml", "--out", "out", "--set", "model.name=cli_models:raises_a_bug",
                                   "--set", "model.options={}"],
         ["error: unexpected KeyError: 'no such key' (a bug in sparseopt or in a user model factory; rerun with "
          "--debug"], {"c.yaml": TINY}, code=1),
    Case("duplicate-key", ["train", "c.yaml", "--out", "out"], ["key 'optim.lr' is given twice"],
         {"c.yaml": "optim:\n  lr: 0.05\n  lr: 0.1\n"}),
    Case("inf-by-set", ["train", "c.yaml", "--out", "out", "--set", "optim.weight_decay=inf"],
         ["optim.weight_decay: got 'inf'"], {"c.yaml": TINY}),
]


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=repr)
def test_the_console_command_answers_in_one_line_without_a_traceback(case, runs, tmp_path):
    with_runs(case, runs, tmp_path)
    prepare(tmp_path, case.files)
    before = tree(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    proc = subprocess.run([sys.executable, "-m", "sparseopt.cli", *case.argv], cwd=tmp_path, capture_output=True,
                          text=True, env=env)
    assert proc.returncode == case.code, proc.stderr
    assert all(text in proc.stderr for text in case.expect), proc.stderr
    assert "Traceback" not in proc.stderr and tree(tmp_path) == before
    debug = subprocess.run([sys.executable, "-m", "sparseopt.cli", "--debug", *case.argv], cwd=tmp_path,
                           capture_output=True, text=True, env=env)
    assert debug.returncode != 0 and "Traceback" in debug.stderr  # --debug shows where it came from


# ---- resume: a run folder is never damaged ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished tiny run and an interrupted one (Ctrl-C at its 11th forward pass), trained once per module."""
    root = tmp_path_factory.mktemp("runs")
    prepare(root, {"c.yaml": TINY, "int.yaml": tiny(model={"name": "cli_models:counting_mlp",
                                                          "options": {"interrupt_at": 11}})})
    assert main(["train", str(root / "c.yaml"), "--out", str(root / "done"), "--quiet"]) == 0
    assert main(["train", str(root / "int.yaml"), "--out", str(root / "partial"), "--quiet"]) == 130
    saved = yaml.safe_load((root / "partial" / "config.yaml").read_text())
    saved["model"]["options"] = {}  # resumable without a new interruption (a fresh model counts from 0)
    (root / "partial" / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return root


def with_runs(case: Case, runs: Path, root: Path) -> None:
    for name in ("done", "partial"):
        if any(name in arg for arg in case.argv):
            shutil.copytree(runs / name, root / name)
    if case.damage is not None:
        case.damage(root)


ONLY = "a resumed run may change only train.epochs"
RESUME_CASES = [
    Case("other-density", ["train", "--resume", "done", "--set", "sparsity.density=0.2"],
         ["cannot resume done with a different config: sparsity.density 0.3 -> 0.2;", ONLY, "--out NEW_FOLDER"]),
    Case("other-method-and-lr", ["train", "--resume", "done", "--set", "sparsity.method=set", "--set", "optim.lr=0.1"],
         ["sparsity.method 'rigl' -> 'set', optim.lr 0.05 -> 0.1;"]),
    Case("other-config-file", ["train", "other.yaml", "--resume", "done"],
         ["model.options.hidden [32] -> [64]", "sparseopt.enabled True -> False"],
         {"other.yaml": tiny(model={"options": {"hidden": [64], "norm": "batch"}}, sparseopt={"enabled": False})}),
    Case("added-model-option", ["train", "--resume", "done", "--set", "model.options.bias=false"],
         ["model.options.bias <unset> -> False"]),
    Case("fewer-epochs", ["train", "--resume", "done", "--set", "train.epochs=2"],
         ["train.epochs 3.0 -> 2.0 (may only grow)"]),
    Case("fewer-checkpoints-kept", ["train", "--resume", "done", "--set", "train.keep_last=1"],
         ["train.keep_last 2 -> 1 (may only grow)"]),
    Case("other-seed", ["train", "--resume", "done", "--set", "train.seed=1"], ["train.seed 0 -> 1"]),
    Case("other-batch-size", ["train", "--resume", "done", "--set", "data.batch_size=16"],
         ["data.batch_size 32 -> 16"]),
    Case("other-name", ["train", "--resume", "done", "--set", "name=renamed"], ["name 'tiny' -> 'renamed'"]),
    Case("safe-and-unsafe-together", ["train", "--resume", "done", "--set", "train.epochs=6", "--set",
                                      "sparsity.update_every=2"], ["sparsity.update_every 4 -> 2;"]),
    Case("partial-run-other-density", ["train", "--resume", "partial", "--set", "sparsity.density=0.5"],
         ["cannot resume partial with a different config: sparsity.density 0.3 -> 0.5"]),
    Case("partial-run-other-model", ["train", "--resume", "partial", "--set", "model.name=mlp"],
         ["model.name 'cli_models:counting_mlp' -> 'mlp'"]),
    Case("resume-and-overwrite", ["train", "--resume", "done", "--overwrite"],
         ["--resume done continues a run and --overwrite replaces it: choose one"]),
    Case("resume-into-another-out", ["train", "--resume", "done", "--out", "elsewhere"],
         ["--resume done continues the run in its own folder, not in --out elsewhere"]),
    Case("resume-a-missing-folder", ["train", "--resume", "nowhere"], ["nowhere/config.yaml is missing"]),
    Case("resume-a-folder-without-checkpoints", ["train", "--resume", "fresh"], ["holds no checkpoints/ folder"],
         {"fresh/config.yaml": TINY}),
    Case("fresh-train-into-a-run", ["train", "c.yaml", "--out", "done", "--quiet"],
         ["done already holds a run", "--overwrite", "--resume"], {"c.yaml": TINY}),
]


@pytest.mark.parametrize("case", RESUME_CASES, ids=repr)
def test_resume_refuses_a_changed_config_before_touching_anything(case, runs, tmp_path, capsys, monkeypatch):
    with_runs(case, runs, tmp_path)
    err = check(case, tmp_path, capsys, monkeypatch)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err


def edit(path: Path, **changes) -> None:
    config = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        config[section][key] = value
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def test_damaged_run_folders_are_named_in_one_line_and_left_alone(runs, tmp_path, capsys, monkeypatch):
    for name, damage, expect in [
        ("edited", lambda d: edit(d / "config.yaml", model__options={"hidden": [64], "norm": "batch"}),
         "does not fit the model and optimizer that edited/config.yaml builds"),
        ("corrupt", lambda d: (d / "checkpoints" / "ckpt-00000024.pt").write_bytes(b"not a checkpoint"),
         "is corrupt or not a sparseopt checkpoint"),
        ("repeated", lambda d: (d / "config.yaml").write_text((d / "config.yaml").read_text() + "name: again\n"),
         "repeated/config.yaml: key 'name' is given twice (lines 1 and"),
    ]:
        shutil.copytree(runs / "done", tmp_path / name)
        damage(tmp_path / name)
        (tmp_path / name / "results.json").unlink()  # an unfinished run: resume has to read the checkpoint
        err = check(Case(name, ["train", "--resume", name, "--quiet"], [expect]), tmp_path, capsys, monkeypatch)
        assert len(err.splitlines()) == 1, err


FINISHED_CASES = [
    Case("finished", ["train", "--resume", "done"], ["done is already finished (24 steps", "nothing was trained or "
                                                     "written", "--set train.epochs=N (now 3)"], code=0),
    Case("finished-same-file", ["train", "c.yaml", "--resume", "done"], ["already finished"], {"c.yaml": TINY}, 0),
    Case("finished-safe-change", ["train", "--resume", "done", "--set", "train.log_every=4", "--set",
                                  "logging.tensorboard=true"],
         ["already finished", "(not applied: train.log_every 2 -> 4, logging.tensorboard False -> True)"], code=0),
]


@pytest.mark.parametrize("case", FINISHED_CASES, ids=repr)
def test_resuming_a_finished_run_says_so_and_changes_nothing(case, runs, tmp_path, capsys, monkeypatch):
    with_runs(case, runs, tmp_path)
    prepare(tmp_path, case.files)
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    assert main(case.argv) == 0
    out, err = capsys.readouterr()
    assert out == "" and all(text in err for text in case.expect), err  # no results line: nothing was trained
    assert "Traceback" not in err and tree(tmp_path) == before


def test_safe_changes_are_accepted_listed_and_recorded(runs, tmp_path, capsys, monkeypatch):
    shutil.copytree(runs / "done", tmp_path / "done")
    shutil.copytree(runs / "partial", tmp_path / "partial")
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path / "done")
    assert main(["train", "--resume", "done", "--quiet", "--set", "train.epochs=4"]) == 0  # an extension
    err = capsys.readouterr().err
    assert err.splitlines() == ["warning: resuming done at step 24 with changed settings: train.epochs 3.0 -> 4.0 "
                                "(the learning-rate schedule and the mask-update window now span 32 steps)"]
    after = tree(tmp_path / "done")
    assert after["checkpoints/ckpt-00000024.pt"] == before["checkpoints/ckpt-00000024.pt"]
    assert "checkpoints/ckpt-00000032.pt" in after
    assert yaml.safe_load((tmp_path / "done" / "config.yaml").read_text())["train"]["epochs"] == 4
    assert json.loads((tmp_path / "done" / "results.json").read_text())["steps"] == 32
    assert main(["train", "--resume", "partial", "--quiet", "--set", "train.log_every=4"]) == 0
    assert "with changed settings: train.log_every 2 -> 4" in capsys.readouterr().err
    assert json.loads((tmp_path / "partial" / "results.json").read_text())["steps"] == 24


def test_grids_never_replace_a_run_of_another_config_without_being_told(runs, tmp_path):
    from sparseopt.experiments.studies.batch import run_many
    from sparseopt.experiments.config.load import ConfigError, from_dict
    from sparseopt.experiments.config.schema import RunConfig

    for name in ("a", "b"):
        shutil.copytree(runs / "done", tmp_path / name)
    before = tree(tmp_path)
    same, other = from_dict(RunConfig, TINY), from_dict(RunConfig, tiny(sparsity={"density": 0.5}))
    with pytest.raises(ConfigError) as info:  # `reproduce` with a changed --set: both folders named at once
        run_many([other, other], [str(tmp_path / "a"), str(tmp_path / "b")], reuse=True, workers=1, quiet=True)
    assert [e.split(" holds")[0] for e in info.value.errors] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert all("sparsity.density 0.3 -> 0.5" in e and "--fresh" in e for e in info.value.errors)
    with pytest.raises(ConfigError, match="already holds a run; pass --overwrite"):  # `demo` without --overwrite
        run_many([same], [str(tmp_path / "a")], workers=1, quiet=True)
    assert tree(tmp_path) == before
    assert run_many([same], [str(tmp_path / "a")], reuse=True, workers=1, quiet=True) == {"new": 0, "partial": 0,
                                                                                          "done": 1}
    assert tree(tmp_path) == before


# ---- diagnose and report: read-only commands never write into what they read ------------------------------------
def no_checkpoints(root: Path) -> None:
    shutil.rmtree(root / "done" / "checkpoints")


def other_model(root: Path) -> None:
    edit(root / "done" / "config.yaml", model__options={"hidden": [64], "norm": "batch"})


def corrupt_checkpoint(root: Path) -> None:
    (root / "done" / "checkpoints" / "ckpt-00000024.pt").write_bytes(b"garbage")


def assorted_bad_runs(root: Path) -> None:
    (root / "broken").mkdir()
    (root / "broken" / "results.json").write_text("{not json")
    (root / "foreign").mkdir()
    (root / "foreign" / "results.json").write_text('{"accuracy": 0.5}')


def a_copy(root: Path) -> None:
    shutil.copytree(root / "done", root / "copy")


READ_ONLY_CASES = [
    Case("hessian-without-checkpoints", ["diagnose", "hessian", "done"], ["done has no checkpoint to analyse"],
         damage=no_checkpoints),
    Case("hessian-not-a-run", ["diagnose", "hessian", "nothing"], ["nothing is not a run folder (no config.yaml)"]),
    Case("hessian-config-does-not-fit", ["diagnose", "hessian", "done", "--samples", "8"],
         ["checkpoint done/checkpoints/ckpt-00000024.pt does not fit the model and optimizer that done/config.yaml"],
         damage=other_model),
    Case("hessian-corrupt-checkpoint", ["diagnose", "hessian", "done"], ["is corrupt or not a sparseopt checkpoint"],
         damage=corrupt_checkpoint),
    Case("hessian-k-zero", ["diagnose", "hessian", "done", "--k", "0"], ["--k: expected an integer >= 1, got 0"]),
    Case("hessian-out-is-a-file", ["diagnose", "hessian", "done", "--out", "f"], ["output folder f exists and is a "
                                                                                  "file"], {"f": "x"}),
    Case("report-names-every-bad-folder", ["report", "missing", "partial", "broken", "foreign", "done"],
         ["error: missing does not exist", "error: partial is not a finished run: partial/results.json is missing",
          "error: cannot read run broken:", "error: foreign/results.json is not the results.json of a sparseopt run"],
         damage=assorted_bad_runs),
    Case("report-same-folder-twice", ["report", "done", "./done"], ["./done is given twice (also as done): it would count as two seeds"]),
    Case("report-a-copied-run", ["report", "done", "copy"], ["copy and done are the same configuration and seed "
                                                             "('tiny', seed 0)"], damage=a_copy),
    Case("report-out-is-a-file", ["report", "done", "--out", "f"], ["output folder f exists and is a file"],
         {"f": "x"}),
    Case("report-target-out-of-range", ["report", "done", "--target", "90"], ["--target is an accuracy in (0, 1]"]),
    Case("grad-ratio-zero-seeds", ["diagnose", "grad-ratio", "--seeds", "0"], ["--seeds: expected an integer >= 1"]),
    Case("grad-ratio-out-under-a-file", ["diagnose", "grad-ratio", "--out", "f/x", "--seeds", "1"],
         ["output folder f/x cannot be created: f is a file"], {"f": "x"}),
    Case("coord-check-out-is-a-file", ["diagnose", "coord-check", "--out", "f"], ["output folder f exists"], {"f": "x"}),
    Case("sweep-out-is-a-file", ["sweep", "--out", "f"], ["output folder f exists"], {"f": "x"}),
    Case("demo-out-is-a-file", ["demo", "--out", "f"], ["output folder f exists"], {"f": "x"}),
    Case("demo-zero-workers", ["demo", "--workers", "0"], ["--workers: expected an integer >= 1, got 0"]),
    Case("reproduce-unknown-preset", ["reproduce", "paper000-tabel1"], ["unknown preset 'paper000-tabel1' (did you "
                                                                        "mean 'paper000-table1'?)"]),
    Case("reproduce-out-is-a-file", ["reproduce", "paper000-table1", "--out", "f"], ["output folder f exists"],
         {"f": "x"}),
]


@pytest.mark.parametrize("case", READ_ONLY_CASES, ids=repr)
def test_diagnose_and_report_refuse_cleanly_and_write_nothing(case, runs, tmp_path, capsys, monkeypatch):
    with_runs(case, runs, tmp_path)
    err = check(case, tmp_path, capsys, monkeypatch)
    if not any(":" in line and "expected an integer" in line for line in err.splitlines()):  # argparse usage
        assert all(line.startswith("error: ") for line in err.splitlines()), err


@pytest.mark.parametrize("fix", [
    ["data.options.n_train=257", "data.options.drop_last=true"],       # the BatchNorm last-batch message's fix
    ["sparsity.start_step=100", "sparsity.method=static"],             # the schedule message's fix
    ["sparsity.density=0.9"],                                          # "density: 90 ... did you mean 0.9?"
])
def test_the_fix_a_message_suggests_is_accepted(fix, tmp_path, capsys, monkeypatch):
    prepare(tmp_path, {"c.yaml": tiny(train={"epochs": 1})})
    monkeypatch.chdir(tmp_path)
    assert main(setting(*fix)) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "results.json").is_file()



@pytest.mark.parametrize(("overrides", "warning"), [
    (["sparsity.method=dense", "sparseopt.enabled=false"],
     "sparsity.density 0.3, sparsity.update_every 4 have no effect with sparsity.method 'dense'"),
    (["sparsity.method=static"], "sparsity.update_every 4 has no effect with sparsity.method 'static' (masks never "
                                  "change)"),
    (["sparsity.distribution=uniform", "sparsity.erk_power_scale=0.5"],
     "sparsity.erk_power_scale 0.5 has no effect with sparsity.distribution 'uniform'"),
    (["sparsity.pai_batches=3"], "sparsity.pai_batches 3 has no effect with sparsity.initial_mask 'random'"),
    (["sparseopt.enabled=false", "sparseopt.scope=bn_followed"],
     "sparseopt.scope 'bn_followed' has no effect with sparseopt.enabled false"),
    (["optim.nesterov=true"], None),
    (["optim.name=adamw", "optim.nesterov=true"], "optim.nesterov True has no effect with optim.name 'adamw'"),
    (["optim.betas=[0.8, 0.9]"], "optim.betas [0.8, 0.9] has no effect with optim.name 'sgd'"),
    (["optim.ham_alpha=5"], "optim.ham_alpha 5.0 has no effect with optim.ham false"),
    (["diagnostics.hessian_k=2"], "diagnostics.hessian_k 2 has no effect with diagnostics.hessian_every 0 (off)"),
    (["data.root=/data"], "data.root '/data' has no effect with data.name 'synthetic'"),
    (["sparsity.execution_min_numel=0"], "sparsity.execution_min_numel 0 has no effect with sparsity.execution "
                                         "'masked'"),
])
def test_settings_the_config_switches_off_are_named(overrides, warning, tmp_path, capsys, monkeypatch):
    prepare(tmp_path, {"c.yaml": tiny(train={"epochs": 1})})
    monkeypatch.chdir(tmp_path)
    assert main(setting(*overrides)) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == ([f"warning: {warning}"] if warning else []), err
