"""The ``sparseopt`` command: parses, validates, prints. The work lives in sparseopt.experiments."""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

from sparseopt.data.errors import DataError
from sparseopt.experiments.config.load import ConfigError, apply_overrides, from_dict, load_yaml
from sparseopt.experiments.errors import UserError
from sparseopt.experiments.config.schema import RunConfig

EXIT_BUG, EXIT_USER_ERROR, EXIT_INTERRUPTED = 1, 2, 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseopt", description="Sparse training that converges like dense.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="dense vs RigL vs RigL+SparseOpt at 95%% sparsity on embedded MNIST")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--seeds", type=_at_least(1), default=5)
    demo.add_argument("--epochs", type=_finite, default=20.0)
    demo.add_argument("--workers", type=_at_least(1), default=None, help="parallel runs (default: up to 2)")
    demo.add_argument("--overwrite", action="store_true")
    demo.add_argument("--quiet", action="store_true")

    train = sub.add_parser("train", help="train one configuration")
    train.add_argument("config", nargs="?", help="YAML config (optional with --resume: the run's own is used)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set optim.lr=0.05 (repeatable)")
    train.add_argument("--out", help="output folder (default: runs/<name>)")
    train.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in the output folder")
    train.add_argument("--deterministic", action="store_true", help="same as --set train.deterministic=true")
    train.add_argument("--quiet", action="store_true")

    report = sub.add_parser("report", help="table and plots comparing finished runs")
    report.add_argument("runs", nargs="+", help="run folders, or `sparseopt sweep` folders")
    report.add_argument("--out", default=None, help="where to write report.md and plots (default: first run's "
                        "parent; for a sweep folder, the folder itself)")
    report.add_argument("--target", type=_finite, default=0.9, help="accuracy for the steps-to-target column")
    show = sub.add_parser("config", help="print a config with every key at its default (a template to edit)")
    show.add_argument("preset_or_file", nargs="?", help="optional YAML config to resolve against the defaults")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    repro = sub.add_parser("reproduce", help="run a paper table/figure preset (laptop or full scale)")
    repro.add_argument("preset", nargs="?", help="preset name (see --list)")
    repro.add_argument("--list", action="store_true", help="list the presets and what they reproduce")
    repro.add_argument("--scale", choices=["laptop", "full"], default="laptop")
    repro.add_argument("--out", default=None, help="default: runs/<preset>-<scale>")
    repro.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=None,
                       help="comma-separated seeds (default: the preset's)")
    repro.add_argument("--workers", type=_at_least(1), default=None, help="parallel runs (1 = in this process, for GPUs)")
    repro.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key in every run, e.g. --set data.root=/data")
    repro.add_argument("--dry-run", action="store_true", help="list the runs without training")
    repro.add_argument("--fresh", action="store_true",
                       help="retrain every run (default: keep finished runs, resume interrupted ones)")
    repro.add_argument("--quiet", action="store_true")

    diagnose = sub.add_parser("diagnose", help="diagnostics that test the theory").add_subparsers(
        dest="diagnostic", required=True)
    ratio = diagnose.add_parser("grad-ratio", help="BatchNorm gradient ratio vs 1/sqrt(1-s) on embedded MNIST")
    ratio.add_argument("--out", default="runs/grad-ratio")
    ratio.add_argument("--seeds", type=_at_least(1), default=10)
    ratio.add_argument("--sparsities", type=_floats, default=[0.0, 0.5, 0.8, 0.9, 0.95, 0.98])
    ratio.add_argument("--norms", type=lambda s: s.split(","), default=["batch", "none", "layer"])
    ratio.add_argument("--batches", type=_at_least(1), default=100)
    coord = diagnose.add_parser("coord-check", help="SP/muP/SuPar activation scales over width and density (GPT)")
    coord.add_argument("--out", default="runs/coord-check")
    coord.add_argument("--kinds", type=lambda s: s.split(","), default=["sp", "mup", "supar"])
    coord.add_argument("--widths", type=_ints, default=[32, 64, 128, 256])
    coord.add_argument("--densities", type=_floats, default=[1.0, 0.5, 0.25, 0.125, 0.0625])
    coord.add_argument("--steps", type=_at_least(1), default=5)
    coord.add_argument("--seeds", type=_at_least(1), default=2)
    hess = diagnose.add_parser("hessian", help="top Hessian eigenvalues of a run vs the 2/lr stability bound")
    hess.add_argument("run", help="run folder (its latest checkpoint is analysed)")
    hess.add_argument("--out", default=None, help="default: the run folder")
    hess.add_argument("--k", type=_at_least(1), default=4)
    hess.add_argument("--samples", type=_at_least(1), default=1000, help="first N training examples (Cohen et al.: 5000)")
    hess.add_argument("--trace-samples", type=_at_least(0), default=0, help="Hutchinson probes for the trace (0 = off)")
    sweep = sub.add_parser("sweep", help="learning-rate x density transfer sweep for SP and SuPar (GPT on text)")
    sweep.add_argument("--out", default="runs/sweep")
    sweep.add_argument("--kinds", type=lambda s: s.split(","), default=["sp", "supar"])
    sweep.add_argument("--lrs", type=_floats, default=[2.0 ** k for k in range(-10, -3)])
    sweep.add_argument("--densities", type=_floats, default=[1.0, 0.25, 0.0625])
    sweep.add_argument("--widths", type=_ints, default=None, help="default: the base width only")
    sweep.add_argument("--base-width", type=_at_least(1), default=64)
    sweep.add_argument("--steps", type=_at_least(1), default=100)
    sweep.add_argument("--seeds", type=_at_least(1), default=1)
    sweep.add_argument("--workers", type=_at_least(1), default=2)
    sweep.add_argument("--quiet", action="store_true", help="no line per finished training run")
    sweep.add_argument("--init-stds", type=_floats, default=None,
                       help="comma-separated base init stds σ to sweep too (default: the paper's σ per kind)")
    return parser


