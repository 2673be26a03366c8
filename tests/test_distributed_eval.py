"""Distributed evaluation: 2 gloo ranks, each on its shard of every test batch, give the single-process result."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import free_port
from torch import nn

from sparseopt.data import InMemoryLoader
from sparseopt.experiments.run.distributed import DistInfo, broadcast_buffers
from sparseopt.experiments.run.evaluation import evaluate


def model_and_data():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))
    net.train()
    net(torch.randn(64, 8))                       # non-trivial BatchNorm running statistics
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(101, 8, generator=g), torch.randint(0, 5, (101,), generator=g)
    return net, InMemoryLoader(x, y, batch_size=25, shuffle=False)  # the last batch (1 example) leaves rank 1 none


def worker(rank, world, port, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net, loader = model_and_data()
        if rank == 1:  # as after a DDP step: this rank updated its own BatchNorm statistics
            net[1].running_mean.add_(1.0)
        loader.shard(rank, world)
        info = DistInfo(rank, world)
        broadcast_buffers(info, net)
        torch.save(evaluate(net, loader, torch.device("cpu"), dist=info), os.path.join(out, f"eval{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_evaluate_like_one_process(tmp_path):
    net, loader = model_and_data()
    single = evaluate(net, loader, torch.device("cpu"))
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        shared = torch.load(tmp_path / f"eval{rank}.pt")
        assert shared["accuracy"] == single["accuracy"]
        assert abs(shared["loss"] - single["loss"]) <= 1e-6 * abs(single["loss"])
    assert 0.0 < single["accuracy"] < 1.0
