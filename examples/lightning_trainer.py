"""Sparse training in Lightning: one callback (marked), Lightning's default training loop unchanged. A tiny random-init
CNN on random images, so it runs in seconds on a CPU; it trains, checkpoints, then resumes with ckpt_path.

    pip install 'sparseopt[lightning]'; python examples/lightning_trainer.py
"""

import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

import sparseopt as so
from sparseopt.integrations.lightning import SparseTrainingCallback


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                 nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=16)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def random_images(n=128, classes=4):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, 16, 16, generator=g),
                                          torch.randint(0, classes, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=16)


def fit(out: str, epochs: int, ckpt_path=None) -> SparseTrainingCallback:
    torch.manual_seed(0)
    sparse = SparseTrainingCallback(                                      # <- the one line that adds sparse training
        density=0.2, topology=so.RigL(update_every=4, end_step=12), preconditioner=so.SparseOpt())
    trainer = pl.Trainer(max_epochs=epochs, accumulate_grad_batches=2, gradient_clip_val=1.0, callbacks=[sparse],
                         default_root_dir=out, accelerator="cpu", devices=1, log_every_n_steps=1,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Classifier(), random_images(), ckpt_path=ckpt_path)  # Lightning calls optimizer.step(closure)
    return sparse


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as out:
        fit(out, epochs=2)                                                # the checkpoint holds the sparse state
        checkpoint = next(Path(out).rglob("*.ckpt"))
        sparse = fit(out, epochs=4, ckpt_path=checkpoint)                 # masks, schedule and ITOP continue
        print(sparse.sparse.report())
        print(f"resumed to step {sparse.sparse.step_count}: density {sparse.sparse.density():.4f}, "
              f"itop {sparse.sparse.itop():.4f}")
