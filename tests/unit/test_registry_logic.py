from __future__ import annotations

from typing import Any

import pytest

from services.common.commands import new_command
from services.common.model_version import VersionProposal
from services.registry.logic import RegistryBook, decide
from services.trainer.datasets import CREDIT_SPEC

NOW = 1_767_225_600_000


def proposal(version: str) -> str:
    return VersionProposal(
        version=version,
        artifact_uri="kafka://models.artifacts/0/0?chunks=1",
        artifact_sha256="a" * 64,
        artifact_size=10,
        feature_spec=CREDIT_SPEC,
    ).model_dump_json()


def apply(book: RegistryBook, cmd: dict[str, Any], problem: str | None = None) -> Any:
    decision = decide(book, cmd, NOW, problem)
    for record in decision.records:
        book.apply_version(record)
    book.apply_event(decision.event)
    return decision


def register(book: RegistryBook, version: str) -> Any:
    return apply(book, new_command("credit", "register", "t", proposal=proposal(version)))


def promote(book: RegistryBook, version: str, stage: str, **options: str) -> Any:
    return apply(
        book,
        new_command("credit", "promote", "t", version=version, target_stage=stage, options=options),
    )


def stage_of(book: RegistryBook, version: str) -> str:
    return book.state.versions[f"credit@{version}"].stage


def test_register_then_promote_assigns_increasing_generations() -> None:
    book = RegistryBook()
    first = register(book, "1.0.0")
    second = promote(book, "1.0.0", "champion")
    assert first.outcome == second.outcome == "applied"
    assert second.event["generation"] > first.event["generation"]
    assert stage_of(book, "1.0.0") == "champion"
    assert second.event["new_champion"] == "1.0.0"


def test_a_version_is_registered_once() -> None:
    book = RegistryBook()
    register(book, "1.0.0")
    again = register(book, "1.0.0")
    assert again.refused and "already exists" in again.event["detail"]


def test_promoting_demotes_the_old_champion_and_rollback_restores_it() -> None:
    book = RegistryBook()
    register(book, "1.0.0")
    promote(book, "1.0.0", "champion")
    register(book, "1.1.0")
    promote(book, "1.1.0", "shadow")
    decision = promote(book, "1.1.0", "champion")
    assert decision.event["previous_champion"] == "1.0.0"
    assert stage_of(book, "1.0.0") == "retired"
    rollback = apply(book, new_command("credit", "rollback", "t"))
    assert rollback.outcome == "applied"
    assert stage_of(book, "1.0.0") == "champion"
    assert stage_of(book, "1.1.0") == "rolled_back"


def test_rollback_without_an_earlier_champion_is_refused() -> None:
    book = RegistryBook()
    register(book, "1.0.0")
    promote(book, "1.0.0", "champion")
    decision = apply(book, new_command("credit", "rollback", "t"))
    assert decision.refused and "no earlier champion" in decision.event["detail"]


@pytest.mark.parametrize(
    ("stage", "target"), [("registered", "registered"), ("registered", "rolled_back")]
)
def test_illegal_targets(stage: str, target: str) -> None:
    book = RegistryBook()
    register(book, "1.0.0")
    decision = promote(book, "1.0.0", target)
    assert decision.refused


def test_champion_cannot_be_demoted_by_promote() -> None:
    book = RegistryBook()
    register(book, "1.0.0")
    promote(book, "1.0.0", "champion")
    decision = promote(book, "1.0.0", "shadow")
    assert decision.refused and "can move to: none" in decision.event["detail"]


def test_second_major_change_while_one_is_in_flight_is_refused() -> None:
    book = RegistryBook()
    for v in ("1.0.0", "2.0.0", "3.0.0"):
        register(book, v)
    promote(book, "1.0.0", "champion")
    assert promote(book, "2.0.0", "shadow").outcome == "applied"
    decision = promote(book, "3.0.0", "canary")
    assert decision.refused and "major-version" in decision.event["detail"]


def test_canary_percent_is_validated() -> None:
    book = RegistryBook()
    register(book, "1.0.0")
    promote(book, "1.0.0", "champion")
    register(book, "1.0.1")
    assert promote(book, "1.0.1", "canary", percent="150").refused
    assert promote(book, "1.0.1", "canary", percent="25").outcome == "applied"
    assert book.state.versions["credit@1.0.1"].canary_percent == 25.0


def test_artifact_problem_and_bad_proposal_are_refused_with_the_reason() -> None:
    book = RegistryBook()
    bad_sha = apply(
        book,
        new_command("credit", "register", "t", proposal=proposal("1.0.0")),
        problem="artifact checksum mismatch",
    )
    assert bad_sha.refused and "checksum" in bad_sha.event["detail"]
    assert "credit@1.0.0" not in book.state.versions
    bad = apply(book, new_command("credit", "register", "t", proposal='{"version": "1.0.0"}'))
    assert bad.refused and "invalid proposal" in bad.event["detail"]
    not_semver = apply(book, new_command("credit", "register", "t", proposal=proposal("v1")))
    assert not_semver.refused and "semantic" in not_semver.event["detail"]


def test_refusals_do_not_consume_a_generation() -> None:
    book = RegistryBook()
    register(book, "1.0.0")
    before = book.generation
    register(book, "1.0.0")
    assert book.generation == before


def test_flag_switches_a_challenger_off_and_on() -> None:
    book = RegistryBook()
    register(book, "1.0.0")
    promote(book, "1.0.0", "champion")
    register(book, "1.1.0")
    promote(book, "1.1.0", "shadow")
    off = apply(
        book, new_command("credit", "flag", "t", version="1.1.0", options={"enabled": "false"})
    )
    assert off.outcome == "applied" and not book.state.versions["credit@1.1.0"].enabled
    assert [v.version for v in book.state.active("credit")] == ["1.0.0"]
    on = apply(
        book, new_command("credit", "flag", "t", version="1.1.0", options={"enabled": "true"})
    )
    assert on.outcome == "applied" and [v.version for v in book.state.active("credit")] == [
        "1.0.0",
        "1.1.0",
    ]
    champion_off = apply(
        book, new_command("credit", "flag", "t", version="1.0.0", options={"enabled": "false"})
    )
    assert champion_off.refused


def test_a_champion_that_fails_to_load_is_rolled_back_to_the_previous_one() -> None:
    book = RegistryBook()
    register(book, "1.0.0")
    promote(book, "1.0.0", "champion")
    register(book, "1.1.0")
    promote(book, "1.1.0", "champion")
    failed = apply(
        book,
        new_command(
            "credit",
            "load_failed",
            "scorer",
            version="1.1.0",
            options={"problem": "sha256 mismatch"},
        ),
    )
    assert failed.outcome == "applied" and failed.event["detail"] == "sha256 mismatch"
    assert stage_of(book, "1.0.0") == "champion" and stage_of(book, "1.1.0") == "rolled_back"
    again = apply(book, new_command("credit", "load_failed", "scorer-2", version="1.1.0"))
    assert again.refused  # a second reporter changes nothing


def test_promote_with_a_bad_artifact_is_refused_and_the_champion_stays() -> None:
    book = RegistryBook()
    register(book, "1.0.0")
    promote(book, "1.0.0", "champion")
    register(book, "1.1.0")
    decision = apply(
        book,
        new_command("credit", "promote", "t", version="1.1.0", target_stage="champion"),
        problem="artifact checksum mismatch",
    )
    assert decision.refused and "checksum" in decision.event["detail"]
    assert stage_of(book, "1.0.0") == "champion"
