"""The join's state in RocksDB on local disk (rocksdict), one database per input partition.

Why and what it costs: docs/adr/0016-label-join-disk-store.md. The layout (raw bytes):

- ``c`` + changelog key -> the changelog value: each event's entry (pending prediction,
  pending label, expiry marker) and each closed window's final statistics, byte for byte
  what ``label-join.changelog`` holds, so a changelog record is applied by writing it;
- ``i`` + index + bucket (8 bytes, big-endian, so buckets sort by time) + event_id -> empty:
  the expiry indexes, in a column family of their own (appended keys then never make a
  compaction rewrite the index); a whole bucket leaves with one range deletion;
- ``s`` + JSON group key -> the live window's statistics (JSON);
- ``m`` + name -> metadata: the changelog offset the data covers, the watermark, the number
  of entries, the changelog partition it belongs to, when it was written.

The join runs up to four batches ahead of its changelog. A batch's changes wait in memory
(``seal``: a WriteBatch, and an overlay that reads see) until the service knows the batch's
changelog records are acknowledged; then ``checkpoint`` writes the batch and the changelog
offset that covers it in one atomic WriteBatch. So the store never holds a change the
changelog lacks, and a store whose offset is behind the changelog's end is brought forward
by applying the changelog from that offset (applying a record twice changes nothing).

Memory is bounded by configuration, not by the state: one block cache per process shared
by its stores (index and filter blocks charged to it), and per store a few memtables.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import shutil
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rocksdict import (
    BlockBasedOptions,
    Cache,
    DBCompressionType,
    Options,
    Rdict,
    ReadOptions,
    WriteBatch,
)

from services.common.performance import GroupStats
from services.label_join.join import (
    WINDOW_KEY,
    Entry,
    GroupKey,
    JoinCore,
    PartitionState,
    window_group,
)
from services.label_join.store import ChangelogRecord, Index, JoinStore

log = logging.getLogger(__name__)

FORMAT = 2  # of this layout; a store in another format is rebuilt from the changelog
INDEX_FAMILY = "index"  # the expiry indexes' column family: an LSM tree of their own
_CHANGELOG = b"c"
_INDEX = b"i"
_STATS = b"s"
_META = b"m"
_OFFSET = _META + b"offset"  # the changelog offset the data covers (next to read)
_WATERMARK = _META + b"watermark"
_ENTRIES = _META + b"entries"
_OWNER = _META + b"owner"  # JSON: format, changelog topic, partition
_SAVED_AT = _META + b"saved_at"  # wall-clock ms of the last checkpoint
# the changelog record just before the offset, where known: its offset (8 bytes) and key. A
# changelog recreated since (as long, but other records) has another record there.
_LAST = _META + b"last"
_REBUILDING = _META + b"rebuilding"  # set while a restore's raw records await their indexes
_BUCKET_BIAS = 1 << 63  # event times are epoch ms; the bias keeps negative ones sortable
_MISSING: Any = object()


def _bucket_bytes(bucket: int) -> bytes:
    return (bucket + _BUCKET_BIAS).to_bytes(8, "big")


def _int(value: bytes | None) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True, slots=True)
class DiskStoreConfig:
    """Where the stores live and the memory they may use."""

    data_dir: Path
    cache_bytes: int = 256 << 20  # the block cache, shared by every store of the process
    write_buffer_bytes: int = 16 << 20  # one memtable of one store (at most 2 per store)


class DiskStores:
    """Opens one partition's store at a time, all sharing one block cache."""

    def __init__(self, config: DiskStoreConfig) -> None:
        self.config = config
        self._cache = Cache(config.cache_bytes)

    def path(self, changelog_topic: str, partition: int) -> Path:
        return self.config.data_dir / changelog_topic / str(partition)

    def options(self) -> Options:
        table = BlockBasedOptions()
        table.set_block_cache(self._cache)
        table.set_bloom_filter(10, False)  # a label for an unknown event is one cheap miss
        table.set_cache_index_and_filter_blocks(True)  # their memory inside the cache's bound
        table.set_pin_l0_filter_and_index_blocks_in_cache(True)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        options.create_missing_column_families(True)
        options.set_block_based_table_factory(table)
        options.set_write_buffer_size(self.config.write_buffer_bytes)
        # a Bloom filter over each memtable's keys: most lookups are for keys not written
        # lately, and without it each one walks the memtables' skip lists
        options.set_memtable_prefix_bloom_ratio(0.1)
        options.set_memtable_whole_key_filtering(True)
        options.set_max_write_buffer_number(2)
        options.set_compression_type(DBCompressionType.lz4())
        options.set_max_open_files(512)
        return options

    def open(
        self,
        changelog_topic: str,
        partition: int,
        load_entry: Callable[[str, bytes], Entry],
    ) -> DiskStore:
        return DiskStore(
            self.path(changelog_topic, partition),
            self.options(),
            changelog_topic,
            partition,
            load_entry,
        )


