"""Audit the locked dependencies (constraints.txt) for known vulnerabilities.

Two sources, both asked with short timeouts:
- pip-audit (``pip-audit --no-deps --disable-pip -r constraints.txt``) when it is installed,
  else PyPI's per-release JSON (``/pypi/NAME/VERSION/json``, its ``vulnerabilities``: the
  database pip-audit's default service reads) asked directly;
- OSV's batch query API.

A pin counts as audited only when a database actually answered for it: pip-audit exits 0
and says "No known vulnerabilities found" even when it skipped every package because the
service did not answer, so its per-package skip reasons are read rather than its exit code.

Exit 1 when any audited pin has a known vulnerability; exit 0 otherwise, including when no
database could be reached (then it says so plainly, and the summary's ``status`` is
``unreachable``, never ``clean``). One JSON summary line on stdout.

    python scripts/audit_deps.py [--constraints constraints.txt] [--timeout 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYPI = "https://pypi.org/pypi/{name}/{version}/json"
OSV = "https://api.osv.dev/v1/querybatch"


@dataclass
class Findings:
    """What one source said: pins it audited, their vulnerability ids, and why it could not."""

    source: str
    audited: set[str] = field(default_factory=set)
    vulns: dict[str, list[str]] = field(default_factory=dict)
    problem: str = ""


def pins(constraints: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==", 1)
            out[name.strip().lower()] = version.strip().split(";")[0].strip()
    return out


def from_pip_audit(report: dict[str, Any]) -> Findings:
    found = Findings("pip-audit")
    skipped: list[str] = []
    for dep in report.get("dependencies", []):
        name = str(dep.get("name", "")).lower()
        if dep.get("skip_reason"):
            skipped.append(str(dep["skip_reason"]))
            continue
        found.audited.add(name)
        ids = [str(v.get("id")) for v in dep.get("vulns", [])]
        if ids:
            found.vulns[name] = ids
    if skipped and not found.audited:
        found.problem = f"pip-audit skipped all {len(skipped)} pins, e.g. {skipped[0]!r}"
    return found


def run_pip_audit(constraints: Path, timeout: float) -> Findings | None:
    exe = shutil.which("pip-audit")
    if exe is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "audit.json"
        cmd = [exe, "--no-deps", "--disable-pip", "-r", str(constraints), "-f", "json"]
        cmd += ["-o", str(out), "--timeout", str(int(timeout)), "--progress-spinner", "off"]
        try:
            subprocess.run(cmd, capture_output=True, timeout=timeout * 6, check=False)
        except subprocess.TimeoutExpired:
            return Findings("pip-audit", problem=f"pip-audit did not finish in {timeout * 6:.0f}s")
        if not out.exists():
            return Findings("pip-audit", problem="pip-audit wrote no report")
        return from_pip_audit(json.loads(out.read_text()))


def get_json(url: str, timeout: float, body: bytes | None = None) -> Any:
    request = urllib.request.Request(url, data=body, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def ask_pypi(
    locked: dict[str, str], timeout: float, fetch: Callable[[str, float], Any] = get_json
) -> Findings:
    """PyPI's per-release JSON, which is what pip-audit's default service reads."""
    found = Findings("pypi")
    errors: list[str] = []

    def one(item: tuple[str, str]) -> tuple[str, list[str] | None, str]:
        name, version = item
        try:
            data = fetch(PYPI.format(name=name, version=version), timeout)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return name, None, f"{name}=={version}: {exc}"
        return name, [str(v.get("id")) for v in data.get("vulnerabilities") or []], ""

    items = sorted(locked.items())
    probe = [one(item) for item in items[:3]]  # a service that is not there fails fast
    rest: list[tuple[str, list[str] | None, str]] = []
    if any(ids is not None for _, ids, _ in probe):
        with ThreadPoolExecutor(8) as pool:
            rest = list(pool.map(one, items[3:]))
    for name, ids, error in probe + rest:
        if ids is None:
            errors.append(error)
            continue
        found.audited.add(name)
        if ids:
            found.vulns[name] = ids
    if not found.audited:
        found.problem = f"PyPI per-release JSON did not answer ({errors[0] if errors else '?'})"
    return found


def ask_osv(
    locked: dict[str, str], timeout: float, fetch: Callable[..., Any] = get_json
) -> Findings:
    found = Findings("osv")
    items = sorted(locked.items())
    queries = [{"package": {"name": n, "ecosystem": "PyPI"}, "version": v} for n, v in items]
    try:
        data = fetch(OSV, timeout, json.dumps({"queries": queries}).encode())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        found.problem = f"OSV did not answer ({exc})"
        return found
    for (name, _), result in zip(items, data.get("results", []), strict=False):
        found.audited.add(name)
        ids = [str(v.get("id")) for v in result.get("vulns") or []]
        if ids:
            found.vulns[name] = ids
    return found


def summarise(locked: dict[str, str], findings: list[Findings]) -> tuple[int, dict[str, Any]]:
    audited = set().union(*(f.audited for f in findings)) if findings else set()
    vulns: dict[str, set[str]] = {}
    for f in findings:
        for name, ids in f.vulns.items():
            vulns.setdefault(name, set()).update(ids)
    status = "vulnerable" if vulns else ("clean" if audited else "unreachable")
    summary = {
        "status": status,
        "pins": len(locked),
        "audited": len(audited),
        "not_audited": sorted(set(locked) - audited),
        "vulnerabilities": {f"{n}=={locked.get(n, '?')}": sorted(v) for n, v in vulns.items()},
        "sources": {f.source: f.problem or f"answered for {len(f.audited)} pins" for f in findings},
    }
    return (1 if vulns else 0), summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--constraints", type=Path, default=ROOT / "constraints.txt")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    args = parser.parse_args(argv)
    locked = pins(args.constraints)
    findings = [
        run_pip_audit(args.constraints, args.timeout) or ask_pypi(locked, args.timeout),
        ask_osv(locked, args.timeout),
    ]
    code, summary = summarise(locked, findings)
    if summary["status"] == "unreachable":
        print(
            "audit_deps: no vulnerability database reachable; the locked dependencies were "
            "NOT audited: " + "; ".join(f"{k}: {v}" for k, v in summary["sources"].items()),
            file=sys.stderr,
        )
    elif summary["not_audited"]:
        print(
            f"audit_deps: {len(summary['not_audited'])} of {len(locked)} pins not audited",
            file=sys.stderr,
        )
    for pin, ids in summary["vulnerabilities"].items():
        print(f"audit_deps: {pin} has known vulnerabilities: {', '.join(ids)}", file=sys.stderr)
    print(json.dumps(summary))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
