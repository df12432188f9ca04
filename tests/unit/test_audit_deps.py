"""scripts/audit_deps.py: a pin is audited only when a database answered for it."""

from __future__ import annotations

import sys
import urllib.error
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import audit_deps  # noqa: E402

LOCKED = {"jinja2": "2.4.1", "requests": "2.32.0", "six": "1.16.0", "idna": "3.7"}


def test_the_lock_file_parses() -> None:
    locked = audit_deps.pins(ROOT / "constraints.txt")
    assert len(locked) > 50 and locked["aiokafka"]


def test_pip_audit_skipping_everything_is_unreachable_not_clean() -> None:
    report = {"dependencies": [{"name": n, "skip_reason": "not found"} for n in LOCKED]}
    found = audit_deps.from_pip_audit(report)
    code, summary = audit_deps.summarise(LOCKED, [found])
    assert code == 0 and summary["status"] == "unreachable" and summary["audited"] == 0
    assert "skipped all 4" in summary["sources"]["pip-audit"]


def test_a_known_vulnerability_fails_and_is_named() -> None:
    def fetch(url: str, timeout: float) -> dict[str, Any]:
        if "/jinja2/" in url:
            return {"vulnerabilities": [{"id": "PYSEC-2014-8"}]}
        if "/idna/" in url:
            raise urllib.error.URLError("down")
        return {"vulnerabilities": []}

    found = audit_deps.ask_pypi(LOCKED, 1.0, fetch=fetch)
    code, summary = audit_deps.summarise(LOCKED, [found])
    assert code == 1 and summary["status"] == "vulnerable"
    assert summary["vulnerabilities"] == {"jinja2==2.4.1": ["PYSEC-2014-8"]}
    assert summary["not_audited"] == ["idna"] and summary["audited"] == 3


def test_a_service_that_is_not_there_is_asked_three_times_only() -> None:
    asked: list[str] = []

    def fetch(url: str, timeout: float) -> Any:
        asked.append(url)
        raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)  # type: ignore[arg-type]

    found = audit_deps.ask_pypi(LOCKED, 1.0, fetch=fetch)
    assert len(asked) == 3 and not found.audited and "404" in found.problem
