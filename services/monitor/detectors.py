"""Online drift detectors, one state per (partition, model version, signal).

River's detectors are fed value by value (ADWIN costs ~0.2 µs per update, PageHinkley
~0.5, KSWIN ~300, so KSWIN only ever sees a sample: ``sample_every``). Batches arrive as
numpy arrays and ``update_many`` returns the positions in the batch where a detector
fired, so the same code serves the stream and the seeded tests that pin those positions.

Signals, as they appear in alert keys:

- ``stream_drift.<feature>``: River detectors on each numeric feature;
- ``category_shift.<feature>``: a chi-square frequency-change test on categorical ones;
- ``stream_drift.score`` / ``stream_drift.confidence``: the positive-class probability and
  the probability of the decided class (a drop means the model grew unsure);
- ``error_rate``: the 0/1 error stream from predictions.labeled.

Detector state is never pickled: after a restart or a rebalance it is rebuilt by
replaying the last records of each partition (see ``service.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from river import drift
from river.drift import binary
from scipy.special import chdtrc  # type: ignore[import-untyped]

from services.common.policies.monitor import CategoryTestPolicy, DetectorPolicy, DetectorSpec
from services.monitor.features import FeatureLayout, PreparedBatch

RECENT = 200  # values behind a detection that tell its direction


@dataclass(frozen=True, slots=True)
class Detection:
    signal: str
    detector: str
    index: int  # position in the batch given to update_many / update_*
    evidence: dict[str, str] = field(default_factory=dict)

    @property
    def direction(self) -> str:
        return self.evidence.get("direction", "")


def make_river(spec: DetectorSpec, seed: int = 0) -> Any:
    """A fresh River detector for a spec; unknown parameters fail loudly, naming the kind."""
    params: dict[str, Any] = dict(spec.params)
    kinds: dict[str, Any] = {
        "adwin": drift.ADWIN,
        "page_hinkley": drift.PageHinkley,
        "kswin": drift.KSWIN,
        "ddm": binary.DDM,
        "eddm": binary.EDDM,
        "hddm_a": binary.HDDMA,
        "hddm_w": binary.HDDMW,
    }
    if spec.kind == "kswin":
        params.setdefault("seed", seed)
    try:
        return kinds[spec.kind](**params)
    except TypeError as exc:
        raise ValueError(f"detector {spec.kind!r}: bad parameters {spec.params}: {exc}") from None


def _fmt(value: float) -> str:
    return f"{value:.6g}"


class StreamDetector:
    """One River detector over one stream of numbers."""

    def __init__(self, spec: DetectorSpec, seed: int = 0) -> None:
        self.spec = spec
        self.name = spec.kind
        self.every = spec.sample_every
        self._river = make_river(spec, seed)
        self.seen = 0  # values offered
        self.fed = 0  # values given to the River detector
        self.detections = 0
        self._segment_sum = 0.0  # values since the last detection
        self._segment_n = 0
        self._tail = np.zeros(0, dtype=np.float64)

    @property
    def estimation(self) -> float | None:
        value = getattr(self._river, "estimation", None)
        return float(value) if isinstance(value, int | float) else None

    def update_many(self, values: np.ndarray) -> list[tuple[int, dict[str, str]]]:
        """Feed a batch; returns (position, evidence) for every detection in it."""
        values = np.asarray(values, dtype=np.float64)
        n = len(values)
        if n == 0:
            return []
        if self.every == 1:
            positions = None
            fed = values.tolist()
        else:
            first = (-self.seen) % self.every
            positions = np.arange(first, n, self.every)
            fed = values[positions].tolist()
        river = self._river
        update = river.update
        fired: list[int] = []
        estimates: list[float | None] = []
        for i, value in enumerate(fed):
            update(value)
            if river.drift_detected:
                fired.append(i if positions is None else int(positions[i]))
                estimates.append(self.estimation)
        self.seen += n
        self.fed += len(fed)
        if not fired:
            self._segment_sum += float(values.sum())
            self._segment_n += n
            self._tail = np.concatenate((self._tail, values))[-RECENT:]
            return []
        out: list[tuple[int, dict[str, str]]] = []
        cumulative = np.cumsum(values)
        start = 0
        seg_sum, seg_n = self._segment_sum, self._segment_n
        history = np.concatenate((self._tail, values))
        offset = len(self._tail)
        for pos, estimate in zip(fired, estimates, strict=True):
            seg_sum += float(cumulative[pos] - (cumulative[start - 1] if start else 0.0))
            seg_n += pos + 1 - start
            recent = history[max(0, offset + pos + 1 - RECENT) : offset + pos + 1]
            before = seg_sum / seg_n if seg_n else float("nan")
            after = float(recent.mean())
            evidence = {
                "detector": self.name,
                "mean_before": _fmt(before),
                "mean_after": _fmt(after),  # the last RECENT values up to the detection
                "direction": "up" if after > before else "down",
                "values_seen": str(self.seen - n + pos + 1),
            }
            if estimate is not None:
                evidence["estimate"] = _fmt(estimate)
            if self.name == "adwin":
                evidence["window"] = str(int(self._river.width))
            self.detections += 1
            out.append((pos, evidence))
            start = pos + 1
            seg_sum, seg_n = 0.0, 0
        self._segment_sum = float(values[start:].sum())
        self._segment_n = n - start
        self._tail = history[-RECENT:]
        return out


def chi2_homogeneity(a: np.ndarray, b: np.ndarray) -> tuple[float, int, float]:
    """Chi-square test that two count vectors come from one distribution: (stat, dof, p)."""
    keep = (a + b) > 0
    a, b = a[keep].astype(np.float64), b[keep].astype(np.float64)
    if len(a) < 2 or a.sum() == 0 or b.sum() == 0:
        return 0.0, 0, 1.0
    total = a.sum() + b.sum()
    column = a + b
    expected_a = column * a.sum() / total
    expected_b = column * b.sum() / total
    stat = float(
        ((a - expected_a) ** 2 / expected_a).sum() + ((b - expected_b) ** 2 / expected_b).sum()
    )
    dof = len(a) - 1
    return stat, dof, float(chdtrc(dof, stat))


class CategoryShift:
    """A frequency-change test: each tumbling window of ``window`` codes against the
    counts accumulated since the last detection (scaled down past ``baseline_max``)."""

    name = "chi2"

    def __init__(self, n_categories: int, policy: CategoryTestPolicy) -> None:
        self.k = n_categories + 1  # the last code is "any other value"
        self.policy = policy
        self.window = np.zeros(self.k, dtype=np.int64)
        self.filled = 0
        self.baseline = np.zeros(self.k, dtype=np.float64)
        self.seen = 0
        self.detections = 0

    def update_many(self, codes: np.ndarray) -> list[tuple[int, dict[str, str]]]:
        out: list[tuple[int, dict[str, str]]] = []
        size = self.policy.window
        start = 0
        n = len(codes)
        while start < n:
            take = min(size - self.filled, n - start)
            self.window += np.bincount(codes[start : start + take], minlength=self.k)[: self.k]
            self.filled += take
            start += take
            if self.filled == size:
                found = self._test()
                if found is not None:
                    out.append((start - 1, found | {"values_seen": str(self.seen + start)}))
                self.window = np.zeros(self.k, dtype=np.int64)
                self.filled = 0
        self.seen += n
        return out

    def _test(self) -> dict[str, str] | None:
        policy = self.policy
        if self.baseline.sum() < policy.window:
            self.baseline += self.window
            return None
        stat, dof, p = chi2_homogeneity(self.baseline, self.window)
        if dof > 0 and p < policy.alpha:
            before = self.baseline / self.baseline.sum()
            now = self.window / self.window.sum()
            moved = int(np.argmax(np.abs(now - before)))
            self.baseline = self.window.astype(np.float64)
            self.detections += 1
            return {
                "detector": self.name,
                "chi2": _fmt(stat),
                "dof": str(dof),
                "p_value": _fmt(p),
                "alpha": _fmt(policy.alpha),
                "window": str(policy.window),
                "most_changed_code": "other" if moved == self.k - 1 else str(moved),
                "share_before": _fmt(float(before[moved])),
                "share_after": _fmt(float(now[moved])),
                "direction": "up" if now[moved] > before[moved] else "down",
            }
        self.baseline += self.window
        total = self.baseline.sum()
        if total > policy.baseline_max:
            self.baseline *= policy.baseline_max / total
        return None


def _stream(signal: str, specs: tuple[DetectorSpec, ...], seed: int) -> list[StreamDetector]:
    return [StreamDetector(spec, seed + i) for i, spec in enumerate(specs)]


class DetectorBank:
    """Every prediction-side detector of one model version on one partition."""

    def __init__(
        self, layout: FeatureLayout, policy: DetectorPolicy, partition: int = 0, seed: int = 0
    ) -> None:
        self.layout = layout
        self.partition = partition
        base = seed * 1_000 + partition
        names = layout.names
        self.numeric: list[tuple[int, str, list[StreamDetector]]] = [
            (j, f"stream_drift.{names[j]}", _stream(names[j], policy.numeric, base + j * 10))
            for j in layout.numeric
            if policy.numeric
        ]
        self.categorical: list[tuple[int, str, CategoryShift]] = (
            [
                (
                    j,
                    f"category_shift.{names[j]}",
                    CategoryShift(len(layout.cat_values[j]), policy.categorical),
                )
                for j in layout.categorical
            ]
            if policy.categorical is not None
            else []
        )
        self.score = _stream("score", policy.score, base + 7_001)
        self.confidence = _stream("confidence", policy.confidence, base + 7_002)

    def update(self, batch: PreparedBatch) -> list[Detection]:
        found: list[Detection] = []
        for j, signal, detectors in self.numeric:
            column = batch.matrix[:, j]
            for det in detectors:
                for pos, ev in det.update_many(column):
                    found.append(Detection(signal, det.name, pos, ev))
        for j, signal, test in self.categorical:
            for pos, ev in test.update_many(batch.codes[j]):
                found.append(Detection(signal, test.name, pos, ev))
        for signal, detectors, values in (
            ("stream_drift.score", self.score, batch.scores),
            ("stream_drift.confidence", self.confidence, batch.confidence),
        ):
            for det in detectors:
                for pos, ev in det.update_many(values):
                    found.append(Detection(signal, det.name, pos, ev))
        found.sort(key=lambda d: d.index)
        return found

    def states(self) -> dict[str, dict[str, float]]:
        """Per signal: values seen, detections, and the current estimate where one exists."""
        out: dict[str, dict[str, float]] = {}
        for _, signal, detectors in self.numeric:
            out[signal] = _summary(detectors)
        for _, signal, test in self.categorical:
            out[signal] = {"seen": float(test.seen), "detections": float(test.detections)}
        out["stream_drift.score"] = _summary(self.score)
        out["stream_drift.confidence"] = _summary(self.confidence)
        return out


def _summary(detectors: list[StreamDetector]) -> dict[str, float]:
    if not detectors:
        return {}
    out = {
        "seen": float(detectors[0].seen),
        "detections": float(sum(d.detections for d in detectors)),
    }
    for det in detectors:
        estimate = det.estimation
        if estimate is not None:
            out["estimate"] = estimate
            break
    return out


class ErrorBank:
    """Detectors on the 0/1 error stream of one model version on one partition."""

    signal = "error_rate"

    TWO_SIDED = frozenset({"adwin", "kswin", "page_hinkley"})

    def __init__(self, policy: DetectorPolicy, partition: int = 0, seed: int = 0) -> None:
        self.detectors = _stream(self.signal, policy.error, seed * 1_000 + partition + 9_001)
        self.increase_only = policy.error_direction == "increase"

    def update(self, errors: np.ndarray) -> list[Detection]:
        """Detections of a rising error rate (DDM and HDDM test only for a rise; the
        two-sided detectors' falls are good news and dropped unless configured)."""
        found: list[Detection] = []
        for det in self.detectors:
            for pos, ev in det.update_many(errors):
                if self.increase_only and det.name in self.TWO_SIDED and ev["direction"] != "up":
                    continue
                found.append(Detection(self.signal, det.name, pos, ev))
        found.sort(key=lambda d: d.index)
        return found
