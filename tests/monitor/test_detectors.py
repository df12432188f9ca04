"""Seeded streams with a drift at a known index pin exactly where each detector fires."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from river import drift
from river.datasets import synth

from scoremesh.contract.featurespec import FeatureRule, FeatureSpec
from services.common.policies.monitor import BudgetPolicy, DetectorPolicy, DetectorSpec
from services.monitor.detectors import DetectorBank, ErrorBank, StreamDetector, signal_delta
from services.monitor.features import FeatureLayout, PreparedBatch

ADWIN = DetectorSpec(kind="adwin")
ADWIN_ERROR = DetectorSpec(kind="adwin", params={"delta": 0.002})
ADWIN_FEATURE = DetectorSpec(kind="adwin", params={"delta": 0.0002})

STEP_AT = 5_000
SEA_DRIFT_AT = 20_000


def numeric_step(seed: int = 7) -> np.ndarray:
    """N(0, 1) for 5,000 values, then N(0.5, 1)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(0.0, 1.0, STEP_AT), rng.normal(0.5, 1.0, STEP_AT)])


def sea_errors(n: int = SEA_DRIFT_AT) -> np.ndarray:
    """0/1 errors of a fixed classifier (SEA concept 0: x0 + x1 > 8) on SEA streams whose
    concept switches from variant 0 to variant 3 (threshold 9.5) at index 20,000. An exact
    step: two generators chained (River's ConceptDriftStream ramps with a sigmoid)."""
    stream = itertools.chain(
        itertools.islice(synth.SEA(variant=0, noise=0.1, seed=1), n),
        itertools.islice(synth.SEA(variant=3, noise=0.1, seed=2), n),
    )
    return np.array([float((x[0] + x[1] > 8) != y) for x, y in stream])


def fired(detector: StreamDetector, values: np.ndarray, chunk: int = 512) -> list[int]:
    """Positions in the whole stream, fed in batches as the service does."""
    out: list[int] = []
    for start in range(0, len(values), chunk):
        changes = detector.update_many(values[start : start + chunk])
        out += [start + c.position for c in changes if c.fresh == 0]  # not the re-measures
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
    bank = ErrorBank(policy, 0.002)
    found = [d for d in bank.update(errors) if d.evidence["measured_on"] == "the detection"]
    rising = [d.index for d in found]
    falling_bank = ErrorBank(policy, 0.002)
    assert rising == [20_319]
    # it did fire, downwards: good news
    assert falling_bank.update(reversed_stream) == []
    assert falling_bank.detectors[0].detections == 1
    # the size of the rise, estimated from where the change happened: ~0.10 -> ~0.20
    assert 0.05 < found[0].stats["increase"] < 0.2


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        # the default: 87 values after the step, no false alarm
        (ADWIN_FEATURE, [5_087]),
        # PageHinkley: fast but noisy, so not a default
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


def test_a_detection_measures_the_change_it_found() -> None:
    """The change point is estimated where it happened (5,000), so the shift is the
    step's 0.5 sd, not ADWIN's diluted cut."""
    change, *measured = StreamDetector(ADWIN_FEATURE).update_many(numeric_step())
    assert change.position == 5_087 and change.values_seen == 5_088 and change.fresh == 0
    assert 60 <= change.n_after <= 120
    assert 0.4 < change.shift_sd < 0.8
    # then measured again on the values after it, against the values before the window
    # it was found in (free of the selection that made it fire): what severity judges
    assert [(c.fresh, c.position) for c in measured] == [(64, 5_151), (128, 5_215)]
    assert all(abs(c.mean_before) < 0.1 and 0.3 < c.shift_sd < 0.8 for c in measured)
    assert 0.2 < measured[-1].shift_sd_low < measured[-1].shift_sd


def test_the_fast_loop_decides_exactly_like_river_fed_value_by_value() -> None:
    values = np.concatenate([numeric_step(), numeric_step(8) + 0.5, numeric_step(9)])
    river_adwin = drift.ADWIN(delta=0.0002)
    expected = []
    for i, v in enumerate(values.tolist()):
        river_adwin.update(v)
        if river_adwin.drift_detected:
            expected.append(i)
    assert len(expected) >= 3
    assert fired(StreamDetector(ADWIN_FEATURE), values, chunk=333) == expected


def test_a_restored_snapshot_continues_exactly_where_the_detector_stopped() -> None:
    """JSON round trip mid-stream (no pickle): the same detections, the same evidence."""
    import orjson

    values = np.concatenate([numeric_step(), numeric_step(8) + 0.5])
    whole = StreamDetector(ADWIN_FEATURE)
    expected = [(c.position, c.fresh, round(c.shift_sd, 9)) for c in whole.update_many(values)]
    first = StreamDetector(ADWIN_FEATURE)
    got = [(c.position, c.fresh, round(c.shift_sd, 9)) for c in first.update_many(values[:5_100])]
    state = orjson.loads(orjson.dumps(first.snapshot()))
    second = StreamDetector(ADWIN_FEATURE)
    assert second.restore(state)  # mid-confirmation: the re-measures continue too
    got += [
        (5_100 + c.position, c.fresh, round(c.shift_sd, 9))
        for c in second.update_many(values[5_100:])
    ]
    assert got == expected and len(expected) >= 5
    # a snapshot for another delta (the budget changed) is refused: start over honestly
    assert not StreamDetector(ADWIN, delta=0.001).restore(state)


def test_the_family_budget_is_split_among_signals() -> None:
    layout = _layout()  # one numeric and one categorical feature: 5 signals with score,
    delta = signal_delta(layout, BudgetPolicy(family_delta=0.002))  # confidence, errors
    assert delta == pytest.approx(0.002 / 5)
    bank = DetectorBank(layout, DetectorPolicy(), BudgetPolicy(family_delta=0.002))
    assert bank.numeric[0][2][0].effective_delta == pytest.approx(delta)
    # a categorical feature's share is split again among its categories (3 + "other")
    assert bank.categorical[0][2][0][0].effective_delta == pytest.approx(delta / 4)


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
    """Feature, category-share, score and confidence detectors of one version."""
    rng = np.random.default_rng(11)
    n = 10_000
    x = numeric_step()
    colours = np.concatenate([rng.choice(3, STEP_AT, p=[0.6, 0.3, 0.1]), rng.choice(3, STEP_AT)])
    # scores move up and towards 0.5: the model grows less sure of its decisions
    scores = np.concatenate([rng.beta(2, 5, STEP_AT), rng.beta(3, 3, STEP_AT)])
    bank = DetectorBank(_layout(), DetectorPolicy(), BudgetPolicy(family_delta=0.002))
    found: list[tuple[str, int, str]] = []
    for start in range(0, n, 512):
        rows = slice(start, start + 512)
        batch = _batch(x[rows], colours[rows], scores[rows])
        found += [
            (d.signal, start + d.index, d.direction)
            for d in bank.update(batch)
            if d.evidence["measured_on"].startswith("the detection")
        ]
    # category shares (0.6, 0.3, 0.1) -> uniform: "blue" up, then "red" down, each found
    # by the detector of its share (a tumbling chi-square window needed 500 values)
    assert found == [
        ("stream_drift.x", 5_087, "up"),
        ("stream_drift.score", 5_087, "up"),
        ("category_shift.colour", 5_151, "up"),
        ("category_shift.colour", 5_183, "down"),
        ("stream_drift.confidence", 5_279, "down"),
    ]