@dataclass(slots=True)
class _Sealed:
    number: int
    batch: WriteBatch
    writes: dict[bytes, bytes | None]  # what it wrote (None: deleted), for reads to see


class DiskStore(JoinStore):
    """One partition's state in RocksDB (see the module docstring)."""

    durable = True

    def __init__(
        self,
        path: Path,
        options: Options,
        changelog_topic: str,
        partition: int,
        load_entry: Callable[[str, bytes], Entry],
    ) -> None:
        self.path = path
        self.partition = partition
        self._options = options
        self._owner = orjson.dumps(
            {"format": FORMAT, "changelog": changelog_topic, "partition": partition}
        )
        self._load_entry = load_entry
        self._closed = False
        path.mkdir(parents=True, exist_ok=True)
        self._index_family: Any
        self._index_cf: Any
        self._db, self._index_family, self._index_cf = _open(path, options)
        held = self._db.get(_OWNER)
        if held is None:
            self._db.put(_OWNER, self._owner)
        elif held != self._owner:
            log.warning(
                "a store of another changelog or format: rebuilt",
                extra={"path": str(path), "found": held.decode(errors="replace")},
            )
            self.wipe()
        self._init_memory()
        self._read()

    def _init_memory(self) -> None:
        self.watermark = None
        self.stats = {}
        self.final_windows = {}
        self.offset: int | None = None  # the changelog offset the data on disk covers
        self.saved_at: int | None = None
        self.last: tuple[int, bytes] | None = None  # see _LAST
        self._count = 0
        self._buckets: tuple[set[int], ...] = (set(), set(), set())
        # this batch: entries read or changed (None: absent), and its writes so far
        self._live: dict[str, Entry | None] = {}
        self._number = 0
        self._batch = WriteBatch(raw_mode=True)
        self._writes: dict[bytes, bytes | None] = {}
        # sealed batches not yet checkpointed (reads see their writes, newest first), and the
        # index ranges they and the open batch deleted: (batch number, low, high)
        self._sealed: list[_Sealed] = []
        self._ranges: list[tuple[int, bytes, bytes]] = []

    def _read(self) -> None:
        """What is kept in memory, from the disk: metadata, statistics, closed windows and
        which buckets are indexed. Its cost does not grow with the number of entries."""
        db = self._db
        self.offset = _int(db.get(_OFFSET))
        self.watermark = _int(db.get(_WATERMARK))
        self.saved_at = _int(db.get(_SAVED_AT))
        last = db.get(_LAST)
        self.last = None if last is None else (int.from_bytes(last[:8], "big"), last[8:])
        self.rebuilding = db.get(_REBUILDING) is not None
        self._count = _int(db.get(_ENTRIES)) or 0
        for key, value in self._scan(_STATS):
            model, version, variant, segment, start = orjson.loads(key[1:])
            self.stats[(model, version, variant, segment, int(start))] = GroupStats.from_json(value)
        for key, value in self._scan(_CHANGELOG + WINDOW_KEY):
            self.final_windows[window_group(key[1:])] = GroupStats.from_json(value)
        for index in Index:
            self._buckets[index].update(self._skip_buckets(index))

    def _scan(
        self, prefix: bytes, upper: bytes | None = None, family: Rdict | None = None
    ) -> Iterable[tuple[bytes, bytes]]:
        read = ReadOptions()
        read.set_iterate_upper_bound(upper if upper is not None else _next_prefix(prefix))
        it = (family or self._db).iter(read)
        it.seek(prefix)
        while it.valid():
            yield it.key(), it.value()
            it.next()

    def _skip_buckets(self, index: Index) -> Iterable[int]:
        """The buckets an index holds keys in: one seek per bucket, not one step per key."""
        prefix = _INDEX + bytes([index])
        read = ReadOptions()
        read.set_iterate_upper_bound(_next_prefix(prefix))
        it = self._index_family.iter(read)
        it.seek(prefix)
        while it.valid():
            key: bytes = it.key()
            raw = int.from_bytes(key[2:10], "big")
            yield raw - _BUCKET_BIAS
            if raw + 1 >= 1 << 64:
                return
            it.seek(prefix + (raw + 1).to_bytes(8, "big"))

    def wipe(self) -> None:
        """Forget everything on disk (the changelog rebuilds it)."""
        self._release()
        Rdict.destroy(str(self.path), self._options)
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self._db, self._index_family, self._index_cf = _open(self.path, self._options)
        self._db.put(_OWNER, self._owner)
        self._init_memory()

    # --- entries ----------------------------------------------------------------------------

    def get(self, event_id: str) -> Entry | None:
        held = self._live.get(event_id, _MISSING)
        if held is not _MISSING:
            return held  # type: ignore[no-any-return]
        key = _CHANGELOG + event_id.encode()
        data = self._unwritten(key)
        if data is _MISSING:
            data = self._db.get(key)
        entry = None if data is None else self._load_entry(event_id, data)
        self._live[event_id] = entry
        return entry

    def prefetch(self, event_ids: Collection[str]) -> None:
        """Entries not yet read in this batch, read with one multi-get (RocksDB looks the
        keys up together, sorted, and the per-call cost is paid once)."""
        live, load = self._live, self._load_entry
        wanted: dict[bytes, str] = {}
        for event_id in event_ids:
            if event_id in live:
                continue
            key = _CHANGELOG + event_id.encode()
            held = self._unwritten(key)
            if held is not _MISSING:
                live[event_id] = None if held is None else load(event_id, held)
            else:
                wanted[key] = event_id
        if wanted:
            found: list[bytes | None] = self._db.get(list(wanted)) or []  # a multi-get
            for event_id, data in zip(wanted.values(), found, strict=True):
                live[event_id] = None if data is None else load(event_id, data)

    def put(self, entry: Entry) -> None:
        if self.get(entry.event_id) is None:
            self._count += 1
        self._live[entry.event_id] = entry

    def remove(self, event_id: str) -> None:
        if self.get(event_id) is not None:
            self._count -= 1
            self._live[event_id] = None

    def __len__(self) -> int:
        return self._count

    # --- expiry indexes ---------------------------------------------------------------------

    def _unwritten(self, key: bytes) -> bytes | None:
        """The key's value in the batches not on disk yet (None: deleted there), the newest
        first; ``_MISSING`` where none of them wrote it."""
        held = self._writes.get(key, _MISSING)
        if held is _MISSING:
            for sealed in reversed(self._sealed):
                held = sealed.writes.get(key, _MISSING)
                if held is not _MISSING:
                    break
        return held  # type: ignore[no-any-return]

    def _write(self, key: bytes, value: bytes | None, family: Any = None) -> None:
        if value is None:
            self._batch.delete(key, family)
        else:
            self._batch.put(key, value, family)
        self._writes[key] = value

    def index(self, index: Index, bucket: int, event_id: str) -> None:
        self._buckets[index].add(bucket)
        key = _INDEX + bytes([index]) + _bucket_bytes(bucket) + event_id.encode()
        self._write(key, b"", self._index_cf)

    def unindex(self, index: Index, bucket: int, event_id: str) -> None:
        key = _INDEX + bytes([index]) + _bucket_bytes(bucket) + event_id.encode()
        self._write(key, None, self._index_cf)

    def buckets(self, index: Index) -> Iterable[int]:
        return list(self._buckets[index])

    def pop_bucket(
        self, index: Index, bucket: int, limit: int | None = None
    ) -> tuple[Collection[str], bool]:
        """The bucket's first ``limit`` keys (disk and overlay merged, in key order) leave by
        one range deletion from the bucket's start up to the last one taken."""
        low = _INDEX + bytes([index]) + _bucket_bytes(bucket)
        high = _INDEX + bytes([index]) + _bucket_bytes(bucket + 1)
        # what the batches not on disk yet wrote in the bucket (the newest write wins) ...
        batches = [*(sealed.writes for sealed in self._sealed), self._writes]
        pending: dict[bytes, bytes | None] = {}
        for writes in batches:
            pending.update((key, v) for key, v in writes.items() if low <= key < high)
        overlay = sorted(pending)
        # ... and their range deletions: this bucket's always start at its first key
        start = max((end for _, r_low, end in self._ranges if r_low == low), default=low)
        on_disk = (
            key for key, _ in self._scan(start, high, self._index_family) if key not in pending
        )
        merged = heapq.merge(on_disk, (key for key in overlay if pending[key] is not None))
        taken = list(merged if limit is None else itertools.islice(merged, limit))
        drained = limit is None or next(merged, None) is None
        end = high if drained else taken[-1] + b"\x00"
        for key in overlay:  # now deleted (the range deletion covers the batches' writes)
            if key < end:
                for writes in batches:
                    writes.pop(key, None)
        self._batch.delete_range(low, end, self._index_cf)
        self._ranges.append((self._number, low, end))
        if drained:
            self._buckets[index].discard(bucket)
        return [key[len(low) :].decode() for key in taken], drained

    # --- batches ----------------------------------------------------------------------------

    def seal(
        self,
        records: Sequence[ChangelogRecord],
        stats: Mapping[GroupKey, bytes | None],
        watermark: int | None,
    ) -> int:
        live = self._live
        for key, value in records:
            if value is not None and key[:1] != WINDOW_KEY[:1]:
                entry = live.get(key.decode())
                if entry is not None and not entry.expired:  # read back without its features
                    value = entry.add_bins(value)
            self._write(_CHANGELOG + key, value)
        for group, blob in stats.items():
            self._write(_STATS + orjson.dumps(list(group)), blob)
        self.watermark = watermark
        if watermark is not None:
            self._batch.put(_WATERMARK, str(watermark).encode())
        self._batch.put(_ENTRIES, str(self._count).encode())
        sealed = _Sealed(self._number, self._batch, self._writes)
        self._sealed.append(sealed)
        self._live.clear()
        self._number += 1
        self._batch = WriteBatch(raw_mode=True)
        self._writes = {}
        return sealed.number

    def checkpoint(
        self, sealed: int, changelog_offset: int | None, last_key: bytes | None = None
    ) -> None:
        while self._sealed and self._sealed[0].number <= sealed:
            done = self._sealed.pop(0)
            last = done.number == sealed
            if last and changelog_offset is not None:
                # earlier batches keep the older offset: replaying from it is harmless,
                # claiming records the store does not hold yet would lose them
                done.batch.put(_OFFSET, str(changelog_offset).encode())
                self.offset = changelog_offset
                self._put_last(done.batch, changelog_offset, last_key)
            now = int(time.time() * 1000)
            done.batch.put(_SAVED_AT, str(now).encode())
            self._db.write(done.batch)
            self.saved_at = now
            self._ranges = [r for r in self._ranges if r[0] > done.number]

    def _put_last(self, batch: WriteBatch, offset: int, key: bytes | None) -> None:
        if key is None or offset < 1:
            batch.delete(_LAST)
            self.last = None
        else:
            batch.put(_LAST, (offset - 1).to_bytes(8, "big") + key)
            self.last = (offset - 1, key)

    def close(self) -> None:
        """Unwritten batches are dropped: the changelog has (or will replay) them."""
        if not self._closed:
            self._closed = True
            self._release()

    def _release(self) -> None:
        """Close the database; it is unlocked once no handle of its column family is left."""
        self._db.close()
        self._index_family = self._index_cf = None

    def all_entries(self) -> Iterable[tuple[str, Entry]]:
        """Every entry on disk (checkpointed batches only): for tools and tests."""
        for key, value in self._scan(_CHANGELOG):
            if not key.startswith(_CHANGELOG + WINDOW_KEY):
                event_id = key[1:].decode()
                yield event_id, self._load_entry(event_id, value)

    def indexed(self, index: Index) -> dict[int, set[str]]:
        """An index on disk (checkpointed batches only): for tools and tests."""
        out: dict[int, set[str]] = {}
        for key, _ in self._scan(_INDEX + bytes([index]), family=self._index_family):
            bucket = int.from_bytes(key[2:10], "big") - _BUCKET_BIAS
            out.setdefault(bucket, set()).add(key[10:].decode())
        return out

    # --- a restore onto an empty store ------------------------------------------------------

    def load_raw(
        self,
        records: Sequence[ChangelogRecord],
        changelog_offset: int,
        last_key: bytes | None = None,
    ) -> None:
        """Changelog records written as they are (last one per key wins), nothing decoded:
        the first pass of a restore onto an empty store; ``rebuild`` is the second. Until
        it ends the store says so, and a store opened in that state is rebuilt."""
        batch = WriteBatch(raw_mode=True)
        for key, value in records:
            if value is None:
                batch.delete(_CHANGELOG + key)
            else:
                batch.put(_CHANGELOG + key, value)
        batch.put(_REBUILDING, b"1")
        batch.put(_OFFSET, str(changelog_offset).encode())
        self._put_last(batch, changelog_offset, last_key)
        self._db.write(batch)
        self.offset = changelog_offset
        self.rebuilding = True

    def rebuild(self, core: JoinCore, ps: PartitionState, chunk: int = 20_000) -> None:
        """The second pass: every entry on disk read once, indexed and counted."""
        assert ps.store is self and not self._sealed
        n = 0
        for key, value in self._scan(_CHANGELOG):
            if key.startswith(_CHANGELOG + WINDOW_KEY):
                ps.final_windows[window_group(key[1:])] = GroupStats.from_json(value)
                continue
            event_id = key[1:].decode()
            entry = self._load_entry(event_id, value)
            self._count += 1
            core.adopt(ps, entry)
            n += 1
            if n % chunk == 0:
                self.checkpoint(self.seal([], {}, ps.watermark), None)
        self._batch.delete(_REBUILDING)
        self.rebuilding = False

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


class StoreLockedError(RuntimeError):
    """Another process (or another store in this one) holds the store's directory."""


def _open(path: Path, options: Options, wait_s: float = 10.0) -> tuple[Rdict, Rdict, Any]:
    """Open the database (and its index column family); while a previous owner of the
    partition is still letting go of it (a rebalance), wait a little."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            db = Rdict(str(path), options, column_families={INDEX_FAMILY: options})
            return db, db.get_column_family(INDEX_FAMILY), db.get_column_family_handle(INDEX_FAMILY)
        except Exception as exc:  # rocksdict raises plain Exception
            if "lock" not in str(exc).lower():
                raise
            if time.monotonic() > deadline:
                raise StoreLockedError(
                    f"the join store {path} is held by another process: give each label-join "
                    "process its own SCOREMESH_LABEL_JOIN_DATA_DIR (its own volume)"
                ) from exc
            time.sleep(0.2)


def _next_prefix(prefix: bytes) -> bytes:
    """The smallest key after every key that starts with ``prefix``."""
    trimmed = prefix.rstrip(b"\xff")
    return trimmed[:-1] + bytes([trimmed[-1] + 1])
