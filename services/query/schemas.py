"""Request and response shapes, for validation where it is cheap and for the OpenAPI document.

``POST /v1/predict`` does not validate through these (raw body + orjson + the model's rule
set is several times faster); they only describe it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from scoremesh.contract.featurespec import MAX_ID_LEN

SEMVER = r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$"
MODEL_NAME = r"^[a-z0-9][a-z0-9_-]{0,63}$"

FeatureValue = bool | int | float | str | None


class EventIn(BaseModel):
    """One event: the same envelope as events.raw."""

    model_config = ConfigDict(extra="allow")

    event_id: str = Field(min_length=1, max_length=MAX_ID_LEN)
    entity_id: str = Field(min_length=1, max_length=MAX_ID_LEN)
    event_time: int | str = Field(
        description="epoch milliseconds, or ISO-8601 with a zone (2026-11-02T10:00:00Z)"
    )
    features: dict[str, FeatureValue] = Field(
        description="feature name -> value; names and types come from the model's feature spec"
    )
    attributes: dict[str, str] = Field(
        default_factory=dict, description="segment attributes, e.g. channel"
    )


class EventBatchIn(BaseModel):
    events: list[EventIn] = Field(
        min_length=1, description="up to the configured limit (SCOREMESH_API_MAX_BATCH, 256)"
    )


class PredictionOut(BaseModel):
    """The prediction that decides for an event (the champion's, or a canary's)."""

    event_id: str
    entity_id: str
    decision: str = Field(description="the predicted class")
    score: float = Field(description="probability of the positive class")
    scores: dict[str, float] = Field(description="probability per class")
    model: str
    model_version: str
    variant: Literal["champion", "canary", "shadow"]
    served: bool = Field(description="true: this variant decided for the entity")
    flags: list[str] = Field(description="flag-action rules the event tripped")


class PredictionBatchOut(BaseModel):
    predictions: list[PredictionOut]


class StoredPrediction(BaseModel):
    """A prediction as the scorer or the API wrote it (the predictions topic's record)."""

    model_config = ConfigDict(extra="allow")

    event_id: str
    entity_id: str
    event_time: int
    model: str
    model_version: str
    variant: str
    served: bool
    source: Literal["stream", "sync"]
    score: float
    scores: dict[str, float]
    decision: str
    features: dict[str, FeatureValue]
    attributes: dict[str, str] = Field(default_factory=dict)
    latency_ms: float
    scored_at: int


class EventPredictionsOut(BaseModel):
    model: str = Field(description="the model that made these predictions")
    event_id: str
    variants: dict[str, StoredPrediction] = Field(description="variant -> latest prediction")


class EntityPredictionsOut(BaseModel):
    entity_id: str
    predictions: list[EventPredictionsOut] = Field(description="newest event time first")


class VersionSummary(BaseModel):
    version: str
    stage: str
    generation: int
    canary_percent: float
    enabled: bool
    registered_at: int
    updated_at: int


class ServingOut(BaseModel):
    champion: str | None
    challengers: list[str]
    failures: dict[str, str] = Field(description="versions this replica could not load, and why")


class ModelSummary(BaseModel):
    name: str
    champion: str | None
    challengers: list[VersionSummary]
    versions: int


class ModelsOut(BaseModel):
    models: list[ModelSummary]


class ModelOut(BaseModel):
    name: str
    champion: str | None
    challengers: list[VersionSummary]
    versions: list[VersionSummary]
    serving: ServingOut | None = Field(
        description="what this replica serves; null for models it does not serve"
    )


class VersionOut(BaseModel):
    """A registered version: stage, artifact, feature spec and metadata (metrics,
    limitations, data window, reference distributions)."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: str
    stage: str
    generation: int
    artifact_uri: str
    artifact_sha256: str
    artifact_size: int
    feature_spec: dict[str, Any]
    metadata: dict[str, Any]
    canary_percent: float
    enabled: bool
    registered_at: int
    updated_at: int
    request_id: str


class DeploymentEventOut(BaseModel):
    """The registry's audit record for one command (deployments.log)."""

    request_id: str
    model: str
    version: str | None
    action: str
    outcome: Literal["applied", "refused"]
    from_stage: str | None
    to_stage: str | None
    previous_champion: str | None
    new_champion: str | None
    generation: int
    actor: str
    reason: str
    detail: str
    at: int


class HistoryOut(BaseModel):
    model: str
    events: list[DeploymentEventOut] = Field(description="oldest first")


class PromoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(pattern=SEMVER, examples=["1.2.0"])
    stage: Literal["shadow", "canary", "champion", "retired"]
    percent: float | None = Field(
        None, gt=0, le=100, description="canary share of entities, in percent"
    )
    reason: str = Field("", max_length=500)


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str | None = Field(
        None,
        pattern=SEMVER,
        description="a shadow or canary version to take out; omit to roll back the champion",
    )
    reason: str = Field("", max_length=500)


class RetrainIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=500, description="why, for the trainer and the log")
    window_days: float | None = Field(
        None,
        gt=0,
        le=3650,
        description="event-time span of the training data; default: the retrain policy's",
    )
    window_end: AwareDatetime | None = Field(
        None, description="end of that span, ISO-8601 with a zone; default: now"
    )


