"""Registry operations shared by the CLI, the query API and the trainer."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from scoremesh.contract.featurespec import FeatureSpec
from scoremesh.contract.records import DeploymentEvent
from services.common.artifacts import store_artifact
from services.common.commands import command, new_command, refusal
from services.common.errors import UserError
from services.common.evaluation import reference_distributions
from services.common.model_version import VersionMetadata, VersionProposal, parse_semver
from services.common.readiness import ReadinessReport, load_candidate, validate_model
from services.common.recipes import (
    EntryPointRecipe,
    PipelineRecipe,
    RecipeError,
    to_onnx,
    trial_run,
)
from services.common.settings import Settings
from services.common.tabular import csv_header, detect, label_text, read_file, read_rows


class OperationError(UserError, ValueError):
    """Bad input to a registry operation; the message says what and how to fix it."""


ONNX_MAGIC_HINT = b"\x08"  # ModelProto starts with field 1 (ir_version), varint


def load_spec(path: Path) -> FeatureSpec:
    try:
        return FeatureSpec.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise OperationError(f"cannot read spec {path}: {exc.strerror}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "spec"
        raise OperationError(f"{path}: {where}: {first['msg']}") from None


def load_model_bytes(path: Path, spec: FeatureSpec, trust_pickle: bool = False) -> bytes:
    """ONNX bytes from an .onnx file, or from a scikit-learn pickle the user vouches for."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OperationError(f"cannot read model {path}: {exc.strerror}") from None
    if path.suffix.lower() in (".pkl", ".pickle", ".joblib"):
        if not trust_pickle:
            raise OperationError(
                f"{path.name} is a pickle: unpickling runs arbitrary code, so scoremesh only does "
                "it for a file from your own disk with --trust-pickle (it is converted to ONNX "
                "on the spot; services never load pickles)"
            )
        return sklearn_pickle_to_onnx(data, spec)
    if not data or data[:1] != ONNX_MAGIC_HINT:
        raise OperationError(f"{path.name} does not look like an ONNX model (export with skl2onnx)")
    return data


def sklearn_pickle_to_onnx(data: bytes, spec: FeatureSpec) -> bytes:
    estimator = pickle.loads(data)
    if not hasattr(estimator, "predict_proba"):
        raise OperationError(
            "the pickled object has no predict_proba: scoremesh serves classifiers"
        )
    try:
        return to_onnx(estimator, spec)
    except RecipeError as exc:
        raise OperationError(f"could not convert the pickle: {exc}") from None


def _coerce(value: Any, dtype: str) -> Any:
    """A CSV cell (already typed by ``parse_cell``) as the spec's dtype wants it."""
    if value is None:
        return None
    if dtype == "double":
        return float(value)
    if dtype == "long":
        return int(value) if isinstance(value, int) else int(float(value))
    if dtype == "boolean":
        if value not in (True, False, 1, 0):
            raise ValueError(f"{value!r} is not a boolean")
        return bool(value)
    return str(value)


