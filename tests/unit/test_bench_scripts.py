"""Every benchmark script imports cleanly (they run outside CI, so nothing else would tell)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.stem for p in (ROOT / "scripts").glob("bench_*.py"))

IMPORT_ALL = """
import importlib, sys
sys.path.insert(0, "scripts")
for name in sys.argv[1:]:
    module = importlib.import_module(name)
    assert callable(getattr(module, "main", None)), f"{name} has no main()"
"""


def test_every_benchmark_script_imports_and_has_a_main() -> None:
    assert len(SCRIPTS) >= 5
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, *SCRIPTS],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
