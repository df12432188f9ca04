"""The monitor's batch logic: records in, signals, Alert records and transitions out. No I/O.

Two stages, in every monitor process:

1. **Per input partition** (predictions, predictions.labeled): decode, deduplicate, turn
   each model version's rows into arrays and publish them to ``monitor.signals`` keyed by
   model (``signals.py``). Stateless but for a bounded memory of recent keys.
2. **Per model** (the consumer that owns the model's ``monitor.signals`` partition): ONE
   detector per model version and signal over the version's whole stream, in the order
   the signals arrived, and the count windows against the training reference. Rows are
   applied once: each version remembers the next offset of every source partition.

Its state is snapshotted to ``monitor.state`` (JSON, ``snapshot_outs``) and restored
from there (``restore``); the signals after a snapshot are replayed with alerting off.
Every finding becomes a ``Condition`` keyed ``model/version/signal`` and the
``AlertManager`` merges them: one alert however many detectors or processes saw it.
Severity comes from the size of the change (policy rules), never from how many saw it.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from scoremesh.contract.codec import CodecError, codec
from scoremesh.contract.topics import TopicName
from services.common.batchloop import Out, Record
from services.common.model_version import ModelVersion
from services.common.policies.monitor import (
    EffectivePolicy,
    MonitorPolicy,
    Severity,
    severity_rank,
)
from services.common.registry_view import RegistryState
from services.common.settings import Settings
from services.monitor import metrics as m
from services.monitor import signals as sig
from services.monitor.alerts import AlertManager, Condition, Transition, alert_key, classify
from services.monitor.detectors import RIVER_VERSION, Detection, DetectorBank, ErrorBank
from services.monitor.features import FeatureLayout, Preparer, encode_categories
from services.monitor.performance import PerformanceCheck, label_join_check, performance_signal
from services.monitor.segments import VersionStats
from services.monitor.windows import DriftWindow, Measurement, VersionReference

log = logging.getLogger(__name__)

PREDICTIONS: TopicName = "predictions"
LABELED: TopicName = "predictions.labeled"
STATS: TopicName = "monitoring.stats"
DEPLOYMENTS: TopicName = "deployments.log"
RETRAIN_RESULTS: TopicName = "retrain.results"
ALERTS: TopicName = "alerts"
SIGNALS: TopicName = "monitor.signals"
STATE: TopicName = "monitor.state"
SOURCES = (PREDICTIONS, LABELED, STATS, DEPLOYMENTS, RETRAIN_RESULTS, SIGNALS)
NEEDS_PERSON = "retrain.needs_person"
SNAPSHOT_FORMAT = 1
SIGNAL_BYTES = 256 * 1024  # arrays per monitor.signals record at most
# signals whose rise says the model's output moved (input drift is then more than a curiosity)
OUTPUT_SIGNALS = ("stream_drift.score", "stream_drift.confidence", "error_rate", "class_shift")
NOT_INPUTS = frozenset({"score", "confidence"})

RUNBOOK_ANCHORS: tuple[tuple[str, str], ...] = (
    ("stream_drift.score", "score-drift"),
    ("stream_drift.confidence", "score-drift"),
    ("reference_drift.score", "score-drift"),
    ("stream_drift.*", "input-drift"),
    ("category_shift.*", "category-shift"),
    ("reference_drift.*", "reference-drift"),
    ("class_shift", "score-drift"),
    ("error_rate", "error-rate"),
    ("performance.*", "performance"),
    ("range_violation.*", "data-quality"),
    ("null_rate.*", "data-quality"),
    ("model_load", "model-load"),
    ("deployment_refused.*", "deployment-refused"),
    ("retrain.*", "retrain-needs-person"),
)


def runbook_anchor(signal: str) -> str:
    for pattern, anchor in RUNBOOK_ANCHORS:
        if fnmatch.fnmatchcase(signal, pattern):
            return anchor
    return "alerts"


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _fmt(value: float) -> str:
    return f"{value:.4g}"


class RecentKeys:
    """Bounded memory of recently seen keys: two generations, O(1) per lookup."""

    def __init__(self, cap: int) -> None:
        self.half = max(1, cap // 2)
        self.enabled = cap > 0
        self.current: set[tuple[str, str]] = set()
        self.previous: set[tuple[str, str]] = set()

    def seen(self, key: tuple[str, str]) -> bool:
        if not self.enabled:
            return False
        if key in self.current or key in self.previous:
            return True
        self.current.add(key)
        if len(self.current) >= self.half:
            self.previous, self.current = self.current, set()
        return False


@dataclass
class VersionContext:
    """What the first stage needs of a version: how to turn its predictions into arrays."""

    version: ModelVersion
    policy: EffectivePolicy
    layout: FeatureLayout
    preparer: Preparer


@dataclass
class VersionState:
    """The second stage's state of one version: its whole-stream detectors and windows."""

    ctx: VersionContext
    signals_partition: int
    bank: DetectorBank
    errors: ErrorBank
    window: DriftWindow
    stats: VersionStats
    sources: dict[str, int] = field(default_factory=dict)  # "kind/partition" -> next offset
    signals_next: int = 0  # signal records below this offset are already in the state
    restored_from: int | None = None  # the snapshot's offset, when restored


