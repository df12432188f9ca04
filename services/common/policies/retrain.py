"""Retraining and promotion policies: which signals count, how often, and when a challenger
has earned its next stage. Pure data, validated, with defaults a team can start from."""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SEVERITIES = ("info", "warning", "critical")


class PerModel(BaseModel):
    """A policy with per-model overrides: ``{"min_new_labels": 500, "models": {"fraud":
    {"min_new_labels": 5000}}}`` gives fraud 5000 and every other model 500."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    models: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-model overrides of this policy's fields"
    )

    @model_validator(mode="after")
    def _overrides_valid(self) -> Self:
        for name in self.models:
            try:
                self.for_model(name)
            except ValueError as exc:
                raise ValueError(f"models.{name}: {exc}") from None
        return self

    def for_model(self, model: str) -> Self:
        """This policy with the model's overrides applied (itself when there are none)."""
        overrides = self.models.get(model)
        if not overrides:
            return self
        if "models" in overrides:
            raise ValueError("overrides cannot nest 'models'")
        merged = {**self.model_dump(exclude={"models"}), **overrides}
        return type(self).model_validate(merged)


class RetrainPolicy(PerModel):
    # Decaying performance retrains; input drift alone pages a person (it can be benign, and
    # a detector's false alarm must not train a model on the old concept). Add "drift" to
    # retrain on it too.
    alert_kinds: tuple[str, ...] = ("performance",)
    min_severity: str = "warning"
    signals: tuple[str, ...] = Field(
        default=(), description="if set, only alerts whose subject.signal is one of these count"
    )
    min_new_labels: int = Field(500, ge=0, description="labels since the last retrain")
    min_interval_s: float = Field(3600.0, ge=0)
    max_per_day: int = Field(6, ge=1)
    window_s: float = Field(7 * 86400.0, gt=0, description="event-time span of training data")
    train_from_change: bool = Field(
        True,
        description="after a drift/performance alert, wait for labels from after the change "
        "and train on [change, now] instead of the last window_s",
    )
    min_labels_after_change: int = Field(1000, ge=1)
    schedule: str | None = Field(None, description="cron expression for scheduled retrains")

    @field_validator("min_severity")
    @classmethod
    def _known_severity(cls, value: str) -> str:
        if value not in SEVERITIES:
            raise ValueError(f"min_severity must be one of {SEVERITIES}")
        return value

    @field_validator("schedule")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is not None:
            from croniter import croniter

            if not croniter.is_valid(value):
                raise ValueError(f"{value!r} is not a cron expression (e.g. '0 3 * * 0')")
        return value


class TrainingWindowPolicy(BaseModel):
    """What a retrain trains on: the requested window (after a change: the labelled data
    since it) plus a bounded random sample of older labelled data, so a retrain neither
    forgets everything before the change nor overfits the last minutes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    older_ratio: float = Field(
        0.25, ge=0, le=10, description="older examples per example of the window, at most"
    )
    older_max_examples: int = Field(5_000, ge=0, description="cap on the older sample")
    older_lookback_s: float = Field(
        30 * 86400.0, ge=0, description="how far before the window the sample may reach"
    )
    recent_share: float = Field(
        0.2, gt=0, lt=1, description="newest share of the window kept to compare with the champion"
    )
    min_examples: int = Field(500, ge=50, description="labelled examples the window needs")
    seed: int = 0

    def older_cap(self, window_examples: int) -> int:
        return min(self.older_max_examples, round(self.older_ratio * window_examples))


class PromotionPolicy(PerModel):
    """Live promotion: shadow -> canary -> champion only on labelled evidence."""

    enabled: bool = True
    metric: str = "accuracy"
    min_labels: int = Field(300, ge=10, description="labels per variant before judging")
    max_labels: int = Field(20_000, ge=10, description="give up (retire) after this many")
    margin: float = Field(0.01, ge=0, description="challenger must beat champion by this")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="one-sided significance level")
    canary_percent: float = Field(25.0, gt=0, le=100)
    skip_canary: bool = False
