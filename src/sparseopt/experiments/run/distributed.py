"""Multi-process data-parallel training under ``torchrun`` (PyTorch DDP), invisible when there is one process.

Every rank builds the same experiment from the same seed; each loads and trains on its slice ``batch[rank::world]``
of the global batch (the loader is sharded; ``data.batch_size`` stays the global size) and evaluates its slice of
every test batch (the counts are all-reduced); rank 0 alone writes logs, checkpoints and results. Collectives
outside DDP's gradient all-reduce happen only at logging, evaluation and checkpoint steps.
Mask updates stay identical across ranks because DDP averages gradients and SparseTraining broadcasts masks.
"""

from __future__ import annotations

import atexit
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env() -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op for a single process)."""
    world = world_size_from_env()
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend)
        atexit.register(_leave_process_group)
    return info


def _leave_process_group() -> None:
    """Destroy the process group and collect what still holds it (DDP's reducer, in a reference cycle with the
    model and SparseTraining) while the interpreter is fully alive. Otherwise gloo's worker threads outlive it:
    each keeps its last collective, whose tensors Python has seen, and releasing them needs the GIL; a thread
    that asks for it while the interpreter finalizes exits inside a destructor and the process aborts
    ("terminate called without an active exception", exit -6; a core dump showed ``ProcessGroupGloo::runLoop``
    -> ``~AsyncBroadcastWork`` -> ``decref_pyobject`` -> ``take_gil`` under ``Py_FinalizeEx``; pytorch/pytorch
    issue 190489), and torchrun then kills the other ranks and reports failure although the run finished. The
    bindings release the GIL while a process group is destroyed, so its threads can finish here."""
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def max_over_ranks(info: DistInfo, *values: float) -> list[float]:
    """Element-wise maximum of numbers over ranks: one small all-reduce (none for a single process)."""
    if not info.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def any_rank(info: DistInfo, *flags: bool) -> list[bool]:
    """Element-wise OR of flags over ranks, so every rank stops at the same step."""
    return [v > 0 for v in max_over_ranks(info, *flags)]


def broadcast_buffers(info: DistInfo, module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics): each rank updated its own copy in its last
    forward, so without this the ranks would evaluate slightly different models."""
    if info.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def sum_over_ranks(info: DistInfo, tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``tensor`` over ranks (itself for one process), on the tensor's own device."""
    if not info.enabled:
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = tensor.to(device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(tensor.device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
