"""Multi-process data-parallel training under ``torchrun`` (PyTorch DDP), invisible when there is one process.

Every rank builds the same experiment from the same seed; each loads and trains on its slice ``batch[rank::world]``
of the global batch (the loader is sharded; ``data.batch_size`` stays the global size); rank 0 alone writes logs,
checkpoints and results.
Mask updates stay identical across ranks because DDP averages gradients and SparseTraining broadcasts masks.
"""

from __future__ import annotations

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


def init_from_env() -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend)
    return info


def any_rank(info: DistInfo, *flags: bool) -> list[bool]:
    """Element-wise OR of flags over ranks, so every rank stops at the same step."""
    if not info.enabled:
        return list(flags)
    t = torch.tensor([float(f) for f in flags])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
