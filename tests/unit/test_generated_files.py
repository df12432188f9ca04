"""Generated artefacts: a test fails when the committed copy is stale."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import gen_topic_table  # noqa: E402


def test_readme_topic_table_matches_the_catalog() -> None:
    readme = (ROOT / "README.md").read_text()
    assert gen_topic_table.updated(readme) == readme, "run: python scripts/gen_topic_table.py"


def test_readme_first_two_commands_are_demo_and_test() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", readme, re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands[:2] == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_feature_spec_schema_is_current_and_accepts_the_shipped_spec() -> None:
    import json

    import gen_featurespec_schema
    import jsonschema

    target = gen_featurespec_schema.TARGET
    assert target.read_text() == gen_featurespec_schema.render(), (
        "run: python scripts/gen_featurespec_schema.py"
    )
    from services.trainer.datasets import CREDIT_SPEC

    schema = json.loads(target.read_text())
    jsonschema.Draft202012Validator(schema).validate(json.loads(CREDIT_SPEC.model_dump_json()))
    bad = {"features": [{"name": "x", "dtype": "float"}], "classes": ["0", "1"]}
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(bad))
    assert errors and "float" in errors[0].message