def load_labelled_data(
    path: Path, spec: FeatureSpec, label_field: str = "label"
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows and labels from JSON lines (events or flat objects) or CSV with a header."""
    text = read_file(path, OperationError)
    rows: list[dict[str, Any]] = []
    labels: list[str] = []
    dtypes = {r.name: r.dtype for r in spec.features}
    csv_input = detect(text, path.name) == "csv"
    if csv_input:
        missing = [n for n in [*dtypes, label_field] if n not in csv_header(text)]
        if missing:
            raise OperationError(f"{path.name}: the CSV header lacks {missing}")
    for row in read_rows(text, path.name):
        if row.values is None:
            raise OperationError(f"{path.name}:{row.line}: {row.problem}")
        obj = row.values
        if obj.get(label_field) is None:
            raise OperationError(f"{path.name}:{row.line}: expected a {label_field!r}")
        if csv_input:
            try:
                rows.append({n: _coerce(obj[n], dtypes[n]) for n in dtypes})
            except ValueError as exc:
                raise OperationError(f"{path.name}:{row.line}: {exc}") from None
        else:
            features = obj.get("features", obj)
            rows.append({n: features.get(n) for n in dtypes})
        labels.append(label_text(obj[label_field]))
    if not rows:
        raise OperationError(f"{path.name}: no rows")
    return rows, labels


def monitoring_gaps(metadata: VersionMetadata, spec: FeatureSpec) -> list[str]:
    """The checks a version will not get, in words, from what its metadata lacks."""
    gaps = []
    if not metadata.holdout_metrics:
        gaps.append(
            "no holdout metrics: performance alerts relative to training (a metric more than "
            "X below its holdout value) will not fire; only the error-rate detector watches "
            "labelled predictions (register with --data HOLDOUT to get them)"
        )
    if not metadata.reference.get("features"):
        gaps.append(
            "no reference distributions: PSI/KS drift of the features, the score and the "
            "confidence against training data is not measured; stream detectors still "
            "compare the stream with its own past"
        )
    if not metadata.class_balance and not metadata.reference.get("decisions"):
        gaps.append("no class balance: the predicted-class shift is not measured")
    if spec.gates.min_metrics and not metadata.validation.get("metrics"):
        gaps.append(
            "metric gates "
            + ", ".join(f"{k} >= {v}" for k, v in spec.gates.min_metrics.items())
            + " were not evaluated (no labelled data)"
        )
    if metadata.recipe is None:
        gaps.append(
            "no training recipe: a retrain will not run; it is reported as needing a person "
            "(register with --recipe package.module:function or a pipeline JSON)"
        )
    return gaps


def holdout_profile(
    onnx: bytes, spec: FeatureSpec, rows: list[dict[str, Any]], readiness: ReadinessReport
) -> dict[str, Any]:
    """What monitoring reads, measured on labelled held-out data with the model itself:
    holdout metrics, class balance and reference distributions (as the trainer records)."""
    model = load_candidate(onnx, spec)
    matrix = model.vectoriser.transform(rows)
    probabilities = model.predict_matrix(matrix).probabilities
    return {
        "holdout_metrics": readiness.report.get("metrics", {}),
        "class_balance": readiness.report.get("class_balance", {}),
        "reference": reference_distributions(matrix, spec, probabilities, rows),
    }


@dataclass(frozen=True)
class RegisterResult:
    outcome: DeploymentEvent
    readiness: ReadinessReport
    promotion: DeploymentEvent | None = None
    gaps: tuple[str, ...] = ()
    recipe_trial: dict[str, Any] | None = None


async def register_version(
    settings: Settings,
    model: str,
    version: str,
    onnx: bytes,
    spec: FeatureSpec,
    metadata: VersionMetadata | None = None,
    rows: list[dict[str, Any]] | None = None,
    labels: list[str] | None = None,
    actor: str = "cli",
    reason: str = "",
    stage: str | None = None,
    recipe: PipelineRecipe | EntryPointRecipe | None = None,
    on_step: Callable[[str], None] | None = None,
    on_upload: Callable[[int, int], None] | None = None,
) -> RegisterResult:
    """Validate, upload, register and optionally promote. Nothing is sent if a gate fails.

    With labelled ``rows`` (held-out data), the fields monitoring reads are filled from
    them where ``metadata`` leaves them empty: holdout metrics, class balance, reference
    distributions. A ``recipe`` is trial-run first (fit on a sample, converted, loaded) and
    recorded, pinned to the hash of its code. ``on_step(what)`` says which step starts;
    ``on_upload(bytes stored, total)`` follows the artifact's upload.
    """
    step = on_step or (lambda _: None)
    try:
        parse_semver(version)
    except ValueError as exc:
        raise OperationError(str(exc)) from None
    step("validating")
    readiness = validate_model(onnx, spec, rows, labels)
    if not readiness.passed:
        refused = new_command(model, "register", actor, version=version, reason=reason)
        return RegisterResult(refusal(refused, "; ".join(readiness.failures)), readiness)
    meta = (metadata or VersionMetadata()).model_copy(update={"validation": readiness.report})
    trial = None
    if recipe is not None:
        step("trial-running the recipe")
        run = trial_run(recipe, spec, rows, labels)
        trial = run.report
        meta = meta.model_copy(update={"recipe": run.recipe})
    if rows and labels:
        profile = holdout_profile(onnx, spec, rows, readiness)
        meta = meta.model_copy(update={k: v for k, v in profile.items() if not getattr(meta, k)})
    gaps = monitoring_gaps(meta, spec)
    meta = meta.model_copy(update={"monitoring_gaps": gaps})
    step("uploading")
    ref = await store_artifact(settings, onnx, model, version, on_progress=on_upload)
    proposal = VersionProposal(
        version=version,
        artifact_uri=ref.uri,
        artifact_sha256=ref.sha256,
        artifact_size=ref.size,
        feature_spec=spec,
        metadata=meta,
    )
    step("registering")
    outcome = await command(
        settings,
        new_command(model, "register", actor, proposal=proposal.model_dump_json(), reason=reason),
    )
    promotion = None
    if outcome["outcome"] == "applied" and stage:
        promotion = await command(
            settings,
            new_command(
                model, "promote", actor, version=version, target_stage=stage, reason=reason
            ),
        )
    return RegisterResult(outcome, readiness, promotion, tuple(gaps), trial)
