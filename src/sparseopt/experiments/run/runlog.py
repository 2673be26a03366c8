"""Metrics logs a run leaves behind: JSON lines (the source for reports), CSV (for spreadsheets), TensorBoard.

Each `log` call becomes one record `{"step": ..., "split": ..., <metric>: <value>, ...}` ("split" only when given).
Files are flushed on every write, so a killed run keeps everything logged before the kill. A resumed run passes
`resume_step`: records after that step are dropped first, so steps redone after the resume are not duplicated.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from sparseopt.experiments.run.checkpoint import atomic_write
from sparseopt.experiments.errors import UserError

T = TypeVar("T")
FORMATS = ("jsonl", "csv")


class RunLogger:
    """Writes `metrics.jsonl` / `metrics.csv` and TensorBoard events (in `tensorboard/`) under `out_dir`.

    The CSV header is the union of all keys seen; when a new key appears the file is rewritten with the wider
    header (rows are few), otherwise rows are appended.
    """

    def __init__(self, out_dir: str | os.PathLike[str], formats: Iterable[str] = FORMATS, tensorboard: bool = True,
                 resume_step: int | None = None) -> None:
        formats = tuple(formats)
        unknown = sorted(set(formats) - set(FORMATS))
        if unknown:
            raise ValueError(f"unknown log formats {unknown}; choose from {list(FORMATS)}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = self._csv = self._tensorboard = None
        self._csv_columns: list[str] = []
        self._csv_rows: list[dict[str, Any]] = []
        if "jsonl" in formats:
            self._jsonl = self._open_jsonl(self.out_dir / "metrics.jsonl", resume_step)
        if "csv" in formats:
            self._csv_path = self.out_dir / "metrics.csv"
            if resume_step is not None and self._csv_path.exists():
                self._csv_columns, self._csv_rows = _read_csv_until(self._csv_path, resume_step)
            self._rewrite_csv()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import, only when wanted

            purge = None if resume_step is None else resume_step + 1  # hides events logged after the checkpoint
            self._tensorboard = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, metrics: Mapping[str, Any], split: str | None = None) -> None:
        """Record `metrics` (numbers or 1-element tensors) at `step`, tagged `split/name` in TensorBoard."""
        if "step" in metrics or "split" in metrics:
            raise ValueError("'step' and 'split' are reserved and cannot be metric names")
        values = {name: _number(value) for name, value in metrics.items()}
        record: dict[str, Any] = {"step": int(step)}
        if split is not None:
            record["split"] = split
        record.update(values)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._csv is not None:
            self._csv_rows.append(record)
            if set(record) - set(self._csv_columns):
                self._csv_columns += [key for key in record if key not in self._csv_columns]
                self._rewrite_csv()
            else:
                self._csv_writer().writerow(record)
                self._csv.flush()
        if self._tensorboard is not None:
            for name, value in values.items():
                self._tensorboard.add_scalar(f"{split}/{name}" if split else name, value, int(step))

    def close(self) -> None:
        for handle in (self._jsonl, self._csv, self._tensorboard):
            if handle is not None:
                handle.close()
        self._jsonl = self._csv = self._tensorboard = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @staticmethod
    def _open_jsonl(path: Path, resume_step: int | None) -> io.TextIOWrapper:
        if resume_step is None or not path.exists():
            return open(path, "w", encoding="utf-8")
        kept = [record for record in read_jsonl(path) if record["step"] <= resume_step]
        with atomic_write(path) as f:
            f.writelines(json.dumps(record) + "\n" for record in kept)
        return open(path, "a", encoding="utf-8")

    def _csv_writer(self) -> csv.DictWriter:
        return csv.DictWriter(self._csv, fieldnames=self._csv_columns, lineterminator="\n")

    def _rewrite_csv(self) -> None:
        if self._csv is not None:
            self._csv.close()
        with atomic_write(self._csv_path) as f:
            writer = csv.DictWriter(f, fieldnames=self._csv_columns, lineterminator="\n")
            if self._csv_columns:
                writer.writeheader()
            writer.writerows(self._csv_rows)
        self._csv = open(self._csv_path, "a", encoding="utf-8", newline="")


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl; a partial last line (run killed mid-write) is ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"metrics file not found: {path}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg}); the metrics file is corrupt") from None
    return records


def progress(iterable_or_total: Iterable[T] | int | None = None, desc: str | None = None, quiet: bool = False, *,
             total: int | None = None) -> tqdm:
    """A tqdm bar with ETA: `for x in progress(items, "train")` or `with progress(total=n, desc=...) as bar`.

    Silent when `quiet` or when stderr is not a terminal (no carriage-return noise in log files).
    """
    if isinstance(iterable_or_total, int):
        iterable, total = None, iterable_or_total
    else:
        iterable = iterable_or_total
    return tqdm(iterable, total=total, desc=desc, disable=True if quiet else None, dynamic_ncols=True)


def _number(value: Any) -> int | float:
    return value if isinstance(value, int) and not isinstance(value, bool) else float(value)


def _read_csv_until(path: Path, last_step: int) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows with step <= last_step; a final line without newline is a partial write and dropped."""
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text))
    rows = [row for row in reader if int(row["step"]) <= last_step]
    return list(reader.fieldnames or []), rows
