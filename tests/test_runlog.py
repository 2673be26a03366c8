import csv
import math
import re
import sys

import pytest
import torch

from sparseopt.experiments.errors import UserError
from sparseopt.experiments.run.runlog import RunLogger, progress, read_jsonl


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_jsonl_and_csv_record_every_call_with_growing_columns(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"loss": 2.5}, split="train")
        log.log(1, {"acc": 0.5, "loss": torch.tensor(3.0)}, split="val")
        log.log(2, {"loss": 1.5, "lr": 0.1, "images": 128}, split="train")
        log.log(3, {"density": 0.1})
        assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 4  # flushed on every write, readable while running
        assert len(read_csv(tmp_path / "metrics.csv")) == 4
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 1, "split": "train", "loss": 2.5},
        {"step": 1, "split": "val", "acc": 0.5, "loss": 3.0},
        {"step": 2, "split": "train", "loss": 1.5, "lr": 0.1, "images": 128},
        {"step": 3, "density": 0.1}]
    rows = read_csv(tmp_path / "metrics.csv")
    assert list(rows[0]) == ["step", "split", "loss", "acc", "lr", "images", "density"]
    assert rows[0] == {"step": "1", "split": "train", "loss": "2.5", "acc": "", "lr": "", "images": "",
                       "density": ""}
    assert rows[2]["images"] == "128" and rows[3]["split"] == "" and rows[3]["density"] == "0.1"


def test_formats_are_selectable_and_validated(tmp_path):
    with RunLogger(tmp_path / "a", formats=("csv",), tensorboard=False) as log:
        log.log(0, {"x": 1.0})
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["metrics.csv"]
    with pytest.raises(ValueError, match="unknown log formats"):
        RunLogger(tmp_path / "b", formats=("json",))
    with RunLogger(tmp_path / "c", formats=(), tensorboard=False) as log, pytest.raises(ValueError, match="reserved"):
        log.log(0, {"step": 1.0})


def test_non_finite_values_survive_jsonl(tmp_path):
    with RunLogger(tmp_path, formats=("jsonl",), tensorboard=False) as log:
        log.log(0, {"loss": float("nan"), "grad": float("inf")})
    [record] = read_jsonl(tmp_path / "metrics.jsonl")
    assert math.isnan(record["loss"]) and record["grad"] == math.inf


def test_resume_drops_records_after_the_checkpoint_step(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 6):
            log.log(step, {"loss": 1.0 / step})
        log.log(5, {"acc": 0.9}, split="val")
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a run killed in the middle of a write
        f.write('{"step": 6, "lo')
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("6,0.1")
    with RunLogger(tmp_path, tensorboard=False, resume_step=3) as log:
        for step in range(4, 7):
            log.log(step, {"loss": 1.0 / step})
    steps = [record["step"] for record in read_jsonl(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    rows = read_csv(tmp_path / "metrics.csv")
    assert [int(row["step"]) for row in rows] == [1, 2, 3, 4, 5, 6]
    assert list(rows[0]) == ["step", "loss", "split", "acc"]  # header from before the resume is kept
    assert float(rows[5]["loss"]) == pytest.approx(1 / 6)


def test_a_new_run_without_resume_starts_fresh_logs(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"loss": 1.0})
    with RunLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"acc": 0.5})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "acc": 0.5}]
    assert read_csv(tmp_path / "metrics.csv") == [{"step": "1", "acc": "0.5"}]


def test_read_jsonl_errors(tmp_path):
    with pytest.raises(UserError, match="metrics file not found"):
        read_jsonl(tmp_path / "absent.jsonl")
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"m\.jsonl:3: not valid JSON"):
        read_jsonl(path)


def test_tensorboard_scalars_are_written_and_purged_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLogger(tmp_path, formats=(), tensorboard=True) as log:
        for step in range(1, 5):
            log.log(step, {"loss": float(step)}, split="train")
        log.log(4, {"density": 0.1})
    with RunLogger(tmp_path, formats=(), tensorboard=True, resume_step=2) as log:
        log.log(3, {"loss": 30.0}, split="train")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "density"}
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_quiet_progress_is_silent_but_usable(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with progress(total=5, desc="train", quiet=True) as bar:
        bar.update(1)
        bar.set_postfix(loss=0.5)
        assert bar.disable
    assert list(progress(range(4), "eval", quiet=True)) == [0, 1, 2, 3]
    assert capsys.readouterr().err == ""


def test_progress_on_a_terminal_counts_and_shows_eta(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with progress(4, "train") as bar:
        bar.update(2)
        bar.set_postfix(loss=0.25)
        assert (bar.n, bar.total) == (2, 4)
    out = capsys.readouterr().err
    assert "train" in out and "2/4" in out and "loss=0.25" in out
    assert re.search(r"\d\d:\d\d<\d\d:\d\d", out)  # elapsed<remaining
    assert list(progress(range(3), "eval")) == [0, 1, 2]
