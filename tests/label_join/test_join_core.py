"""The join and its metrics, without a broker: scikit-learn on the same joined rows is the oracle."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import orjson
import pytest
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
)

from scoremesh.contract.codec import CodecError, codec
from services.common.performance import GroupStats, merge_all
from services.common.registry_view import RegistryState
from services.label_join.join import (
    DAY_MS,
    HOUR_MS,
    Binner,
    Entry,
    JoinConfig,
    JoinCore,
    OutputTopics,
    VersionCatalog,
    VersionInfo,
    state_record,
)
from services.label_join.rows import EventRows
from tests.label_join.factories import (
    AGE_EDGES,
    T0,
    Scenario,
    encode_label,
    encode_prediction,
    label,
    model_version,
    prediction,
    record,
    scenario,
)

TOPICS = OutputTopics("predictions.labeled", "training.examples", "labels.unmatched")
CONFIG = JoinConfig(window_ms=DAY_MS, grace_ms=HOUR_MS, tumbling_ms=HOUR_MS, sliding_ms=DAY_MS)

Batch = tuple[list[dict[str, Any]], list[dict[str, Any]]]  # (predictions, labels)


def make_core(config: JoinConfig = CONFIG, registry: bool = True) -> JoinCore:
    catalog = VersionCatalog("credit")
    if registry:
        state = RegistryState()
        state.apply(model_version("1.0.0", "champion", 2))
        state.apply(model_version("1.1.0", "shadow", 3))
        catalog.update(state)
    core = JoinCore(config, catalog, TOPICS, clock=lambda: 1_800_000_000.0)
    core.restore(0, [])
    return core


def batches_of(s: Scenario, size: int = 97, seed: int = 1) -> list[Batch]:
    """Early labels, then predictions interleaved with the labels, then the unknown-event
    labels, the flush that closes the window, and the labels that come too late."""
    rng = random.Random(seed)
    out: list[Batch] = [([], s.early_labels)]
    preds, labs = list(s.predictions), list(s.labels)
    while preds or labs:
        take_p = rng.randint(0, size) if labs else size
        take_l = rng.randint(0, size) if preds else size
        out.append((preds[:take_p], labs[:take_l]))
        preds, labs = preds[take_p:], labs[take_l:]
    out.append(([], s.unknown))
    out.append((s.flush, []))
    out.append(([], s.late_labels))
    return out


class Run:
    """Feeds batches to a core and keeps its outputs, changelog and published shards."""

    def __init__(self, core: JoinCore) -> None:
        self.core = core
        self.outputs: dict[str, list[dict[str, Any]]] = {
            t: [] for t in (TOPICS.labeled, TOPICS.examples, TOPICS.unmatched)
        }
        self.changelog: list[tuple[bytes, bytes | None]] = []
        self.shards: dict[tuple[Any, int], GroupStats] = {}
        self.offset = 0

    def feed(self, batch: Batch) -> list[tuple[bytes, bytes | None]]:
        preds, labs = batch
        p_records = [
            record("predictions", p["event_id"], encode_prediction(p), offset=self._next())
            for p in preds
        ]
        l_records = [
            record("labels", lab["event_id"], encode_label(lab), offset=self._next())
            for lab in labs
        ]
        result = self.core.process(p_records, l_records)
        for out in result.outputs:
            name = {
                "predictions.labeled": "LabeledPrediction",
                "training.examples": "TrainingExample",
                "labels.unmatched": "UnmatchedLabel",
            }[out.topic]
            self.outputs[out.topic].append(codec(name).decode(out.value))
        written = [(key, value) for _, key, value in result.changelog]
        self.changelog.extend(written)
        self.collect()
        return written

    def collect(self) -> None:
        shards, _ = self.core.take_dirty()
        self.shards.update(shards)

    def _next(self) -> int:
        self.offset += 1
        return self.offset

    def window_stats(
        self, variant: str, segment: str = "all", before: int = T0 + DAY_MS
    ) -> GroupStats:
        picked = [
            s
            for (key, _), s in self.shards.items()
            if key[2] == variant and key[3] == segment and key[4] < before
        ]
        merged = merge_all(picked)
        assert merged is not None, f"no stats for {variant}/{segment}"
        return merged


def expected_rows(
    s: Scenario, variant: str, channel: str | None = None
) -> tuple[list[str], list[str], list[float], list[dict[str, Any]], list[int]]:
    truth, decisions, p1, feats, delays = [], [], [], [], []
    for p in s.predictions:
        if p["variant"] != variant or p["event_id"] not in s.truth:
            continue
        if channel is not None and p["attributes"]["channel"] != channel:
            continue
        truth.append(s.truth[p["event_id"]])
        decisions.append(p["decision"])
        p1.append(p["scores"]["1"])
        feats.append(p["features"])
        delays.append(s.label_times[p["event_id"]] - p["event_time"])
    return truth, decisions, p1, feats, delays


def sklearn_metrics(truth: list[str], decisions: list[str], p1: list[float]) -> dict[str, float]:
    y = np.array(truth)
    proba = np.array([[1.0 - p, p] for p in p1])
    return {
        "accuracy": accuracy_score(y, decisions),
        "precision": precision_score(y, decisions, pos_label="1", zero_division=0),
        "recall": recall_score(y, decisions, pos_label="1", zero_division=0),
        "f1": f1_score(y, decisions, pos_label="1", zero_division=0),
        "log_loss": log_loss(y, proba, labels=["0", "1"]),
        "brier": brier_score_loss(y == "1", np.array(p1)),
    }


def assert_matches_sklearn(
    stats: GroupStats, s: Scenario, variant: str, channel: str | None
) -> None:
    truth, decisions, p1, _, _ = expected_rows(s, variant, channel)
    metrics = stats.metrics()
    assert stats.labeled == len(truth)
    for name, value in sklearn_metrics(truth, decisions, p1).items():
        assert metrics[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


@pytest.fixture(scope="module")
def clean_run() -> tuple[Scenario, Run]:
    s = scenario(600, seed=5, window_ms=CONFIG.window_ms)
    run = Run(make_core())
    for batch in batches_of(s):
        run.feed(batch)
    return s, run


@pytest.mark.parametrize("variant", ["champion", "shadow"])
@pytest.mark.parametrize("channel", [None, "web", "branch", "partner"])
def test_out_of_order_duplicate_missing_and_late_labels_give_sklearns_metrics(
    clean_run: tuple[Scenario, Run], variant: str, channel: str | None
) -> None:
    s, run = clean_run
    segment = "all" if channel is None else f"channel={channel}"
    assert_matches_sklearn(run.window_stats(variant, segment), s, variant, channel)


def test_counts_coverage_and_expiry_of_the_closed_window(clean_run: tuple[Scenario, Run]) -> None:
    s, run = clean_run
    stats = run.window_stats("champion")
    n = len(s.predictions) // 2
    assert stats.predicted == n
    assert stats.labeled == len(s.truth)
    assert stats.expired_unlabeled == n - len(s.truth)  # closed by the flush
    assert stats.metrics()["coverage"] == pytest.approx(len(s.truth) / n)
    assert run.core.counts["expired_unlabeled"] == 2 * (n - len(s.truth))


def test_error_rate_by_feature_bin_matches_a_direct_count(clean_run: tuple[Scenario, Run]) -> None:
    s, run = clean_run
    metrics = run.window_stats("champion").metrics()
    truth, decisions, _, feats, _ = expected_rows(s, "champion")
    ages = np.array([f["age"] for f in feats])
    wrong = np.array([t != d for t, d in zip(truth, decisions, strict=True)])
    bins = np.searchsorted(np.array(AGE_EDGES[1:-1]), ages, side="right")
    for b in np.unique(bins):
        assert metrics[f"n:age:bin{b}"] == (bins == b).sum()
        assert metrics[f"error_rate:age:bin{b}"] == pytest.approx(wrong[bins == b].mean())
    zips = np.array([f["zipcode"] for f in feats])
    for z in np.unique(zips):
        assert metrics[f"error_rate:zipcode:{z}"] == pytest.approx(wrong[zips == z].mean())
    # segments carry no bins (cardinality); "all" does
    assert not any(
        k.startswith("n:") for k in run.window_stats("champion", "channel=web").metrics()
    )


def test_label_delay_percentiles_are_within_the_histogram_resolution(
    clean_run: tuple[Scenario, Run],
) -> None:
    s, run = clean_run
    metrics = run.window_stats("champion").metrics()
    *_, delays = expected_rows(s, "champion")
    for q in (50, 90, 99):
        exact = float(np.percentile(delays, q, method="inverted_cdf"))
        assert metrics[f"label_delay_p{q}_ms"] == pytest.approx(exact, rel=0.045), q


def test_outputs_deduplicated_by_key_are_exactly_the_joined_rows(
    clean_run: tuple[Scenario, Run],
) -> None:
    s, run = clean_run
    labeled = latest_by(run.outputs["predictions.labeled"], ("event_id", "variant"))
    assert {k: v["label"] for k, v in labeled.items()} == {
        (e, variant): y for e, y in s.truth.items() for variant in ("champion", "shadow")
    }
    sample = next(iter(labeled.values()))
    assert sample["label_delay_ms"] == s.label_times[sample["event_id"]] - sample["event_time"]
    assert sample["correct"] == (sample["decision"] == sample["label"])
    assert sample["attributes"]["channel"] in ("web", "branch", "partner")
    examples = latest_by(run.outputs["training.examples"], ("event_id",))
    assert {k[0]: v["label"] for k, v in examples.items()} == s.truth
    assert examples[(next(iter(s.truth)),)]["features"].keys() == {"age", "salary", "zipcode"}


def test_unmatched_labels_carry_their_reason(clean_run: tuple[Scenario, Run]) -> None:
    s, run = clean_run
    reasons: dict[str, set[str]] = {}
    for u in run.outputs["labels.unmatched"]:
        reasons.setdefault(u["reason"], set()).add(u["event_id"])
    assert reasons == {
        "too_late": {lab["event_id"] for lab in s.late_labels},
        "unknown_event": {lab["event_id"] for lab in s.unknown},
    }
    unknown = next(u for u in run.outputs["labels.unmatched"] if u["reason"] == "unknown_event")
    assert codec("Label").decode(unknown["original"])["event_id"] == unknown["event_id"]


def latest_by(rows: Iterable[dict[str, Any]], key: tuple[str, ...]) -> dict[tuple[Any, ...], Any]:
    """Downstream dedupe: per key, the row with the newest label_time (then the last sent)."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        k = tuple(row[f] for f in key)
        if k not in out or row["label_time"] >= out[k]["label_time"]:
            out[k] = row
    return out


