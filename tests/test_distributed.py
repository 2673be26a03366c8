"""Two gloo ranks on CPU: every rank must train the same sparse network."""

import gc
import os
import socket

import torch
import torch.distributed as dist
import pytest
import torch.multiprocessing as mp
from torch import nn

import sparseopt as so
from sparseopt.grad_hooks import scaled_grad
from helpers import mlp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, port, out, backend):
    torch.set_num_threads(1)
    if backend == "python":  # the fallback gradient hooks (a fresh process: read at the first SparseTraining)
        os.environ["SPARSEOPT_NATIVE_KERNELS"] = "0"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for topology in ("set", "rigl"):
            train(rank, topology, out)
    finally:
        dist.destroy_process_group()
        gc.collect()  # DDP's reducer holds the group: its gloo threads must stop before finalization (see
        # sparseopt.experiments.run.distributed._leave_process_group)


def train(rank, topology, out):
    net = mlp(widths=(10, 32, 32, 4), seed=0)
    model = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    topo = (so.SET if topology == "set" else so.RigL)(update_every=2, drop_fraction=0.5, end_step=20)
    # Different seeds per rank on purpose: rank 0's masks must win, and stay in sync at every update.
    sparse = so.SparseTraining(model, opt, 0.2, topology=topo, seed=rank, preconditioner=so.SparseOpt())
    grown_from, global_grads = [], []
    score = topo.grow_scores   # what the update reads the grow scores through
    topo.grow_scores = lambda w, grad, gen, out=None: grown_from.append(grad if grad is None else grad.clone()) or score(w, grad, gen, out=out)
    g = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    for step in range(9):
        x, y = torch.randn(16, 10, generator=g), torch.randint(0, 4, (16,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        if step == 0 and topology == "rigl":  # an update step: RigL must grow from the all-rank dense gradient
            dense = torch.autograd.grad(nn.functional.cross_entropy(net(x), y), [p.param for p in sparse.params])
            for d in dense:
                dist.all_reduce(d)
                global_grads.append(d / dist.get_world_size())
        if step == 1:  # an ordinary step: the all-reduced .grad must be the masked, preconditioned average
            raw = torch.autograd.grad(nn.functional.cross_entropy(net(x), y), [p.param for p in sparse.params])
            for r in raw:
                dist.all_reduce(r)
        opt.zero_grad()
        loss.backward()
        if step == 1:
            applied_errors = [(p.param.grad - scaled_grad(r / dist.get_world_size(), sparse.masks[p.name],
                                                          sparse._row_scale.get(p.name))).abs().max().item()
                              for p, r in zip(sparse.params, raw)]
        opt.step()
    torch.save({"native": sparse._gradients.native, "applied_errors": applied_errors, "masks": sparse.masks, "fired": dict(sparse.fired), "state_names": sorted(sparse.state_dict()["masks"]),
                "grown_from": grown_from[:len(global_grads)], "global_grads": global_grads,
                "weights": {k: v.detach().clone() for k, v in model.module.named_parameters()}},
               os.path.join(out, f"{topology}{rank}.pt"))


@pytest.mark.parametrize("backend", ["native", "python"])
def test_masks_and_weights_identical_across_ddp_ranks(tmp_path, backend):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path), backend), nprocs=2, join=True)
    for topology in ("set", "rigl"):
        a, b = [torch.load(tmp_path / f"{topology}{r}.pt", weights_only=True) for r in range(2)]
        assert a["native"] == b["native"] == (backend == "native")
        for name in a["masks"]:
            assert torch.equal(a["masks"][name], b["masks"][name])
            assert torch.equal(a["fired"][name], b["fired"][name])
        for name in a["weights"]:
            assert torch.equal(a["weights"][name], b["weights"][name]), name
        assert any(not torch.equal(a["fired"][n], a["masks"][n]) for n in a["masks"])  # masks did move
        assert a["state_names"] == ["3.weight", "6.weight"]  # saved without DDP's "module." prefix
        assert max(a["applied_errors"] + b["applied_errors"]) < 1e-6
    for r in range(2):
        rigl = torch.load(tmp_path / f"rigl{r}.pt", weights_only=True)
        assert len(rigl["grown_from"]) == len(rigl["global_grads"]) == 2
        for seen, expected in zip(rigl["grown_from"], rigl["global_grads"]):
            torch.testing.assert_close(seen, expected)
