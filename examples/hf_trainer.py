"""Sparse training in a Hugging Face Trainer: one callback (marked). A tiny random-init HF ResNet on random images,
so it runs in seconds on a CPU with nothing downloaded; it trains, checkpoints, then resumes from the checkpoint.

    pip install 'sparseopt[transformers]'; python examples/hf_trainer.py
"""

import tempfile

import torch
from transformers import ResNetConfig, ResNetForImageClassification, Trainer, TrainingArguments

import sparseopt as so
from sparseopt.integrations.transformers import SparseTrainingCallback


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, n=64, classes=4):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def make_trainer(out: str, max_steps: int) -> tuple[Trainer, SparseTrainingCallback]:
    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32],
                                                      depths=[1, 1], layer_type="basic", num_labels=4))
    sparse = SparseTrainingCallback(                                     # <- the one line that adds sparse training
        density=0.2, topology=so.RigL(update_every=4, end_step=int(0.75 * 16)), preconditioner=so.SparseOpt())
    args = TrainingArguments(output_dir=out, max_steps=max_steps, per_device_train_batch_size=8,
                             gradient_accumulation_steps=2, learning_rate=3e-3, save_steps=8, logging_steps=4,
                             report_to="none", use_cpu=True, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=RandomImages(), callbacks=[sparse]), sparse


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as out:
        trainer, _ = make_trainer(out, max_steps=8)
        trainer.train()                                                   # writes checkpoint-8/, sparse state included
        trainer, sparse = make_trainer(out, max_steps=16)
        trainer.train(resume_from_checkpoint=True)                        # masks, schedule and ITOP continue
        print(sparse.sparse.report())
        last = trainer.state.log_history[-2]
        print(f"step {last['step']}: loss {last['loss']:.4f}, density {last['sparseopt/density']:.4f}, "
              f"itop {last['sparseopt/itop']:.4f}")
