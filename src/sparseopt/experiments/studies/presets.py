"""Reproduction presets: each table/figure of the papers as a grid of runs, at laptop or full scale.

A preset (``src/sparseopt/presets/<name>.yaml``) names the paper item it reproduces and, per scale, a base
config, variants (the compared methods, as config overrides), axes (dotted config keys swept, e.g.
``sparsity.density``) and seeds. ``laptop`` scale substitutes the embedded MNIST subset and small models so the
grid runs on a CPU in minutes; ``full`` is the paper's setting (CIFAR-100 / ImageNet ResNets, GPUs).
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from sparseopt.experiments.studies.batch import run_many
from sparseopt.experiments.run.checkpoint import atomic_write
from sparseopt.experiments.config.load import ConfigError, apply_overrides, from_dict, load_yaml, merge
from sparseopt.experiments.run.distributed import init_from_env
from sparseopt.experiments.errors import UserError
from sparseopt.experiments.run.preflight import check_output_folder
from sparseopt.experiments.report.runs import make_report
from sparseopt.experiments.config.schema import RunConfig


@dataclass
class ScaleSpec:
    base_from: str | None = None  # a shared base config in presets/_bases/<name>.yaml, under ``base``
    base: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    axes: dict[str, list[Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    workers: int | None = None
    target: float = 0.9
    args: dict[str, Any] = field(default_factory=dict)  # for diagnostic presets


@dataclass
class Preset:
    title: str
    paper: str
    kind: Literal["train", "grad-ratio", "coord-check", "sweep", "fidelity"] = "train"
    notes: str = ""
    laptop: ScaleSpec | None = None
    full: ScaleSpec | None = None


def preset_names() -> list[str]:
    folder = resources.files("sparseopt") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml") and not p.name.startswith("_"))


def _read_package_yaml(*parts: str) -> dict:
    with resources.as_file(resources.files("sparseopt").joinpath("presets", *parts)) as path:
        return load_yaml(path)


def load_preset(name: str) -> Preset:
    names = preset_names()
    if name not in names:
        import difflib
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"unknown preset {name!r}{hint}; `sparseopt reproduce --list` shows all {len(names)}")
    return from_dict(Preset, _read_package_yaml(f"{name}.yaml"))


def _label(key: str, value: Any) -> str:
    return f"{key.rsplit('.', 1)[-1]}={value}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+=-]+", "_", text).strip("_")


def expand(spec: ScaleSpec, overrides: list[str] = (), seeds: list[int] | None = None) -> list[RunConfig]:
    """Every (variant, axis values, seed) as a validated RunConfig; all errors surface before anything runs."""
    if not spec.variants:
        raise UserError("the preset has no variants to run")
    base = merge(_read_package_yaml("_bases", f"{spec.base_from}.yaml"), spec.base) if spec.base_from else spec.base
    keys = list(spec.axes)
    swept = {k: f"the preset sweeps it over {spec.axes[k]}" for k in keys}
    swept["train.seed"] = "seeds come from --seeds"
    clashes = [f"--set {item}: {swept[key]}; it would make every run of the grid the same there"
               for item in overrides if (key := item.partition("=")[0].strip()) in swept]
    if clashes:
        raise ConfigError(clashes)
    configs = []
    for variant, variant_overrides in spec.variants.items():
        for values in itertools.product(*(spec.axes[k] for k in keys)):
            name = " ".join([variant, *(_label(k, v) for k, v in zip(keys, values))])
            for seed in seeds if seeds is not None else spec.seeds:
                data = merge(base, variant_overrides)
                sets = [f"{k}={json.dumps(v)}" for k, v in zip(keys, values)]
                data = apply_overrides(data, [*sets, f"train.seed={seed}", *overrides])
                data["name"] = name
                configs.append(from_dict(RunConfig, data))
    return configs


def reproduce(name: str, out: str | Path, *, scale: str = "laptop", seeds: list[int] | None = None,
              workers: int | None = None, overrides: list[str] = (), dry_run: bool = False,
              quiet: bool = False, fresh: bool = False) -> dict:
    """Run the preset's grid into ``out/runs`` and report it; finished runs of the same config are kept and
    interrupted ones resumed unless ``fresh``.

    Under torchrun every rank trains each run (one at a time, with DDP) and rank 0 alone writes the report;
    the other ranks return an empty dict.
    """
    preset = load_preset(name)
    spec = getattr(preset, scale, None)
    if spec is None:
        raise UserError(f"preset {name!r} has no {scale!r} scale; it has: "
                        f"{[s for s in ('laptop', 'full') if getattr(preset, s) is not None]}")
    out = Path(out)
    ranks = init_from_env()
    if ranks.enabled and workers is not None and workers > 1:
        raise UserError(f"--workers {workers} under torchrun: the runs are already spread over the "
                        f"{ranks.world} processes (DDP), one run at a time; drop --workers")
    if preset.kind != "train":
        if not ranks.is_main:  # single-process diagnostics: rank 0 runs them
            return {}
        return _run_diagnostic(name, preset.kind, dict(spec.args), out, seeds, dry_run)
    configs = expand(spec, list(overrides), seeds)
    run_dirs = [str(out / "runs" / f"{_slug(c.name)}-seed{c.train.seed}") for c in configs]
    if dry_run:
        return {"preset": name, "runs": [{"name": c.name, "seed": c.train.seed, "dir": d}
                                         for c, d in zip(configs, run_dirs)]}
    check_output_folder(out)
    workers = 1 if ranks.enabled else workers or spec.workers
    counts = run_many(configs, run_dirs, workers=workers, quiet=quiet or not ranks.is_main, desc=name,
                      reuse=not fresh, overwrite=fresh)
    if not ranks.is_main:
        return {}
    report = make_report(run_dirs, out, target=spec.target)
    summary = {"preset": name, "title": preset.title, "paper": preset.paper, "scale": scale, "runs_state": counts,
               **report}
    with atomic_write(out / "results.json") as f:
        json.dump(summary, f, indent=2)
    return summary


def _run_diagnostic(name: str, kind: str, args: dict, out: Path, seeds: list[int] | None, dry_run: bool) -> dict:
    """Presets that are a diagnostic command rather than a grid of training runs."""
    from sparseopt.experiments.studies import diagnose
    from sparseopt.experiments.studies.fidelity import fidelity

    if seeds is not None:
        args["seeds"] = len(seeds)
    if dry_run:
        return {"preset": name, "runs": [], "args": args}
    run = {"grad-ratio": diagnose.grad_ratio, "coord-check": diagnose.coord_check, "sweep": diagnose.sweep,
           "fidelity": fidelity}[kind]
    result = run(out, **args)
    return {"preset": name, "table": result.get("table", json.dumps(result.get("optimum_shift", result.get(
        "spread")), indent=1)), **result}
