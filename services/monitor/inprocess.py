"""Both monitor stages in one process without a broker: for tests and benchmarks.

``Loopback`` stands in for the ``monitor.signals`` topic: the signal records one
``MonitorCore.process`` call emits are partitioned like the producer would (murmur2 of
the model) and handed, as consumer records with offsets, to the owner's next call. Several
cores (monitor replicas) can share one loopback: each owns a set of signals partitions.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiokafka import ConsumerRecord

from scoremesh.contract.catalog import topic_spec
from scoremesh.contract.partitioner import partitions_for_keys
from services.common.batchloop import Out, Record
from services.monitor.alerts import Transition
from services.monitor.core import SIGNALS, MonitorCore


class Loopback:
    def __init__(self, topic: str, partitions: int | None = None) -> None:
        self.topic = topic
        self.partitions = partitions or topic_spec(SIGNALS).partitions
        self.log: dict[int, list[Record]] = {p: [] for p in range(self.partitions)}
        self.read: dict[tuple[int, int], int] = {}  # (reader, partition) -> next offset

    def append(self, outs: Sequence[Out]) -> list[Out]:
        """Signal records go on the log; every other output is returned."""
        rest: list[Out] = []
        signals = [o for o in outs if o.topic == self.topic]
        parts = partitions_for_keys([o.key or b"" for o in signals], self.partitions)
        for out, part in zip(signals, parts, strict=True):
            log = self.log[part]
            log.append(
                ConsumerRecord(self.topic, part, len(log), 0, 0, out.key, out.value, None, 0, 0, [])
            )
        rest.extend(o for o in outs if o.topic != self.topic)
        return rest

    def take(self, reader: int, partitions: Sequence[int], limit: int = 10_000) -> list[Record]:
        out: list[Record] = []
        for part in partitions:
            start = self.read.get((reader, part), 0)
            chunk = self.log[part][start : start + limit]
            self.read[(reader, part)] = start + len(chunk)
            out.extend(chunk)
        return out


def run_batch(
    core: MonitorCore,
    loop: Loopback,
    records: list[Record],
    owned: Sequence[int] | None = None,
    reader: int = 0,
) -> tuple[list[Transition], list[Out]]:
    """One batch of input records, then the signals waiting on the owned partitions
    (all of them by default). Returns the transitions and the non-signal outputs."""
    parts = range(loop.partitions) if owned is None else owned
    first = core.process(records)
    rest = loop.append(first.outs)
    second = core.process(loop.take(reader, parts))
    rest += loop.append(second.outs)
    return first.transitions + second.transitions, rest
