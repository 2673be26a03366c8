"""Byte-level text corpus shipped with CPython and a fast, resumable random-window batch sampler.

Default corpus: the values of ``pydoc_data.topics.topics`` (CPython's help topics, ~465k characters, no download),
joined in sorted-key order and UTF-8 encoded. The split is fixed: the first ``1 - val_fraction`` of the bytes train,
the rest validate.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

CORPORA = ("pydoc_topics",)


def load_corpus(name: str | Path = "pydoc_topics") -> torch.Tensor:
    """The corpus as a 1-D uint8 tensor: ``"pydoc_topics"`` or a path to any text/binary file."""
    if name == "pydoc_topics":
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        text = "\n\n".join(topics[k] for k in sorted(topics))
        data = text.encode("utf-8")
    else:
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"unknown corpus {name!r}: neither one of {CORPORA} nor an existing file")
        data = path.read_bytes()
    if len(data) < 2:
        raise ValueError(f"corpus {name!r} is too short")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def split_corpus(data: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    cut = int(round(len(data) * (1.0 - val_fraction)))
    return data[:cut], data[cut:]


class RandomWindowSampler:
    """Batches of random windows ``(x, y)`` with ``y`` = ``x`` shifted by one byte, both int64 (B, T).

    Deterministic given ``seed``; ``state_dict()``/``load_state_dict()`` resume the exact stream.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, ctx: int, seed: int = 0) -> None:
        if data.dim() != 1:
            raise ValueError("data must be a 1-D tensor of token ids")
        if batch_size < 1 or ctx < 1:
            raise ValueError(f"batch_size and ctx must be positive, got {batch_size}, {ctx}")
        if len(data) < ctx + 1:
            raise ValueError(f"data has {len(data)} tokens, fewer than ctx + 1 = {ctx + 1}")
        self.data = data.long()
        self.batch_size, self.ctx = batch_size, ctx
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self._offsets = torch.arange(ctx + 1)
        self.batches = 0

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.data) - self.ctx, (self.batch_size,), generator=self.generator)
        win = self.data[starts[:, None] + self._offsets]
        self.batches += 1
        return win[:, :-1], win[:, 1:]

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sample()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "batches": self.batches}

    def load_state_dict(self, state: Mapping) -> None:
        self.generator.set_state(state["generator"])
        self.batches = int(state["batches"])


def text_samplers(batch_size: int, ctx: int, seed: int = 0, corpus: str | Path = "pydoc_topics",
                  val_fraction: float = 0.1) -> tuple[RandomWindowSampler, RandomWindowSampler]:
    """Train and validation samplers over the fixed split (validation seeded with ``seed + 1``)."""
    train, val = split_corpus(load_corpus(corpus), val_fraction)
    return (RandomWindowSampler(train, batch_size, ctx, seed),
            RandomWindowSampler(val if len(val) > ctx else train, batch_size, ctx, seed + 1))
