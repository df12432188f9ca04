"""The live promotion policy: a challenger moves on only on labelled evidence.

For each challenger, labelled metrics per variant are accumulated from monitoring.stats
(tumbling windows, segment "all"), compared with the champion's over the same period, and
judged with a one-sided two-proportion z-test: promote when the challenger is better by the
margin and significantly so; retire (shadow) or roll back (canary) when it has had
``max_labels`` without showing it, or is significantly worse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from scoremesh.contract.records import MonitoringStats
from services.common.policies.retrain import PromotionPolicy


@dataclass
class Tally:
    labels: int = 0
    correct: float = 0.0

    @property
    def rate(self) -> float:
        return self.correct / self.labels if self.labels else 0.0


@dataclass(frozen=True)
class Move:
    version: str
    action: str  # promote | retire | rollback
    target_stage: str | None
    reason: str
    options: dict[str, str] = field(default_factory=dict)


def one_sided_p(better: Tally, worse: Tally) -> float:
    """P-value that ``better``'s rate exceeds ``worse``'s (two-proportion z-test)."""
    n1, n2 = better.labels, worse.labels
    if not n1 or not n2:
        return 1.0
    pooled = (better.correct + worse.correct) / (n1 + n2)
    se = math.sqrt(max(pooled * (1 - pooled) * (1 / n1 + 1 / n2), 1e-12))
    z = (better.rate - worse.rate) / se
    return 0.5 * math.erfc(z / math.sqrt(2))


class PromotionBook:
    """Labelled counts per (``model@version``, variant) and event-time window.

    Variants are compared over the windows both have, so a challenger is judged against the
    champion on the same period of traffic (for a shadow, on the very same events).
    """

    def __init__(self) -> None:
        self.windows: dict[tuple[str, str], dict[tuple[int, int], tuple[int, float]]] = {}

    def observe(self, stats: MonitoringStats, metric: str) -> None:
        if stats["segment"] != "all" or stats["window_kind"] != "tumbling":
            return
        if metric not in stats["metrics"] or not stats["count"]:
            return
        window = (int(stats["window_start"]), int(stats["window_end"]))
        count = int(stats["count"])
        # A re-emitted window (at-least-once upstream) replaces, never adds.
        key = f"{stats['model']}@{stats['model_version']}"
        self.windows.setdefault((key, stats["variant"]), {})[window] = (
            count,
            float(stats["metrics"][metric]) * count,
        )

    def paired(self, a: tuple[str, str], b: tuple[str, str]) -> tuple[Tally, Tally]:
        wa, wb = self.windows.get(a, {}), self.windows.get(b, {})
        shared = wa.keys() & wb.keys()
        return (
            Tally(sum(wa[w][0] for w in shared), sum(wa[w][1] for w in shared)),
            Tally(sum(wb[w][0] for w in shared), sum(wb[w][1] for w in shared)),
        )


def judge(
    book: PromotionBook,
    model: str,
    champion: str,
    challengers: dict[str, str],
    policy: PromotionPolicy,
) -> list[Move]:
    """Moves for a model's challengers {version: stage}; champion is the champion's version."""
    moves: list[Move] = []
    for version, stage in challengers.items():
        variant = "shadow" if stage == "shadow" else "canary"
        mine, theirs = book.paired(
            (f"{model}@{version}", variant), (f"{model}@{champion}", "champion")
        )
        if mine.labels < policy.min_labels or theirs.labels < policy.min_labels:
            continue
        lift = mine.rate - theirs.rate
        p_better = one_sided_p(mine, theirs)
        p_worse = one_sided_p(theirs, mine)
        evidence = (
            f"{policy.metric} {mine.rate:.3f} vs champion {theirs.rate:.3f} "
            f"(lift {lift:+.3f}, p={p_better:.3g}) over {mine.labels} labels"
        )
        if lift >= policy.margin and p_better < policy.alpha:
            target = "champion" if stage == "canary" or policy.skip_canary else "canary"
            options = {"percent": str(policy.canary_percent)} if target == "canary" else {}
            moves.append(Move(version, "promote", target, f"promotion policy: {evidence}", options))
        elif p_worse < policy.alpha or mine.labels >= policy.max_labels:
            why = "significantly worse" if p_worse < policy.alpha else "no significant lift"
            action = "rollback" if stage == "canary" else "retire"
            moves.append(
                Move(
                    version,
                    action,
                    "retired" if action == "retire" else None,
                    f"promotion policy: {why}: {evidence}",
                )
            )
    return moves
