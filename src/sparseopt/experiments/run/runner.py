"""One training run: the loop, evaluation, logging, checkpoints, resume, and clean stops.

Output folder layout (all written atomically or append-only):
    config.yaml      the resolved configuration
    metrics.jsonl    one JSON object per logged step (metrics.csv too, and tensorboard/)
    checkpoints/     ckpt-<step>.pt (last K) and best.pt: everything needed for a bit-identical resume
    results.json     final and best metrics, sparsity report, wall time (keys documented in docs/cli.md)

The per-step path never waits for the device: metrics accumulate on it and are read at logging steps, where the
divergence check and (under torchrun) the agreement to stop also happen (docs/scale.md).
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from sparseopt.experiments.run.build import Experiment, build_callbacks, build_experiment
from sparseopt.experiments.run.callbacks import Callback, StepContext
from sparseopt.experiments.run.checkpoint import CheckpointManager, atomic_write
from sparseopt.experiments.config.load import dump_yaml, to_dict
from sparseopt.experiments.run.distributed import (barrier, broadcast_buffers, init_from_env, max_over_ranks,
                                                   world_size_from_env)
from sparseopt.experiments.errors import UserError
from sparseopt.experiments.run.evaluation import evaluate
from sparseopt.experiments.run.precision import MixedPrecision
from sparseopt.experiments.run.preflight import ConfigWarning, check_execution, check_output_folder
from sparseopt.experiments.run.resume import describe, plan_resume
from sparseopt.experiments.run.runlog import RunLogger, progress
from sparseopt.experiments.config.schema import RunConfig
from sparseopt.experiments.run.stopping import Interrupted, StopRequest, stop_on_signals

__all__ = ["Interrupted", "Runner", "TrainingDiverged", "evaluate", "train"]

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "results.json")


def checkpoint_mismatch(checkpoint: Path | None, config: Path, err: Exception) -> UserError:
    """One line for a checkpoint whose tensors do not fit the model its folder's config builds."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    detail = " ".join(lines[:2]) if lines else type(err).__name__
    if len(detail) > 300:
        detail = detail[:297] + "..."
    return UserError(f"checkpoint {checkpoint} does not fit the model and optimizer that {config} builds "
                     f"({detail}); was config.yaml edited? restore it (results.json keeps a copy for finished runs)")


def restore_model_state(exp: Experiment, state: dict, checkpoint: Path | None, config: Path) -> None:
    """Load a checkpoint's model, optimizer and sparse state into ``exp``; a misfit is one line naming both files."""
    try:
        exp.model.load_state_dict(state["model"])
        exp.optimizer.load_state_dict(state["optimizer"])
        if (state["sparse"] is None) != (exp.sparse is None):
            raise ValueError("the checkpoint and the config disagree on whether the model is sparse")
        if exp.sparse is not None:
            exp.sparse.load_state_dict(state["sparse"])
    except (KeyError, ValueError, RuntimeError) as err:
        raise checkpoint_mismatch(checkpoint, config, err) from err


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


def gradient_norm(model: nn.Module) -> torch.Tensor | None:
    """Global gradient norm, left on the device (read at the logging step with the other metrics)."""
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) if grads else None


class WindowMeter:
    """Loss sum, correct predictions and examples since the last log, accumulated on the device: the training
    step never waits for the device; the host reads the window once, at the logging step.

    The loss sum doubles as the divergence flag: it is finite unless some step's loss was NaN or infinite."""

    def __init__(self, device: torch.device, first_step: int) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.count, self.first_step = 0, first_step

    def add(self, loss: torch.Tensor, correct: torch.Tensor, n: int) -> None:
        self.loss_sum.add_(loss.float(), alpha=n)
        self.correct.add_(correct)
        self.count += n


