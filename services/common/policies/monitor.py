"""What the monitor watches and when it speaks: detectors, windows, severity rules, sinks.

One frozen pydantic model with defaults, passed to ``MonitorService`` and ``MonitorCore``.
Per-model overrides live under ``models``; ``MonitorPolicy.for_model`` merges them. A
policy can be loaded from a YAML or JSON file (``load_policy``) so operators tune
thresholds without a release.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

Severity = Literal["info", "warning", "critical"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "critical")
DetectorKind = Literal["adwin", "page_hinkley", "kswin", "ddm", "eddm", "hddm_a", "hddm_w"]
SinkName = Literal["log", "webhook", "slack", "pagerduty"]


def severity_rank(severity: str) -> int:
    """info < warning < critical; anything else ranks below info."""
    return SEVERITIES.index(severity) if severity in SEVERITIES else -1  # type: ignore[arg-type]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DetectorSpec(_Frozen):
    """One River detector. ``sample_every`` feeds it every k-th value (KSWIN costs ~300 µs)."""

    kind: DetectorKind
    params: dict[str, float | int | str] = Field(default_factory=dict)
    sample_every: int = Field(1, ge=1)


# ADWIN without an explicit delta takes its share of the model's false-alarm budget
# (``BudgetPolicy``); a delta given here is used as it is.
ADWIN = DetectorSpec(kind="adwin")


class DetectorPolicy(_Frozen):
    """Stream detectors of one model version, each fed the version's whole stream.

    ``categorical``: one detector per category share (the 0/1 indicator of each category,
    and of "any other value"), so a share that moves is found as fast as a mean that moves.
    """

    numeric: tuple[DetectorSpec, ...] = (ADWIN,)
    categorical: tuple[DetectorSpec, ...] = (ADWIN,)
    score: tuple[DetectorSpec, ...] = (ADWIN,)
    confidence: tuple[DetectorSpec, ...] = (ADWIN,)
    error: tuple[DetectorSpec, ...] = (ADWIN,)
    error_direction: Literal["increase", "both"] = Field(
        "increase", description="a falling error rate is good news, not an alert"
    )


class BudgetPolicy(_Frozen):
    """The family-wise false-alarm budget of one model version's stream detectors.

    Bonferroni: every signal (a feature, the score, the confidence, the error rate) gets
    ``family_delta / signals`` as its ADWIN delta, split again among a categorical
    feature's category shares; adding features therefore does not add false alarms.
    """

    family_delta: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="ADWIN's false-detection budget of a version, all signals together: a "
        "detection alone is info; pages need the re-measure on fresh values to confirm it",
    )


class WindowPolicy(_Frozen):
    """Count windows per (model, version): the last ``size`` predictions, tested every
    ``hop`` predictions once ``min_samples`` are in."""

    size: int = Field(5_000, ge=100)
    hop: int = Field(1_000, ge=1)
    min_samples: int = Field(1_000, ge=50)
    psi_epsilon: float = Field(1e-4, gt=0, lt=0.1)

    @model_validator(mode="after")
    def _consistent(self) -> WindowPolicy:
        if self.min_samples > self.size:
            raise ValueError("window.min_samples must not exceed window.size")
        return self


class Thresholds(_Frozen):
    """Levels a statistic must reach (``below``: fall under) for each severity."""

    info: float | None = None
    warning: float | None = None
    critical: float | None = None
    below: bool = False

    def severity(self, value: float) -> Severity | None:
        found: Severity | None = None
        for name in SEVERITIES:
            level = getattr(self, name)
            if level is None:
                continue
            if (value <= level) if self.below else (value >= level):
                found = name
        return found

    def lowest(self) -> float | None:
        levels = [v for v in (self.info, self.warning, self.critical) if v is not None]
        if not levels:
            return None
        return max(levels) if self.below else min(levels)


class SeverityRule(_Frozen):
    """``signal`` is an fnmatch pattern (``reference_drift.*``); the first rule matching a
    (signal, statistic) pair decides its severity."""

    signal: str
    statistic: str
    thresholds: Thresholds


DEFAULT_RULES: tuple[SeverityRule, ...] = (
    # Stream detectors: severity from the size of the change found at the detection, as
    # the one-sided 97.5 % lower confidence bound (services/monitor/detectors.py).
    # shift_sd: |mean after - mean before| / standard deviation, of a feature, the score,
    # the confidence or a category's 0/1 indicator (Cohen's d: 0.2 small, 0.5 medium, 0.8
    # large); a 0.5 sd step reads ~0.35, a slow drift < 0.2. increase: of the error rate.
    SeverityRule(
        signal="stream_drift.*",
        statistic="shift_sd",
        thresholds=Thresholds(info=0.0, warning=0.2, critical=0.8),
    ),
    SeverityRule(
        signal="category_shift.*",
        statistic="shift_sd",
        thresholds=Thresholds(info=0.0, warning=0.2, critical=0.8),
    ),
    SeverityRule(
        signal="error_rate",
        statistic="increase",
        thresholds=Thresholds(info=0.0, warning=0.02, critical=0.05),
    ),
    # Windows against the training reference (an input feature's reference drift pages
    # above info only when the model's output moved too: AlertPolicy.input_drift_alone).
    SeverityRule(
        signal="reference_drift.*",
        statistic="psi",
        thresholds=Thresholds(warning=0.1, critical=0.25),
    ),
    SeverityRule(
        signal="reference_drift.*",
        statistic="ks",
        thresholds=Thresholds(warning=0.1, critical=0.2),
    ),
    SeverityRule(
        signal="class_shift", statistic="psi", thresholds=Thresholds(warning=0.1, critical=0.25)
    ),
    SeverityRule(
        signal="range_violation.*",
        statistic="rate",
        thresholds=Thresholds(warning=0.01, critical=0.05),
    ),
    SeverityRule(
        signal="null_rate.*",
        statistic="increase",
        thresholds=Thresholds(warning=0.05, critical=0.2),
    ),
)


class AlertPolicy(_Frozen):
    cooldown_s: float = Field(
        900.0,
        gt=0,
        description="an alert stays open, absorbing repeats, until its condition has been "
        "clear this long; then it resolves",
    )
    heartbeat_s: float = Field(
        300.0, gt=0, description="a firing alert's record is re-written at most this often"
    )
    renotify_s: float = Field(0.0, ge=0, description="re-send a firing alert; 0 = never")
    resolve_ratio: float = Field(
        0.8, gt=0, le=1, description="a windowed statistic clears below this share of its level"
    )
    rules: tuple[SeverityRule, ...] = DEFAULT_RULES
    input_drift_alone: Severity = Field(
        "info",
        description="the highest severity of an input feature's reference drift while the "
        "model's score and decisions hold and its error rate has not risen: slow, harmless "
        "input drift (a trend, a season, a random walk) is worth knowing, not a page",
    )
    runbook_url: str = Field(
        "docs/operations.md",
        description="alerts link to <runbook_url>#<anchor> (the anchor names the signal)",
    )
    deployment_refused_severity: Severity = "warning"
    model_load_failed_severity: Severity = "critical"
    retrain_needs_person_severity: Severity = Field(
        "warning",
        description="a retrain the trainer refused to run (no recipe, or its code changed)",
    )
    deployment_max_age_s: float = Field(
        86_400.0, gt=0, description="older deployments.log records never alert (first start)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> AlertPolicy:
        if self.heartbeat_s >= self.cooldown_s:
            raise ValueError(
                "alerts.heartbeat_s must be below alerts.cooldown_s, or a sibling monitor "
                "could resolve an alert another one still sees"
            )
        return self


class PerformanceRule(_Frozen):
    """A metric worse than the version's training value by more than ``max_drop`` (the
    label-join's ``ThresholdRule``, as configuration)."""

    metric: str = "f1"
    max_drop: float = Field(0.05, ge=0)
    critical_drop: float | None = Field(0.15, ge=0)
    min_labels: int = Field(200, ge=1)
    window_kind: Literal["tumbling", "sliding"] = "sliding"
    segments: Literal["all", "every"] = "all"


