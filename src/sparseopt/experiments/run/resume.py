"""What a resumed run may change: a run folder must go on describing the run that is in it.

``sparseopt train --resume DIR [CONFIG] [--set ...]`` compares the config it is given with ``DIR/config.yaml``
before anything is built or written. Keys that change how a run is *observed or hosted*, not *what it trains*,
may differ (the list below, also in docs/cli.md; ``train.precision`` is not among them: it changes the
arithmetic of every later step); ``train.epochs`` and ``train.keep_last`` only upward. Any other
difference is refused with every key listed ``old -> new``: continuing would leave masks and checkpoints of one
config under the name of another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparseopt.experiments.run.checkpoint import checkpoint_step, find_checkpoints
from sparseopt.experiments.config.load import from_dict, load_yaml, to_dict
from sparseopt.experiments.errors import UserError
from sparseopt.experiments.config.schema import RunConfig

#: Keys a resumed run may change; a trailing ".*" covers a whole section.
SAFE_TO_CHANGE = ("train.epochs", "train.keep_last", "train.log_every", "train.eval_every", "train.device",
                  "train.deterministic", "train.channels_last", "train.compile", "logging.*", "data.root", "data.download", "data.num_workers",
                  "data.test_batch_size", "diagnostics.*")
#: Of those, the ones that may only grow: a longer run (an extension), more checkpoints kept.
GROW_ONLY = ("train.epochs", "train.keep_last")


@dataclass
class ResumePlan:
    changes: list[tuple[str, Any, Any]]  # accepted differences (key, saved value, new value)
    finished: dict | None                # the run's results.json when it is complete and not being extended


def plan_resume(out: Path, cfg: RunConfig) -> ResumePlan:
    """Refuse a resume that would change what the run in ``out`` trains; say whether it is already finished."""
    saved = saved_config(out)
    changes = config_changes(to_dict(saved), to_dict(cfg))
    refused = [(k, old, new) for k, old, new in changes if not _allowed(k, old, new)]
    if refused:
        listed = ", ".join(f"{k} {_show(old)} -> {_show(new)}" + (" (may only grow)" if k in GROW_ONLY else "")
                           for k, old, new in refused)
        raise UserError(f"cannot resume {out} with a different config: {listed}; a resumed run may change only "
                        f"{', '.join(SAFE_TO_CHANGE)} (docs/cli.md); to train the new config start a new run "
                        "(--out NEW_FOLDER)")
    return ResumePlan(changes, _finished_results(out, cfg))


def saved_config(out: Path) -> RunConfig:
    path = out / "config.yaml"
    if not path.is_file():
        raise UserError(f"cannot resume: {path} is missing; is {out} a run folder?")
    try:
        return from_dict(RunConfig, load_yaml(path))
    except UserError as err:
        first = str(err).splitlines()[0]
        raise UserError(f"cannot resume: the run's own {path} does not validate ({first}); "
                        "restore it from results.json's 'config' or start a new run") from None


def config_changes(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Every leaf that differs, as (dotted key, old, new); a key missing on one side shows as ``<unset>``."""
    changes = []
    for key in [*old, *(k for k in new if k not in old)]:
        dotted = f"{prefix}{key}"
        a, b = old.get(key, _UNSET), new.get(key, _UNSET)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, dotted + ".")
        elif a != b or type(a) is not type(b) and not _same_number(a, b):
            changes.append((dotted, a, b))
    return changes


def describe(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{k} {_show(old)} -> {_show(new)}" for k, old, new in changes)


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()


def _same_number(a: Any, b: Any) -> bool:
    numbers = (int, float)
    return isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and \
        not isinstance(b, bool) and a == b


def _allowed(key: str, old: Any, new: Any) -> bool:
    safe = any(key == s or (s.endswith(".*") and key.startswith(s[:-1])) for s in SAFE_TO_CHANGE)
    if not safe:
        return False
    return key not in GROW_ONLY or new > old


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _finished_results(out: Path, cfg: RunConfig) -> dict | None:
    """results.json of a run that completed the length ``cfg`` asks for (a stale one from before an extension,
    or one older than the latest checkpoint, does not count)."""
    path = out / "results.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        epochs, steps = results["config"]["train"]["epochs"], int(results["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    checkpoints = find_checkpoints(out / "checkpoints")
    latest = checkpoint_step(checkpoints[-1]) if checkpoints else 0
    return results if epochs == cfg.train.epochs and steps >= latest else None