def final_view(run: Run) -> dict[tuple[Any, ...], tuple[int, int, int, float, float]]:
    """Per group and window: exact counts and the loss sums, as the publisher would merge them."""
    return {
        key: (s.predicted, s.labeled, s.expired_unlabeled, s.log_loss_sum, s.brier_sum)
        for (key, _), s in run.shards.items()
    }


@pytest.mark.parametrize("crash_at", [1, 3, 5, 8, -3, -2])
def test_a_crash_mid_batch_and_replay_changes_no_total(crash_at: int) -> None:
    """Kill after any batch's outputs are acknowledged but with only part of its changelog
    written and its offsets not committed; restore from the changelog and replay from the
    batch: every count and sum ends exactly as without the crash."""
    s = scenario(300, seed=9, window_ms=CONFIG.window_ms)
    batches = batches_of(s, size=61, seed=3)
    clean = Run(make_core())
    for batch in batches:
        clean.feed(batch)

    crashed = Run(make_core())
    k = crash_at % len(batches)
    for batch in batches[:k]:
        crashed.feed(batch)
    written = crashed.feed(batches[k])
    kept = written[: len(written) // 2]  # the rest never reached the broker
    survivor = crashed.changelog[: len(crashed.changelog) - len(written)] + kept
    restarted = Run(make_core())
    restarted.core.restore(0, survivor)
    restarted.changelog = list(survivor)
    restarted.shards = dict(crashed.shards)  # what the publisher had put in Redis
    restarted.collect()
    restarted.outputs = {t: list(v) for t, v in crashed.outputs.items()}
    for batch in batches[k:]:
        restarted.feed(batch)

    expected, got = final_view(clean), final_view(restarted)
    assert got.keys() == expected.keys()
    for key, (pred, lab, exp, ll, br) in expected.items():
        g = got[key]
        assert g[:3] == (pred, lab, exp), key
        assert g[3] == pytest.approx(ll, rel=1e-9) and g[4] == pytest.approx(br, rel=1e-9)
    clean_labeled = latest_by(clean.outputs["predictions.labeled"], ("event_id", "variant"))
    got_labeled = latest_by(restarted.outputs["predictions.labeled"], ("event_id", "variant"))
    assert {k: v["label"] for k, v in got_labeled.items()} == {
        k: v["label"] for k, v in clean_labeled.items()
    }


def test_restore_from_the_changelog_rebuilds_identical_statistics() -> None:
    s = scenario(300, seed=2, window_ms=CONFIG.window_ms)
    run = Run(make_core())
    for batch in batches_of(s)[:-3]:  # window still open
        run.feed(batch)
    live = {k: v.to_json() for k, v in run.core.partitions[0].stats.items()}
    restored = make_core()
    ps = restored.restore(0, run.changelog)
    assert {k: v for k, v in ps.stats.items()}.keys() == live.keys()
    for key, blob in live.items():
        a, b = GroupStats.from_json(blob), ps.stats[key]
        assert (a.predicted, a.labeled, a.confusion, a.delays, a.bins) == (
            b.predicted,
            b.labeled,
            b.confusion,
            b.delays,
            b.bins,
        )
        assert a.log_loss_sum == pytest.approx(b.log_loss_sum, rel=1e-12)
    assert ps.watermark == run.core.partitions[0].watermark


def as_version_1(key: bytes, value: bytes | None) -> tuple[bytes, bytes | None]:
    """A changelog record as the join wrote it before heads were kept as bytes (JSON with
    the decoded entity, features and attributes)."""
    if value is not None and value[:2] == b"\xc3\x01":  # kept as its one Prediction
        value = Entry.decode(key.decode(), value, EventRows()).encode()
    if value is None or b"\n" not in value:
        return key, value
    meta, _, head = value.partition(b"\n")
    raw = orjson.loads(meta)
    fields = EventRows().decode_head(head) if head else {}
    old = {
        "v": 1,
        "t": raw["t"],
        "e": fields.get("entity_id", ""),
        "f": fields.get("features"),
        "a": fields.get("attributes", {}),
        "p": raw["p"],
        "l": raw["l"],
    }
    return key, orjson.dumps(old)


def test_a_changelog_written_before_heads_restores_the_same_state() -> None:
    """Upgrading a running join: state restored from version-1 records joins the rest of
    the stream exactly as state restored from today's records."""
    s = scenario(300, seed=4, window_ms=CONFIG.window_ms)
    batches = batches_of(s)
    first = Run(make_core())
    for batch in batches[:-3]:
        first.feed(batch)
    old = [as_version_1(k, v) for k, v in first.changelog]
    assert any(v is not None and v.startswith(b'{"v":1,') and b'"f":{' in v for _, v in old)
    runs = []
    for changelog in (first.changelog, old):
        run = Run(make_core())
        run.core.restore(0, changelog)
        for batch in batches[-3:]:
            run.feed(batch)
        runs.append(run)
    assert runs[0].outputs == runs[1].outputs
    assert final_view(runs[0]) == final_view(runs[1])
    assert runs[0].changelog == runs[1].changelog  # rewritten entries come out as version 2


def test_duplicate_predictions_are_idempotent_and_a_label_joins_every_variant() -> None:
    run = Run(make_core())
    p = prediction("x1", T0, {"age": 30, "salary": 1.0, "zipcode": 1}, 0.8)
    shadow = prediction("x1", T0, p["features"], 0.3, "shadow", "1.1.0")
    run.feed(([p, p], []))
    run.feed(([p, shadow], [label("x1", "1", T0 + 10)]))
    run.feed(([shadow], [label("x1", "1", T0 + 20)]))  # same value again: nothing new
    assert run.core.counts["prediction_duplicate"] == 3
    assert run.core.counts["label_duplicate"] == 1
    assert sorted(o["variant"] for o in run.outputs["predictions.labeled"]) == [
        "champion",
        "shadow",
    ]
    assert len(run.outputs["training.examples"]) == 1
    champion = run.window_stats("champion")
    assert (champion.predicted, champion.labeled) == (1, 1)


def test_a_correction_replaces_the_label_everywhere() -> None:
    run = Run(make_core())
    p = prediction("x1", T0, {"age": 30, "salary": 1.0, "zipcode": 1}, 0.8)
    run.feed(([p], [label("x1", "0", T0 + 10)]))
    assert run.window_stats("champion").metrics()["accuracy"] == 0.0
    run.feed(([], [label("x1", "1", T0 + 20)]))  # newer and different: it wins
    run.feed(([], [label("x1", "0", T0 + 15)]))  # older than the held one: ignored
    stats = run.window_stats("champion")
    assert (stats.labeled, stats.metrics()["accuracy"]) == (1, 1.0)
    assert [o["label"] for o in run.outputs["predictions.labeled"]] == ["0", "1"]
    assert [o["label"] for o in run.outputs["training.examples"]] == ["0", "1"]
    assert run.core.counts["label_superseded"] == 1


def test_invalid_labels_go_to_unmatched_with_the_reason() -> None:
    run = Run(make_core())
    bad = [
        record("labels", "k1", b"\x00garbage"),
        record("labels", "k2", encode_label(label("x2", "maybe", T0))),
        record("labels", "k3", encode_label(label("", "1", T0))),
        record("labels", "k4", encode_label(label("x4", "1", -5))),
    ]
    result = run.core.process([], bad)
    decoded = [codec("UnmatchedLabel").decode(o.value) for o in result.outputs]
    assert [(d["reason"], d["event_id"]) for d in decoded] == [
        ("undecodable", "k1"),
        ("invalid_class", "x2"),
        ("invalid_label", "k3"),
        ("invalid_label", "x4"),
    ]
    assert decoded[0]["original"] == b"\x00garbage"
    assert "not one of the model's classes" in decoded[1]["detail"]


def test_any_class_is_accepted_while_no_version_is_known() -> None:
    run = Run(make_core(registry=False))
    p = prediction("x1", T0, {"age": 30, "salary": 1.0, "zipcode": 1}, 0.8)
    run.feed(([p], [label("x1", "1", T0 + 5)]))
    assert len(run.outputs["predictions.labeled"]) == 1
    stats = run.window_stats("champion")  # classes from the scores, no segments, no bins
    assert stats.classes == ("0", "1") and stats.positive == "1"
    assert not any(key[3] != "all" for key, _ in run.shards)


def test_expired_markers_are_forgotten_after_the_marker_horizon() -> None:
    config = JoinConfig(
        window_ms=HOUR_MS, grace_ms=0, tumbling_ms=HOUR_MS, sliding_ms=HOUR_MS, marker_ms=HOUR_MS
    )
    run = Run(make_core(config))
    feats = {"age": 30, "salary": 1.0, "zipcode": 1}
    run.feed(([prediction("old", T0, feats, 0.5)], []))
    run.feed(([prediction("mid", T0 + 2 * HOUR_MS + 1, feats, 0.5)], []))
    assert run.core.partitions[0].entries["old"].expired
    run.feed(([], [label("old", "1", T0 + 10)]))
    run.feed(([prediction("new", T0 + 4 * HOUR_MS + 1, feats, 0.5)], []))
    assert "old" not in run.core.partitions[0].entries
    assert (b"old", None) in run.changelog  # the tombstone
    assert [u["reason"] for u in run.outputs["labels.unmatched"]] == ["too_late"]


def test_a_prediction_for_a_closed_window_is_counted_not_joined() -> None:
    run = Run(make_core())
    feats = {"age": 30, "salary": 1.0, "zipcode": 1}
    run.feed(([prediction("new", T0 + 3 * DAY_MS, feats, 0.5)], []))
    run.feed(([prediction("ancient", T0, feats, 0.5)], [label("ancient", "1", T0 + 5)]))
    assert run.core.counts["prediction_too_late"] == 1
    assert [u["reason"] for u in run.outputs["labels.unmatched"]] == ["too_late"]


def test_a_prediction_from_a_clock_far_ahead_does_not_expire_the_state() -> None:
    core = make_core()
    run = Run(core)
    feats = {"age": 30, "salary": 1.0, "zipcode": 1}
    run.feed(([prediction("now", T0, feats, 0.5)], []))
    future = int(core.clock() * 1000) + 10 * DAY_MS
    run.feed(([prediction("bogus", future, feats, 0.5)], []))
    assert core.partitions[0].watermark == T0
    assert not core.partitions[0].entries["now"].expired


def test_multiclass_metrics_match_sklearn_macro_average() -> None:
    rng = np.random.default_rng(4)
    classes = ("a", "b", "c")
    stats = GroupStats(classes, "c")
    truth, decisions, probas = [], [], []
    from services.common.performance import Contribution, brier_term, log_loss_term

    for _ in range(400):
        p = rng.dirichlet([1, 1, 1])
        scores = dict(zip(classes, p.tolist(), strict=True))
        y = str(rng.choice(classes))
        d = classes[int(np.argmax(p))]
        stats.add(
            Contribution(y, d, log_loss_term(scores, y), brier_term(scores, y, classes, "c"), 0, ())
        )
        truth.append(y)
        decisions.append(d)
        probas.append(p)
    m = stats.metrics()
    assert m["accuracy"] == pytest.approx(accuracy_score(truth, decisions))
    for name, fn in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
        expected = fn(truth, decisions, average="macro", labels=list(classes), zero_division=0)
        assert m[name] == pytest.approx(expected), name
    assert m["log_loss"] == pytest.approx(log_loss(truth, np.array(probas), labels=list(classes)))
    assert m["brier"] == pytest.approx(
        brier_score_loss(truth, np.array(probas), labels=list(classes))
    )


def test_shards_round_trip_and_merge() -> None:
    a = GroupStats(("0", "1"), "1", predicted=3, labeled=2, log_loss_sum=1.5, brier_sum=0.25)
    a.confusion = {("1", "1"): 1, ("0", "1"): 1}
    a.delays = {10: 2}
    a.bins = {"age:bin1": [2, 1]}
    b = GroupStats.from_json(a.to_json())
    assert b == a
    merged = merge_all([a, b])
    assert merged is not None and merged.labeled == 4 and merged.bins == {"age:bin1": [4, 2]}
    assert a.labeled == 2  # merge_all copies
    assert math.isclose(merged.metrics()["log_loss"], 0.75)


def test_changelog_records_read_back_for_people() -> None:
    """`scoremesh tail label-join.changelog` shows each record as JSON, the event's own
    fields decoded; anything else is a clear error."""
    s = scenario(40, seed=6, window_ms=CONFIG.window_ms)
    run = Run(make_core())
    for batch in batches_of(s):
        run.feed(batch)
    shown = [state_record(v) for _, v in run.changelog if v is not None]
    joined = [r for r in shown if r.get("v") == 2 and r["head"] is not None and r["l"]]
    assert joined and set(joined[0]["head"]) == {
        "event_id",
        "entity_id",
        "event_time",
        "features",
        "attributes",
    }
    assert any("cm" in r and "pred" in r for r in shown)  # closed windows
    for bad in (b"", b"\xc3\x01abc", b"[1, 2]", b'{"v": 2}\n\x07'):
        with pytest.raises(CodecError):
            state_record(bad)


def test_bins_of_is_key_of_for_every_kind_of_value() -> None:
    """bins_of inlines key_of's common cases; every value must land in the same bin."""
    info = VersionInfo(
        classes=("0", "1"),
        positive="1",
        segments=(),
        binners=(Binner("n", (0.0, 10.0, 100.0)), Binner("c", None)),
        known=True,
    )
    values: list[Any] = [None, float("nan"), float("inf"), -float("inf"), True, False, 0, 10]
    values += [10.0, 9.999, 1e9, -3, "x", "10", b"x", [1], 5.5]
    for n in values:
        for c in values:
            if isinstance(c, list):
                continue  # unhashable: not a category a decoded event can carry
            for _ in range(2):  # the second pass reads categories from the binner's cache
                expected = tuple(b.key_of({"n": n, "c": c}.get(b.feature)) for b in info.binners)
                assert info.bins_of({"n": n, "c": c}) == expected, (n, c)
    assert info.bins_of({}) == ("n:null", "c:null")


def test_outputs_kept_on_the_states_partition_are_where_murmur2_puts_them() -> None:
    """With keep_partitions, an output goes to the partition of the state it comes from:
    for inputs partitioned by murmur2 of the event_id, the partition murmur2 of the output's
    key picks. Topics not named keep their murmur2 placement (None)."""
    from scoremesh.contract.partitioner import partitions_for_keys

    core = make_core()
    core.keep_partitions([TOPICS.labeled, TOPICS.examples])
    s = scenario(n=120)
    ids = sorted({p["event_id"] for p in s.predictions})
    home = dict(zip(ids, partitions_for_keys([i.encode() for i in ids], 6), strict=True))
    for p in range(6):
        if p not in core.partitions:
            core.restore(p, [])
    offset = 0

    def records(topic: str, items: list[dict[str, Any]], encode: Any) -> list[Any]:
        nonlocal offset
        out = []
        for item in items:
            offset += 1
            key = item["event_id"]
            out.append(record(topic, key, encode(item), partition=home.get(key, 0), offset=offset))
        return out

    result = core.process(
        records("predictions", s.predictions, encode_prediction),
        records("labels", [*s.labels, label(ids[0], "no-such-class", T0)], encode_label),
    )
    kept = [o for o in result.outputs if o.topic != TOPICS.unmatched]
    assert len(kept) > 100
    for o in kept:
        assert o.key is not None
        assert o.partition == partitions_for_keys([o.key], 6)[0] == home[o.key.decode()]
    unmatched = [o for o in result.outputs if o.topic == TOPICS.unmatched]
    assert unmatched and all(o.partition is None for o in unmatched)


def test_an_event_known_by_one_prediction_is_kept_as_the_predictions_bytes() -> None:
    """Nothing to encode for the commonest change: an event's first prediction, no label.
    Restored, it is the same state as its version-2 record; anything more is version 2."""
    feats = {"age": 30, "salary": 1.0, "zipcode": 1}
    run = Run(make_core())
    p = prediction("k1", T0, feats, 0.8)
    data = encode_prediction(p)
    assert run.feed(([p], [])) == [(b"k1", data)]
    assert state_record(data)["prediction"]["event_id"] == "k1"
    v2 = Entry.decode("k1", data, EventRows()).encode()
    assert v2.startswith(b'{"v":2,')
    runs = []
    for value in (data, v2):
        restored = Run(make_core())
        restored.core.restore(0, [(b"k1", value)])
        restored.feed(([], [label("k1", "1", T0 + 5)]))
        runs.append(restored)
    assert runs[0].outputs == runs[1].outputs and runs[0].changelog == runs[1].changelog
    assert final_view(runs[0]) == final_view(runs[1])
    written = dict(run.feed(([prediction("k2", T0, feats, 0.1)], [label("k2", "0", T0 + 1)])))
    assert written[b"k2"] is not None and written[b"k2"].startswith(b'{"v":2,')  # + its label
    shadow = prediction("k3", T0, feats, 0.2, "shadow", "1.1.0")
    written = dict(run.feed(([prediction("k3", T0, feats, 0.3), shadow], [])))
    assert written[b"k3"] is not None and written[b"k3"].startswith(b'{"v":2,')  # two variants
    with pytest.raises(ValueError, match="kept as 'other'"):
        make_core().restore(0, [(b"other", data)])
