"""`scoremesh models spec init`: a first feature spec, inferred from labelled data, to edit.

From a CSV (with a header) or JSON lines (flat objects, or event envelopes with
``features``) and the name of the label column it infers, per column in file order: the
type, whether it may be null (and what the model sees then: the median, or the most
frequent category), a range widened by a margin (out-of-range values are flagged, not
rejected: an inferred range is a guess), and categories for strings and for whole numbers
with few distinct values; and the classes of the label. Every guess worth a second look is
returned as a note.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from scoremesh.contract.featurespec import FeatureRule, FeatureSpec, LatencyGate, ReadinessGates
from services.common.errors import UserError
from services.common.tabular import csv_header, detect, label_text, read_file, read_rows

MAX_STRING_CATEGORIES = 100
POSITIVE_NAMES = ("1", "true", "yes", "positive", "fraud", "default", "churn")


class SpecInferenceError(UserError, ValueError):
    """The data cannot give a spec; the message says what is wrong with it."""


@dataclass(frozen=True)
class InferredSpec:
    spec: FeatureSpec
    notes: list[str]
    rows: int


def read_table(path: Path, label: str) -> tuple[list[str], list[dict[str, Any]], list[str]]:
    """(feature columns in file order, rows, labels as strings)."""
    text = read_file(path, SpecInferenceError)
    if detect(text, path.name) == "csv" and label not in (header := csv_header(text)):
        raise SpecInferenceError(
            f"{path.name}: no column {label!r} in the header ({', '.join(header)})"
        )
    rows: list[dict[str, Any]] = []
    labels: list[str] = []
    columns: dict[str, None] = {}
    for row in read_rows(text, path.name):
        if row.values is None:
            raise SpecInferenceError(f"{path.name}:{row.line}: {row.problem}")
        obj = row.values
        if obj.get(label) in (None, ""):
            raise SpecInferenceError(f"{path.name}:{row.line}: the label {label!r} is empty")
        nested = obj.get("features")
        features = nested if isinstance(nested, dict) else obj
        values = {k: v for k, v in features.items() if k != label}
        columns.update(dict.fromkeys(values))
        rows.append(values)
        labels.append(label_text(obj[label]))
    if not rows:
        raise SpecInferenceError(f"{path.name}: no rows")
    return list(columns), rows, labels


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return float(ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2)


def _rule(
    name: str, values: list[Any], total: int, margin: float, max_categories: int, notes: list[str]
) -> FeatureRule | None:
    present = [v for v in values if v is not None]
    nulls = total - len(present)
    nullable = nulls > 0
    if not present:
        notes.append(f"{name}: dropped, always null or absent")
        return None
    kinds = {type(v) for v in present}
    if kinds == {bool}:
        counts = Counter(present)
        impute = float(counts.most_common(1)[0][0]) if nullable else None
        return FeatureRule(name=name, dtype="boolean", nullable=nullable, impute=impute)
    if kinds <= {int, float} and bool not in kinds:
        dtype = "long" if kinds == {int} else "double"
        distinct = sorted(set(present))
        impute = _median([float(v) for v in present]) if nullable else None
        if dtype == "long" and len(distinct) <= max_categories:
            if nullable:
                impute = float(Counter(present).most_common(1)[0][0])
            notes.append(
                f"{name}: whole numbers with {len(distinct)} distinct values -> categories "
                f"{distinct}; unseen values are flagged (category_action), or make it a range"
            )
            return FeatureRule(
                name=name,
                dtype="long",
                nullable=nullable,
                impute=impute,
                categories=list(distinct),
                category_action="flag",
            )
        low, high = float(min(present)), float(max(present))
        span = high - low or abs(high) or 1.0
        lo, hi = low - margin * span, high + margin * span
        if low >= 0:
            lo = max(lo, 0.0)
        if dtype == "long":
            lo, hi = float(math.floor(lo)), float(math.ceil(hi))
        if nullable:
            notes.append(
                f"{name}: null in {nulls / total:.1%} of rows; the model sees the median "
                f"{impute:g} then (edit 'impute' if null means something else, e.g. 0)"
            )
        return FeatureRule(
            name=name,
            dtype=dtype,
            nullable=nullable,
            impute=impute,
            min=lo,
            max=hi,
            range_action="flag",
        )
    if kinds == {str}:
        distinct_s = sorted(set(present))
        if len(distinct_s) > MAX_STRING_CATEGORIES:
            notes.append(
                f"{name}: dropped, {len(distinct_s)} distinct strings (a model needs them "
                "encoded: map them to fewer categories or numbers in your data first)"
            )
            return None
        counts = Counter(present)
        impute = float(distinct_s.index(counts.most_common(1)[0][0])) if nullable else None
        notes.append(
            f"{name}: text -> {len(distinct_s)} categories, encoded as their index in the "
            "list (the order is part of the model's input: keep it)"
        )
        return FeatureRule(
            name=name,
            dtype="string",
            nullable=nullable,
            impute=impute,
            categories=list(distinct_s),
            category_action="flag",
        )
    shown = ", ".join(sorted(k.__name__ for k in kinds))
    raise SpecInferenceError(
        f"column {name!r} mixes types ({shown}); make it one type in the data, then retry"
    )


def infer_spec(
    columns: list[str],
    rows: list[dict[str, Any]],
    labels: list[str],
    margin: float = 0.1,
    max_categories: int = 12,
) -> InferredSpec:
    if margin < 0:
        raise SpecInferenceError(f"the margin must not be negative, got {margin}")
    notes: list[str] = []
    rules = []
    for name in columns:
        rule = _rule(
            name, [row.get(name) for row in rows], len(rows), margin, max_categories, notes
        )
        if rule is not None:
            rules.append(rule)
    if not rules:
        raise SpecInferenceError("no usable feature columns")
    counts = Counter(labels)
    classes = sorted(counts)
    if len(classes) < 2:
        raise SpecInferenceError(f"the label has a single class ({classes[0]}); nothing to learn")
    if len(classes) > 50:
        raise SpecInferenceError(
            f"the label has {len(classes)} distinct values: scoremesh serves classifiers "
            "(is it the right column?)"
        )
    positive = next((c for c in classes if c.lower() in POSITIVE_NAMES), None)
    if positive is None:
        positive = min(classes, key=lambda c: counts[c])
        notes.append(f"positive class: {positive!r}, the rarest; edit 'positive_class' if not")
    rarest = min(counts.values()) / len(labels)
    gates = ReadinessGates(
        latency=[LatencyGate(batch_size=1, p99_ms=10.0)],
        max_artifact_bytes=50 * 1024 * 1024,
        min_class_share=0.01 if rarest >= 0.01 else None,
    )
    notes.append(
        'gates: no metric floor yet; add e.g. "min_metrics": {"f1": 0.8} so that a version '
        "below it cannot register"
    )
    try:
        spec = FeatureSpec(features=rules, classes=classes, positive_class=positive, gates=gates)
    except ValidationError as exc:
        raise SpecInferenceError(
            f"the inferred spec is invalid: {exc.errors()[0]['msg']}"
        ) from None
    return InferredSpec(spec, notes, len(rows))


def spec_from_file(
    path: Path, label: str, margin: float = 0.1, max_categories: int = 12
) -> InferredSpec:
    columns, rows, labels = read_table(path, label)
    return infer_spec(columns, rows, labels, margin, max_categories)