class PerformancePolicy(_Frozen):
    rules: tuple[PerformanceRule, ...] = (PerformanceRule(),)


class StatePolicy(_Frozen):
    """Detector snapshots on ``monitor.state`` (JSON; the state of a River ADWIN is the
    library's own plain-data encoding, base64) and the bounded replay that follows them."""

    snapshot_every_records: int = Field(
        500, ge=1, description="signal records of a partition between two snapshots"
    )
    snapshot_interval_s: float = Field(
        30.0, gt=0, description="and at least this often while signals arrive"
    )
    cold_replay_records: int = Field(
        2_000,
        ge=0,
        description="with no snapshot (first start): signal records replayed per partition",
    )
    timeout_s: float = Field(60.0, gt=0)


def _default_min_severity() -> dict[SinkName, Severity]:
    return {"log": "info", "webhook": "info", "slack": "warning", "pagerduty": "critical"}


class SinkPolicy(_Frozen):
    queue_size: int = Field(1_000, ge=1)
    max_attempts: int = Field(6, ge=1)
    backoff_initial_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    timeout_s: float = Field(5.0, gt=0)
    webhook_url: str | None = None
    slack_webhook_url: SecretStr | None = None
    pagerduty_routing_key: SecretStr | None = None
    pagerduty_url: str = "https://events.pagerduty.com/v2/enqueue"
    min_severity: dict[SinkName, Severity] = Field(default_factory=_default_min_severity)

    @model_validator(mode="after")
    def _consistent(self) -> SinkPolicy:
        if self.backoff_initial_s > self.backoff_max_s:
            raise ValueError("sinks.backoff_initial_s must not exceed sinks.backoff_max_s")
        return self