class RetrainRequestOut(BaseModel):
    """The request as published to retrain.requests (the trainer's input)."""

    request_id: str
    model: str
    reason: str
    evidence: dict[str, str]
    window_start: int = Field(description="epoch milliseconds, event time")
    window_end: int = Field(description="epoch milliseconds, event time")
    actor: str
    requested_at: int


class RetrainAcceptedOut(BaseModel):
    request: RetrainRequestOut
    result_url: str = Field(description="where the trainer's answer appears (GET)")


class RetrainResultOut(BaseModel):
    """The trainer's latest record for a request (retrain.results)."""

    request_id: str
    model: str
    status: Literal["started", "succeeded", "rejected", "failed"]
    attempt: int
    version: str | None = Field(description="the version registered (in shadow), when succeeded")
    parent_version: str | None
    detail: str = Field(description="what happened; the reasons when rejected or failed")
    metrics: dict[str, float] = Field(description="the new model on the most recent events")
    champion_metrics: dict[str, float] = Field(description="the champion on the same events")
    examples: int
    window_start: int
    window_end: int
    trainer: str
    at: int


class MonitoringOut(BaseModel):
    model: str
    stats: list[dict[str, Any]] = Field(
        description="the monitor's latest drift measurement per version x signal"
    )
    versions: list[dict[str, Any]] = Field(
        default_factory=list,
        description="per version and segment over the whole stream: predictions, decision "
        "shares, labels, label coverage and delay, error rate",
    )
    segments: list[dict[str, Any]] = Field(
        default_factory=list,
        description="per version, variant and segment, the label join's newest statistics "
        "(sliding window): MonitoringStats records (count, metrics with label delay "
        "percentiles and the error rate per feature bin)",
    )
    note: str | None = None


class AlertsOut(BaseModel):
    alerts: list[dict[str, Any]] = Field(description="Alert records, most recently seen first")
    note: str | None = None


class HealthOut(BaseModel):
    status: Literal["alive"]
    service: str


class ReadyOut(BaseModel):
    ready: bool
    service: str
    checks: dict[str, str]


class ProblemError(BaseModel):
    code: str = Field(description="reason code, the validator's vocabulary for event problems")
    field: str | None = None
    message: str
    index: int | None = Field(None, description="position of the event in the request")
    event_id: str | None = None


class ProblemOut(BaseModel):
    """RFC 9457 problem details (application/problem+json)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    instance: str
    request_id: str | None = None
    errors: list[ProblemError] | None = None


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for problem+json answers."""
    return {
        status: {
            "model": ProblemOut,
            "content": {"application/problem+json": {}},
            "description": _DESCRIPTIONS.get(status, "problem"),
        }
        for status in statuses
    }


_DESCRIPTIONS = {
    400: "Malformed request",
    401: "Missing or wrong bearer token",
    403: "Mutating routes are disabled (no token configured)",
    404: "Unknown resource",
    409: "The registry refused the command",
    413: "Request body over the limit",
    422: "Invalid request or events (reason codes per event)",
    503: "Not ready: no model, or Kafka/Redis unavailable",
    504: "Timed out",
}
