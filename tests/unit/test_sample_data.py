"""`scoremesh sample` writes what `events send` and `labels send` read, recent enough for a
retrain's default window, with broken values for the dead-letter topic and no label for them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from services.cli.main import main
from services.cli.stream import parse_events
from services.label_join.labels import read_labels


def test_sample_files_are_what_the_send_commands_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events, labels = tmp_path / "e.jsonl", tmp_path / "l.csv"
    argv = ["sample", "--count", "300", "--concept", "2", "--invalid", "0.1", "--json"]
    assert main([*argv, "--events", str(events), "--labels", str(labels)]) == 0
    summary = json.loads(capsys.readouterr().out)
    parsed = parse_events(events.read_text(), "auto")
    assert parsed.bad == [] and len(parsed.events) == 300
    _, good, bad, read = read_labels(labels, ["0", "1"])
    assert bad == [] and len(good) == read == summary["labelled"] == 300 - sum(
        summary["broken"].values()
    )
    assert 10 <= sum(summary["broken"].values()) <= 60
    now = time.time() * 1000
    times = [e["event_time"] for _, e in parsed.events]
    assert now - 2 * 3_600_000 < min(times) and max(times) < now  # in a retrain's window
    labelled = {label["event_id"] for _, label in good}
    broken = [e for _, e in parsed.events if e["event_id"] not in labelled]
    assert len(broken) == sum(summary["broken"].values())
    assert all(
        e["features"].get("age") == 250
        or e["features"].get("zipcode") == 42
        or e["features"].get("salary") == "a lot"
        or "age" not in e["features"]
        for e in broken
    )


def test_a_bad_share_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sample", "--invalid", "1.5", "--events", str(tmp_path / "e")]) == 1
    assert "--invalid must be in [0, 1)" in capsys.readouterr().err
