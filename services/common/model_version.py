"""Model versions as the registry publishes them, and the names of stages and variants."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from scoremesh.contract.featurespec import FeatureSpec
from scoremesh.contract.records import ModelVersion as ModelVersionRecord
from services.common.recipes import Recipe

Stage = Literal["registered", "shadow", "canary", "champion", "retired", "rolled_back"]
STAGES: tuple[str, ...] = ("registered", "shadow", "canary", "champion", "retired", "rolled_back")
CHALLENGER_STAGES = ("shadow", "canary")
ACTIVE_STAGES = ("champion", "shadow", "canary")
Variant = Literal["champion", "shadow", "canary"]

_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")


class VersionError(ValueError):
    pass


def parse_semver(version: str) -> tuple[int, int, int]:
    match = _SEMVER.match(version)
    if not match:
        raise VersionError(f"version {version!r} is not semantic (MAJOR.MINOR.PATCH, e.g. 1.2.0)")
    return int(match[1]), int(match[2]), int(match[3])


class DataWindow(BaseModel):
    start: int | None = None
    end: int | None = None


class VersionMetadata(BaseModel):
    """What we know about how a version was made and how good it is.

    Unknown keys are kept (extra="allow") so older readers never drop newer metadata.
    """

    model_config = ConfigDict(extra="allow")

    trained_at: int | None = None
    data_window: DataWindow = Field(default_factory=DataWindow)
    dataset: str = ""
    dataset_size: int = 0
    class_balance: dict[str, float] = Field(default_factory=dict)
    holdout_metrics: dict[str, float] = Field(default_factory=dict)
    cv_metrics: dict[str, Any] = Field(default_factory=dict)
    reference: dict[str, Any] = Field(
        default_factory=dict, description="reference distributions of features and scores"
    )
    limitations: str = ""
    parent_version: str | None = None
    onnx_opset: int | None = None
    code_version: str = ""
    validation: dict[str, Any] = Field(default_factory=dict)
    recipe: Recipe | None = Field(
        None, description="how to train it again: the trainer runs exactly this (docs/adr/0013)"
    )
    training_window: dict[str, Any] = Field(
        default_factory=dict,
        description="what a retrain trained on: the window since the change, the older sample",
    )
    onnx_operators: list[str] = Field(default_factory=list, description="the graph's op types")
    monitoring_gaps: list[str] = Field(
        default_factory=list, description="checks this version does not get, and why"
    )


class VersionProposal(BaseModel):
    """What a register command proposes; the registry turns it into a ModelVersion."""

    model_config = ConfigDict(extra="forbid")

    version: str
    artifact_uri: str
    artifact_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    artifact_size: int = Field(gt=0)
    feature_spec: FeatureSpec
    metadata: VersionMetadata = Field(default_factory=VersionMetadata)


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    stage: str
    generation: int
    artifact_uri: str
    artifact_sha256: str
    artifact_size: int
    feature_spec_json: str
    metadata_json: str
    canary_percent: float = 0.0
    enabled: bool = True
    registered_at: int = 0
    updated_at: int = 0
    request_id: str = ""
    _cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @cached_property
    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec.model_validate_json(self.feature_spec_json)

    @cached_property
    def metadata(self) -> VersionMetadata:
        return VersionMetadata.model_validate_json(self.metadata_json or "{}")

    @property
    def rule_set(self) -> str:
        return f"{self.key}#g{self.generation}"

    @property
    def semver(self) -> tuple[int, int, int]:
        return parse_semver(self.version)

    @classmethod
    def from_record(cls, record: ModelVersionRecord) -> ModelVersion:
        return cls(
            name=record["name"],
            version=record["version"],
            stage=record["stage"],
            generation=record["generation"],
            artifact_uri=record["artifact_uri"],
            artifact_sha256=record["artifact_sha256"],
            artifact_size=record["artifact_size"],
            feature_spec_json=record["feature_spec"],
            metadata_json=record["metadata"],
            canary_percent=record.get("canary_percent", 0.0),
            enabled=record.get("enabled", True),
            registered_at=record.get("registered_at", 0),
            updated_at=record.get("updated_at", 0),
            request_id=record.get("request_id", ""),
        )

    def to_record(self) -> ModelVersionRecord:
        return {
            "name": self.name,
            "version": self.version,
            "stage": self.stage,
            "generation": self.generation,
            "artifact_uri": self.artifact_uri,
            "artifact_sha256": self.artifact_sha256,
            "artifact_size": self.artifact_size,
            "feature_spec": self.feature_spec_json,
            "metadata": self.metadata_json,
            "canary_percent": self.canary_percent,
            "enabled": self.enabled,
            "registered_at": self.registered_at,
            "updated_at": self.updated_at,
            "request_id": self.request_id,
        }

    def to_json(self) -> dict[str, Any]:
        """A human/API view: the spec and metadata as objects, not strings."""
        out: dict[str, Any] = dict(self.to_record())
        out["feature_spec"] = orjson.loads(self.feature_spec_json)
        out["metadata"] = orjson.loads(self.metadata_json or "{}")
        return out
