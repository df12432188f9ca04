"""Layers point one way: the contract, then services/common, then one folder per service,
then the CLI and the demo on top. A service never imports another service."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "services"
CONTRACT = ROOT / "client" / "scoremesh"
TOP = {"cli", "demo"}  # may import anything
HEAVY = ("onnxruntime", "sklearn", "river", "fastapi", "skl2onnx", "services")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def layer_of(module: str) -> str | None:
    """``services.<layer>...`` -> layer; ``services`` itself (its version) is neutral."""
    parts = module.split(".")
    return parts[1] if parts[0] == "services" and len(parts) > 1 else None


def test_the_contract_imports_no_service_and_nothing_heavy() -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in CONTRACT.rglob("*.py")
        for module in imported_modules(path)
        if module.split(".")[0] in HEAVY
    ]
    assert offenders == []


def test_common_imports_no_service_and_services_do_not_import_each_other() -> None:
    offenders = []
    for path in SERVICES.rglob("*.py"):
        own = path.relative_to(SERVICES).parts[0]
        if own in TOP or own.endswith(".py"):
            continue
        for module in imported_modules(path):
            layer = layer_of(module)
            if layer is None or layer in ("common", own):
                continue
            offenders.append(f"{path.relative_to(ROOT)} ({own}) imports {module}")
    assert offenders == [], "\n".join(offenders)


def test_the_layer_check_sees_a_violation() -> None:
    assert layer_of("services.scorer.service") == "scorer"
    tree = "from services.scorer.service import ScorerService\n"
    assert "services.scorer.service" in {
        n.module for n in ast.walk(ast.parse(tree)) if isinstance(n, ast.ImportFrom)
    }
