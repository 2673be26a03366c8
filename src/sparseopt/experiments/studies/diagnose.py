"""`sparseopt diagnose ...`: run the diagnostics of sparseopt.diagnostics and write results.json + plots."""

from __future__ import annotations

import json
from pathlib import Path

from sparseopt.experiments.run.checkpoint import atomic_write
from sparseopt.experiments.errors import UserError


def _write_json(path: Path, payload: dict) -> None:
    with atomic_write(path) as f:
        json.dump(payload, f, indent=2)


def _check_out(out: str | Path) -> None:
    """Fail before minutes of compute if the results could not be written."""
    from sparseopt.experiments.run.preflight import check_output_folder

    check_output_folder(Path(out))


def grad_ratio(out: str | Path, *, seeds: int = 10, sparsities: list[float], norms: list[str],
               batches: int = 100) -> dict:
    """Paper 001 Fig. 2 on the embedded MNIST subset: measured gradient ratio vs 1/sqrt(1 - s)."""
    from sparseopt.data import load_mnist_subset
    from sparseopt.diagnostics import format_table, gradient_ratio_experiment, plot_gradient_ratio

    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    bad = [s for s in sparsities if not 0 <= s < 1]
    if bad:
        raise UserError(f"sparsities must be in [0, 1), got {bad}")
    _check_out(out)
    x, y, _, _ = load_mnist_subset()
    result = gradient_ratio_experiment(x, y, sparsities, norms=tuple(norms), seeds=range(seeds), batches=batches)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_gradient_ratio(result, out / "grad_ratio.png")
    _write_json(out / "results.json", result)
    return {"table": format_table(result), **result}


def hessian(run_dir: str | Path, out: str | Path | None = None, *, k: int = 4, samples: int = 1000,
            physical_batch: int = 1000, trace_samples: int = 0) -> dict:
    """Top-k Hessian eigenvalues of a run's latest checkpoint against its edge-of-stability threshold."""
    import torch

    from sparseopt.diagnostics import sharpness_report
    from sparseopt.experiments.run.build import build_experiment
    from sparseopt.experiments.run.checkpoint import find_checkpoints, load_checkpoint
    from sparseopt.experiments.config.load import from_dict, load_yaml
    from sparseopt.experiments.run.preflight import check_output_folder
    from sparseopt.experiments.run.runner import restore_model_state
    from sparseopt.experiments.config.schema import RunConfig

    for name, value, least in (("--k", k, 1), ("--samples", samples, 1), ("--trace-samples", trace_samples, 0)):
        if value < least:
            raise UserError(f"{name} must be at least {least}, got {value}")
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.yaml)")
    checkpoints = find_checkpoints(run_dir / "checkpoints")  # reads only: never creates checkpoints/
    if not checkpoints:
        raise UserError(f"{run_dir} has no checkpoint to analyse (no {run_dir / 'checkpoints'}/ckpt-*.pt); "
                        "train it first")
    out = Path(out) if out is not None else run_dir
    check_output_folder(out)
    cfg = from_dict(RunConfig, load_yaml(run_dir / "config.yaml"))
    cfg.sparsity.execution = "masked"  # Hessian-vector products need the dense weights; checkpoints are the same
    exp = build_experiment(cfg)
    state = load_checkpoint(checkpoints[-1], map_location=exp.device)
    restore_model_state(exp, state, checkpoints[-1], run_dir / "config.yaml")
    loader = exp.data.train
    if not hasattr(loader, "x"):
        raise UserError("diagnose hessian needs an in-memory dataset (mnist, cifar, synthetic)")
    x, y = loader.x[:samples], loader.y[:samples]
    if loader.normalize is not None:
        x = loader.normalize(x)
    group = exp.optimizer.param_groups[0]
    result = sharpness_report(
        exp.model, x.to(exp.device), y.to(exp.device),
        masks=exp.sparse.masks if exp.sparse else None, factors=exp.sparse.factors() if exp.sparse else None,
        k=k, lr=group["lr"] if group["lr"] > 0 else None, momentum=group.get("momentum", 0.0), nesterov=group.get("nesterov", False),
        physical_batch=physical_batch, trace_samples=trace_samples)
    result.update({"run": str(run_dir), "step": int(state["step"]), "samples": int(len(x)), "lr": group["lr"],
                   "torch": torch.__version__})
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "hessian.json", result)
    return result


