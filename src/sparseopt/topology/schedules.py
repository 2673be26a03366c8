"""When masks change and by how much (SPEC 3.1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

ANNEALING = ("cosine", "constant")


@dataclass(frozen=True)
class UpdateSchedule:
    """Mask updates at ``start_step, start_step + update_every, ...`` up to ``end_step`` inclusive.

    The drop fraction anneals from ``drop_fraction`` at ``start_step`` to 0 at ``end_step`` with a cosine (RigL,
    JaxPruner), or stays constant. ``end_step=None`` never stops updating (constant annealing only).
    """

    update_every: int = 100
    drop_fraction: float = 0.3
    start_step: int = 0
    end_step: int | None = None
    annealing: str = "cosine"

    def __post_init__(self) -> None:
        if isinstance(self.update_every, bool) or not isinstance(self.update_every, int) or self.update_every <= 0:
            raise ValueError(f"update_every must be a positive integer number of steps, got {self.update_every!r}")
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1], got {self.drop_fraction!r}")
        if self.start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {self.start_step}")
        if self.annealing not in ANNEALING:
            raise ValueError(f"unknown annealing {self.annealing!r}; choose one of {ANNEALING}")
        if self.end_step is None:
            if self.annealing == "cosine":
                raise ValueError("cosine annealing needs end_step (RigL uses about 0.75 × total steps)")
        elif self.end_step <= self.start_step:
            raise ValueError(
                f"end_step ({self.end_step}) must be after start_step ({self.start_step}); "
                "set end_step to about 0.75 × total training steps"
            )

    def is_update_step(self, step: int) -> bool:
        if step < self.start_step or (self.end_step is not None and step > self.end_step):
            return False
        return (step - self.start_step) % self.update_every == 0

    def fraction(self, step: int) -> float:
        """Drop fraction f(t); 0 outside [start_step, end_step]."""
        if step < self.start_step or (self.end_step is not None and step > self.end_step):
            return 0.0
        if self.annealing == "constant":
            return self.drop_fraction
        progress = (step - self.start_step) / (self.end_step - self.start_step)
        return 0.5 * self.drop_fraction * (1.0 + math.cos(math.pi * progress))
