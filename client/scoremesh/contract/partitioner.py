"""Kafka's default partitioner (murmur2 of the key), for a whole batch of keys at once.

The Java client, aiokafka and faust all place a keyed record in partition
``(murmur2(key) & 0x7FFFFFFF) % partitions``; co-partitioning by event_id depends on it.
aiokafka's murmur2 is pure Python, one key at a time (a few µs per record, the largest
client-side cost of a send). Here the keys of a batch are grouped by length and hashed
column by column with numpy's wrapping uint32 arithmetic: the same numbers (tested
against aiokafka's), a fraction of a µs per key.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_SEED = 0x9747B28C
_M = np.uint32(0x5BD1E995)
_SMALL_BATCH = 8  # below this, per-key Python is cheaper than numpy's set-up


def _murmur2_one(data: bytes) -> int:
    length = len(data)
    h = (_SEED ^ length) & 0xFFFFFFFF
    m = 0x5BD1E995
    end = length & ~3
    for i in range(0, end, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    extra = length & 3
    if extra >= 3:
        h ^= data[end + 2] << 16
    if extra >= 2:
        h ^= data[end + 1] << 8
    if extra >= 1:
        h ^= data[end]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def _murmur2_same_length(keys: Sequence[bytes], length: int) -> np.ndarray:
    raw = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), length)
    h = np.full(len(keys), (_SEED ^ length) & 0xFFFFFFFF, dtype=np.uint32)
    words = length // 4
    if words:
        k_all = np.ascontiguousarray(raw[:, : words * 4]).view("<u4")
        for i in range(words):
            k = k_all[:, i] * _M
            k ^= k >> np.uint32(24)
            k *= _M
            h *= _M
            h ^= k
    extra = length & 3
    end = words * 4
    if extra >= 3:
        h ^= raw[:, end + 2].astype(np.uint32) << np.uint32(16)
    if extra >= 2:
        h ^= raw[:, end + 1].astype(np.uint32) << np.uint32(8)
    if extra >= 1:
        h ^= raw[:, end].astype(np.uint32)
        h *= _M
    h ^= h >> np.uint32(13)
    h *= _M
    h ^= h >> np.uint32(15)
    return h


def murmur2_batch(keys: Sequence[bytes]) -> list[int]:
    """murmur2 of every key (unsigned 32-bit), in order."""
    if len(keys) < _SMALL_BATCH:
        return [_murmur2_one(k) for k in keys]
    by_length: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        by_length.setdefault(len(key), []).append(i)
    out = [0] * len(keys)
    for length, idx in by_length.items():
        hashes = _murmur2_same_length([keys[i] for i in idx], length).tolist()
        for i, value in zip(idx, hashes, strict=True):
            out[i] = value
    return out


def partitions_for_keys(keys: Sequence[bytes], partitions: int) -> list[int]:
    """The partition index (0..partitions-1) the default partitioner picks for each key."""
    return [(h & 0x7FFFFFFF) % partitions for h in murmur2_batch(keys)]
