"""One training run: the loop, evaluation, logging, checkpoints, resume, and clean stops.

Output folder layout (all written atomically or append-only):
    config.yaml      the resolved configuration
    metrics.jsonl    one JSON object per logged step (metrics.csv too, and tensorboard/)
    checkpoints/     ckpt-<step>.pt (last K) and best.pt: everything needed for a bit-identical resume
    results.json     final and best metrics, sparsity report, wall time (keys documented in docs/cli.md)
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from sparseopt.experiments.build import Experiment, build_callbacks, build_experiment
from sparseopt.experiments.callbacks import Callback, StepContext
from sparseopt.experiments.checkpoint import CheckpointManager, atomic_write
from sparseopt.experiments.configio import dump_yaml, to_dict
from sparseopt.experiments.distributed import any_rank, barrier, init_from_env
from sparseopt.experiments.errors import UserError
from sparseopt.experiments.preflight import check_output_folder
from sparseopt.experiments.runlog import RunLogger, progress
from sparseopt.experiments.schema import RunConfig

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "results.json")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def check_out_dir(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to mix two runs in one folder unless told how (``--overwrite`` or ``--resume``)."""
    existing = [m for m in RUN_MARKERS if (out / m).exists()]
    if resume and not (out / "checkpoints").is_dir():
        raise UserError(f"cannot resume: {out} holds no checkpoints/ folder; start the run without --resume")
    if existing and not (overwrite or resume):
        raise UserError(f"{out} already holds a run ({', '.join(existing)}); pass --overwrite to replace it "
                        "or --resume to continue it")


def clear_out_dir(out: Path) -> None:
    """Remove a previous run's files (for ``--overwrite``), leaving anything else in the folder alone."""
    for name in (*RUN_MARKERS, "metrics.csv", "tensorboard", "sparsity.txt", "hessian.json"):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


