"""`scoremesh models history` answers who, what, why and when for every registry decision."""

from __future__ import annotations

from typing import Any

import pytest

from services.cli.models import HISTORY_COLUMNS, history_rows
from services.cli.output import table


def event(**fields: Any) -> dict[str, Any]:
    base = {
        "request_id": "r",
        "model": "credit",
        "version": None,
        "action": "promote",
        "outcome": "applied",
        "from_stage": None,
        "to_stage": None,
        "previous_champion": None,
        "new_champion": None,
        "generation": 1,
        "actor": "cli",
        "reason": "",
        "detail": "",
        "at": 1_796_083_200_000,  # 2026-12-01T00:00:00Z
    }
    return base | fields


def history_table(events: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> list[str]:
    table(history_rows(events), HISTORY_COLUMNS, max_width=100)
    return capsys.readouterr().out.splitlines()


def test_each_line_has_time_actor_action_versions_and_reason(
    capsys: pytest.CaptureFixture[str],
) -> None:
    lines = history_table(
        [
            event(action="register", version="1.0.0", actor="bootstrap", reason="first"),
            event(
                version="2.0.0",
                from_stage="canary",
                to_stage="champion",
                previous_champion="1.0.0",
                reason="better on live labels",
                at=1_796_083_261_000,
            ),
            event(
                action="rollback",
                version="1.0.0",
                from_stage="retired",
                to_stage="champion",
                previous_champion="2.0.0",
                actor="scorer:host-1",
                reason="canary worse than champion",
            ),
            event(version="3.0.0", outcome="refused", detail="no such version credit@3.0.0"),
        ],
        capsys,
    )
    header, *rows = lines
    assert header.split() == ["TIME", "(UTC)", "ACTOR", "ACTION", "VERSION", "CHANGE", "REASON"]
    assert rows[0].split() == [
        "2026-12-01",
        "00:00:00Z",
        "bootstrap",
        "register",
        "1.0.0",
        "registered",
        "first",
    ]
    assert rows[1].startswith("2026-12-01 00:01:01Z  cli ")
    assert "2.0.0" in rows[1] and "canary -> champion (previous champion 1.0.0)" in rows[1]
    assert rows[1].endswith("better on live labels")
    assert "scorer:host-1" in rows[2] and "retired -> champion (previous champion 2.0.0)" in rows[2]
    assert "refused: no such version credit@3.0.0" in rows[3] and rows[3].endswith("-")
