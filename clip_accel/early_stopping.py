"""Early stopping on a validation metric; its state is plain data so checkpoints can carry it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields


@dataclass
class EarlyStopping:
    """Tracks the best validation metric; `should_stop` after `patience` evaluations without improvement."""

    metric: str
    patience: int
    min_delta: float
    best_value: float = -math.inf
    best_metrics: dict = field(default_factory=dict)
    best_step: int = 0
    evaluations_without_improvement: int = 0

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """Record one evaluation; True when it is the new best (by more than `min_delta`)."""
        improved = metrics[self.metric] > self.best_value + self.min_delta
        if improved:
            self.best_value, self.best_metrics, self.best_step = metrics[self.metric], dict(metrics), step
            self.evaluations_without_improvement = 0
        else:
            self.evaluations_without_improvement += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.evaluations_without_improvement >= self.patience

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name in (f.name for f in fields(self)):
            setattr(self, name, state[name])