def _at_least(least: int):
    """argparse type: an integer >= ``least`` (seeds, steps, workers: 0 or less would silently do nothing)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {value}")
        return value

    return parse


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _load_config(path: str | None, overrides: list[str], resume: str | None) -> RunConfig:
    if path is None and resume is None:
        raise UserError("give a config file (sparseopt train CONFIG.yaml) or --resume RUN_DIR")
    source = Path(resume) / "config.yaml" if path is None else Path(path)
    if path is None and not source.is_file():
        raise UserError(f"cannot resume: {source} is missing; is {resume} a run folder?")
    return from_dict(RunConfig, apply_overrides(load_yaml(source), overrides))


def _cmd_train(args) -> int:
    from sparseopt.experiments.run.runner import train

    if args.resume is not None and args.overwrite:
        raise UserError(f"--resume {args.resume} continues a run and --overwrite replaces it: choose one")
    if args.resume is not None and args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
        raise UserError(f"--resume {args.resume} continues the run in its own folder, not in --out {args.out}; "
                        "drop --out (or copy the run folder first)")
    overrides = args.overrides + (["train.deterministic=true"] if args.deterministic else [])
    cfg = _load_config(args.config, overrides, args.resume)
    out = args.resume or args.out or str(Path("runs") / cfg.name)
    from sparseopt.experiments.run.preflight import ConfigWarning, ignored_settings

    for line in ignored_settings(cfg):
        warnings.warn(line, ConfigWarning, stacklevel=1)
    results = train(cfg, out, overwrite=args.overwrite, resume=args.resume is not None, quiet=args.quiet)
    if not results:  # a torchrun rank other than 0: rank 0 reports
        return 0
    if results.get("already_finished"):
        print(f"{out} is already finished ({results['steps']} steps, final test accuracy "
              f"{results['final']['test_accuracy']:.4f}); nothing was trained or written"
              + (f" (not applied: {results['unapplied_changes']})" if results["unapplied_changes"] else "")
              + f". To train longer: --resume {out} --set train.epochs=N (now {cfg.train.epochs:g})", file=sys.stderr)
        return 0
    print(f"{cfg.name}: final test accuracy {results['final']['test_accuracy']:.4f}, best "
          f"{results['best']['test_accuracy']:.4f} at step {results['best']['step']} ({results['steps']} steps, "
          f"{results['wall_time']:.1f} s); results in {out}")
    return 0


def _cmd_report(args) -> int:
    from sparseopt.experiments.report.runs import make_report
    from sparseopt.experiments.report.sweep import is_sweep_dir

    default = Path(args.runs[0]) if is_sweep_dir(args.runs[0]) else Path(args.runs[0]).resolve().parent
    out = args.out or str(default)
    summary = make_report(args.runs, out, target=args.target)
    print(summary["table"])
    print(f"\nwritten: {Path(out) / 'report.md'}, {', '.join(summary['plots'])}")
    return 0


def _cmd_demo(args) -> int:
    from sparseopt.experiments.studies.demo import run_demo

    summary = run_demo(args.out, seeds=args.seeds, epochs=args.epochs, workers=args.workers,
                       overwrite=args.overwrite, quiet=args.quiet)
    d = summary["sparseopt_minus_rigl"]
    print(f"\nMNIST subset (4,000 train / 1,000 test), BatchNorm MLP 784-300-100-10, density {summary['density']}, "
          f"{summary['epochs']:g} epochs, {summary['seeds']} seeds:\n")
    print(summary["table"])
    print(f"\nRigL+SparseOpt minus RigL, final test accuracy, paired over {d['pairs']} seeds: "
          f"{100 * d['mean']:+.2f} ± {100 * d['sd']:.2f} points (sd)")
    print(f"written: {args.out}/results.json, report.md, train_loss.png, test_accuracy.png, runs/")
    return 0


def _cmd_sweep(args) -> int:
    from sparseopt.experiments.studies import diagnose

    result = diagnose.sweep(args.out, kinds=args.kinds, lrs=args.lrs, densities=args.densities, widths=args.widths,
                            base_width=args.base_width, steps=args.steps, seeds=args.seeds, workers=args.workers,
                            init_stds=args.init_stds, quiet=args.quiet)

    def lr(value):
        return "diverged" if value is None else f"{value:.2g}"

    for kind, shift in result["optimum_shift"].items():
        for s in shift.get("shifts") or [{"init_std": None, "shift_log2": max(shift["shift_log2"].values(),
                                                                               default=float("nan"))}]:
            optima = [o for o in shift["optima"] if o.get("init_std") == s["init_std"]]
            sigma = "" if s["init_std"] is None else f" (σ={s['init_std']:g})"
            print(f"{kind:>6}{sigma}: best learning rate per density "
                  + ", ".join(f"{o['density']:g}: {lr(o['lr_grid'])}" for o in optima)
                  + f"; shift across densities {s['shift_log2']:.2f} octaves")
    for kind, best in result.get("init_std_optimum", {}).items():
        print(f"{kind:>6}: best init std per density "
              + ", ".join(f"{o['density']:g}: {lr(o['init_std'])}" for o in best["optima"])
              + f"; shift across densities {max(best['shift_log2'].values(), default=float('nan')):.2f} octaves")
    plots = "lr_sweep.png" + (", init_std_sweep.png" if "init_std_optimum" in result else "")
    print(f"written: {args.out}/results.json, {plots} (`sparseopt report {args.out}` adds report.md)")
    return 0


def _cmd_config(args) -> int:
    import yaml

    from sparseopt.experiments.config.load import to_dict

    data = load_yaml(args.preset_or_file) if args.preset_or_file else {}
    cfg = from_dict(RunConfig, apply_overrides(data, args.overrides))
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _cmd_reproduce(args) -> int:
    from sparseopt.experiments.studies import presets

    if args.list or not args.preset:
        for name in presets.preset_names():
            p = presets.load_preset(name)
            scales = ", ".join(s for s in ("laptop", "full") if getattr(p, s) is not None)
            print(f"{name:<28} paper {p.paper}\n{'':<28} {p.title} [{scales}]")
        return 0
    out = args.out or str(Path("runs") / f"{args.preset}-{args.scale}")
    summary = presets.reproduce(args.preset, out, scale=args.scale, seeds=args.seeds, workers=args.workers,
                                overrides=args.overrides, dry_run=args.dry_run, quiet=args.quiet, fresh=args.fresh)
    if not summary:  # a torchrun rank other than 0: rank 0 reports
        return 0
    if args.dry_run:
        runs = summary["runs"]
        for r in runs:
            print(f"{r['name']} (seed {r['seed']}) -> {r['dir']}")
        print(f"{len(runs)} runs" if runs else f"diagnostic with {summary['args']}")
        return 0
    print(summary["table"])
    if "runs_state" in summary:
        c = summary["runs_state"]
        print(f"\nruns: {c['new']} trained, {c['partial']} resumed, {c['done']} already finished (kept)")
    print(f"written: {out}/results.json, report.md and plots")
    return 0


def _cmd_diagnose(args) -> int:
    from sparseopt.experiments.studies import diagnose

    if args.diagnostic == "coord-check":
        result = diagnose.coord_check(args.out, kinds=args.kinds, widths=args.widths, densities=args.densities,
                                      steps=args.steps, seeds=args.seeds)
        for axis in ("width", "density"):
            for kind, ratios in result["spread"][axis].items():
                print(f"{kind:>6} across {axis:<7}: max/min activation scale {min(ratios.values()):.2f}"
                      f"-{max(ratios.values()):.2f} (1 = flat)")
        print(f"written: {args.out}/results.json, {args.out}/coord_check.png")
        return 0
    if args.diagnostic == "grad-ratio":
        result = diagnose.grad_ratio(args.out, seeds=args.seeds, sparsities=args.sparsities, norms=args.norms,
                                     batches=args.batches)
        print(result["table"])
        print(f"\nwritten: {args.out}/results.json, {args.out}/grad_ratio.png")
        return 0
    result = diagnose.hessian(args.run, args.out, k=args.k, samples=args.samples, trace_samples=args.trace_samples)
    for name in ("unrestricted", "restricted", "preconditioned"):
        if name in result:
            r = result[name]
            print(f"{name:>15}: top eigenvalues {[round(v, 4) for v in r['eigenvalues']]} "
                  f"({r['status']}, {r['matvecs']} Hessian-vector products)")
    threshold = result.get("threshold")
    print(f"stability threshold at step {result['step']} (lr {result['lr']:.4g}): "
          + (f"{threshold:.4f}" if threshold is not None else "none (the learning rate is 0)"))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 bad input (one ``error:`` line per problem), 130 after Ctrl-C, 143 after SIGTERM,
    1 a bug."""
    args = _parser().parse_args(argv)
    commands = {"train": _cmd_train, "report": _cmd_report, "demo": _cmd_demo, "diagnose": _cmd_diagnose,
                "reproduce": _cmd_reproduce, "config": _cmd_config, "sweep": _cmd_sweep}
    try:
        with warnings.catch_warnings():  # restores the warning printer after an in-process call
            warnings.showwarning = _print_warning
            return commands[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UserError, ConfigError, DataError, ValueError) as err:  # ValueError: the core library's input checks
        if args.debug:
            raise
        _print_error(err.errors if isinstance(err, ConfigError) else str(err).splitlines())
        return EXIT_USER_ERROR
    except OSError as err:  # a folder that cannot be written, a full disk: the user's to fix, not a bug
        if args.debug:
            raise
        where = f" ({err.filename})" if err.filename else ""
        _print_error([f"{err.strerror or err}{where}"])
        return EXIT_USER_ERROR
    except Exception as err:
        from sparseopt.experiments.run.runner import Interrupted

        if isinstance(err, Interrupted):
            print(str(err), file=sys.stderr)
            return err.exit_code  # 130 after Ctrl-C, 143 after SIGTERM
        if args.debug:
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        _print_error([f"unexpected {type(err).__name__}: {first} (a bug in sparseopt or in a user model factory; "
                      "rerun with --debug for the traceback)"])
        return EXIT_BUG


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Config warnings as one ``warning:`` line; other warnings keep where they came from."""
    from sparseopt.experiments.run.preflight import ConfigWarning

    text = str(message) if issubclass(category, ConfigWarning) else \
        f"{message} ({category.__name__}, {Path(filename).name}:{lineno})"
    print(f"warning: {text}", file=sys.stderr if file is None else file)


def _print_error(lines: list[str]) -> None:
    for line in lines or ["unknown error"]:
        print(f"error: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