class _NoLogger:
    """What ranks other than 0 log to under DDP: nothing."""

    def log(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


class Runner:
    """Trains one RunConfig into ``out``; ``run()`` returns the results dict it also writes as results.json.

    Under ``torchrun`` every rank runs this; rank 0 alone writes (see :mod:`sparseopt.experiments.run.distributed`).
    """

    def __init__(self, cfg: RunConfig, out: str | Path, *, overwrite: bool = False, resume: bool = False,
                 quiet: bool = False, callbacks: list[Callback] = ()) -> None:
        self.cfg, self.out, self.quiet, self.resume = cfg, Path(out), quiet, resume
        self.callbacks = list(callbacks) if callbacks else build_callbacks(cfg)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = not cfg.train.deterministic  # autotuned conv kernels, unless exactness
        check_execution(cfg, world_size_from_env())      # the cheap checks first: nothing built yet
        self.dist = init_from_env()
        check_output_folder(self.out)
        check_out_dir(self.out, overwrite=overwrite, resume=resume)
        self.plan = plan_resume(self.out, cfg) if resume else None  # refuses a changed config, touching nothing
        if self.plan is not None and self.plan.finished is not None:
            return                                        # nothing to build or write: run() says it is finished
        self.exp: Experiment = build_experiment(cfg)      # all validation happens before the folder is touched
        self.amp = MixedPrecision(cfg.train.precision, self.exp.device)
        self.net = self.exp.model
        if self.dist.enabled:
            self.exp.data.train.shard(self.dist.rank, self.dist.world)
            self.exp.data.test.shard(self.dist.rank, self.dist.world)
            ids = [torch.cuda.current_device()] if self.exp.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.exp.model, device_ids=ids)
        if cfg.train.compile:  # the forward only; SparseTraining's hooks run eagerly around optimizer.step()
            self.net = torch.compile(self.net)
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
            if self.plan.changes and self.dist.is_main:  # only safe keys (resume.SAFE_TO_CHANGE) get here
                longer = any(k == "train.epochs" for k, _, _ in self.plan.changes)
                warnings.warn(f"resuming {self.out} at step {self.step} with changed settings: "
                              f"{describe(self.plan.changes)}" + (
                                  f" (the learning-rate schedule and the mask-update window now span "
                                  f"{self.exp.total_steps} steps)" if longer else ""), ConfigWarning, stacklevel=2)
                dump_yaml(cfg, self.out / "config.yaml")
        elif self.dist.is_main:
            dump_yaml(cfg, self.out / "config.yaml")

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def _state(self) -> dict:
        e = self.exp
        return {"model": e.model.state_dict(), "optimizer": e.optimizer.state_dict(),
                "scheduler": e.scheduler.state_dict(), "sparse": e.sparse.state_dict() if e.sparse else None,
                "loader": e.data.train.state_dict(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if e.device.type == "cuda" else None,
                "grad_scaler": self.amp.state_dict(),
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
        restore_model_state(e, state, self.ckpt.latest(), self.out / "config.yaml")
        try:
            e.scheduler.load_state_dict(state["scheduler"])
            e.data.train.load_state_dict(state["loader"])
        except (KeyError, ValueError, RuntimeError) as err:
            raise checkpoint_mismatch(self.ckpt.latest(), self.out / "config.yaml", err) from err
        for c in self.callbacks:
            c.load_state_dict(state.get("callbacks", {}).get(c.name, {}))
        torch.set_rng_state(state["rng"].cpu())
        if state.get("cuda_rng") is not None and e.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu())
        self.amp.load_state_dict(state.get("grad_scaler"))
        self.step, self.elapsed, self.best = int(state["step"]), float(state["elapsed"]), dict(state["best"])

    # ---- the loop ---------------------------------------------------------------------------------------------
    def _eval_due(self) -> bool:
        every = self.cfg.train.eval_every or len(self.exp.data.train)
        return self.step % every == 0 or self.step == self.exp.total_steps

    def _prepare(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch on the device in the layout the step wants (NHWC images with ``train.channels_last``)."""
        device = self.exp.device
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if self.cfg.train.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def _check_finite(self, meter: WindowMeter, stop: StopRequest | None = None) -> int:
        """Host sync point (logging and checkpoint steps only): raise if any rank saw a NaN/inf loss since the
        last log, so no diverged state is ever checkpointed; returns the stop signal agreed over ranks (0: none)."""
        bad = not math.isfinite(meter.loss_sum.item())
        bad, signum = max_over_ranks(self.dist, bad, (stop.signum or 0) if stop is not None else 0)
        if bad:
            value = meter.loss_sum.item()
            what = "nan" if math.isnan(value) else "inf" if math.isinf(value) else "nan/inf on another rank"
            raise TrainingDiverged(
                f"loss became {what} between steps "
                f"{meter.first_step + 1} and {self.step}; the last good checkpoint "
                f"({self.ckpt.latest() or 'none yet'}) is intact. Lower optim.lr, add warmup "
                "(optim.warmup_epochs) or check the data")
        return int(signum)

    def _train_metrics(self, meter: WindowMeter, grad_norm: torch.Tensor | None) -> dict[str, float]:
        e = self.exp
        norm = grad_norm if grad_norm is not None else torch.zeros((), device=e.device)
        loss_sum, correct, grad = torch.stack([meter.loss_sum, meter.correct.float(), norm.float()]).tolist()
        metrics = {"loss": loss_sum / meter.count, "accuracy": correct / meter.count,
                   "lr": e.optimizer.param_groups[0]["lr"], "grad_norm": grad,
                   "epoch": self.step / len(e.data.train), "wall_time": self.elapsed}
        if e.sparse is not None:
            metrics["itop"] = e.sparse.itop()
            metrics["density"] = e.sparse.density()
        return metrics

    def _evaluate(self, logger: RunLogger, meter: WindowMeter) -> float:
        e = self.exp
        self._check_finite(meter)
        broadcast_buffers(self.dist, e.model)
        metrics = evaluate(e.model, e.data.test, e.device, dist=self.dist, prepare=self._prepare,
                           autocast=self.amp.autocast)
        self.last_eval = (self.step, dict(metrics))
        if metrics["accuracy"] > self.best["accuracy"]:
            self.best = {"accuracy": metrics["accuracy"], "step": self.step}
        if self.dist.is_main:
            if e.sparse is not None:
                metrics.update({f"density/{r.name}": r.density for r in e.sparse.report().layers})
            logger.log(self.step, metrics, split="test")
        self._save(metrics["accuracy"])
        return metrics["accuracy"]

    def _train_step(self, x: torch.Tensor, y: torch.Tensor,
                    log_now: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One optimizer step; returns device tensors (loss, correct predictions, gradient norm if ``log_now``),
        so nothing here waits for the device."""
        e = self.exp
        x, y = self._prepare(x, y)
        with self.amp.autocast():
            logits = self.net(x)
            loss = nn.functional.cross_entropy(logits, y, label_smoothing=self.cfg.optim.label_smoothing)
        e.optimizer.zero_grad(set_to_none=True)
        self.amp.backward(loss, e.optimizer)
        grad_norm = gradient_norm(e.model) if log_now else None
        self.amp.step(e.optimizer)
        e.scheduler.step()
        return loss.detach(), (logits.argmax(1) == y).sum(), grad_norm

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
        if self.plan is not None and self.plan.finished is not None:  # resumed after its last step: no-op
            unapplied = describe(self.plan.changes)
            return {**self.plan.finished, "already_finished": True, "unapplied_changes": unapplied} \
                if self.dist.is_main else {}
        e, cfg = self.exp, self.cfg
        logger = RunLogger(self.out, formats=cfg.logging.formats, tensorboard=cfg.logging.tensorboard,
                           resume_step=self.step if self.resume else None) if self.dist.is_main else _NoLogger()
        e.model.train()
        meter = WindowMeter(e.device, self.step)
        test_acc = None
        try:
            with stop_on_signals() as stop, progress(total=e.total_steps, desc=cfg.name, quiet=self.quiet) as bar:
                bar.update(self.step)
                while self.step < e.total_steps:
                    for x, y in e.data.train:
                        tic = time.perf_counter()
                        log_now = (self.step + 1) % cfg.train.log_every == 0
                        loss, correct, grad_norm = self._train_step(x, y, log_now)
                        self.step += 1
                        meter.add(loss, correct, len(y))
                        self.elapsed += time.perf_counter() - tic
                        signum = 0
                        if log_now:  # the one host sync of a logging interval
                            signum = self._check_finite(meter, stop)
                            metrics = self._train_metrics(meter, grad_norm)
                            logger.log(self.step, metrics, split="train")
                            bar.set_postfix(loss=f"{metrics['loss']:.3f}",
                                            acc=f"{test_acc:.3f}" if test_acc is not None else "-")
                            meter = WindowMeter(e.device, self.step)
                        self._run_callbacks(logger)
                        if self._eval_due():
                            test_acc = self._evaluate(logger, meter)
                        bar.update(1)
                        if not self.dist.enabled:  # one process: act on a signal after the step it arrived in
                            signum = stop.signum or 0
                        if signum:
                            self._check_finite(meter)
                            raise Interrupted(self._save(), signum)
                        if self.step >= e.total_steps:
                            break
        finally:
            logger.close()
        self._check_finite(meter)
        return self._finish()

    def _finish(self) -> dict:
        e = self.exp
        if self.last_eval is not None and self.last_eval[0] == self.step:
            final = self.last_eval[1]
        else:
            broadcast_buffers(self.dist, e.model)
            final = evaluate(e.model, e.data.test, e.device, dist=self.dist, prepare=self._prepare,
                             autocast=self.amp.autocast)
        if not self.dist.is_main:
            barrier(self.dist)  # leave once rank 0 has written the results
            return {}
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
        barrier(self.dist)
        return results


def train(cfg: RunConfig, out: str | Path, *, overwrite: bool = False, resume: bool = False,
          quiet: bool = False, callbacks: list[Callback] = ()) -> dict:
    """Train ``cfg`` into ``out`` and return its results (see :class:`Runner`)."""
    return Runner(cfg, out, overwrite=overwrite, resume=resume, quiet=quiet, callbacks=callbacks).run()
