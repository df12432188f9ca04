"""The whole story on the embedded stack: drift, detection, one retrain, promotion, picture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.demo.picture import read_data
from tests.e2e.test_cli_and_demo import scoremesh

pytestmark = pytest.mark.e2e


def test_the_loop_closes_after_injected_drift(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    # The stream ends 3,000 events after the promotion; --max-events is only a deadline
    # (~5 min at 800/s). The default, 3 x --events (45 s), is no budget when another
    # test's services share the two cores and the retrain and its evidence take longer.
    result = scoremesh(
        [
            *("demo", "--events", "12000", "--drift-at", "5000", "--max-events", "240000"),
            *("--output", str(out)),
        ],
        tmp_path,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    told = report["story"]

    assert report["accounted"] and report["unscored"] == 0, "no event lost"
    assert report["loop_closed"] is True
    detection = told["detection"]
    assert detection is not None and detection["index"] >= 5000, (
        "detected after the injection point"
    )
    assert detection["delay_events"] < 2000
    assert len(told["retrain_requests"]) == 1, "exactly one retrain for the episode"
    (retrain,) = told["retrain_results"]
    assert retrain["status"] == "succeeded" and retrain["version"] == "1.1.0"

    before = told["accuracy_before_drift"]["accuracy"]
    after_drift = told["accuracy_after_drift"]["accuracy"]
    after_promotion = told["accuracy_after_promotion"]
    assert after_promotion["version"] == "1.1.0" and after_promotion["labels"] > 500
    assert before > 0.85 and after_drift < before - 0.15
    assert after_promotion["accuracy"] > after_drift + 0.15, (
        "the new champion is better on the drifted concept"
    )
    old = told.get("old_champion_on_same_events")
    if old and old["labels"]:
        assert after_promotion["accuracy"] > old["accuracy"]
    history = "\n".join(told["deployment_history"])
    assert (
        "1.1.0 registered -> shadow" in history
        and "-> champion (previous champion 1.0.0)" in history
    )

    page = (out / "demo.html").read_text()
    data = read_data(page)
    assert {"1.0.0 (champion)", "1.1.0 (champion)"} <= set(data["series"])
    labels = {m["label"] for m in data["markers"]}
    assert labels >= {"drift injected", "drift detected", "retrain requested", "promoted"}
    injected = next(m for m in data["markers"] if m["label"] == "drift injected")
    assert injected["index"] == 5000
    assert "picture:" in result.stdout and "accuracy after promotion" in result.stdout
