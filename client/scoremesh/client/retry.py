"""Capped exponential backoff: the one retry schedule of scoremesh's clients and services
(starting Kafka clients, watching the broker, delivering alerts to webhooks)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """The waits between tries: ``initial_s``, then doubling (``factor``) up to ``max_s``.

    With ``jitter`` each wait is drawn uniformly from its upper half, so many clients that
    failed together do not retry together. ``reset()`` after a success.
    """

    initial_s: float
    max_s: float
    factor: float = 2.0
    jitter: bool = False
    _next: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s or self.factor < 1:
            raise ValueError("need 0 < initial_s <= max_s and factor >= 1")
        self._next = self.initial_s

    def next(self) -> float:
        """The wait before the next try (and the schedule moves on)."""
        wait = self._next
        self._next = min(wait * self.factor, self.max_s)
        return random.uniform(wait / 2, wait) if self.jitter else wait

    def reset(self) -> None:
        self._next = self.initial_s
