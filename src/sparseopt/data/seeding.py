"""Derive independent seeds from tuples like (seed, epoch, index) so randomness never depends on call order.

That is what makes shuffling and augmentation reproducible across resumes and DataLoader workers.
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends only on ``keys`` (well mixed by numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def torch_generator(*keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``keys``."""
    return torch.Generator().manual_seed(derive_seed(*keys))
