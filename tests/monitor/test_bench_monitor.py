"""CI runs the monitor benchmark's core part short and seeded (``--quick``): whole-stream
detection delays against one ADWIN, and no page on stationary or slowly drifting inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_monitor_benchmark_meets_its_verdicts(tmp_path: Path) -> None:
    out = tmp_path / "monitor.json"
    done = subprocess.run(
        [sys.executable, "scripts/bench_monitor.py", "--quick", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.exists(), done.stderr[-3000:]
    core = json.loads(out.read_text())["core"]
    assert core["verdicts"] == {name: True for name in core["verdicts"]}, core["detection"]
    assert done.returncode == 0
    # not vacuous: three seeded rounds, every signal paged, the long runs saw every event
    assert len(core["detection_rounds"]) == 3
    assert all(r["pages"].get("error_rate") for r in core["detection_rounds"])
    assert core["stationary"]["seen"] == core["stationary"]["events"] == 100_000
    assert core["detection"]["error_rate"]["ratio_median"] <= 1.5
