"""The registry's decisions as pure functions: command + state -> new records + audit event."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, cast

from pydantic import ValidationError

from scoremesh.contract.records import DeploymentEvent, ModelCommand
from services.common.model_version import (
    CHALLENGER_STAGES,
    STAGES,
    ModelVersion,
    VersionError,
    VersionProposal,
    parse_semver,
)
from services.common.registry_view import RegistryState

# Legal stage changes by promote. A champion leaves only when another version is promoted
# (it becomes retired) or by rollback (it becomes rolled_back).
TRANSITIONS: dict[str, frozenset[str]] = {
    "registered": frozenset({"shadow", "canary", "champion", "retired"}),
    "shadow": frozenset({"canary", "champion", "retired"}),
    "canary": frozenset({"shadow", "champion", "retired"}),
    "champion": frozenset(),
    "retired": frozenset({"shadow", "canary", "champion"}),
    "rolled_back": frozenset({"shadow", "canary", "retired"}),
}
DEFAULT_CANARY_PERCENT = 10.0


@dataclass
class RegistryBook:
    """Everything the registry decides from: versions, champion history, handled requests."""

    state: RegistryState = field(default_factory=RegistryState)
    champion_history: dict[str, list[str]] = field(default_factory=dict)  # model -> versions
    handled: set[str] = field(default_factory=set)
    generation: int = 0

    def apply_version(self, version: ModelVersion) -> None:
        self.state.apply(version)
        self.handled.add(version.request_id)
        self.generation = max(self.generation, version.generation)

    def apply_event(self, event: DeploymentEvent) -> None:
        self.handled.add(event["request_id"])
        self.generation = max(self.generation, event["generation"])
        new_champion = event.get("new_champion")
        if event["outcome"] == "applied" and new_champion:
            history = self.champion_history.setdefault(event["model"], [])
            if not history or history[-1] != new_champion:
                history.append(new_champion)


@dataclass(frozen=True)
class Decision:
    outcome: str  # applied | refused
    records: list[ModelVersion]
    event: DeploymentEvent

    @property
    def refused(self) -> bool:
        return self.outcome == "refused"


class Refusal(Exception):
    pass


def _event(cmd: ModelCommand, generation: int, now_ms: int, **fields: Any) -> DeploymentEvent:
    """The answer to a command; ``fields`` (what the decision changed) are checked against
    the record by the codec when the event is encoded."""
    event: DeploymentEvent = {
        "request_id": cmd["request_id"],
        "model": cmd["model"],
        "version": cmd.get("version"),
        "action": cmd["action"],
        "outcome": "applied",
        "from_stage": None,
        "to_stage": None,
        "previous_champion": None,
        "new_champion": None,
        "generation": generation,
        "actor": cmd.get("actor") or "unknown",
        "reason": cmd.get("reason") or "",
        "detail": "",
        "at": now_ms,
    }
    return cast(DeploymentEvent, event | fields)


def decide(
    book: RegistryBook,
    cmd: ModelCommand,
    now_ms: int,
    artifact_problem: str | None = None,
) -> Decision:
    """Decide a command. ``artifact_problem`` is what the service found checking the artifact."""
    generation = book.generation + 1
    try:
        if artifact_problem and cmd.get("action") in ("promote", "rollback"):
            raise Refusal(f"artifact check failed, the serving version stays: {artifact_problem}")
        action = cmd["action"]
        if action == "register":
            records, fields = _register(book, cmd, generation, now_ms, artifact_problem)
        elif action == "promote":
            records, fields = _promote(book, cmd, generation, now_ms)
        elif action == "rollback":
            records, fields = _rollback(book, cmd, generation, now_ms)
        elif action == "retire":
            cmd = {**cmd, "target_stage": "retired"}
            records, fields = _promote(book, cmd, generation, now_ms)
        elif action == "flag":
            records, fields = _flag(book, cmd, generation, now_ms)
        elif action == "load_failed":
            records, fields = _load_failed(book, cmd, generation, now_ms)
        else:
            raise Refusal(
                f"unknown action {action!r}; use register, promote, rollback, retire, flag "
                "or load_failed"
            )
    except Refusal as refusal:
        return Decision(
            "refused",
            [],
            _event(cmd, book.generation, now_ms, outcome="refused", detail=str(refusal)),
        )
    return Decision("applied", records, _event(cmd, generation, now_ms, **fields))


def _get(book: RegistryBook, model: str, version: str | None) -> ModelVersion:
    if not version:
        raise Refusal("a version is required")
    held = book.state.versions.get(f"{model}@{version}")
    if held is None:
        known = ", ".join(v.version for v in book.state.of_model(model)) or "none"
        raise Refusal(f"{model}@{version} is not registered (known versions: {known})")
    return held


def _register(
    book: RegistryBook,
    cmd: ModelCommand,
    generation: int,
    now_ms: int,
    artifact_problem: str | None,
) -> tuple[list[ModelVersion], dict[str, Any]]:
    model = cmd["model"]
    try:
        proposal = VersionProposal.model_validate_json(cmd.get("proposal") or "")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "proposal"
        raise Refusal(f"invalid proposal: {where}: {first['msg']}") from None
    try:
        parse_semver(proposal.version)
    except VersionError as exc:
        raise Refusal(str(exc)) from None
    if f"{model}@{proposal.version}" in book.state.versions:
        raise Refusal(
            f"{model}@{proposal.version} already exists; versions are immutable, register "
            "a new version number"
        )
    if artifact_problem:
        raise Refusal(artifact_problem)
    version = ModelVersion(
        name=model,
        version=proposal.version,
        stage="registered",
        generation=generation,
        artifact_uri=proposal.artifact_uri,
        artifact_sha256=proposal.artifact_sha256,
        artifact_size=proposal.artifact_size,
        feature_spec_json=proposal.feature_spec.model_dump_json(),
        metadata_json=proposal.metadata.model_dump_json(),
        registered_at=now_ms,
        updated_at=now_ms,
        request_id=cmd["request_id"],
    )
    return [version], {"version": proposal.version, "to_stage": "registered"}


def _promote(
    book: RegistryBook, cmd: ModelCommand, generation: int, now_ms: int
) -> tuple[list[ModelVersion], dict[str, Any]]:
    model = cmd["model"]
    target = cmd.get("target_stage")
    if target not in STAGES or target in ("registered", "rolled_back"):
        raise Refusal(
            f"cannot promote to {target!r}; target one of shadow, canary, champion, retired "
            "(rolled_back is reached with rollback)"
        )
    held = _get(book, model, cmd.get("version"))
    if target == held.stage:
        raise Refusal(f"{held.key} is already {target}")
    if target not in TRANSITIONS[held.stage]:
        allowed = ", ".join(sorted(TRANSITIONS[held.stage])) or "none (promote another version)"
        raise Refusal(f"{held.key} is {held.stage}; it can move to: {allowed}")
    options = cmd.get("options") or {}
    champion = book.state.champion(model)
    if target in CHALLENGER_STAGES and champion is not None:
        major = held.semver[0]
        other_major = [
            v
            for v in book.state.of_model(model)
            if v.stage in CHALLENGER_STAGES
            and v.key != held.key
            and v.semver[0] != champion.semver[0]
        ]
        if major != champion.semver[0] and other_major:
            raise Refusal(
                f"{other_major[0].key} (a major-version change) is still {other_major[0].stage}; "
                "finish or retire it before starting another major-version change"
            )
    percent = held.canary_percent
    if target == "canary":
        try:
            percent = float(options.get("percent", DEFAULT_CANARY_PERCENT))
        except ValueError:
            raise Refusal(f"canary percent {options.get('percent')!r} is not a number") from None
        if not 0 < percent <= 100:
            raise Refusal(f"canary percent must be in (0, 100], got {percent}")
    records = [
        replace(
            held,
            stage=target,
            generation=generation,
            updated_at=now_ms,
            request_id=cmd["request_id"],
            canary_percent=percent,
        )
    ]
    fields: dict[str, Any] = {"version": held.version, "from_stage": held.stage, "to_stage": target}
    if target == "champion":
        if champion is not None:
            records.append(
                replace(
                    champion,
                    stage="retired",
                    generation=generation,
                    updated_at=now_ms,
                    request_id=cmd["request_id"],
                )
            )
            fields["previous_champion"] = champion.version
        fields["new_champion"] = held.version
    return records, fields


def _rollback(
    book: RegistryBook, cmd: ModelCommand, generation: int, now_ms: int
) -> tuple[list[ModelVersion], dict[str, Any]]:
    model = cmd["model"]
    if cmd.get("version"):
        held = _get(book, model, cmd["version"])
        if held.stage not in CHALLENGER_STAGES:
            raise Refusal(
                f"{held.key} is {held.stage}; only a shadow or canary version is rolled back by "
                "version (roll back the champion with no version)"
            )
        record = replace(
            held,
            stage="rolled_back",
            generation=generation,
            updated_at=now_ms,
            request_id=cmd["request_id"],
        )
        return [record], {"from_stage": held.stage, "to_stage": "rolled_back"}
    champion = book.state.champion(model)
    if champion is None:
        raise Refusal(f"{model} has no champion to roll back")
    history = [v for v in book.champion_history.get(model, []) if v != champion.version]
    previous = None
    for version in reversed(history):
        candidate = book.state.versions.get(f"{model}@{version}")
        if candidate is not None and candidate.stage in ("retired", "shadow", "canary"):
            previous = candidate
            break
    if previous is None:
        raise Refusal(f"{champion.key} has no earlier champion to roll back to")
    records = [
        replace(
            champion,
            stage="rolled_back",
            generation=generation,
            updated_at=now_ms,
            request_id=cmd["request_id"],
        ),
        replace(
            previous,
            stage="champion",
            generation=generation,
            updated_at=now_ms,
            request_id=cmd["request_id"],
        ),
    ]
    return records, {
        "version": previous.version,
        "from_stage": previous.stage,
        "to_stage": "champion",
        "previous_champion": champion.version,
        "new_champion": previous.version,
    }


def _flag(
    book: RegistryBook, cmd: ModelCommand, generation: int, now_ms: int
) -> tuple[list[ModelVersion], dict[str, Any]]:
    """Switch a variant on or off without changing its stage (a feature flag)."""
    held = _get(book, cmd["model"], cmd.get("version"))
    raw = (cmd.get("options") or {}).get("enabled", "").lower()
    if raw not in ("true", "false"):
        raise Refusal("flag needs options.enabled = true or false")
    enabled = raw == "true"
    if held.stage == "champion" and not enabled:
        raise Refusal(f"{held.key} is the champion; promote or roll back instead of disabling it")
    if held.enabled == enabled:
        raise Refusal(f"{held.key} is already {'enabled' if enabled else 'disabled'}")
    record = replace(
        held,
        enabled=enabled,
        generation=generation,
        updated_at=now_ms,
        request_id=cmd["request_id"],
    )
    return [record], {
        "from_stage": held.stage,
        "to_stage": held.stage,
        "detail": f"enabled={str(enabled).lower()}",
    }


def _load_failed(
    book: RegistryBook, cmd: ModelCommand, generation: int, now_ms: int
) -> tuple[list[ModelVersion], dict[str, Any]]:
    """A reader could not load a version: take it out of service, keep what works."""
    problem = (cmd.get("options") or {}).get("problem", "unknown problem")
    try:
        held = _get(book, cmd["model"], cmd.get("version"))
    except Refusal as refusal:
        raise Refusal(f"{refusal}; reported load problem: {problem}") from None
    if held.stage in CHALLENGER_STAGES:
        record = replace(
            held,
            stage="rolled_back",
            generation=generation,
            updated_at=now_ms,
            request_id=cmd["request_id"],
        )
        return [record], {"from_stage": held.stage, "to_stage": "rolled_back", "detail": problem}
    if held.stage == "champion":
        try:
            records, fields = _rollback(book, {**cmd, "version": None}, generation, now_ms)
        except Refusal:
            # Nothing earlier to fall back to: readers keep whatever they already serve.
            return [], {
                "from_stage": "champion",
                "to_stage": "champion",
                "detail": f"{problem}; no earlier champion to fall back to",
            }
        return records, {**fields, "detail": problem}
    raise Refusal(f"{held.key} is {held.stage}, not serving; nothing to do ({problem})")
