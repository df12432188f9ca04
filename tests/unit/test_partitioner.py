"""The batched partitioner must place every key exactly where the Kafka clients do."""

from __future__ import annotations

from aiokafka.partitioner import murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from scoremesh.contract.partitioner import murmur2_batch, partitions_for_keys

KEYS = st.lists(st.binary(max_size=40), max_size=300)


@settings(max_examples=300, deadline=None)
@given(KEYS)
def test_murmur2_matches_the_kafka_client(keys: list[bytes]) -> None:
    assert murmur2_batch(keys) == [murmur2(k) & 0xFFFFFFFF for k in keys]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=24), min_size=1, max_size=600), st.integers(1, 64))
def test_partitions_match_the_default_partitioner(ids: list[str], partitions: int) -> None:
    keys = [i.encode() for i in ids]
    expected = [(murmur2(k) & 0x7FFFFFFF) % partitions for k in keys]
    assert partitions_for_keys(keys, partitions) == expected


def test_known_java_values() -> None:
    # org.apache.kafka.common.utils.UtilsTest#testMurmur2 (signed ints in Java)
    cases = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536}
    cases |= {
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    }
    cases |= {b"abc": 479470107}
    for key, signed in cases.items():
        assert murmur2_batch([key] * 10)[0] == signed & 0xFFFFFFFF
        assert murmur2_batch([key])[0] == signed & 0xFFFFFFFF
