"""Write golden bytes for schema versions that have none yet. Never rewrites existing ones."""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scoremesh.contract.codec import all_schema_versions, codec  # noqa: E402
from tests.contract.samples import SAMPLES  # noqa: E402

GOLDEN = ROOT / "tests" / "contract" / "golden"


def main() -> int:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    written = 0
    for name, versions in all_schema_versions().items():
        current = versions[-1]
        blob = GOLDEN / f"{name}.v{current.version}.bin"
        if blob.exists():
            continue
        sample = SAMPLES[name]
        blob.write_bytes(codec(name).encode(sample))
        as_json = {k: {"$bytes": v.hex()} if isinstance(v, bytes) else v for k, v in sample.items()}
        # Insertion order kept (no key sorting): map order is part of the bytes.
        (GOLDEN / f"{name}.v{current.version}.json").write_bytes(
            orjson.dumps(as_json, option=orjson.OPT_INDENT_2)
        )
        written += 1
        print(f"wrote {blob.relative_to(ROOT)}")
    print(f"{written} new golden file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
