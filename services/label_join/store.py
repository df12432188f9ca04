"""Where one input partition's join state lives: the interface, and the in-memory store.

``JoinCore`` (services/label_join/join.py) reads and changes a partition's state only through
a ``JoinStore``: the events (pending predictions, pending labels, expiry markers: one
``Entry`` per event_id), the per-bucket indexes that expiry walks, and the window
statistics. Two stores implement it:

- ``MemoryStore`` (here): dicts and sets. For tests and small deployments; the state is
  rebuilt from the changelog on every assignment.
- ``DiskStore`` (services/label_join/disk_store.py): RocksDB on local disk, memory bounded by
  its configuration, the changelog offset kept with the data (docs/adr/0016-*).

A batch changes entries in place (the core marks them dirty); at the batch's end the core
hands the store the batch's changelog records with ``seal`` (the store's record of the same
change), and once the service has the changelog's acknowledgement it calls ``checkpoint``
with the changelog offset that covers them. A store that keeps nothing across restarts
ignores both.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from services.common.performance import GroupStats
    from services.label_join.join import Entry, GroupKey

# (key, value) as on the changelog: an event_id's entry, or a closed window's final
# statistics (join.WINDOW_KEY); None: forgotten (a tombstone)
ChangelogRecord: TypeAlias = "tuple[bytes, bytes | None]"


class Index(enum.IntEnum):
    """The expiry indexes: event_ids by the tumbling bucket of a time."""

    EVENTS = 0  # live entries, by event time
    MARKERS = 1  # expired entries kept for `too_late`, by event time
    LABELS = 2  # labels waiting for their prediction, by label time


class JoinStore:
    """One input partition's join state (see the module docstring).

    ``stats`` (live windows) and ``final_windows`` (closed ones, also on the changelog) are
    plain dicts the core changes; ``watermark`` likewise. Entries returned by ``get`` may be
    changed in place until the batch is sealed.
    """

    partition: int
    watermark: int | None
    stats: dict[GroupKey, GroupStats]
    final_windows: dict[GroupKey, GroupStats]
    # whether the store keeps state across restarts: then the core tells it which window
    # statistics a batch changed (``seal``), and restores only the changelog's tail
    durable: bool = False

    # --- entries ----------------------------------------------------------------------------

    def get(self, event_id: str) -> Entry | None:
        raise NotImplementedError

    def put(self, entry: Entry) -> None:
        """Add the event's entry, or replace the one held."""
        raise NotImplementedError

    def prefetch(self, event_ids: Collection[str]) -> None:
        """The batch is about to ``get`` these events: a store that reads them from disk
        may read them all at once now. Nothing else changes."""

    def remove(self, event_id: str) -> None:
        """Forget the event (nothing happens if it is not held)."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, event_id: str) -> Entry:
        entry = self.get(event_id)
        if entry is None:
            raise KeyError(event_id)
        return entry

    def __contains__(self, event_id: object) -> bool:
        return isinstance(event_id, str) and self.get(event_id) is not None

    # --- expiry indexes ---------------------------------------------------------------------

    def index(self, index: Index, bucket: int, event_id: str) -> None:
        raise NotImplementedError

    def unindex(self, index: Index, bucket: int, event_id: str) -> None:
        raise NotImplementedError

    def buckets(self, index: Index) -> Iterable[int]:
        """The buckets that may hold event_ids (in no particular order)."""
        raise NotImplementedError

    def pop_bucket(
        self, index: Index, bucket: int, limit: int | None = None
    ) -> tuple[Collection[str], bool]:
        """Up to ``limit`` (None: all) of the bucket's event_ids, taken out of it, and
        whether it is now empty (it then leaves ``buckets``). A limit takes the smallest
        event_ids first."""
        raise NotImplementedError

    # --- batches ----------------------------------------------------------------------------

    def seal(
        self,
        records: Sequence[ChangelogRecord],
        stats: Mapping[GroupKey, bytes | None],
        watermark: int | None,
    ) -> int:
        """End of a batch: its changelog records (the new values of what it changed) and,
        for a durable store, the window statistics it changed (their JSON, None: gone) and
        the partition's watermark. Returns the batch's number for ``checkpoint``."""
        return 0

    def checkpoint(
        self, sealed: int, changelog_offset: int | None, last_key: bytes | None = None
    ) -> None:
        """Batches up to ``sealed`` are on the changelog, whose records before
        ``changelog_offset`` (None: unknown, keep the last one) they cover; ``last_key``:
        the key of the record just before that offset, where known (a durable store keeps
        it to tell its changelog from one recreated since)."""

    def close(self) -> None:
        """Release what the store holds open (the data stays where it is kept)."""


class MemoryStore(JoinStore):
    """The state in dicts and sets; nothing survives the process."""

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.watermark = None
        self.stats = {}
        self.final_windows = {}
        self.entries: dict[str, Entry] = {}
        self._indexes: tuple[dict[int, set[str]], ...] = ({}, {}, {})

    def get(self, event_id: str) -> Entry | None:
        return self.entries.get(event_id)

    def put(self, entry: Entry) -> None:
        self.entries[entry.event_id] = entry

    def remove(self, event_id: str) -> None:
        self.entries.pop(event_id, None)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def index(self, index: Index, bucket: int, event_id: str) -> None:
        members = self._indexes[index].get(bucket)
        if members is None:
            members = self._indexes[index][bucket] = set()
        members.add(event_id)

    def unindex(self, index: Index, bucket: int, event_id: str) -> None:
        members = self._indexes[index].get(bucket)
        if members is not None:
            members.discard(event_id)

    def buckets(self, index: Index) -> Iterable[int]:
        return list(self._indexes[index])

    def pop_bucket(
        self, index: Index, bucket: int, limit: int | None = None
    ) -> tuple[Collection[str], bool]:
        members = self._indexes[index].get(bucket)
        if members is None:
            return (), True
        if limit is None or len(members) <= limit:
            del self._indexes[index][bucket]
            return members, True
        taken = heapq.nsmallest(limit, members)  # the disk store's order: the same batches
        members.difference_update(taken)
        return taken, False

    def indexed(self, index: Index) -> dict[int, set[str]]:
        """The index itself (tests compare stores with it)."""
        return self._indexes[index]
