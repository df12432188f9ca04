"""The wire format, pinned: every released schema version decodes its golden bytes.

Golden files are written once by `python scripts/gen_golden.py` when a schema version is
released, and never rewritten: if a change breaks one of these, it breaks old producers.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from scoremesh.contract.codec import MAGIC, all_schema_versions, codec

GOLDEN = Path(__file__).parent / "golden"
VERSIONS = [(name, v.version) for name, vs in all_schema_versions().items() for v in vs]


def load_expected(path: Path) -> dict[str, object]:
    data = orjson.loads(path.read_bytes())
    # bytes fields are stored as {"$bytes": hex}
    return {
        k: bytes.fromhex(v["$bytes"]) if isinstance(v, dict) and "$bytes" in v else v
        for k, v in data.items()
    }


@pytest.mark.parametrize(("name", "version"), VERSIONS)
def test_golden_bytes_decode_with_current_reader(name: str, version: int) -> None:
    blob = GOLDEN / f"{name}.v{version}.bin"
    assert blob.exists(), f"no golden bytes for {name} v{version}: run scripts/gen_golden.py"
    data = blob.read_bytes()
    assert data[:2] == MAGIC
    decoded = codec(name).decode(data)
    expected = load_expected(GOLDEN / f"{name}.v{version}.json")
    for key, value in expected.items():
        assert decoded[key] == value, key


@pytest.mark.parametrize(("name", "version"), VERSIONS)
def test_current_writer_reproduces_golden_bytes_of_its_version(name: str, version: int) -> None:
    if codec(name).current.version != version:
        pytest.skip("older version: only decoding is promised")
    expected = load_expected(GOLDEN / f"{name}.v{version}.json")
    assert codec(name).encode(expected) == (GOLDEN / f"{name}.v{version}.bin").read_bytes()


def test_fingerprint_is_crc64_avro_of_canonical_form() -> None:
    # Pinned: changing a released schema changes this and strands every old producer.
    assert (
        codec("Event").current.fingerprint.hex()
        == (GOLDEN / f"Event.v{codec('Event').current.version}.bin").read_bytes()[2:10].hex()
    )