@contextmanager
def stop_on_interrupt():
    """First Ctrl-C asks the loop to stop after the current step (it then checkpoints); a second one aborts."""
    flag = {"stop": False}

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no signal handling, run normally
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class Interrupted(Exception):
    """Raised after a Ctrl-C once the checkpoint is on disk."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__(f"interrupted; checkpoint written to {checkpoint}; continue with --resume")
        self.checkpoint = checkpoint


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device) -> dict[str, float]:
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        count += len(y)
    model.train(was_training)
    return {"loss": loss_sum / count, "accuracy": correct / count}


def gradient_norm(model: nn.Module) -> float:
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


class _NoLogger:
    """What ranks other than 0 log to under DDP: nothing."""

    def log(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


class Runner:
    """Trains one RunConfig into ``out``; ``run()`` returns the results dict it also writes as results.json.

    Under ``torchrun`` every rank runs this; rank 0 alone writes (see :mod:`sparseopt.experiments.distributed`).
    """

    def __init__(self, cfg: RunConfig, out: str | Path, *, overwrite: bool = False, resume: bool = False,
                 quiet: bool = False, callbacks: list[Callback] = ()) -> None:
        self.cfg, self.out, self.quiet, self.resume = cfg, Path(out), quiet, resume
        self.callbacks = list(callbacks) if callbacks else build_callbacks(cfg)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self.dist = init_from_env()
        check_output_folder(self.out)                     # the cheap checks first: nothing built yet
        check_out_dir(self.out, overwrite=overwrite, resume=resume)
        self.exp: Experiment = build_experiment(cfg)      # all validation happens before the folder is touched
        self.net = self.exp.model
        if self.dist.enabled:
            self.exp.data.train.shard(self.dist.rank, self.dist.world)
            ids = [torch.cuda.current_device()] if self.exp.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.exp.model, device_ids=ids)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if not resume:
                clear_out_dir(self.out)
        barrier(self.dist)
        self.ckpt = CheckpointManager(self.out / "checkpoints", keep_last=cfg.train.keep_last, metric_mode="max")
        self.step, self.elapsed, self.best = 0, 0.0, {"accuracy": -1.0, "step": 0}
        self.last_eval: tuple[int, dict[str, float]] | None = None
        if resume:
            self._restore()
        elif self.dist.is_main:
            dump_yaml(cfg, self.out / "config.yaml")

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def _state(self) -> dict:
        e = self.exp
        return {"model": e.model.state_dict(), "optimizer": e.optimizer.state_dict(),
                "scheduler": e.scheduler.state_dict(), "sparse": e.sparse.state_dict() if e.sparse else None,
                "loader": e.data.train.state_dict(), "rng": torch.get_rng_state(),
                "step": self.step, "elapsed": self.elapsed, "best": dict(self.best),
                "callbacks": {c.name: c.state_dict() for c in self.callbacks}}

    def _save(self, metric: float | None = None) -> Path:
        path = self.ckpt.directory / f"ckpt-{self.step:08d}.pt"
        if self.dist.is_main:
            path = self.ckpt.save(self._state(), self.step, metric)
        barrier(self.dist)
        return path

    def _restore(self) -> None:
        state = self.ckpt.load_latest(map_location=self.exp.device)
        if state is None:
            raise UserError(f"cannot resume: {self.out / 'checkpoints'} holds no checkpoint")
        e = self.exp
        try:
            e.model.load_state_dict(state["model"])
            e.optimizer.load_state_dict(state["optimizer"])
            e.scheduler.load_state_dict(state["scheduler"])
            if (state["sparse"] is None) != (e.sparse is None):
                raise ValueError("the checkpoint and the config disagree on whether the model is sparse")
            if e.sparse is not None:
                e.sparse.load_state_dict(state["sparse"])
            e.data.train.load_state_dict(state["loader"])
        except (KeyError, ValueError, RuntimeError) as err:
            raise UserError(f"the checkpoint in {self.out / 'checkpoints'} does not fit this config ({err}); "
                            "resume with the config.yaml saved in the run folder") from err
        for c in self.callbacks:
            c.load_state_dict(state.get("callbacks", {}).get(c.name, {}))
        torch.set_rng_state(state["rng"].cpu())
        self.step, self.elapsed, self.best = int(state["step"]), float(state["elapsed"]), dict(state["best"])

    # ---- the loop ---------------------------------------------------------------------------------------------
    def _eval_due(self) -> bool:
        every = self.cfg.train.eval_every or len(self.exp.data.train)
        return self.step % every == 0 or self.step == self.exp.total_steps

    def _train_metrics(self, loss_sum: float, correct: int, count: int, grad_norm: float) -> dict[str, float]:
        e = self.exp
        metrics = {"loss": loss_sum / count, "accuracy": correct / count, "lr": e.optimizer.param_groups[0]["lr"],
                   "grad_norm": grad_norm, "epoch": self.step / len(e.data.train), "wall_time": self.elapsed}
        if e.sparse is not None:
            metrics["itop"] = e.sparse.itop()
            metrics["density"] = e.sparse.density()
        return metrics

    def _evaluate(self, logger: RunLogger) -> float | None:
        e = self.exp
        if not self.dist.is_main:
            self._save()  # joins rank 0's barrier
            return None
        metrics = evaluate(e.model, e.data.test, e.device)
        if e.sparse is not None:
            metrics.update({f"density/{r.name}": r.density for r in e.sparse.report().layers})
        logger.log(self.step, metrics, split="test")
        self.last_eval = (self.step, metrics)
        if metrics["accuracy"] > self.best["accuracy"]:
            self.best = {"accuracy": metrics["accuracy"], "step": self.step}
        self._save(metrics["accuracy"])
        return metrics["accuracy"]

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, log_now: bool) -> tuple[float, int, float]:
        """One optimizer step; returns (loss, correct predictions, gradient norm if ``log_now`` else 0)."""
        e = self.exp
        x, y = x.to(e.device, non_blocking=True), y.to(e.device, non_blocking=True)
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, y, label_smoothing=self.cfg.optim.label_smoothing)
        value = loss.item()
        if any_rank(self.dist, not math.isfinite(value))[0]:
            raise TrainingDiverged(
                f"loss became {value} at step {self.step}; the last good checkpoint "
                f"({self.ckpt.latest() or 'none yet'}) is intact. Lower optim.lr, add warmup "
                "(optim.warmup_epochs) or check the data")
        e.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = gradient_norm(e.model) if log_now else 0.0
        e.optimizer.step()
        e.scheduler.step()
        return value, int((logits.argmax(1) == y).sum()), grad_norm

    def _run_callbacks(self, logger: RunLogger) -> None:
        if not self.dist.is_main:
            return
        due = [c for c in self.callbacks if c.every > 0 and self.step % c.every == 0]
        if not due:
            return
        e = self.exp
        loader = e.data.train
        ctx = StepContext(self.step, e.model, e.optimizer, e.sparse, getattr(loader, "x", None),
                          getattr(loader, "y", None), e.device, getattr(loader, "normalize", None))
        for c in due:
            metrics = c(ctx)
            if metrics:
                logger.log(self.step, metrics, split=c.name)

    def run(self) -> dict:
        e, cfg = self.exp, self.cfg
        logger = RunLogger(self.out, formats=cfg.logging.formats, tensorboard=cfg.logging.tensorboard,
                           resume_step=self.step if self.resume else None) if self.dist.is_main else _NoLogger()
        e.model.train()
        window = [0.0, 0, 0]  # loss sum, correct, count since the last log
        test_acc = None
        try:
            with stop_on_interrupt() as interrupt, progress(total=e.total_steps, desc=cfg.name,
                                                             quiet=self.quiet) as bar:
                bar.update(self.step)
                while self.step < e.total_steps:
                    for x, y in e.data.train:
                        tic = time.perf_counter()
                        log_now = (self.step + 1) % cfg.train.log_every == 0
                        loss, correct, grad_norm = self._train_step(x, y, log_now)
                        self.step += 1
                        window[0] += loss * len(y)
                        window[1] += correct
                        window[2] += len(y)
                        self.elapsed += time.perf_counter() - tic
                        if log_now:
                            logger.log(self.step, self._train_metrics(*window, grad_norm), split="train")
                            bar.set_postfix(loss=f"{window[0] / window[2]:.3f}",
                                            acc=f"{test_acc:.3f}" if test_acc is not None else "-")
                            window = [0.0, 0, 0]
                        self._run_callbacks(logger)
                        if self._eval_due():
                            test_acc = self._evaluate(logger)
                        bar.update(1)
                        if any_rank(self.dist, interrupt["stop"])[0]:
                            raise Interrupted(self._save())
                        if self.step >= e.total_steps:
                            break
        finally:
            logger.close()
        return self._finish()

    def _finish(self) -> dict:
        e = self.exp
        if not self.dist.is_main:
            return {}
        if self.last_eval is not None and self.last_eval[0] == self.step:
            final = self.last_eval[1]
        else:
            final = evaluate(e.model, e.data.test, e.device)
        report = e.sparse.report() if e.sparse is not None else None
        results = {
            "name": self.cfg.name, "seed": self.cfg.train.seed, "steps": self.step, "wall_time": self.elapsed,
            "final": {"test_accuracy": final["accuracy"], "test_loss": final["loss"]},
            "best": {"test_accuracy": self.best["accuracy"], "step": self.best["step"]},
            "sparsity": report.to_dict() if report is not None else None,
            "config": to_dict(self.cfg),
        }
        with atomic_write(self.out / "results.json") as f:
            json.dump(results, f, indent=2)
        if report is not None:
            with atomic_write(self.out / "sparsity.txt") as f:
                f.write(str(report) + "\n")
        return results


def train(cfg: RunConfig, out: str | Path, *, overwrite: bool = False, resume: bool = False,
          quiet: bool = False, callbacks: list[Callback] = ()) -> dict:
    """Train ``cfg`` into ``out`` and return its results (see :class:`Runner`)."""
    return Runner(cfg, out, overwrite=overwrite, resume=resume, quiet=quiet, callbacks=callbacks).run()
