"""Bit-packed ITOP masks and the memory SparseTraining keeps."""

import torch
from hypothesis import given, settings, strategies as st

import sparseopt as so
from sparseopt.bits import PackedMasks, pack_mask, unpack_mask
from sparseopt.memory import parameter_bytes, state_bytes

from helpers import mlp, train_step


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 200), st.lists(st.integers(0, 199), max_size=60), st.integers(0, 2**31 - 1))
def test_packed_masks_merge_and_count_like_a_bool_mask(n, marks, seed):
    start = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.3
    packed = PackedMasks({"w": start})
    more = torch.zeros(n, dtype=torch.bool)
    more[torch.tensor([m % n for m in marks], dtype=torch.long)] = True   # repeats allowed
    packed.merge_("w", more)
    expected = start | more
    assert torch.equal(packed["w"], expected)
    assert packed.count("w") == int(expected.sum())
    assert torch.equal(unpack_mask(pack_mask(expected), (n,)), expected)


@given(st.integers(1, 100), st.integers(0, 2**31 - 1))
def test_pack_mask_is_the_bit_by_bit_packing(n, seed):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5
    bits = torch.cat([mask, mask.new_zeros(-n % 8)]).view(-1, 8).to(torch.int64)
    assert torch.equal(pack_mask(mask), (bits * (1 << torch.arange(8))).sum(1).to(torch.uint8))
    assert torch.equal(pack_mask(mask.view(1, n)[:, 1:]), pack_mask(mask[1:].clone()))  # a view at an odd offset


def test_state_is_under_half_the_parameter_bytes_without_a_preconditioner():
    model = mlp((64, 256, 256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse = so.SparseTraining(model, opt, density=0.1, topology=so.RigL(update_every=2, end_step=100))
    for step in range(5):
        train_step(model, opt, step)
    parts = state_bytes(sparse)
    assert parts["grad_scale"] == 0                    # the scales are the masks themselves
    assert parts["scratch"] == 0                       # the grow-score buffer lives only during an update
    numel = sum(p.param.numel() for p in sparse.params)
    assert parts["masks"] == numel and parts["fired"] <= numel // 8 + 8 * len(sparse.params)
    sparse_param_bytes = 4 * numel
    assert parts["total"] <= 0.5 * sparse_param_bytes <= parameter_bytes(model)
    assert 0 < sparse.itop() <= 1 and sparse.report().itop == sparse.itop()


def test_state_with_sparseopt_is_under_half_the_parameter_bytes():
    """Scope: layers of 256 units, big enough that per-weight state dominates the per-layer overhead."""
    model = mlp((64, 256, 256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse = so.SparseTraining(model, opt, density=0.1, topology=so.RigL(update_every=2, end_step=100),
                               preconditioner=so.SparseOpt())
    for step in range(5):
        train_step(model, opt, step)
    scoped = [p for p in sparse.params if p.name in sparse._precondition_names]
    parts = state_bytes(sparse)
    # one float factor per output neuron, not per weight
    assert scoped and parts["grad_scale"] == sum(4 * p.param.shape[p.out_axis] for p in scoped)
    assert parts["total"] <= 0.5 * sum(4 * p.param.numel() for p in sparse.params) <= parameter_bytes(model)
