"""Online drift detectors, one per model version and signal, over the version's whole stream.

River's detectors are fed value by value (ADWIN ~0.2 µs per update, PageHinkley ~0.5,
KSWIN ~300, so KSWIN only ever sees a sample: ``sample_every``). Batches arrive as numpy
arrays and ``update_many`` returns the positions in the batch where a detector fired, so
the same code serves the stream and the seeded tests that pin those positions.

Signals, as they appear in alert keys:

- ``stream_drift.<feature>``: each numeric feature;
- ``category_shift.<feature>``: the share of each category of a categorical feature (one
  detector per category, on its 0/1 indicator);
- ``stream_drift.score`` / ``stream_drift.confidence``: the positive-class probability and
  the probability of the decided class (a drop means the model grew unsure);
- ``error_rate``: the 0/1 error stream from predictions.labeled.

Every detection carries the size of the change it found (``stats``): the change point is
estimated in the last 500 values (the maximum of the centred cumulative sum, as in
CUSUM) and "before" and "after" are the values on either side of it (ADWIN's own cut
keeps older values on the new side and would understate a step). Local sides make the
size that of an abrupt change: a slow drift that ADWIN eventually notices moved little
across any one point, and reads small. The sizes the severity rules judge are
conservative: the one-sided 97.5 % lower confidence bound of the difference (so a short,
noisy side cannot make a small change look big): ``shift_sd`` = that bound of |after -
before| / standard deviation (for a category, of its 0/1 indicator: the share's move in
standard deviations; its PSI is evidence), ``increase`` of the error rate by that bound.
The point estimates are in the evidence.

False alarms: an ADWIN without an explicit delta gets its share of the model version's
family-wise budget (``BudgetPolicy``, Bonferroni over the signals).

State is never pickled: ``snapshot`` returns JSON-ready data (River's ADWIN state is the
library's own plain-data encoding, base64) and ``restore`` rebuilds from it.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import version as _installed_version
from typing import Any

import numpy as np
from river import drift
from river.drift import binary

from services.common.policies.monitor import BudgetPolicy, DetectorPolicy, DetectorSpec
from services.monitor.features import FeatureLayout, PreparedBatch

RECENT = 500  # where a change is looked for: the last values before a detection
REFERENCE = 500  # the values before those: what the values after a detection are measured against
MIN_SIDE = 20  # values on each side of an estimated change point at least
Z_LOW = 1.96  # sizes are judged by their lower confidence bound (97.5 %, one-sided)
CONFIRM_AT = (64, 128)  # values after a detection at which its size is measured again
CONFIRM_GATE_SD = 0.3  # ... if the window it fired on shows at least this step (point estimate)
RIVER_VERSION = _installed_version("river")  # River's ADWIN state encoding is per release


@dataclass(frozen=True, slots=True)
class Detection:
    signal: str
    detector: str
    index: int  # position in the batch given to update_many / update_*
    evidence: dict[str, str] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)  # the size of the change

    @property
    def direction(self) -> str:
        return self.evidence.get("direction", "")


def make_river(spec: DetectorSpec, seed: int = 0, delta: float | None = None) -> Any:
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
    if spec.kind == "adwin" and delta is not None:
        params.setdefault("delta", delta)
    try:
        return kinds[spec.kind](**params)
    except TypeError as exc:
        raise ValueError(f"detector {spec.kind!r}: bad parameters {spec.params}: {exc}") from None


def _fmt(value: float) -> str:
    return f"{value:.6g}"


@dataclass(frozen=True, slots=True)
class Change:
    """What one detection found: the stream before and after the cut."""

    position: int
    mean_before: float
    mean_after: float
    n_before: int
    n_after: int
    sd: float
    values_seen: int
    estimate: float | None
    fresh: int = 0  # 0: the detection itself; else measured on this many values after it

    @property
    def shift_sd(self) -> float:
        """The point estimate of |after - before| in standard deviations."""
        gap = abs(self.mean_after - self.mean_before)
        return gap / self.sd if self.sd > 0 else (0.0 if gap == 0 else math.inf)

    @property
    def shift_sd_low(self) -> float:
        """Its one-sided 97.5 % lower confidence bound (what severity rules judge)."""
        if self.sd <= 0:
            return self.shift_sd
        return max(0.0, self.shift_sd - Z_LOW * math.sqrt(1 / self.n_before + 1 / self.n_after))

    @property
    def rate_gap_low(self) -> float:
        """For 0/1 streams: the lower bound of |after - before| (binomial errors)."""
        b, a = self.mean_before, self.mean_after
        se = math.sqrt(b * (1 - b) / self.n_before + a * (1 - a) / self.n_after)
        return max(0.0, abs(a - b) - Z_LOW * se)


class StreamDetector:
    """One River detector over one stream of numbers, with the statistics of its segment."""

    def __init__(self, spec: DetectorSpec, seed: int = 0, delta: float | None = None) -> None:
        self.spec = spec
        self.name = spec.kind
        self.every = spec.sample_every
        self.delta = delta if spec.kind == "adwin" and "delta" not in spec.params else None
        self._river = make_river(spec, seed, delta)
        self.seen = 0  # values offered
        self.fed = 0  # values given to the River detector
        self.detections = 0
        # since the last detection (ADWIN's window is exactly that until it cuts)
        self._shift: float | None = None
        self._n = 0
        self._sum = 0.0
        self._sumsq = 0.0  # of (value - shift)
        self._tail = np.zeros(0, dtype=np.float64)
        # after a detection: [mean before, n before, sd, sum of fresh values, their count]
        self._pending: list[float] | None = None

    @property
    def effective_delta(self) -> float | None:
        value = getattr(self._river, "delta", None)
        return float(value) if isinstance(value, int | float) else None

    @property
    def estimation(self) -> float | None:
        value = getattr(self._river, "estimation", None)
        return float(value) if isinstance(value, int | float) else None

    def _accumulate(self, values: np.ndarray) -> None:
        if len(values) == 0:
            return
        if self._shift is None:
            self._shift = float(values[0])
        centred = values - self._shift
        self._n += len(values)
        self._sum += float(values.sum())
        self._sumsq += float(centred @ centred)

    def _sd(self) -> float:
        if self._n < 2 or self._shift is None:
            return 0.0
        mean_c = self._sum / self._n - self._shift
        var = (self._sumsq - self._n * mean_c * mean_c) / (self._n - 1)
        return math.sqrt(max(var, 0.0))

    def _fire_loop(self, fed: list[float]) -> list[int]:
        """Feed values; the index in ``fed`` of every detection."""
        fired: list[int] = []
        det = self._river
        if self.name == "adwin":
            # River's ADWIN resets on the update after a detection; resetting right away is
            # the same stream of decisions without the wrapper's call per value
            update = det._helper.update
            for i, value in enumerate(fed):
                if update(value):
                    fired.append(i)
                    det._reset()
                    update = det._helper.update
            return fired
        update = det.update
        for i, value in enumerate(fed):
            update(value)
            if det.drift_detected:
                fired.append(i)
        return fired

    def update_many(self, values: np.ndarray) -> list[Change]:
        """Feed a batch; one ``Change`` per detection in it."""
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
        fired = self._fire_loop(fed)
        history = np.concatenate((self._tail, values))
        offset = len(self._tail)
        out: list[Change] = []
        start = 0
        for i in fired:
            pos = i if positions is None else int(positions[i])
            self._confirm(values, start, pos + 1, out)
            self._accumulate(values[start : pos + 1])
            sd = self._sd()
            before, n_before, after, n_after = _around_the_change(
                history[: offset + pos + 1], self._n
            )
            out.append(
                Change(
                    pos,
                    before,
                    after,
                    n_before,
                    n_after,
                    sd,
                    self.seen + pos + 1,
                    self.estimation,
                )
            )
            # sized again on fresh values only when the window itself shows a clear step:
            # a slow drift makes the detector fire again and again on small moves, and
            # each re-measure on a few dozen values is a small chance of a false page
            gap = abs(after - before)
            if sd > 0 and gap / sd >= CONFIRM_GATE_SD:
                reference = _reference_before(history[: offset + pos + 1], self._n)
                self._pending = [*reference, sd, 0.0, 0.0]
                if self._pending[1] == 0:
                    self._pending[:2] = [before, float(n_before)]
            else:
                self._pending = None
            self.detections += 1
            self._shift, self._n, self._sum, self._sumsq = None, 0, 0.0, 0.0
            start = pos + 1
        self._confirm(values, start, n, out)
        self._accumulate(values[start:])
        self.seen += n
        self.fed += len(fed)
        self._tail = history[-(RECENT + REFERENCE) :]
        return out

    def _confirm(self, values: np.ndarray, start: int, end: int, out: list[Change]) -> None:
        """Measure a pending detection on the values that came after it, at CONFIRM_AT
        of them: fresh values carry none of the selection that made the detector fire."""
        pending = self._pending
        if pending is None or end <= start:
            return
        before, n_before, sd, fresh_sum, fresh_n = pending
        segment = values[start:end]
        sums = np.cumsum(segment)
        for at in CONFIRM_AT:
            k = at - int(fresh_n)
            if 0 < k <= len(segment):
                mean = (fresh_sum + float(sums[k - 1])) / at
                pos = start + k - 1
                out.append(
                    Change(
                        pos,
                        before,
                        mean,
                        int(n_before),
                        at,
                        sd,
                        self.seen + pos + 1,
                        self.estimation,
                        fresh=at,
                    )
                )
        pending[3] = fresh_sum + float(sums[-1])
        pending[4] = fresh_n + len(segment)
        if pending[4] >= CONFIRM_AT[-1]:
            self._pending = None

    # --- state without pickle -------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        det = self._river
        river_state: dict[str, Any]
        if self.name == "adwin":
            river_state = {
                "adwin": base64.b64encode(det._helper.__getstate__()).decode(),
                "drift_detected": bool(det._drift_detected),
            }
        else:
            plain = {
                k: v
                for k, v in vars(det).items()
                if isinstance(v, bool | int | float | str) or v is None
            }
            river_state = {"attributes": plain, "complete": len(plain) == len(vars(det))}
        return {
            "kind": self.name,
            "params": dict(self.spec.params),
            "delta": self.delta,
            "seen": self.seen,
            "fed": self.fed,
            "detections": self.detections,
            "segment": [self._shift, self._n, self._sum, self._sumsq],
            "tail": _pack(self._tail),
            "pending": self._pending,
            "river": river_state,
        }

    def restore(self, state: Mapping[str, Any]) -> bool:
        """Take a snapshot's state; False (and left fresh) when it does not fit this spec."""
        if state.get("kind") != self.name or state.get("params") != dict(self.spec.params):
            return False
        if state.get("delta") != self.delta:
            return False  # the budget changed (more features): start over, honestly
        river_state = state.get("river") or {}
        det = self._river
        if self.name == "adwin":
            det._helper.__setstate__(base64.b64decode(river_state["adwin"]))
            det._drift_detected = bool(river_state.get("drift_detected"))
        else:
            if not river_state.get("complete"):
                return False
            for k, v in (river_state.get("attributes") or {}).items():
                setattr(det, k, v)
        self.seen = int(state["seen"])
        self.fed = int(state["fed"])
        self.detections = int(state["detections"])
        shift, n, total, sumsq = state["segment"]
        self._shift = None if shift is None else float(shift)
        self._n, self._sum, self._sumsq = int(n), float(total), float(sumsq)
        self._tail = _unpack(state["tail"])
        pending = state.get("pending")
        self._pending = [float(v) for v in pending] if pending else None
        return True


