"""Sparsify your own model and train it with your own loop: the three lines that change are marked."""

import torch
from torch import nn

import sparseopt as so
from sparseopt.data import load_mnist_subset

torch.manual_seed(0)
x_train, y_train, x_test, y_test = load_mnist_subset()
model = nn.Sequential(nn.Flatten(), nn.Linear(784, 300, bias=False), nn.BatchNorm1d(300), nn.ReLU(),
                      nn.Linear(300, 100, bias=False), nn.BatchNorm1d(100), nn.ReLU(), nn.Linear(100, 10))
epochs, batch = 5, 128
steps = epochs * (len(x_train) // batch)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

sparse = so.SparseTraining(                                                # <- 1: sparsify (95% sparse, ERK)
    model, opt, density=0.05, distribution="erk", prune_first_layer=True,
    topology=so.RigL(update_every=16, drop_fraction=0.3, end_step=int(0.75 * steps)),
    preconditioner=so.SparseOpt(),                                         # <- 2: undo BatchNorm's gradient skew
)

for epoch in range(epochs):                                                # the loop is plain PyTorch
    order = torch.randperm(len(x_train))
    for i in range(len(x_train) // batch):
        idx = order[i * batch:(i + 1) * batch]
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()

model.eval()
with torch.no_grad():
    accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
print(sparse.report())                                                     # <- 3: per-layer density, ITOP, changes
print(f"test accuracy {accuracy:.4f}")
checkpoint = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
              "sparse": sparse.state_dict()}