def coord_check(out: str | Path, *, kinds: list[str], widths: list[int], densities: list[float], steps: int = 5,
                seeds: int = 2) -> dict:
    """Paper 004 Fig. 5: activation scales over width and density for SP, muP and SuPar on the byte-level GPT."""
    from sparseopt.experiments.studies.coord_check import coord_check as run, plot_coord_check, spread

    _check_out(out)
    result = run(kinds, widths, densities, steps=steps, seeds=range(seeds))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_coord_check(result, out / "coord_check.png")
    result["spread"] = {axis: {k: spread(result, axis, k) for k in kinds} for axis in ("width", "density")}
    _write_json(out / "results.json", result)
    return result


def _sweep_one(kind: str, kwargs: dict) -> dict:
    import torch

    from sparseopt.experiments.studies.transfer import lr_sweep

    torch.set_num_threads(1)
    return lr_sweep(kind, **kwargs)


def sweep(out: str | Path, *, kinds: list[str], lrs: list[float], densities: list[float], widths: list[int] | None,
          base_width: int = 64, steps: int = 100, seeds: int = 1, workers: int = 2,
          init_stds: list[float] | None = None, quiet: bool = False) -> dict:
    """Paper 004 Fig. 1/6: train loss against learning rate, one line per density, per parameterization; the
    optimum's shift across densities (in log2 of the learning rate) is the transfer measure. With ``init_stds``
    the base init std σ is swept too (each value replaces the kind's σ): the LR optimum is found per σ, the best
    σ per density goes into ``init_std_optimum`` and ``init_std_sweep.png`` plots loss against σ."""
    import math
    from concurrent.futures import ProcessPoolExecutor

    from sparseopt.parameterization import KINDS

    bad_kinds = [k for k in kinds if k.lower() not in KINDS]
    if not kinds or bad_kinds:
        raise UserError(f"--kinds must be among {', '.join(KINDS)}, got {kinds}")
    if steps < 1 or seeds < 1:
        raise UserError(f"--steps and --seeds must be at least 1, got steps={steps}, seeds={seeds}")
    if not lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
        raise UserError(f"--lrs must be positive learning rates, got {lrs}")
    if not densities or any(not 0 < d <= 1 for d in densities):
        raise UserError(f"--densities must be in (0, 1], got {densities}")
    if init_stds is not None and (not init_stds or any(not (s > 0 and math.isfinite(s)) for s in init_stds)):
        raise UserError(f"--init-stds must be positive init standard deviations, got {init_stds}")
    _check_out(out)
    kwargs = dict(lrs=lrs, densities=densities, widths=widths, base_width=base_width, steps=steps,
                  seeds=tuple(range(seeds)), last=min(20, steps), init_stds=init_stds,
                  verbose=not quiet)  # one line per finished training run: a sweep takes minutes
    with ProcessPoolExecutor(max_workers=max(1, min(workers, len(kinds)))) as pool:
        results = list(pool.map(_sweep_one, kinds, [kwargs] * len(kinds)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = sweep_summary(results)
    sweep_plots(results, out)
    _write_json(out / "results.json", payload)
    return payload


def _json_keys(value):
    """Width-keyed dicts -> string keys (JSON), recursively through dicts and lists."""
    if isinstance(value, dict):
        return {str(k): _json_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_keys(v) for v in value]
    return value


def sweep_summary(results: list[dict]) -> dict:
    """``{"results", "optimum_shift": {kind: ...}}`` plus ``"init_std_optimum": {kind: ...}`` when σ was swept."""
    from sparseopt.experiments.studies.transfer import init_std_optimum, optimum_shift

    payload = {"results": results,
               "optimum_shift": {r["kind"]: _json_keys(optimum_shift(r)) for r in results}}
    sigma = {r["kind"]: init_std_optimum(r) for r in results}
    if any(v is not None for v in sigma.values()):
        payload["init_std_optimum"] = {k: _json_keys(v) for k, v in sigma.items() if v is not None}
    return payload


def sweep_plots(results: list[dict], out: Path) -> list[Path]:
    """``lr_sweep.png`` (Fig. 1/6) and, when σ was swept, ``init_std_sweep.png``."""
    from sparseopt.experiments.studies.transfer import plot_init_std_sweep, plot_lr_sweep, swept_init_stds

    plots = [plot_lr_sweep(results, out / "lr_sweep.png")]
    if any(swept_init_stds(r) for r in results):
        plots.append(plot_init_std_sweep(results, out / "init_std_sweep.png"))
    return plots