class ModelPolicy(_Frozen):
    """Per-model overrides; unset parts fall back to the policy-wide ones."""

    detectors: DetectorPolicy | None = None
    budget: BudgetPolicy | None = None
    window: WindowPolicy | None = None
    rules: tuple[SeverityRule, ...] = Field((), description="checked before the policy-wide rules")
    performance: PerformancePolicy | None = None
    exclude_features: tuple[str, ...] = ()


@dataclass(frozen=True)
class EffectivePolicy:
    detectors: DetectorPolicy
    budget: BudgetPolicy
    window: WindowPolicy
    rules: tuple[SeverityRule, ...]
    performance: PerformancePolicy
    exclude_features: frozenset[str]


class MonitorPolicy(_Frozen):
    detectors: DetectorPolicy = DetectorPolicy()
    window: WindowPolicy = WindowPolicy()
    alerts: AlertPolicy = AlertPolicy()
    performance: PerformancePolicy = PerformancePolicy()
    budget: BudgetPolicy = BudgetPolicy()
    state: StatePolicy = StatePolicy()
    sinks: SinkPolicy = SinkPolicy()
    models: dict[str, ModelPolicy] = Field(default_factory=dict)
    lag_interval_s: float = Field(15.0, ge=0, description="0 = no consumer-lag export")
    drift_state_interval_s: float = Field(5.0, ge=0, description="Redis drift-state writes")
    dedupe_per_partition: int = Field(
        20_000, ge=0, description="recent (event_id, variant) keys remembered per partition"
    )
    redis_alert_ttl_s: int = Field(30 * 86_400, ge=60)
    redis_recent_alerts: int = Field(1_000, ge=1)

    def for_model(self, model: str) -> EffectivePolicy:
        override = self.models.get(model, ModelPolicy())
        return EffectivePolicy(
            detectors=override.detectors or self.detectors,
            budget=override.budget or self.budget,
            window=override.window or self.window,
            rules=override.rules + self.alerts.rules,
            performance=override.performance or self.performance,
            exclude_features=frozenset(override.exclude_features),
        )


class PolicyError(ValueError):
    """A policy file is unreadable or invalid; the message names the file and the field."""


def load_policy(path: Path | None, **overrides: Any) -> MonitorPolicy:
    """A policy from a YAML or JSON file (or the defaults), with top-level overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = path.read_text()
        except OSError as exc:
            raise PolicyError(f"monitor policy {path}: cannot read it ({exc})") from None
        try:
            loaded = orjson.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
            raise PolicyError(f"monitor policy {path}: not valid YAML/JSON ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise PolicyError(f"monitor policy {path}: the top level must be a mapping")
        data = loaded or {}
    data.update(overrides)
    try:
        return MonitorPolicy.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in exc.errors()
        )
        raise PolicyError(f"monitor policy {path or '(defaults)'}: {problems}") from None


def with_sinks(
    policy: MonitorPolicy,
    *,
    webhook_url: str | None = None,
    slack_webhook_url: SecretStr | None = None,
    pagerduty_routing_key: SecretStr | None = None,
) -> MonitorPolicy:
    """The policy with sink endpoints from secrets (kept out of the policy JSON itself)."""
    update: dict[str, Any] = {}
    if webhook_url:
        update["webhook_url"] = webhook_url
    if slack_webhook_url is not None:
        update["slack_webhook_url"] = slack_webhook_url
    if pagerduty_routing_key is not None:
        update["pagerduty_routing_key"] = pagerduty_routing_key
    if not update:
        return policy
    return policy.model_copy(update={"sinks": policy.sinks.model_copy(update=update)})
