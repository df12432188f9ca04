"""The contract's Python types: generated from the schemas, checked by mypy end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scoremesh.contract import records, topics
from scoremesh.contract.catalog import CatalogError, catalog, topic_name
from scoremesh.contract.codec import all_schema_versions, codec
from services.common.settings import ConfigError, Settings

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import gen_contract  # noqa: E402


def test_generated_records_and_topics_are_fresh() -> None:
    for path, text in gen_contract.generated().items():
        assert path.read_text() == text, f"stale {path.name}: run python scripts/gen_contract.py"


def test_every_record_and_topic_has_its_type() -> None:
    for name, versions in all_schema_versions().items():
        assert records.RECORD_VERSIONS[name] == versions[-1].version
        fields = [f["name"] for f in versions[-1].raw["fields"]]
        assert list(getattr(records, name).__annotations__) == fields
    assert set(topics.TOPICS) == set(catalog())


def test_topics_outside_the_catalog_are_refused() -> None:
    settings = Settings(kafka_bootstrap="x:1", topic_prefix="t-")
    assert settings.topic(topics.EVENTS_RAW) == "t-events.raw"
    with pytest.raises(ConfigError, match=r"unknown topic 'events\.raww'"):
        settings.topic("events.raww")  # type: ignore[arg-type]
    with pytest.raises(CatalogError, match="unknown topic"):
        topic_name("nope")


def test_a_typed_codec_round_trips_plain_dicts() -> None:
    event: records.Event = {
        "event_id": "e-1",
        "entity_id": "c-1",
        "event_time": 1,
        "features": {"x": 1.5},
    }
    decoded = codec(records.Event).decode(codec(records.Event).encode(event))
    assert type(decoded) is dict and decoded["model"] is None and decoded["features"] == {"x": 1.5}


WRONG = """
from scoremesh.contract.codec import codec
from scoremesh.contract.records import Prediction
from services.common.settings import Settings

def core(data: bytes) -> float:
    prediction = codec(Prediction).decode(data)
    return prediction["scroe"]

def out(prediction: Prediction) -> bytes:
    prediction["decision"] = 1
    return codec(Prediction).encode(prediction)

Settings().topic("predictionz")
"""


@pytest.mark.timeout(300)
def test_mypy_rejects_a_wrong_field_a_wrong_type_and_an_unknown_topic(tmp_path: Path) -> None:
    snippet = tmp_path / "wrong_core.py"
    snippet.write_text(WRONG)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(snippet)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 1, done.stdout
    assert 'TypedDict "Prediction" has no key "scroe"' in done.stdout
    assert 'Value of "decision" has incompatible type "int"; expected "str"' in done.stdout
    assert (
        'Argument 1 to "topic" of "Settings" has incompatible type "Literal[\'predictionz\']"'
        in (done.stdout)
    )