def _around_the_change(history: np.ndarray, segment: int) -> tuple[float, int, float, int]:
    """(mean before, count, mean after, count) on either side of the most likely change
    point among the last ``RECENT`` values of the segment: the split that maximises the
    centred cumulative sum. Both sides are local, so a step shows its full size while a
    slow drift (a trend, a season, a random walk) shows only what moved across the split."""
    w = history[-min(RECENT, segment, len(history)) :]
    n = len(w)
    if n < 2 * MIN_SIDE:
        half = max(1, n // 2)
        return float(w[:half].mean()), half, float(w[half:].mean()) if n > half else 0.0, n - half
    bridge = np.abs(np.cumsum(w - w.mean()))
    split = MIN_SIDE - 1 + int(np.argmax(bridge[MIN_SIDE - 1 : n - MIN_SIDE]))
    before, after = w[: split + 1], w[split + 1 :]
    return float(before.mean()), len(before), float(after.mean()), len(after)


def _reference_before(history: np.ndarray, segment: int) -> tuple[float, float]:
    """(mean, count) of the REFERENCE values before the window a detection was found in
    (within the segment since the previous detection), or (0, 0) when there are too few.
    The detector fired on the window, so the window is biased; the values before it are
    not, and a slow drift moves them by little."""
    end = len(history) - RECENT
    start = max(len(history) - min(segment, len(history)), end - REFERENCE)
    if end - start < MIN_SIDE * 5:
        return 0.0, 0.0
    ref = history[start:end]
    return float(ref.mean()), float(len(ref))


def _pack(values: np.ndarray) -> dict[str, str]:
    """Values as base64 of the narrowest dtype that holds them exactly (0/1 streams: one
    byte each, float32 features: four)."""
    for dtype in ("|u1", "<f4", "<f8"):
        narrow = values.astype(dtype)
        if np.array_equal(narrow.astype(np.float64), values):
            return {"dtype": dtype, "b64": base64.b64encode(narrow.tobytes()).decode()}
    raise AssertionError("float64 holds every float64")


def _unpack(packed: Mapping[str, str]) -> np.ndarray:
    raw = base64.b64decode(packed["b64"])
    return np.frombuffer(raw, dtype=packed["dtype"]).astype(np.float64)


def binary_psi(before: float, after: float, epsilon: float = 1e-4) -> float:
    """PSI of a share and its complement (one category against the rest)."""
    out = 0.0
    for a, e in ((after, before), (1.0 - after, 1.0 - before)):
        a, e = max(a, epsilon), max(e, epsilon)
        out += (a - e) * math.log(a / e)
    return out


def signal_count(layout: FeatureLayout) -> int:
    """Signals of a version that share its false-alarm budget: features, score,
    confidence and the error rate."""
    return len(layout.numeric) + len(layout.categorical) + 3


def signal_delta(layout: FeatureLayout, budget: BudgetPolicy) -> float:
    return budget.family_delta / signal_count(layout)


def _stream(specs: tuple[DetectorSpec, ...], seed: int, delta: float) -> list[StreamDetector]:
    return [StreamDetector(spec, seed + i, delta) for i, spec in enumerate(specs)]


def _numeric_detection(signal: str, detector: str, change: Change) -> Detection:
    evidence = {
        "detector": detector,
        "mean_before": _fmt(change.mean_before),
        "mean_after": _fmt(change.mean_after),
        "n_before": str(change.n_before),
        "n_after": str(change.n_after),
        "sd": _fmt(change.sd),
        "shift_sd": _fmt(change.shift_sd_low),
        "shift_sd_point": _fmt(change.shift_sd),
        "direction": "up" if change.mean_after > change.mean_before else "down",
        "values_seen": str(change.values_seen),
    }
    if change.estimate is not None:
        evidence["estimate"] = _fmt(change.estimate)
    return Detection(signal, detector, change.position, evidence, _sized(change, evidence))


def _sized(change: Change, evidence: dict[str, str]) -> dict[str, float]:
    """The statistics severity rules judge: none at the detection itself (info: the values
    that made the detector fire overstate the change), the lower bound of the shift on
    the values that came after it."""
    if change.fresh == 0:
        evidence["measured_on"] = "the detection (sized on the next values)"
        return {}
    evidence["measured_on"] = f"{change.fresh} values after the detection"
    return {"shift_sd": change.shift_sd_low}


def _with_delta(detection: Detection, det: StreamDetector) -> Detection:
    delta = det.effective_delta
    if delta is not None:
        detection.evidence["delta"] = f"{delta:.3g}"
    return detection


class DetectorBank:
    """Every prediction-side detector of one model version (its whole stream)."""

    def __init__(
        self,
        layout: FeatureLayout,
        policy: DetectorPolicy,
        budget: BudgetPolicy | None = None,
        seed: int = 0,
    ) -> None:
        self.layout = layout
        self.delta = signal_delta(layout, budget or BudgetPolicy())
        names = layout.names
        base = seed * 1_000
        self.numeric: list[tuple[int, str, list[StreamDetector]]] = [
            (j, f"stream_drift.{names[j]}", _stream(policy.numeric, base + j * 10, self.delta))
            for j in layout.numeric
            if policy.numeric
        ]
        # per categorical feature: one detector list per code 0..k (k: any other value),
        # the feature's share of the budget split among its categories
        self.categorical: list[tuple[int, str, list[list[StreamDetector]]]] = [
            (
                j,
                f"category_shift.{names[j]}",
                [
                    _stream(
                        policy.categorical,
                        base + j * 10 + 5_000 + c,
                        self.delta / (len(layout.cat_values[j]) + 1),
                    )
                    for c in range(len(layout.cat_values[j]) + 1)
                ],
            )
            for j in layout.categorical
            if policy.categorical
        ]
        self.score = _stream(policy.score, base + 7_001, self.delta)
        self.confidence = _stream(policy.confidence, base + 7_002, self.delta)

    def update(self, batch: PreparedBatch) -> list[Detection]:
        found: list[Detection] = []
        for j, signal, detectors in self.numeric:
            column = batch.matrix[:, j]
            for det in detectors:
                for change in det.update_many(column):
                    found.append(_with_delta(_numeric_detection(signal, det.name, change), det))
        for j, signal, per_code in self.categorical:
            codes = batch.codes[j]
            k = len(per_code) - 1
            for code, detectors in enumerate(per_code):
                indicator = (codes == code).astype(np.float64)
                for det in detectors:
                    for change in det.update_many(indicator):
                        found.append(
                            _with_delta(self._category(signal, det.name, j, code, k, change), det)
                        )
        for signal, detectors, values in (
            ("stream_drift.score", self.score, batch.scores),
            ("stream_drift.confidence", self.confidence, batch.confidence),
        ):
            for det in detectors:
                for change in det.update_many(values):
                    found.append(_with_delta(_numeric_detection(signal, det.name, change), det))
        found.sort(key=lambda d: d.index)
        return found

    def _category(
        self, signal: str, detector: str, j: int, code: int, k: int, change: Change
    ) -> Detection:
        before, after = change.mean_before, change.mean_after
        value = "other" if code == k else _category_name(self.layout, j, code)
        psi = binary_psi(before, after)
        evidence = {
            "detector": detector,
            "category": value,
            "share_before": _fmt(before),
            "share_after": _fmt(after),
            "n_before": str(change.n_before),
            "n_after": str(change.n_after),
            "psi": _fmt(psi),
            "shift_sd": _fmt(change.shift_sd_low),
            "shift_sd_point": _fmt(change.shift_sd),
            "direction": "up" if after > before else "down",
            "values_seen": str(change.values_seen),
        }
        return Detection(signal, detector, change.position, evidence, _sized(change, evidence))

    def detectors(self) -> dict[str, list[StreamDetector]]:
        """Every detector by a stable name (snapshot keys)."""
        out: dict[str, list[StreamDetector]] = {}
        for _, signal, detectors in self.numeric:
            out[signal] = detectors
        for _, signal, per_code in self.categorical:
            for code, detectors in enumerate(per_code):
                out[f"{signal}#{code}"] = detectors
        out["stream_drift.score"] = self.score
        out["stream_drift.confidence"] = self.confidence
        return out

    def states(self) -> dict[str, dict[str, float]]:
        """Per signal: values seen, detections, and the current estimate where one exists."""
        out: dict[str, dict[str, float]] = {}
        for _, signal, detectors in self.numeric:
            out[signal] = _summary(detectors)
        for _, signal, per_code in self.categorical:
            out[signal] = {
                "seen": float(per_code[0][0].seen) if per_code and per_code[0] else 0.0,
                "detections": float(sum(d.detections for ds in per_code for d in ds)),
            }
        out["stream_drift.score"] = _summary(self.score)
        out["stream_drift.confidence"] = _summary(self.confidence)
        return out


def _category_name(layout: FeatureLayout, j: int, code: int) -> str:
    cats = layout.spec.features[j].categories or []
    return str(cats[code]) if code < len(cats) else str(code)


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
    """Detectors on the 0/1 error stream of one model version (its whole labelled stream)."""

    signal = "error_rate"

    TWO_SIDED = frozenset({"adwin", "kswin", "page_hinkley"})

    def __init__(self, policy: DetectorPolicy, delta: float, seed: int = 0) -> None:
        self.detectors = _stream(policy.error, seed * 1_000 + 9_001, delta)
        self.increase_only = policy.error_direction == "increase"

    def update(self, errors: np.ndarray) -> list[Detection]:
        """Detections of a rising error rate (DDM and HDDM test only for a rise; the
        two-sided detectors' falls are good news and dropped unless configured)."""
        found: list[Detection] = []
        for det in self.detectors:
            for change in det.update_many(errors):
                increase = change.mean_after - change.mean_before
                if self.increase_only and det.name in self.TWO_SIDED and increase <= 0:
                    continue
                bound = math.copysign(change.rate_gap_low, increase)
                evidence = {
                    "detector": det.name,
                    "rate_before": _fmt(change.mean_before),
                    "rate_after": _fmt(change.mean_after),
                    "n_before": str(change.n_before),
                    "n_after": str(change.n_after),
                    "increase": _fmt(bound),
                    "increase_point": _fmt(increase),
                    "measured_on": f"{change.fresh} values after the detection"
                    if change.fresh
                    else "the detection",
                    "direction": "up" if increase > 0 else "down",
                    "values_seen": str(change.values_seen),
                }
                found.append(
                    _with_delta(
                        Detection(
                            self.signal, det.name, change.position, evidence, {"increase": bound}
                        ),
                        det,
                    )
                )
        found.sort(key=lambda d: d.index)
        return found

    @property
    def estimation(self) -> float | None:
        for det in self.detectors:
            if det.estimation is not None:
                return det.estimation
        return None
