"""Seeded streams with a drift at a known index pin exactly where each detector fires."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from river.datasets import synth

from scoremesh.contract.featurespec import FeatureRule, FeatureSpec
from services.common.policies.monitor import (
    ADWIN_ERROR,
    ADWIN_FEATURE,
    CategoryTestPolicy,
    DetectorPolicy,
    DetectorSpec,
)
from services.monitor.detectors import CategoryShift, DetectorBank, ErrorBank, StreamDetector
from services.monitor.features import FeatureLayout, PreparedBatch

STEP_AT = 5_000
SEA_DRIFT_AT = 20_000


def numeric_step(seed: int = 7) -> np.ndarray:
    """N(0, 1) for 5,000 values, then N(0.5, 1): MEASURED.md's numeric drift."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(0.0, 1.0, STEP_AT), rng.normal(0.5, 1.0, STEP_AT)])


def sea_errors(n: int = SEA_DRIFT_AT) -> np.ndarray:
    """0/1 errors of a fixed classifier (SEA concept 0: x0 + x1 > 8) on SEA streams whose
    concept switches from variant 0 to variant 3 (threshold 9.5) at index 20,000. An exact
    step: two generators chained, not ConceptDriftStream's sigmoid (MEASURED.md)."""
    stream = itertools.chain(
        itertools.islice(synth.SEA(variant=0, noise=0.1, seed=1), n),
        itertools.islice(synth.SEA(variant=3, noise=0.1, seed=2), n),
    )
    return np.array([float((x[0] + x[1] > 8) != y) for x, y in stream])


def fired(detector: StreamDetector, values: np.ndarray, chunk: int = 512) -> list[int]:
    """Positions in the whole stream, fed in batches as the service does."""
    out: list[int] = []
    for start in range(0, len(values), chunk):
        out += [start + pos for pos, _ in detector.update_many(values[start : start + chunk])]
    return out


def test_the_sea_error_stream_steps_at_its_known_index() -> None:
    errors = sea_errors()
    assert errors[:SEA_DRIFT_AT].mean() == pytest.approx(0.1032)
    assert errors[SEA_DRIFT_AT:].mean() == pytest.approx(0.1997)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        # the default: one detection, 319 errors after the step, none before
        (ADWIN_ERROR, [20_319]),
        # DDM: 3,962 late, then repeats as the error rate keeps its new level
        (DetectorSpec(kind="ddm"), [23_962, 28_531, 28_828, 29_031]),
        # HDDM_A: two false alarms on the stationary part
        (DetectorSpec(kind="hddm_a"), [7_536, 10_790, 20_341]),
    ],
    ids=["adwin", "ddm", "hddm_a"],
)
def test_error_stream_detectors_fire_at_pinned_indices(
    spec: DetectorSpec, expected: list[int]
) -> None:
    assert fired(StreamDetector(spec), sea_errors()) == expected


def test_error_bank_reports_only_a_rising_error_rate() -> None:
    errors = sea_errors()
    reversed_stream = np.concatenate([errors[SEA_DRIFT_AT:], errors[:SEA_DRIFT_AT]])
    policy = DetectorPolicy(error=(ADWIN_ERROR,))
    bank = ErrorBank(policy)
    rising = [d.index for d in bank.update(errors)]
    falling_bank = ErrorBank(policy)
    assert rising == [20_319]
    assert falling_bank.update(reversed_stream) == []  # it did fire, downwards: good news
    assert falling_bank.detectors[0].detections == 1


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        # the default: 87 values after the step, no false alarm
        (ADWIN_FEATURE, [5_087]),
        # PageHinkley: fast but noisy (MEASURED.md: 67 false alarms), so not a default
        (DetectorSpec(kind="page_hinkley"), [924, 4_600, 5_043, 7_011, 7_939, 8_517, 9_520]),
        # KSWIN at ~300 µs/update only ever sees every 10th value
        (DetectorSpec(kind="kswin", sample_every=10), [1_130, 5_290, 6_880, 8_110]),
    ],
    ids=["adwin", "page_hinkley", "kswin_sampled"],
)
def test_numeric_detectors_fire_at_pinned_indices(spec: DetectorSpec, expected: list[int]) -> None:
    assert fired(StreamDetector(spec, seed=1), numeric_step()) == expected


