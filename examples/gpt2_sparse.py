"""RigL + SparseOpt on a tiny random-init Hugging Face GPT-2 (nothing downloaded): its Conv1D projections are
sparse with factors along their output axis, the embeddings and the tied LM head stay dense, and the report says so.

    .venv/bin/python examples/gpt2_sparse.py        (needs `pip install 'sparseopt[transformers]'`)
"""

import logging

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import sparseopt as so


def main(steps: int = 40) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # shows the "left dense" line
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=256, n_positions=32,
                                       bos_token_id=0, eos_token_id=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 256, (64, 17), generator=torch.Generator().manual_seed(0))
    sparse = so.SparseTraining(model, opt, density=0.1, topology=so.RigL(update_every=10, end_step=30),
                               preconditioner=so.SparseOpt(), init="fanin",
                               example_input={"input_ids": tokens[:2, :-1]})  # finds the layers reading the input
    for step in range(steps):
        batch = tokens[(step * 8) % 64:][:8]
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(sparse.report())
    name = "transformer.h.0.mlp.c_fc.weight"
    print(f"{name}: weight {tuple(model.get_parameter(name).shape)} (in, out), "
          f"SparseOpt factors {tuple(sparse.factors()[name].shape)}, final loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