@dataclass
class CoreResult:
    outs: list[Out]
    transitions: list[Transition]
    predictions: int = 0
    labeled: int = 0
    signal_rows: int = 0


@dataclass
class DriftRow:
    """The latest windowed measurement of one signal (for Redis and `monitor status`)."""

    model: str
    version: str
    signal: str
    feature: str | None
    stats: dict[str, float]
    severity: str | None
    sample: int
    window_first: int
    window_last: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "signal": self.signal,
            "feature": self.feature,
            "stats": self.stats,
            "state": self.severity or "ok",
            "sample": self.sample,
            "window_first": self.window_first,
            "window_last": self.window_last,
        }


class MonitorCore:
    def __init__(
        self,
        settings: Settings,
        policy: MonitorPolicy,
        performance_check: PerformanceCheck | None = None,
        seed: int = 0,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.seed = seed
        self.manager = AlertManager(policy.alerts)
        self.performance_check = performance_check or label_join_check(policy.performance)
        self.topic_names = {settings.topic(name): name for name in (*SOURCES, ALERTS)}
        self.alerts_topic = settings.topic(ALERTS)
        self.signals_topic = settings.topic(SIGNALS)
        self.state_topic = settings.topic(STATE)
        self.registry: dict[tuple[str, str], ModelVersion] = {}
        self.contexts: dict[tuple[str, str], VersionContext] = {}
        self.states: dict[tuple[str, str], VersionState] = {}
        self.recent: dict[tuple[str, int], RecentKeys] = {}
        self.clocks: dict[str, int] = {}
        self.drift: dict[tuple[str, str], dict[str, DriftRow]] = {}
        self.drift_changed: set[tuple[str, str]] = set()
        self.detections_total = 0
        # second stage, per monitor.signals partition: the next offset to apply, records
        # since the last snapshot, and when it was taken (wall time)
        self.signal_positions: dict[int, int] = {}
        self.since_snapshot: dict[int, int] = defaultdict(int)
        self.snapshot_at: dict[int, float] = {}
        self._codecs = {
            PREDICTIONS: codec("Prediction"),
            LABELED: codec("LabeledPrediction"),
            STATS: codec("MonitoringStats"),
            DEPLOYMENTS: codec("DeploymentEvent"),
            RETRAIN_RESULTS: codec("RetrainResult"),
        }
        self._alert_codec = codec("Alert")

    # --- registry -------------------------------------------------------------------

    def on_registry(self, state: RegistryState) -> None:
        for version in state.versions.values():
            key = (version.name, version.version)
            held = self.registry.get(key)
            self.registry[key] = version
            if held is not None and held.artifact_sha256 != version.artifact_sha256:
                self.contexts.pop(key, None)  # never expected; rebuild from the new record
                self.states.pop(key, None)

    def context(self, model: str, version: str) -> VersionContext | None:
        key = (model, version)
        ctx = self.contexts.get(key)
        if ctx is not None:
            return ctx
        mv = self.registry.get(key)
        if mv is None:
            return None
        effective = self.policy.for_model(model)
        layout = FeatureLayout.of(mv.feature_spec, effective.exclude_features)
        ctx = VersionContext(version=mv, policy=effective, layout=layout, preparer=Preparer(layout))
        self.contexts[key] = ctx
        return ctx

    def version_state(self, model: str, version: str, partition: int) -> VersionState | None:
        key = (model, version)
        state = self.states.get(key)
        if state is not None:
            return state
        ctx = self.context(model, version)
        if ctx is None:
            return None
        metadata = ctx.version.metadata
        reference = VersionReference(ctx.layout, metadata.reference, metadata.class_balance)
        policy = ctx.policy
        bank = DetectorBank(ctx.layout, policy.detectors, policy.budget, self.seed)
        state = VersionState(
            ctx=ctx,
            signals_partition=partition,
            bank=bank,
            errors=ErrorBank(policy.detectors, bank.delta, self.seed),
            window=DriftWindow(ctx.layout, reference, policy.window),
            stats=VersionStats(ctx.layout, reference),
        )
        self.states[key] = state
        return state

    # --- partitions -----------------------------------------------------------------

    def drop_partition(self, topic: str, partition: int) -> None:
        """A partition went to another consumer: its state goes with it (the new owner
        restores the second stage's from ``monitor.state``)."""
        name = self.topic_names.get(topic, topic)
        self.recent.pop((name, partition), None)
        if name == SIGNALS:
            for key in [k for k, s in self.states.items() if s.signals_partition == partition]:
                del self.states[key]
            self.signal_positions.pop(partition, None)
            self.since_snapshot.pop(partition, None)
            self.snapshot_at.pop(partition, None)

    # --- the batch ------------------------------------------------------------------

    def process(self, records: Iterable[Record], warm: bool = False) -> CoreResult:
        """Fold a batch. ``warm``: replayed signals: update state, raise nothing."""
        by_topic: dict[str, list[Record]] = defaultdict(list)
        for record in records:
            name = self.topic_names.get(record.topic)
            if name is None or name == ALERTS:
                m.SKIPPED.labels(record.topic, "unknown_topic").inc()
                continue
            by_topic[name].append(record)
        conditions: list[Condition] = []
        clears: list[tuple[str, int]] = []
        result = CoreResult([], [])
        if warm:
            result.signal_rows = self._signals(by_topic.get(SIGNALS, []), True, [], [])
            return result
        if by_topic.get(SIGNALS):
            # state as of the last batch, whose alerts are acknowledged: a snapshot never
            # gets ahead of the alerts it has seen
            parts = {r.partition for r in by_topic[SIGNALS]}
            result.outs.extend(self.snapshot_outs(self.snapshots_due(parts)))
            result.signal_rows = self._signals(by_topic[SIGNALS], False, conditions, clears)
        if by_topic.get(PREDICTIONS):
            result.predictions = self._predictions(by_topic[PREDICTIONS], result.outs)
        if by_topic.get(LABELED):
            result.labeled = self._labeled(by_topic[LABELED], result.outs)
        if by_topic.get(STATS):
            self._stats(by_topic[STATS], conditions, clears)
        if by_topic.get(DEPLOYMENTS):
            self._deployments(by_topic[DEPLOYMENTS], conditions)
        if by_topic.get(RETRAIN_RESULTS):
            self._retrain_results(by_topic[RETRAIN_RESULTS], conditions, clears)
        self.clocks["wall"] = int(time.time() * 1000)
        transitions = self.apply(conditions, clears)
        result.transitions = transitions
        result.outs.extend(self.out(t) for t in transitions)
        return result

    def apply(self, conditions: list[Condition], clears: list[tuple[str, int]]) -> list[Transition]:
        """Conditions and clears, in time order, then a sweep for quiet alerts."""
        transitions: list[Transition] = []
        runbook = self.policy.alerts.runbook_url
        for cond in sorted(conditions, key=lambda c: c.at_ms):
            cond.evidence.setdefault("runbook", f"{runbook}#{runbook_anchor(cond.signal)}")
            transitions.extend(self.manager.observe(cond))
        for key, at in clears:
            transitions.extend(self.manager.clear(key, at))
        transitions.extend(self.manager.sweep(self.clocks))
        if transitions:
            self._count(transitions)
        return transitions

    def out(self, transition: Transition) -> Out:
        return Out(
            self.alerts_topic,
            transition.key.encode(),
            self._alert_codec.encode(transition.record),
        )

    def _decode(
        self, name: TopicName, records: list[Record]
    ) -> list[tuple[int, int, dict[str, Any]]]:
        decode = self._codecs[name].decode
        out: list[tuple[int, int, dict[str, Any]]] = []
        for record in records:
            try:
                out.append((record.partition, record.offset, decode(record.value or b"")))
            except CodecError as exc:
                m.SKIPPED.labels(name, exc.code).inc()
        return out

    def _dedupe(
        self, name: str, decoded: list[tuple[int, int, dict[str, Any]]]
    ) -> list[tuple[int, int, dict[str, Any]]]:
        cap = self.policy.dedupe_per_partition
        out = []
        for partition, offset, value in decoded:
            recent = self.recent.get((name, partition))
            if recent is None:
                recent = self.recent[(name, partition)] = RecentKeys(cap)
            if recent.seen((value["event_id"], value["variant"])):
                m.SKIPPED.labels(name, "duplicate").inc()
                continue
            out.append((partition, offset, value))
        return out

    def _signal_outs(self, batch: sig.SignalBatch, outs: list[Out]) -> None:
        """One record per ``SIGNAL_BYTES`` of arrays (well below the topic's size limit)."""
        n = len(batch)
        per_row = max(1, sum(a.nbytes for a in batch.arrays.values()) // max(n, 1))
        step = max(1, SIGNAL_BYTES // per_row)
        key = batch.model.encode()
        for start in range(0, n, step):
            part = batch if n <= step else batch.rows(np.arange(start, min(n, start + step)))
            outs.append(Out(self.signals_topic, key, sig.encode(part)))

    # --- first stage: predictions and labels to signals -----------------------------

    def _predictions(self, records: list[Record], outs: list[Out]) -> int:
        decoded = self._dedupe(PREDICTIONS, self._decode(PREDICTIONS, records))
        groups: dict[tuple[str, str, int], list[tuple[int, dict[str, Any]]]] = defaultdict(list)
        for partition, offset, p in decoded:
            groups[(p["model"], p["model_version"], partition)].append((offset, p))
        for (model, version, partition), rows in groups.items():
            ctx = self.context(model, version)
            if ctx is None:
                m.SKIPPED.labels(PREDICTIONS, "unknown_version").inc(len(rows))
                continue
            batch = ctx.preparer.prepare([p for _, p in rows])
            offsets = np.fromiter((o for o, _ in rows), dtype=np.int64, count=len(rows))
            self._signal_outs(sig.from_predictions(model, version, partition, offsets, batch), outs)
        return len(decoded)

    def _labeled(self, records: list[Record], outs: list[Out]) -> int:
        decoded = self._dedupe(LABELED, self._decode(LABELED, records))
        groups: dict[tuple[int, str, str], list[tuple[int, dict[str, Any]]]] = defaultdict(list)
        for partition, offset, lp in decoded:
            groups[(partition, lp["model"], lp["model_version"])].append((offset, lp))
        for (partition, model, version), rows in groups.items():
            n = len(rows)
            self._signal_outs(
                sig.from_labeled(
                    model,
                    version,
                    partition,
                    np.fromiter((o for o, _ in rows), dtype=np.int64, count=n),
                    np.fromiter((not r["correct"] for _, r in rows), dtype=np.uint8, count=n),
                    np.fromiter((r["event_time"] for _, r in rows), dtype=np.int64, count=n),
                    np.fromiter((r["label_time"] for _, r in rows), dtype=np.int64, count=n),
                    np.fromiter(
                        (r.get("label_delay_ms") or 0 for _, r in rows),
                        dtype=np.int64,
                        count=n,
                    ),
                ),
                outs,
            )
        return len(decoded)

    # --- second stage: whole-stream detectors ---------------------------------------

    def _signals(
        self,
        records: list[Record],
        warm: bool,
        conditions: list[Condition],
        clears: list[tuple[str, int]],
    ) -> int:
        rows = 0
        touched: set[tuple[str, str]] = set()
        # a fetch holds one batch of every input partition (from every replica): merged
        # and put in time order, the detectors see the stream as it happened, not
        # partition after partition
        pending: dict[tuple[str, str, str], list[sig.SignalBatch]] = defaultdict(list)
        for record in records:
            part = record.partition
            self.signal_positions[part] = max(self.signal_positions.get(part, 0), record.offset + 1)
            if not warm:
                self.since_snapshot[part] += 1
            try:
                batch = sig.decode(record.value or b"")
            except sig.SignalError as exc:
                m.SKIPPED.labels(SIGNALS, "undecodable").inc()
                log.error("skipping a monitor.signals record", extra={"error": str(exc)})
                continue
            state = self.version_state(batch.model, batch.version, part)
            if state is None:
                m.SKIPPED.labels(SIGNALS, "unknown_version").inc(len(batch))
                continue
            if record.offset < state.signals_next:
                continue  # already in the restored state
            state.signals_next = record.offset + 1
            source = f"{batch.kind}/{batch.source_partition}"
            seen = state.sources.get(source, 0)
            if len(batch) and int(batch.offsets.max()) < seen:
                m.SKIPPED.labels(SIGNALS, "duplicate").inc(len(batch))
                continue
            if len(batch) and int(batch.offsets.min()) < seen:
                keep = batch.offsets >= seen
                m.SKIPPED.labels(SIGNALS, "duplicate").inc(int((~keep).sum()))
                batch = batch.rows(keep)
            if not len(batch):
                continue
            state.sources[source] = int(batch.offsets.max()) + 1
            rows += len(batch)
            pending[(batch.model, batch.version, batch.kind)].append(batch)
        for (model, version, kind), batches in pending.items():
            state = self.states[(model, version)]
            merged = sig.merge(batches, "event_times" if kind == "predictions" else "label_times")
            if kind == "predictions":
                self._predictions_stage2(state, merged, warm, conditions)
                touched.add((model, version))
            else:
                self._labeled_stage2(state, merged, warm, conditions)
        if not warm:
            for key in touched:
                state = self.states[key]
                if state.window.due:
                    self._evaluate(state, conditions, clears)
        return rows

    def _predictions_stage2(
        self, state: VersionState, batch: sig.SignalBatch, warm: bool, conditions: list[Condition]
    ) -> None:
        layout = state.ctx.layout
        matrix = batch.arrays["matrix"]
        codes = {
            j: encode_categories(matrix[:, j].astype(np.float64), values)
            for j, values in layout.cat_values.items()
        }
        prepared = sig.prepared(batch, codes)
        detections = state.bank.update(prepared)
        state.window.add(prepared)
        state.stats.add_predictions(prepared)
        times = prepared.event_times
        self.clocks["events"] = max(self.clocks.get("events", 0), int(times.max()))
        if warm:
            return
        mv = state.ctx.version
        for det in detections:
            conditions.append(
                self._detection(mv.name, mv.version, state.ctx.policy, det, int(times[det.index]))
            )

    def _labeled_stage2(
        self, state: VersionState, batch: sig.SignalBatch, warm: bool, conditions: list[Condition]
    ) -> None:
        a = batch.arrays
        errors = a["errors"].astype(np.float64)
        found = state.errors.update(errors)
        state.stats.add_labels(errors, a["label_delays"])
        label_times = a["label_times"]
        self.clocks["labels"] = max(self.clocks.get("labels", 0), int(label_times.max()))
        mv = state.ctx.version
        estimate = state.errors.estimation
        if estimate is not None:
            m.ERROR_RATE.labels(mv.name, mv.version).set(estimate)
        if warm:
            return
        for det in found:
            det.evidence["event_time_ms"] = str(int(a["event_times"][det.index]))
            conditions.append(
                self._detection(
                    mv.name, mv.version, state.ctx.policy, det, int(label_times[det.index])
                )
            )

    def _detection(
        self,
        model: str,
        version: str,
        policy: EffectivePolicy,
        det: Detection,
        at: int,
    ) -> Condition:
        verdict = classify(policy.rules, det.signal, det.stats, 1.0)
        severity: Severity = verdict.severity or "info"
        feature = det.signal.split(".", 1)[1] if "." in det.signal else None
        m.DETECTIONS.labels(model, version, det.signal, det.detector).inc()
        self.detections_total += 1
        what = {
            "stream_drift.score": "the score distribution changed",
            "stream_drift.confidence": "the model's confidence changed",
            "error_rate": "the error rate rose",
        }.get(det.signal, f"{feature} changed")
        ev = det.evidence
        if det.signal == "error_rate":
            detail = f" ({ev['rate_before']} -> {ev['rate_after']})"
        elif det.signal.startswith("category_shift."):
            detail = f" (share of {ev['category']} {ev['share_before']} -> {ev['share_after']})"
        else:
            detail = f" (mean {ev['mean_before']} -> {ev['mean_after']}, {ev['shift_sd']} sd)"
        evidence = dict(ev)
        evidence.update(
            statistic=",".join(det.stats) or det.detector,
            threshold=_threshold_text(det),
            rule=_rule_text(det.signal, det.stats, verdict.breached, severity),
            window=f"{ev.get('n_before', '?')} values before the cut, "
            f"{ev.get('n_after', '?')} after",
            sample=ev.get("values_seen", ""),
            detected_at=iso(at),
        )
        evidence.setdefault("event_time_ms", str(at))
        return Condition(
            model=model,
            version=version,
            signal=det.signal,
            kind="performance" if det.signal == "error_rate" else "drift",
            severity=severity,
            summary=f"{model} {version}: {what}{detail}, seen by {det.detector} "
            "over the whole stream",
            at_ms=at,
            subject=_subject(model, version, det.signal, feature),
            evidence=evidence,
        )

    def _output_moved(self, model: str, version: str, found: dict[str, Severity | None]) -> bool:
        """Did the model's output move (score, confidence, decisions, errors)? Then input
        drift is more than a curiosity."""
        for signal in ("reference_drift.score", "class_shift"):
            level = found.get(signal)
            if level is not None and severity_rank(level) >= severity_rank("warning"):
                return True
        for alert in self.manager.book.alerts.values():
            if not alert.firing or alert.model != model or alert.version != version:
                continue
            signal = alert.key.split("/", 2)[-1]
            if severity_rank(alert.severity) >= severity_rank("warning") and (
                signal in OUTPUT_SIGNALS or signal.startswith("performance.")
            ):
                return True
        return False

    def _evaluate(
        self, state: VersionState, conditions: list[Condition], clears: list[tuple[str, int]]
    ) -> None:
        mv = state.ctx.version
        policy = state.ctx.policy
        key = (mv.name, mv.version)
        rows = self.drift.setdefault(key, {})
        ratio = self.policy.alerts.resolve_ratio
        measured = [
            (meas, classify(policy.rules, meas.signal, meas.stats, ratio))
            for meas in state.window.evaluate()
        ]
        found = {meas.signal: verdict.severity for meas, verdict in measured}
        moved: bool | None = None
        cap = self.policy.alerts.input_drift_alone
        for meas, verdict in measured:
            severity = verdict.severity
            capped = False
            if (
                severity is not None
                and meas.signal.startswith("reference_drift.")
                and meas.feature not in NOT_INPUTS
                and severity_rank(severity) > severity_rank(cap)
            ):
                if moved is None:
                    moved = self._output_moved(mv.name, mv.version, found)
                if not moved:
                    severity, capped = cap, True
            rows[meas.signal] = DriftRow(
                mv.name,
                mv.version,
                meas.signal,
                meas.feature,
                meas.stats,
                severity,
                meas.sample,
                meas.window_first_ms,
                meas.window_last_ms,
            )
            _export(mv, meas)
            akey = alert_key(mv.name, mv.version, meas.signal)
            if severity is not None:
                cond = self._breach(state, meas, severity, verdict.breached)
                if capped:
                    cond.evidence["rule"] += (
                        f"; capped at {cap}: the score, decisions and error rate hold "
                        "(alerts.input_drift_alone)"
                    )
                conditions.append(cond)
            elif verdict.clear:
                clears.append((akey, meas.window_last_ms))
        self.drift_changed.add(key)

    def _breach(
        self,
        state: VersionState,
        meas: Measurement,
        severity: Severity,
        breached: dict[str, tuple[float, float]],
    ) -> Condition:
        mv = state.ctx.version
        evidence = {name: _fmt(value) for name, value in meas.stats.items()}
        for name, (_, level) in breached.items():
            evidence[f"threshold.{name}"] = _fmt(level)
        first = next(iter(breached))
        evidence.update(
            statistic=",".join(breached),
            threshold=evidence[f"threshold.{first}"],
            rule=_rule_text(meas.signal, meas.stats, breached, severity),
            window=f"last {meas.sample} predictions ({iso(meas.window_first_ms)} .. "
            f"{iso(meas.window_last_ms)})",
            window_size=str(state.window.policy.size),
            sample=str(meas.sample),
        )
        stats = ", ".join(f"{n} {_fmt(v)} >= {_fmt(lv)}" for n, (v, lv) in breached.items())
        what = {
            "drift": f"{meas.feature} drifted from the training reference",
            "data_quality": f"{meas.signal.split('.', 1)[0].replace('_', ' ')} of "
            f"{meas.feature} is high",
        }[meas.kind]
        if meas.signal == "class_shift":
            what = "the predicted-class mix moved away from training"
        return Condition(
            model=mv.name,
            version=mv.version,
            signal=meas.signal,
            kind=meas.kind,
            severity=severity,
            summary=f"{mv.name} {mv.version}: {what} ({stats})",
            at_ms=meas.window_last_ms,
            subject=_subject(mv.name, mv.version, meas.signal, meas.feature),
            evidence=evidence,
            explicit_clear=True,
        )

    # --- snapshots: the second stage's state on monitor.state -----------------------

    def snapshots_due(self, partitions: Iterable[int], now: float | None = None) -> set[int]:
        now = time.monotonic() if now is None else now
        policy = self.policy.state
        due = set()
        for part in partitions:
            taken = self.snapshot_at.setdefault(part, now)
            if self.since_snapshot[part] and (
                self.since_snapshot[part] >= policy.snapshot_every_records
                or now - taken >= policy.snapshot_interval_s
            ):
                due.add(part)
        return due

    def snapshot(self, state: VersionState) -> dict[str, Any]:
        mv = state.ctx.version
        return {
            "format": SNAPSHOT_FORMAT,
            "model": mv.name,
            "version": mv.version,
            "river": RIVER_VERSION,
            "signals_partition": state.signals_partition,
            "next_offset": self.signal_positions.get(state.signals_partition, 0),
            "sources": dict(state.sources),
            "detectors": {
                name: [d.snapshot() for d in detectors]
                for name, detectors in state.bank.detectors().items()
            },
            "errors": [d.snapshot() for d in state.errors.detectors],
            "stats": state.stats.snapshot(),
            "taken_at": int(time.time() * 1000),
        }

    def snapshot_outs(self, partitions: Iterable[int]) -> list[Out]:
        """One monitor.state record per version whose signals are on these partitions."""
        parts = set(partitions)
        outs = []
        for state in self.states.values():
            if state.signals_partition not in parts:
                continue
            mv = state.ctx.version
            outs.append(
                Out(
                    self.state_topic,
                    f"{mv.name}@{mv.version}".encode(),
                    orjson.dumps(self.snapshot(state)),
                )
            )
        now = time.monotonic()
        for part in parts:
            self.since_snapshot[part] = 0
            self.snapshot_at[part] = now
        if outs:
            m.SNAPSHOTS.inc(len(outs))
        return outs

    def restore(self, snapshot: dict[str, Any]) -> int | None:
        """A version's second-stage state from its snapshot; the signals offset to replay
        from, or None when the snapshot cannot be used (then the version starts fresh)."""
        model, version = snapshot.get("model"), snapshot.get("version")
        if snapshot.get("format") != SNAPSHOT_FORMAT or not model or not version:
            return None
        part = int(snapshot["signals_partition"])
        self.states.pop((model, version), None)
        state = self.version_state(model, version, part)
        if state is None:
            return None
        if snapshot.get("river") != RIVER_VERSION:
            log.warning(
                "detector snapshot from another River version; starting that version fresh",
                extra={"model": model, "version": version, "river": snapshot.get("river")},
            )
            return None
        try:
            ok = all(
                det.restore(snap)
                for name, detectors in state.bank.detectors().items()
                for det, snap in zip(detectors, snapshot["detectors"].get(name) or [], strict=True)
            ) and all(
                det.restore(snap)
                for det, snap in zip(state.errors.detectors, snapshot["errors"], strict=True)
            )
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("unusable detector snapshot", extra={"model": model, "error": str(exc)})
            ok = False
        if not ok:
            self.states.pop((model, version), None)  # fresh, not half-restored
            return None
        state.stats.restore(snapshot.get("stats") or {})
        state.sources = {k: int(v) for k, v in (snapshot.get("sources") or {}).items()}
        state.signals_next = int(snapshot["next_offset"])
        state.restored_from = state.signals_next
        self.signal_positions[part] = max(self.signal_positions.get(part, 0), state.signals_next)
        return state.signals_next

    # --- stats and deployments ------------------------------------------------------

    def _stats(
        self, records: list[Record], conditions: list[Condition], clears: list[tuple[str, int]]
    ) -> None:
        for _, _, stats in self._decode(STATS, records):
            model, version = stats["model"], stats["model_version"]
            segment = stats.get("segment") or "all"
            variant = stats.get("variant", "")
            at = int(stats["window_end"])
            self.clocks["stats"] = max(self.clocks.get("stats", 0), at)
            verdict = self.performance_check(stats, self.registry.get((model, version)))
            breached = {b.metric for b in verdict.breaches}
            for b in verdict.breaches:
                signal = performance_signal(b.metric, segment)
                evidence = {
                    "statistic": b.metric,
                    "value": _fmt(b.value),
                    "threshold": _fmt(b.threshold),
                    "window": f"{stats.get('window_kind', '')} {iso(int(stats['window_start']))}"
                    f" .. {iso(at)}",
                    "sample": str(stats.get("count", 0)),
                    "variant": variant,
                }
                if b.baseline is not None:
                    evidence["baseline"] = _fmt(b.baseline)
                subject = _subject(model, version, signal, None)
                subject["segment"] = segment
                subject["metric"] = b.metric
                conditions.append(
                    Condition(
                        model=model,
                        version=version,
                        signal=signal,
                        kind="performance",
                        severity=b.severity,
                        summary=f"{model} {version}: {b.metric} {_fmt(b.value)} is below "
                        f"{_fmt(b.threshold)} on segment {segment} ({stats.get('count', 0)} "
                        "labels)",
                        at_ms=at,
                        subject=subject,
                        evidence=evidence,
                        explicit_clear=True,
                    )
                )
            for metric in verdict.judged:
                if metric not in breached:
                    clears.append(
                        (alert_key(model, version, performance_signal(metric, segment)), at)
                    )

    def _deployments(self, records: list[Record], conditions: list[Condition]) -> None:
        policy = self.policy.alerts
        oldest = int((time.time() - policy.deployment_max_age_s) * 1000)
        for _, _, event in self._decode(DEPLOYMENTS, records):
            at = int(event["at"])
            if at < oldest:
                continue
            model, version, action = event["model"], event.get("version"), event["action"]
            detail = event.get("detail") or event.get("reason") or ""
            evidence = {
                "request_id": event["request_id"],
                "action": action,
                "actor": event.get("actor", ""),
                "detail": detail[:1000],
                "generation": str(event.get("generation", "")),
                "at": iso(at),
            }
            if action == "load_failed":
                conditions.append(
                    Condition(
                        model=model,
                        version=version,
                        signal="model_load",
                        kind="model_load",
                        severity=policy.model_load_failed_severity,
                        summary=f"{model} {version}: a scorer could not load the model: {detail}",
                        at_ms=at,
                        subject=_subject(model, version, "model_load", None),
                        evidence=evidence,
                    )
                )
            elif event.get("outcome") == "refused":
                signal = f"deployment_refused.{action}"
                conditions.append(
                    Condition(
                        model=model,
                        version=version,
                        signal=signal,
                        kind="deployment",
                        severity=policy.deployment_refused_severity,
                        summary=f"{model} {version or ''}: {action} refused: {detail}",
                        at_ms=at,
                        subject=_subject(model, version, signal, None),
                        evidence=evidence,
                    )
                )

    def _retrain_results(
        self, records: list[Record], conditions: list[Condition], clears: list[tuple[str, int]]
    ) -> None:
        """The trainer refused a retrain a person must take over (it never writes alerts):
        open until a later retrain of that version succeeds."""
        policy = self.policy.alerts
        oldest = int((time.time() - policy.deployment_max_age_s) * 1000)
        for _, _, result in self._decode(RETRAIN_RESULTS, records):
            at = int(result["at"])
            model, version = result["model"], result.get("parent_version")
            key = alert_key(model, version, NEEDS_PERSON)
            if result["status"] == "succeeded":
                clears.append((key, at))
            if result["status"] != "needs_person" or at < oldest:
                continue
            conditions.append(
                Condition(
                    model=model,
                    version=version,
                    signal=NEEDS_PERSON,
                    kind="retrain",
                    severity=policy.retrain_needs_person_severity,
                    summary=f"{model} {version or ''}: a retrain needs a person: "
                    f"{result['detail']}",
                    at_ms=at,
                    subject=_subject(model, version, NEEDS_PERSON, None),
                    evidence={
                        "request_id": result["request_id"],
                        "detail": result["detail"][:1000],
                        "trainer": result.get("trainer", ""),
                        "at": iso(at),
                    },
                    explicit_clear=True,
                )
            )

    # --- metrics --------------------------------------------------------------------

    def _count(self, transitions: list[Transition]) -> None:
        for t in transitions:
            m.ALERT_TRANSITIONS.labels(t.record["kind"], t.record["severity"], t.event).inc()
        self.export_open()

    def export_open(self) -> None:
        """Gauges of open alerts and of features with a drift alert firing (after a fold too)."""
        counts: dict[tuple[str, str], int] = defaultdict(int)
        drifting: dict[tuple[str, str, str], int] = {}
        for a in self.manager.book.alerts.values():
            if a.firing:
                counts[(a.kind, a.severity)] += 1
            feature = a.subject.get("feature")
            if a.kind == "drift" and feature and a.version:
                key = (a.model, a.version, feature)
                # 1 only for a drift alert that pages: info (slow or harmless drift) is not
                # for the Prometheus rules either
                pages = a.firing and severity_rank(a.severity) >= severity_rank("warning")
                drifting[key] = max(drifting.get(key, 0), 1 if pages else 0)
        for kind in {a.kind for a in self.manager.book.alerts.values()}:
            for severity in ("info", "warning", "critical"):
                m.ALERTS_OPEN.labels(kind, severity).set(counts.get((kind, severity), 0))
        for (model, version, feature), value in drifting.items():
            m.DRIFT_DETECTED.labels(model, version, feature).set(value)

    def version_rows(self) -> dict[str, dict[str, Any]]:
        """The whole-stream figures of every version whose detectors run here."""
        out = {}
        for (model, version), state in self.states.items():
            row: dict[str, Any] = {"model": model, "version": version, "segment": "all"}
            row.update(state.stats.as_dict())
            estimate = state.errors.estimation
            row["error_rate_now"] = estimate if state.stats.labels else None
            row["detections"] = sum(
                int(v.get("detections", 0)) for v in state.bank.states().values()
            ) + sum(d.detections for d in state.errors.detectors)
            out[f"{model}@{version}"] = row
        return out

    def drift_rows(self) -> list[dict[str, Any]]:
        return [row.as_dict() for rows in self.drift.values() for row in rows.values()]


def _subject(model: str, version: str | None, signal: str, feature: str | None) -> dict[str, str]:
    subject = {"model": model, "version": version or "", "signal": signal, "segment": "all"}
    if feature:
        subject["feature"] = feature
    return subject


def _threshold_text(det: Detection) -> str:
    delta = det.evidence.get("delta")
    return f"{det.detector} delta={delta}" if delta else det.detector


def _rule_text(
    signal: str,
    stats: dict[str, float],
    breached: dict[str, tuple[float, float]],
    severity: str,
) -> str:
    """Which severity rule fired, in words: ``shift_sd 0.52 >= 0.3 -> warning``."""
    if breached:
        parts = [
            f"{name} {_fmt(value)} >= {_fmt(level)}" for name, (value, level) in breached.items()
        ]
        return f"{signal}: {', '.join(parts)} -> {severity}"
    shown = ", ".join(f"{name} {_fmt(value)}" for name, value in stats.items())
    return f"{signal}: {shown or 'no statistic'}: no rule above it -> {severity}"


def _export(mv: ModelVersion, meas: Measurement) -> None:
    feature = meas.feature or ""
    stats = meas.stats
    if meas.signal.startswith("reference_drift."):
        m.DRIFT_PSI.labels(mv.name, mv.version, feature).set(stats["psi"])
        if "ks" in stats:
            m.DRIFT_KS.labels(mv.name, mv.version, feature).set(stats["ks"])
    elif meas.signal == "class_shift":
        m.CLASS_SHIFT_PSI.labels(mv.name, mv.version).set(stats["psi"])
    elif meas.signal.startswith("null_rate."):
        m.NULL_RATE.labels(mv.name, mv.version, feature).set(stats["rate"])
    elif meas.signal.startswith("range_violation."):
        m.RANGE_VIOLATION_RATE.labels(mv.name, mv.version, feature).set(stats["rate"])