def test_batching_does_not_move_a_detection() -> None:
    values = numeric_step()
    assert fired(StreamDetector(ADWIN_FEATURE), values, chunk=10_000) == [5_087]
    assert fired(StreamDetector(ADWIN_FEATURE), values, chunk=7) == [5_087]
    kswin = DetectorSpec(kind="kswin", sample_every=10)
    assert fired(StreamDetector(kswin, seed=1), values, chunk=33) == [1_130, 5_290, 6_880, 8_110]


def test_detection_evidence_says_which_way_the_stream_moved() -> None:
    detector = StreamDetector(ADWIN_FEATURE)
    ((pos, evidence),) = detector.update_many(numeric_step())
    assert pos == 5_087 and evidence["direction"] == "up"
    assert float(evidence["mean_before"]) < 0.1 < 0.25 < float(evidence["mean_after"])
    assert evidence["values_seen"] == "5088" and int(evidence["window"]) > 0


def test_category_frequency_change_fires_at_the_window_after_the_shift() -> None:
    rng = np.random.default_rng(3)
    codes = np.concatenate(
        [
            rng.choice(4, 10_000, p=[0.5, 0.3, 0.2, 0.0]),
            rng.choice(4, 10_000, p=[0.35, 0.3, 0.35, 0.0]),
        ]
    )
    test = CategoryShift(3, CategoryTestPolicy(window=500, alpha=1e-5))
    found = test.update_many(codes)
    assert [pos for pos, _ in found] == [10_499]
    evidence = found[0][1]
    assert evidence["most_changed_code"] == "0" and evidence["direction"] == "down"
    assert float(evidence["p_value"]) < 1e-5


def test_category_test_is_quiet_on_a_stationary_stream() -> None:
    for seed in range(5):
        codes = np.random.default_rng(50 + seed).choice(9, 100_000)
        assert CategoryShift(9, CategoryTestPolicy()).update_many(codes) == []


def _layout() -> FeatureLayout:
    spec = FeatureSpec(
        features=[
            FeatureRule(name="x", dtype="double"),
            FeatureRule(name="colour", dtype="string", categories=["red", "green", "blue"]),
        ],
        classes=["0", "1"],
    )
    return FeatureLayout.of(spec)


def _batch(x: np.ndarray, colours: np.ndarray, scores: np.ndarray) -> PreparedBatch:
    n = len(x)
    return PreparedBatch(
        matrix=np.stack([x, colours.astype(np.float64)], axis=1).astype(np.float32),
        nulls=np.zeros((n, 0), dtype=bool),
        out_of_range=np.zeros((n, 0), dtype=bool),
        codes={1: colours},
        scores=scores,
        confidence=np.maximum(scores, 1 - scores),
        decisions=(scores >= 0.5).astype(np.int64),
        event_times=np.arange(n, dtype=np.int64),
    )


def test_detector_bank_pins_every_prediction_signal() -> None:
    """Feature, category, score and confidence detectors of one version on one partition."""
    rng = np.random.default_rng(11)
    n = 10_000
    x = numeric_step()
    colours = np.concatenate([rng.choice(3, STEP_AT, p=[0.6, 0.3, 0.1]), rng.choice(3, STEP_AT)])
    # scores move up and towards 0.5: the model grows less sure of its decisions
    scores = np.concatenate([rng.beta(2, 5, STEP_AT), rng.beta(3, 3, STEP_AT)])
    bank = DetectorBank(_layout(), DetectorPolicy(), partition=0)
    found: list[tuple[str, int, str]] = []
    for start in range(0, n, 512):
        rows = slice(start, start + 512)
        batch = _batch(x[rows], colours[rows], scores[rows])
        found += [(d.signal, start + d.index, d.direction) for d in bank.update(batch)]
    assert found == [
        ("stream_drift.x", 5_087, "up"),
        ("stream_drift.score", 5_087, "up"),
        ("stream_drift.confidence", 5_279, "down"),
        ("category_shift.colour", 5_499, "down"),
    ]
