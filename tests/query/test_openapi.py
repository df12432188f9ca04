"""docs/openapi.json is generated; this fails when the committed copy is stale."""

from __future__ import annotations

import sys

from tests.query.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import gen_openapi


def test_committed_openapi_matches_the_app() -> None:
    committed = (ROOT / "docs" / "openapi.json").read_text()
    assert committed == gen_openapi.render(), "run: python scripts/gen_openapi.py"


def test_every_operation_documents_its_problems_as_problem_json() -> None:
    document = gen_openapi.document()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")) and path not in ("/readyz",):
                    assert list(response["content"]) == ["application/problem+json"], (
                        method,
                        path,
                        status,
                    )
