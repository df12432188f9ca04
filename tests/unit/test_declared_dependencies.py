"""What the code imports is declared, and what is declared is used."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = {"services", "scoremesh", "tests"}
# Declared for what they bring at run time rather than for an import of our own.
USED_WITHOUT_IMPORT = {
    "scoremesh-client",  # first party
    "chartkick",  # the console serves the JS files of the installed package
}
OPTIONAL = {"uvloop"}  # brought by uvicorn[standard]; imported only when present


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(pyproject: Path, extras: bool = False) -> set[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    deps = list(project["dependencies"])
    if extras:
        deps += [d for group in project.get("optional-dependencies", {}).values() for d in group]
    return {normal(re.split(r"[\s\[<>=!~;]", d, maxsplit=1)[0]) for d in deps}


def imported(*roots: Path) -> set[str]:
    modules: set[str] = set()
    for root in roots:
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    modules.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    modules.add(node.module.split(".")[0])
    return modules - FIRST_PARTY - set(sys.stdlib_module_names)


def distributions(modules: set[str]) -> dict[str, set[str]]:
    known = packages_distributions()
    return {m: {normal(d) for d in known.get(m, [m])} for m in modules}


def test_every_third_party_import_of_the_services_is_declared() -> None:
    allowed = (
        declared(ROOT / "pyproject.toml", extras=True)
        | declared(ROOT / "client" / "pyproject.toml")
        | OPTIONAL
    )
    missing = {
        module: dists
        for module, dists in distributions(imported(ROOT / "services")).items()
        if not dists & allowed
    }
    assert missing == {}, f"imported but not declared in pyproject.toml: {missing}"


def test_every_declared_dependency_is_imported() -> None:
    used = {d for dists in distributions(imported(ROOT / "services")).values() for d in dists}
    unused = declared(ROOT / "pyproject.toml") - used - USED_WITHOUT_IMPORT
    assert unused == set(), f"declared in pyproject.toml but imported nowhere: {unused}"


def test_the_client_declares_what_it_imports() -> None:
    client = ROOT / "client"
    allowed = declared(client / "pyproject.toml") | {
        "aiokafka",
        "confluent-kafka",
        "faust-streaming",
    }
    missing = {
        module: dists
        for module, dists in distributions(imported(client / "scoremesh")).items()
        if not dists & allowed
    }
    assert missing == {}, f"the client imports undeclared packages: {missing}"
