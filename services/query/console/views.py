"""What the console's pages show, computed from plain data. Pure: no I/O, no FastAPI."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from services.common.model_version import ModelVersion
from services.query.console.history import (
    DRIFT_KIND,
    PERFORMANCE_KIND,
    PERFORMANCE_METRICS,
    SCORE_FEATURE,
    Series,
    StatsHistory,
    drift_feature,
)

Line = dict[str, Any]
"""One line of a chart as Chartkick reads it: ``{"name": ..., "data": [[time, value], ...]}``."""

COUNT_METRICS = frozenset({"coverage", "labeled", "predicted"})
DEFAULT_METRIC = "accuracy"
ALERT_PAGE_SIZE = 100
SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}
RUNBOOK_KINDS: tuple[str, ...] = (
    "drift",
    "performance",
    "data_quality",
    "model_load",
    "deployment",
    "other",
)
"""Alert kinds with a runbook section (anchor ``#<kind>``); any other kind goes to ``other``."""


def iso(ms: int) -> str:
    """Epoch milliseconds as ISO-8601 UTC (what Chartkick reads as a time axis)."""
    return (
        dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z")
    )


def when(ms: int | None) -> str:
    """Epoch milliseconds for people: ``2026-01-01 00:05:00 UTC``; ``-`` for none."""
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def line(name: str, points: Iterable[tuple[int, float]]) -> Line:
    return {"name": name, "data": [[iso(end), round(value, 6)] for end, value in points]}


def series_name(series: Series, by: str) -> str:
    key = series.key
    if by == "segment":
        return key.segment
    return f"{key.version} {key.variant}"


# --- performance -------------------------------------------------------------------------


def performance_metrics(history: StatsHistory, model: str) -> list[str]:
    """The quality metrics a model's windows carry, ``accuracy`` first when present."""
    have = set(history.metric_names(model, PERFORMANCE_KIND))
    found = [m for m in PERFORMANCE_METRICS if m in have and m not in COUNT_METRICS]
    return found


def pick_metric(available: Sequence[str], asked: str | None) -> str:
    if asked and asked in available:
        return asked
    if DEFAULT_METRIC in available or not available:
        return DEFAULT_METRIC
    return available[0]


def performance_lines(
    history: StatsHistory,
    model: str,
    metric: str,
    *,
    segment: str | None = "all",
    version: str | None = None,
    by: str = "version",
) -> list[Line]:
    """One line per version x variant (``by="version"``) or per segment (``by="segment"``)."""
    out = []
    for series in history.series(model, PERFORMANCE_KIND, version=version, segment=segment):
        points = series.values(metric)
        if points:
            out.append(line(series_name(series, by), points))
    return out


# --- drift -------------------------------------------------------------------------------


def drift_lines(history: StatsHistory, model: str, version: str) -> dict[str, list[Line]]:
    """``{"psi": [...], "ks": [...]}``: a line per feature (and ``score``), per variant when
    a version was measured as more than one."""
    found = history.series(model, DRIFT_KIND, version=version)
    several = len({s.key.variant for s in found}) > 1
    out: dict[str, list[Line]] = {"psi": [], "ks": []}
    for series in found:
        features: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for end, metrics in zip(series.ends, series.metrics, strict=True):
            for name, value in metrics.items():
                parsed = drift_feature(name)
                if parsed is not None:
                    features.setdefault(parsed, []).append((end, value))
        for (statistic, feature), points in sorted(
            features.items(), key=lambda kv: (kv[0][0], kv[0][1] != SCORE_FEATURE, kv[0][1])
        ):
            label = "score" if feature == SCORE_FEATURE else feature
            if several:
                label = f"{label} ({series.key.variant})"
            out[statistic].append(line(label, points))
    return out


def latest_drift(history: StatsHistory, model: str, version: str) -> list[dict[str, Any]]:
    """The last evaluation of each feature: ``feature, psi, ks, at`` rows, worst PSI first."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for series in history.series(model, DRIFT_KIND, version=version):
        if not series.ends:
            continue
        end, metrics = series.ends[-1], series.metrics[-1]
        for name, value in metrics.items():
            parsed = drift_feature(name)
            if parsed is None:
                continue
            statistic, feature = parsed
            row = rows.setdefault(
                (series.key.variant, feature),
                {
                    "feature": "score" if feature == SCORE_FEATURE else feature,
                    "variant": series.key.variant,
                    "at": end,
                    "psi": None,
                    "ks": None,
                },
            )
            row[statistic] = value
    return sorted(rows.values(), key=lambda r: -(r.get("psi") or 0.0))


def pick_drift_version(
    history: StatsHistory, model: str, champion: str | None, asked: str | None
) -> str | None:
    measured = history.drift_versions(model)
    if asked and asked in measured:
        return asked
    if champion in measured:
        return champion
    return measured[-1] if measured else (asked or champion)


# --- models, versions, the deployment log -------------------------------------------------


@dataclass(frozen=True)
class ModelRow:
    name: str
    champion: str | None
    challengers: list[str]
    versions: int
    open_alerts: Counter[str]
    last_change: dict[str, Any] | None


def model_rows(
    models: Sequence[str],
    versions_of: Mapping[str, Sequence[ModelVersion]],
    alerts: Iterable[Mapping[str, Any]],
    history: Sequence[Mapping[str, Any]],
) -> list[ModelRow]:
    open_by_model: dict[str, Counter[str]] = {}
    for alert in alerts:
        open_by_model.setdefault(str(alert.get("model")), Counter())[
            str(alert.get("severity"))
        ] += 1
    last: dict[str, Mapping[str, Any]] = {}
    for event in history:
        last[str(event["model"])] = event
    rows = []
    for name in models:
        versions = versions_of.get(name, [])
        champions = [v for v in versions if v.stage == "champion"]
        champion = max(champions, key=lambda v: v.generation) if champions else None
        rows.append(
            ModelRow(
                name=name,
                champion=champion.version if champion else None,
                challengers=[
                    f"{v.version} ({v.stage})"
                    for v in versions
                    if v.stage in ("shadow", "canary") and v.enabled
                ],
                versions=len(versions),
                open_alerts=open_by_model.get(name, Counter()),
                last_change=dict(last[name]) if name in last else None,
            )
        )
    return rows


def newest_first(events: Sequence[Mapping[str, Any]], limit: int | None = None) -> list[Any]:
    out = list(reversed(events))
    return out if limit is None else out[:limit]


def find_result(events: Sequence[Mapping[str, Any]], request_id: str | None) -> Any:
    """The deployment-log event that answered a request id (the result of an action)."""
    if not request_id:
        return None
    return next((e for e in reversed(events) if e.get("request_id") == request_id), None)


def metadata_view(version: ModelVersion) -> dict[str, Any]:
    """A version's metadata, the fields people look at first pulled out, the rest kept."""
    raw = dict(version.to_json().get("metadata") or {})
    main = {
        key: raw.pop(key)
        for key in (
            "trained_at",
            "dataset",
            "dataset_size",
            "data_window",
            "class_balance",
            "holdout_metrics",
            "cv_metrics",
            "limitations",
            "parent_version",
            "code_version",
            "onnx_opset",
        )
        if key in raw
    }
    recipe = raw.pop("recipe", None)
    validation = raw.pop("validation", None)
    reference = raw.pop("reference", None)
    return {
        "main": main,
        "recipe": recipe,
        "validation": validation,
        "reference_features": sorted((reference or {}).get("features", {}))
        if isinstance(reference, dict)
        else [],
        "other": raw,
    }


# --- alerts ------------------------------------------------------------------------------


def filter_alerts(
    alerts: Iterable[Mapping[str, Any]],
    *,
    model: str | None = None,
    severity: str | None = None,
    text: str | None = None,
) -> list[Mapping[str, Any]]:
    needle = (text or "").lower()
    picked = [
        a
        for a in alerts
        if (not model or a.get("model") == model)
        and (not severity or a.get("severity") == severity)
        and (
            not needle
            or needle in str(a.get("alert_key", "")).lower()
            or needle in str(a.get("summary", "")).lower()
        )
    ]
    picked.sort(key=lambda a: int(a.get("last_seen") or 0), reverse=True)
    return picked


@dataclass(frozen=True)
class Page:
    items: list[Any]
    number: int
    pages: int
    total: int


def paginate(items: Sequence[Any], number: int, size: int = ALERT_PAGE_SIZE) -> Page:
    pages = max(1, -(-len(items) // size))
    number = min(max(1, number), pages)
    start = (number - 1) * size
    return Page(list(items[start : start + size]), number, pages, len(items))


def runbook_url(alert: Mapping[str, Any], base: str | None) -> str:
    """The alert's own runbook when its evidence names an http(s) one, else the section for
    its kind in the configured runbooks (``console_runbook_url``) or the console's own."""
    evidence = alert.get("evidence") or {}
    for key in ("runbook_url", "runbook"):
        own = str(evidence.get(key) or "")
        if urlsplit(own).scheme in ("http", "https"):
            return own
    kind = str(alert.get("kind") or "other")
    anchor = kind if kind in RUNBOOK_KINDS else "other"
    return f"{base or '/console/runbooks'}#{anchor}"


def severity_counts(alerts: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    counts = Counter(str(a.get("severity")) for a in alerts)
    return dict(sorted(counts.items(), key=lambda kv: SEVERITY_ORDER.get(kv[0], 9)))


def alert_view(alert: Mapping[str, Any], runbook_base: str | None) -> dict[str, Any]:
    """An Alert record with every field the pages show (records from older monitors may
    lack some), its evidence sorted and its runbook resolved."""
    subject = alert.get("subject") or {}
    evidence = alert.get("evidence") or {}
    return {
        "key": str(alert.get("alert_key", "")),
        "kind": str(alert.get("kind") or "other"),
        "severity": str(alert.get("severity") or "info"),
        "state": str(alert.get("state") or "firing"),
        "model": str(alert.get("model") or ""),
        "version": alert.get("model_version") or "",
        "signal": str(subject.get("signal") or alert.get("alert_key", "")),
        "segment": str(subject.get("segment") or ""),
        "summary": str(alert.get("summary") or ""),
        "evidence": sorted((str(k), str(v)) for k, v in evidence.items()),
        "first_seen": int(alert.get("first_seen") or 0),
        "last_seen": int(alert.get("last_seen") or 0),
        "count": int(alert.get("count") or 1),
        "runbook": runbook_url(alert, runbook_base),
    }


def most_severe(alerts: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Critical first, then warning, then info; the most recently seen first within each."""
    return sorted(
        alerts,
        key=lambda a: (
            SEVERITY_ORDER.get(str(a.get("severity")), 9),
            -int(a.get("last_seen") or 0),
        ),
    )
