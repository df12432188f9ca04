"""Automatic canary rollback: a canary clearly worse than the champion is taken out.

Compares, per canary, its scoring-error rate and its per-row inference time (p99 over
batches) with the champion's, once both have a minimum sample. Accuracy needs labels and
is judged downstream (monitor / promotion policy); this guard acts on what a scorer sees.

Latency is CPU time of the ONNX call (both versions score the same batches), and its p99 is
compared only once both have ``min_batches`` samples: over twenty batches a p99 is the one
slowest batch, and one preempted call on a loaded host rolled back a healthy canary.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Tally:
    events: int = 0
    failed: int = 0
    batches: int = 0
    per_row_ms: deque[float] = field(default_factory=lambda: deque(maxlen=2000))

    @property
    def error_rate(self) -> float:
        return self.failed / self.events if self.events else 0.0

    @property
    def p99(self) -> float:
        return float(np.percentile(self.per_row_ms, 99)) if self.per_row_ms else 0.0


@dataclass(frozen=True)
class Verdict:
    version_key: str
    reason: str


class CanaryGuard:
    def __init__(
        self,
        min_events: int,
        max_error_rate_delta: float,
        max_latency_ratio: float,
        min_batches: int = 100,
    ) -> None:
        self.min_events = min_events
        self.min_batches = min_batches
        self.max_error_rate_delta = max_error_rate_delta
        self.max_latency_ratio = max_latency_ratio
        self._tallies: dict[str, _Tally] = {}
        self._judged: set[str] = set()

    def observe(self, key: str, events: int, failed: bool, cpu_ms: float | None) -> None:
        tally = self._tallies.setdefault(key, _Tally())
        tally.events += events
        if failed:
            tally.failed += events
        elif cpu_ms is not None and events:
            tally.batches += 1
            tally.per_row_ms.append(cpu_ms / events)

    def judge(self, champion_key: str, canary_keys: list[str]) -> list[Verdict]:
        """Verdicts for canaries that are worse; each canary is judged guilty at most once."""
        champion = self._tallies.get(champion_key)
        out: list[Verdict] = []
        if champion is None or champion.events < self.min_events:
            return out
        for key in canary_keys:
            canary = self._tallies.get(key)
            if key in self._judged or canary is None or canary.events < self.min_events:
                continue
            delta = canary.error_rate - champion.error_rate
            if delta > self.max_error_rate_delta:
                out.append(
                    Verdict(
                        key,
                        f"canary error rate {canary.error_rate:.2%} vs champion "
                        f"{champion.error_rate:.2%} over {canary.events} events",
                    )
                )
            elif (
                min(canary.batches, champion.batches) >= self.min_batches
                and champion.p99 > 0
                and canary.p99 > champion.p99 * self.max_latency_ratio
            ):
                out.append(
                    Verdict(
                        key,
                        f"canary p99 {canary.p99 * 1000:.1f} µs/row CPU vs champion "
                        f"{champion.p99 * 1000:.1f} µs/row over {canary.batches} batches "
                        f"(limit x{self.max_latency_ratio})",
                    )
                )
        self._judged.update(v.version_key for v in out)
        return out

    def forget(self, live_keys: set[str]) -> None:
        for key in list(self._tallies):
            if key not in live_keys:
                del self._tallies[key]
