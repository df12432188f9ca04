"""Dead-letter records: why an input was refused, where it came from, and its bytes."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import ConsumerRecord

from scoremesh.contract.featurespec import Violation


def rejection_record(
    record: ConsumerRecord[bytes, bytes],
    reasons: Sequence[Violation],
    stage: str,
    keep_bytes: int,
    rule_set: str | None = None,
    event_id: Any = None,
    entity_id: Any = None,
) -> dict[str, Any]:
    value = record.value or b""
    return {
        "event_id": event_id if isinstance(event_id, str) else None,
        "entity_id": entity_id if isinstance(entity_id, str) else None,
        "stage": stage,
        "reasons": [r.as_record() for r in reasons],
        "rule_set": rule_set,
        "source_topic": record.topic,
        "source_partition": record.partition,
        "source_offset": record.offset,
        "size": len(value),
        "sha256": hashlib.sha256(value).hexdigest(),
        "original": value[:keep_bytes],
        "truncated": len(value) > keep_bytes,
        "rejected_at": int(time.time() * 1000),
    }
