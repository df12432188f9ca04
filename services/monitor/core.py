"""The monitor's batch logic: records in, Alert records and transitions out. No I/O.

Detectors run per (partition, model version): partitions are random samples by event_id,
and a partition's detector state moves with it on a rebalance (rebuilt by replay, never
pickled). Windows run per (model version) over every partition this process owns. Every
finding becomes a ``Condition`` keyed ``model/version/signal``, and the ``AlertManager``
merges them: one alert however many partitions, detectors or processes saw it.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from scoremesh.contract.codec import CodecError, codec
from scoremesh.contract.topics import TopicName
from services.common.batchloop import Out, Record
from services.common.model_version import ModelVersion
from services.common.policies.monitor import EffectivePolicy, MonitorPolicy, Severity
from services.common.registry_view import RegistryState
from services.common.settings import Settings
from services.monitor import metrics as m
from services.monitor.alerts import AlertManager, Condition, Transition, alert_key, classify
from services.monitor.detectors import Detection, DetectorBank, ErrorBank
from services.monitor.features import FeatureLayout, Preparer
from services.monitor.performance import PerformanceCheck, label_join_check, performance_signal
from services.monitor.windows import DriftWindow, Measurement, VersionReference

log = logging.getLogger(__name__)

PREDICTIONS: TopicName = "predictions"
LABELED: TopicName = "predictions.labeled"
STATS: TopicName = "monitoring.stats"
DEPLOYMENTS: TopicName = "deployments.log"
RETRAIN_RESULTS: TopicName = "retrain.results"
ALERTS: TopicName = "alerts"
SOURCES = (PREDICTIONS, LABELED, STATS, DEPLOYMENTS, RETRAIN_RESULTS)
NEEDS_PERSON = "retrain.needs_person"
REPLAYED_SOURCES = (PREDICTIONS, LABELED)  # detector state lives on these


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
    version: ModelVersion
    policy: EffectivePolicy
    layout: FeatureLayout
    preparer: Preparer
    window: DriftWindow
    banks: dict[int, DetectorBank] = field(default_factory=dict)


@dataclass
class CoreResult:
    outs: list[Out]
    transitions: list[Transition]
    predictions: int = 0
    labeled: int = 0


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
        self.registry: dict[tuple[str, str], ModelVersion] = {}
        self.contexts: dict[tuple[str, str], VersionContext] = {}
        self.error_banks: dict[tuple[int, str, str], ErrorBank] = {}
        self.recent: dict[tuple[str, int], RecentKeys] = {}
        self.clocks: dict[str, int] = {}
        self.drift: dict[tuple[str, str], dict[str, DriftRow]] = {}
        self.drift_changed: set[tuple[str, str]] = set()
        self.detections_total = 0
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
        metadata = mv.metadata
        reference = VersionReference(layout, metadata.reference, metadata.class_balance)
        ctx = VersionContext(
            version=mv,
            policy=effective,
            layout=layout,
            preparer=Preparer(layout),
            window=DriftWindow(layout, reference, effective.window),
        )
        self.contexts[key] = ctx
        return ctx

    # --- partitions -----------------------------------------------------------------

    def drop_partition(self, topic: str, partition: int) -> None:
        """A partition went to another consumer: its detector state goes with it."""
        name = self.topic_names.get(topic, topic)
        self.recent.pop((name, partition), None)
        if name == PREDICTIONS:
            for ctx in self.contexts.values():
                ctx.banks.pop(partition, None)
        elif name == LABELED:
            for key in [k for k in self.error_banks if k[0] == partition]:
                del self.error_banks[key]

    # --- the batch ------------------------------------------------------------------

    def process(self, records: Iterable[Record], warm: bool = False) -> CoreResult:
        """Fold a batch. ``warm``: replayed history: update state, raise nothing."""
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
        if by_topic.get(PREDICTIONS):
            result.predictions = self._predictions(by_topic[PREDICTIONS], warm, conditions, clears)
        if by_topic.get(LABELED):
            result.labeled = self._labeled(by_topic[LABELED], warm, conditions)
        if not warm:
            if by_topic.get(STATS):
                self._stats(by_topic[STATS], conditions, clears)
            if by_topic.get(DEPLOYMENTS):
                self._deployments(by_topic[DEPLOYMENTS], conditions)
            if by_topic.get(RETRAIN_RESULTS):
                self._retrain_results(by_topic[RETRAIN_RESULTS], conditions, clears)
            self.clocks["wall"] = int(time.time() * 1000)
            transitions = self.apply(conditions, clears)
            result.transitions = transitions
            result.outs = [self.out(t) for t in transitions]
        return result

    def apply(self, conditions: list[Condition], clears: list[tuple[str, int]]) -> list[Transition]:
        """Conditions and clears, in time order, then a sweep for quiet alerts."""
        transitions: list[Transition] = []
        for cond in sorted(conditions, key=lambda c: c.at_ms):
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

    def _decode(self, name: TopicName, records: list[Record]) -> list[tuple[int, dict[str, Any]]]:
        decode = self._codecs[name].decode
        out: list[tuple[int, dict[str, Any]]] = []
        for record in records:
            try:
                out.append((record.partition, decode(record.value or b"")))
            except CodecError as exc:
                m.SKIPPED.labels(name, exc.code).inc()
        return out

    def _dedupe(
        self, name: str, decoded: list[tuple[int, dict[str, Any]]]
    ) -> list[tuple[int, dict[str, Any]]]:
        cap = self.policy.dedupe_per_partition
        out = []
        for partition, value in decoded:
            recent = self.recent.get((name, partition))
            if recent is None:
                recent = self.recent[(name, partition)] = RecentKeys(cap)
            if recent.seen((value["event_id"], value["variant"])):
                m.SKIPPED.labels(name, "duplicate").inc()
                continue
            out.append((partition, value))
        return out

    # --- predictions ----------------------------------------------------------------

    def _predictions(
        self,
        records: list[Record],
        warm: bool,
        conditions: list[Condition],
        clears: list[tuple[str, int]],
    ) -> int:
        decoded = self._dedupe(PREDICTIONS, self._decode(PREDICTIONS, records))
        groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
        for partition, p in decoded:
            groups[(p["model"], p["model_version"], partition)].append(p)
        touched: set[tuple[str, str]] = set()
        for (model, version, partition), preds in groups.items():
            ctx = self.context(model, version)
            if ctx is None:
                m.SKIPPED.labels(PREDICTIONS, "unknown_version").inc(len(preds))
                continue
            batch = ctx.preparer.prepare(preds)
            bank = ctx.banks.get(partition)
            if bank is None:
                bank = ctx.banks[partition] = DetectorBank(
                    ctx.layout, ctx.policy.detectors, partition, self.seed
                )
            detections = bank.update(batch)
            ctx.window.add(batch)
            touched.add((model, version))
            last = int(batch.event_times.max())
            self.clocks["events"] = max(self.clocks.get("events", 0), last)
            if not warm:
                for det in detections:
                    at = int(batch.event_times[det.index])
                    conditions.append(
                        self._detection(model, version, ctx.policy, partition, det, at)
                    )
        if not warm:
            for key in touched:
                ctx = self.contexts[key]
                if ctx.window.due:
                    self._evaluate(ctx, conditions, clears)
        return len(decoded)

    def _detection(
        self,
        model: str,
        version: str,
        policy: EffectivePolicy,
        partition: int,
        det: Detection,
        at: int,
    ) -> Condition:
        key = alert_key(model, version, det.signal)
        held = self.manager.book.alerts.get(key)
        partitions = {partition}
        if held is not None and held.firing and held.evidence.get("partitions"):
            partitions |= {int(p) for p in held.evidence["partitions"].split(",")}
        verdict = classify(policy.rules, det.signal, {"partitions": float(len(partitions))}, 1.0)
        severity: Severity = verdict.severity or "warning"
        feature = det.signal.split(".", 1)[1] if "." in det.signal else None
        m.DETECTIONS.labels(model, version, det.signal, det.detector).inc()
        self.detections_total += 1
        what = {
            "stream_drift.score": "the score distribution changed",
            "stream_drift.confidence": "the model's confidence changed",
            "error_rate": "the error rate rose",
        }.get(det.signal, f"{feature} changed")
        before, after = det.evidence.get("mean_before"), det.evidence.get("mean_after")
        detail = f" (mean {before} -> {after})" if before and after else ""
        evidence = dict(det.evidence)
        evidence.update(
            statistic=det.detector,
            threshold=_threshold_text(policy, det),
            sample=det.evidence.get("values_seen", ""),
            detected_at=iso(at),
        )
        return Condition(
            model=model,
            version=version,
            signal=det.signal,
            kind="performance" if det.signal == "error_rate" else "drift",
            severity=severity,
            summary=f"{model} {version}: {what}{detail}, seen by {det.detector} "
            f"on partition {partition}",
            at_ms=at,
            subject=_subject(model, version, det.signal, feature),
            evidence=evidence,
            partition=partition,
        )

    def _evaluate(
        self, ctx: VersionContext, conditions: list[Condition], clears: list[tuple[str, int]]
    ) -> None:
        mv = ctx.version
        key = (mv.name, mv.version)
        rows = self.drift.setdefault(key, {})
        ratio = self.policy.alerts.resolve_ratio
        for meas in ctx.window.evaluate():
            verdict = classify(ctx.policy.rules, meas.signal, meas.stats, ratio)
            rows[meas.signal] = DriftRow(
                mv.name,
                mv.version,
                meas.signal,
                meas.feature,
                meas.stats,
                verdict.severity,
                meas.sample,
                meas.window_first_ms,
                meas.window_last_ms,
            )
            _export(mv, meas)
            akey = alert_key(mv.name, mv.version, meas.signal)
            if verdict.severity is not None:
                conditions.append(self._breach(ctx, meas, verdict.severity, verdict.breached))
            elif verdict.clear:
                clears.append((akey, meas.window_last_ms))
        self.drift_changed.add(key)

    def _breach(
        self,
        ctx: VersionContext,
        meas: Measurement,
        severity: Severity,
        breached: dict[str, tuple[float, float]],
    ) -> Condition:
        mv = ctx.version
        evidence = {name: _fmt(value) for name, value in meas.stats.items()}
        for name, (_, level) in breached.items():
            evidence[f"threshold.{name}"] = _fmt(level)
        first = next(iter(breached))
        evidence.update(
            statistic=",".join(breached),
            threshold=evidence[f"threshold.{first}"],
            window=f"last {meas.sample} predictions ({iso(meas.window_first_ms)} .. "
            f"{iso(meas.window_last_ms)})",
            window_size=str(ctx.window.policy.size),
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

    # --- labels ---------------------------------------------------------------------

    def _labeled(self, records: list[Record], warm: bool, conditions: list[Condition]) -> int:
        decoded = self._dedupe(LABELED, self._decode(LABELED, records))
        groups: dict[tuple[int, str, str], list[dict[str, Any]]] = defaultdict(list)
        for partition, lp in decoded:
            groups[(partition, lp["model"], lp["model_version"])].append(lp)
        for (partition, model, version), rows in groups.items():
            bank = self.error_banks.get((partition, model, version))
            if bank is None:
                bank = self.error_banks[(partition, model, version)] = ErrorBank(
                    self.policy.for_model(model).detectors, partition, self.seed
                )
            errors = np.fromiter(
                (0.0 if r["correct"] else 1.0 for r in rows), dtype=np.float64, count=len(rows)
            )
            times = [int(r["label_time"]) for r in rows]
            self.clocks["labels"] = max(self.clocks.get("labels", 0), max(times))
            found = bank.update(errors)
            for detector in bank.detectors:
                if detector.estimation is not None:
                    m.ERROR_RATE.labels(model, version).set(detector.estimation)
                    break
            if warm:
                continue
            policy = self.policy.for_model(model)
            for det in found:
                at = times[det.index]
                conditions.append(self._detection(model, version, policy, partition, det, at))
        return len(decoded)

    # --- stats and deployments ------------------------------------------------------

    def _stats(
        self, records: list[Record], conditions: list[Condition], clears: list[tuple[str, int]]
    ) -> None:
        for _, stats in self._decode(STATS, records):
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
        for _, event in self._decode(DEPLOYMENTS, records):
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
        for _, result in self._decode(RETRAIN_RESULTS, records):
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
                drifting[key] = max(drifting.get(key, 0), 1 if a.firing else 0)
        for kind in {a.kind for a in self.manager.book.alerts.values()}:
            for severity in ("info", "warning", "critical"):
                m.ALERTS_OPEN.labels(kind, severity).set(counts.get((kind, severity), 0))
        for (model, version, feature), value in drifting.items():
            m.DRIFT_DETECTED.labels(model, version, feature).set(value)

    def drift_rows(self) -> list[dict[str, Any]]:
        return [row.as_dict() for rows in self.drift.values() for row in rows.values()]


def _subject(model: str, version: str | None, signal: str, feature: str | None) -> dict[str, str]:
    subject = {"model": model, "version": version or "", "signal": signal, "segment": "all"}
    if feature:
        subject["feature"] = feature
    return subject


def _threshold_text(effective: EffectivePolicy, det: Detection) -> str:
    if det.detector == "chi2":
        return f"p < {det.evidence.get('alpha', '')}"
    policy = effective.detectors
    specs = {
        "error_rate": policy.error,
        "stream_drift.score": policy.score,
        "stream_drift.confidence": policy.confidence,
    }.get(det.signal, policy.numeric)
    for spec in specs:
        if spec.kind == det.detector:
            return ",".join(f"{k}={v}" for k, v in sorted(spec.params.items())) or "defaults"
    return ""


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
