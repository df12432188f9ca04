"""Canary routing: one sticky function shared by the scorer and the query API."""

from __future__ import annotations

from hashlib import blake2b


def canary_bucket(entity_id: str) -> int:
    """A stable bucket in [0, 10000) for an entity (never Python's salted hash())."""
    return int.from_bytes(blake2b(entity_id.encode(), digest_size=8).digest(), "big") % 10_000


def in_canary(entity_id: str, percent: float) -> bool:
    return canary_bucket(entity_id) < percent * 100
