"""The join itself, per input partition: predictions ⋈ labels by event_id. Pure: no I/O.

State is one ``Entry`` per event_id (every variant's prediction, the event's features, the
current label), so every change to an event is one changelog record and a crash can never
leave half an event behind. Rules (docs/adr/0006-label-join-state.md):

- a prediction is kept once per (event_id, variant); a repeat is ignored;
- a label may come first: it waits ("pending") as long as a prediction could still join,
  i.e. until the partition's watermark passes ``label_time + window + grace`` (a prediction
  is at the latest as old as its label, and one older than the window is too late anyway),
  then goes to labels.unmatched as ``unknown_event``. Waiting the whole window, not just the
  grace, keeps a backlog catch-up (predictions hours behind their labels) from turning
  joinable labels into unmatched ones;
- duplicate labels: the last one wins. The label held changes only to a *different* value
  with a label_time not older than the held one; then every joined row of the event is
  emitted again with the new label (predictions.labeled and training.examples, keyed so
  downstream keeps the newest label_time) and its metric contribution is retracted and
  re-added. A repeat of the held value, or an older label, changes nothing;
- time is event time per partition: the watermark is the newest prediction event_time;
  a tumbling metrics window [b, b+T) and every entry in it expire together once the
  watermark reaches ``b + T + window + grace``. An expired entry leaves a marker for
  ``marker`` ms so a label for it is classified ``too_late`` (not ``unknown_event``);
- labels that fail to decode, name no event, or carry a class the model does not know go
  to labels.unmatched with the reason; nothing is dropped silently.
"""

from __future__ import annotations

import bisect
import collections
import functools
import logging
import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import orjson

from scoremesh.contract.codec import MAGIC, CodecError, codec
from services.common.batchloop import Out, Record
from services.common.performance import (
    Contribution,
    GroupStats,
    brier_term,
    delay_bucket,
    log_loss_term,
)
from services.common.registry_view import RegistryState
from services.common.settings import Settings
from services.label_join import telemetry
from services.label_join.labels import InvalidLabel, decode_label
from services.label_join.rows import EventRows
from services.label_join.store import ChangelogRecord, Index, JoinStore, MemoryStore

log = logging.getLogger(__name__)

SECOND_MS = 1000
HOUR_MS = 3600 * SECOND_MS
DAY_MS = 24 * HOUR_MS
MAX_ID_LEN = 256
MAX_TIME_MS = 10**14
MISSING = "(missing)"

# (model, version, variant, segment, window_start)
GroupKey: TypeAlias = tuple[str, str, str, str, int]

WINDOW_KEY = b"\x00window:"  # changelog keys of closed windows; event ids are printable


def window_key(group: GroupKey) -> bytes:
    return WINDOW_KEY + orjson.dumps(list(group))


def window_group(key: bytes) -> GroupKey:
    model, version, variant, segment, start = orjson.loads(key[len(WINDOW_KEY) :])
    return (model, version, variant, segment, int(start))


# Reason codes of labels.unmatched (UnmatchedLabel.reason). Stable: dashboards use them.
UNMATCHED_REASONS: dict[str, str] = {
    "too_late": "the event's join window had closed when the label arrived",
    "unknown_event": "no prediction for the event arrived within the join window",
    "invalid_class": "the label is not one of the model's classes",
    "invalid_label": "event_id, value or label_time is missing or malformed",
    "undecodable": "the bytes are neither a Label record (Avro) nor a JSON object",
}


@dataclass(frozen=True, slots=True)
class JoinConfig:
    """Windows in milliseconds of event time."""

    window_ms: int = 7 * DAY_MS
    grace_ms: int = HOUR_MS
    tumbling_ms: int = HOUR_MS
    sliding_ms: int = DAY_MS
    marker_ms: int = 7 * DAY_MS
    keep_original_bytes: int = 4 * 1024
    # entries a partition expires (or forgets, as markers) per batch: a bucket larger than
    # this is worked through over the next batches, so neither memory nor a batch's time
    # grows with the rate of events (each expired entry is read, rewritten and logged)
    expire_per_batch: int = 10_000

    def __post_init__(self) -> None:
        if min(self.window_ms, self.tumbling_ms, self.sliding_ms) <= 0:
            raise ValueError("window, tumbling and sliding lengths must be positive")
        if self.grace_ms < 0 or self.marker_ms < 0:
            raise ValueError("grace and marker lengths must not be negative")
        if self.expire_per_batch < 1:
            raise ValueError("expire_per_batch must be at least 1")
        if self.sliding_ms % self.tumbling_ms:
            raise ValueError("the sliding window must be a whole number of tumbling windows")

    def bucket(self, t: int) -> int:
        return t - t % self.tumbling_ms

    @classmethod
    def from_settings(cls, settings: Settings) -> JoinConfig:
        """From the ``SCOREMESH_LABEL_JOIN_*`` settings (seconds)."""
        lj = settings.label_join

        def ms(seconds: float) -> int:
            return int(seconds * SECOND_MS)

        return cls(
            window_ms=ms(lj.window_s),
            grace_ms=ms(lj.grace_s),
            tumbling_ms=ms(lj.tumbling_s),
            sliding_ms=ms(lj.sliding_s),
            marker_ms=ms(lj.marker_s),
            expire_per_batch=lj.expire_per_batch,
            keep_original_bytes=settings.rejection_keep_bytes,
        )


@dataclass(frozen=True, slots=True)
class Binner:
    """Which bin of a feature a value falls in: reference deciles, or the category itself."""

    feature: str
    inner_edges: tuple[float, ...] | None  # None: categorical
    # "feature:bin" keys, made once: numeric bins by index, categories as they come
    _numeric: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _categories: dict[Any, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        edges = self.inner_edges or ()
        numeric = tuple(f"{self.feature}:bin{i}" for i in range(len(edges) + 1))
        object.__setattr__(self, "_numeric", numeric)
        object.__setattr__(self, "_categories", {})

    def bin_of(self, value: Any) -> str:
        return self.key_of(value)[len(self.feature) + 1 :]

    def key_of(self, value: Any) -> str:
        """``feature:bin`` of a value (the key of GroupStats.bins)."""
        if value is None:
            return f"{self.feature}:null"
        kind = type(value)
        if self.inner_edges is None:
            if kind is not int and kind is not str:  # 1, 1.0 and True are equal dict keys
                return f"{self.feature}:{value}"
            held = self._categories.get(value)
            if held is None:
                held = f"{self.feature}:{value}"
                if len(self._categories) < 4096:
                    self._categories[value] = held
            return held
        if (
            kind is not float
            and kind is not int
            and (kind is bool or not isinstance(value, int | float))
        ):
            return f"{self.feature}:null"
        if value != value:  # NaN
            return f"{self.feature}:null"
        return self._numeric[bisect.bisect_right(self.inner_edges, value)]


@dataclass(frozen=True, slots=True)
class VersionInfo:
    classes: tuple[str, ...]
    positive: str
    segments: tuple[str, ...]
    binners: tuple[Binner, ...]
    known: bool  # False: the registry did not know the version; classes came from its scores

    def bins_of(self, features: dict[str, Any]) -> tuple[str, ...]:
        """The ``feature:bin`` key of each binned feature of an event: ``Binner.key_of``,
        with its common cases (a number in a numeric bin, a known category) inline."""
        out: list[str] = []
        get = features.get
        for b in self.binners:
            value: Any = get(b.feature)
            kind = type(value)
            edges = b.inner_edges
            if edges is not None:
                if (kind is float or kind is int) and value == value:
                    out.append(b._numeric[bisect.bisect_right(edges, value)])
                    continue
            elif kind is str or kind is int:
                held = b._categories.get(value)
                if held is not None:
                    out.append(held)
                    continue
            out.append(b.key_of(value))
        return tuple(out)


def binners_from_reference(reference: dict[str, Any]) -> tuple[Binner, ...]:
    out: list[Binner] = []
    features = reference.get("features") if isinstance(reference, dict) else None
    if not isinstance(features, dict):
        return ()
    for name, ref in sorted(features.items()):
        if not isinstance(ref, dict):
            continue
        if ref.get("kind") == "categorical":
            out.append(Binner(name, None))
        elif ref.get("kind") == "numeric" and isinstance(ref.get("edges"), list):
            edges = [float(e) for e in ref["edges"]]
            if len(edges) >= 3:
                out.append(Binner(name, tuple(edges[1:-1])))
    return tuple(out)


class VersionCatalog:
    """Classes, positive class, segments and feature bins of each model version.

    Read from the registry (the version's feature spec and metadata.reference). Infos are
    cached for the life of the process so a contribution is always retracted exactly as it
    was added; a version the registry does not know (yet) gets its classes from the
    prediction's scores, the model's newest known segments, and no feature bins.
    """

    def __init__(self, model: str) -> None:
        self.model = model
        self.state: RegistryState | None = None
        self._infos: dict[tuple[str, str], VersionInfo] = {}
        self._allowed: frozenset[str] | None = None

    def update(self, state: RegistryState) -> None:
        self.state = state
        classes = {c for v in state.of_model(self.model) for c in v.feature_spec.classes}
        self._allowed = frozenset(classes) if classes else None

    def allowed_labels(self) -> frozenset[str] | None:
        """The classes any version of the model knows; None (accept any) when none is known."""
        return self._allowed

    def info(self, model: str, version: str, scores: dict[str, float]) -> VersionInfo:
        key = (model, version)
        held = self._infos.get(key)
        if held is not None:
            return held
        mv = self.state.versions.get(f"{model}@{version}") if self.state else None
        if mv is not None:
            spec = mv.feature_spec
            info = VersionInfo(
                classes=tuple(spec.classes),
                positive=spec.positive,
                segments=tuple(spec.segments),
                binners=binners_from_reference(mv.metadata.reference),
                known=True,
            )
        else:
            newest = self.state.of_model(model) if self.state else []
            classes = tuple(scores) or ("",)
            info = VersionInfo(
                classes=classes,
                positive=classes[-1],
                segments=tuple(newest[-1].feature_spec.segments) if newest else (),
                binners=(),
                known=False,
            )
        self._infos[key] = info
        return info


@dataclass(slots=True)
class Pred:
    model: str
    version: str
    served: bool
    source: str
    score: float
    scores: dict[str, float]
    decision: str
    scored_at: int
    # "feature:bin" keys of the event's features for this version's binners (shared strings);
    # made when the prediction arrives, not kept in the changelog: restore makes them again
    bins: tuple[str, ...] = ()

    def to_list(self) -> list[Any]:
        return [
            self.model,
            self.version,
            self.served,
            self.source,
            self.score,
            self.scores,
            self.decision,
            self.scored_at,
        ]

    @classmethod
    def from_list(cls, raw: list[Any]) -> Pred:
        return cls(raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7])

    @classmethod
    def from_record(cls, p: dict[str, Any]) -> Pred:
        """From a decoded Prediction (the strings that repeat interned)."""
        return cls(
            sys.intern(p["model"]),
            sys.intern(p["model_version"]),
            p["served"],
            sys.intern(p["source"]),
            p["score"],
            p["scores"],
            sys.intern(p["decision"]),
            p["scored_at"],
        )


@dataclass(slots=True)
class Entry:
    """Everything known about one event in this partition.

    The event's own fields are kept as ``head``: the bytes of the Prediction's first five
    fields (event_id, entity_id, event_time, features, attributes) as they arrived, which
    the outputs copy (services/label_join/rows.py). ``attributes`` is the decoded map the
    segments need, shared between events with the same attributes.
    """

    event_id: str
    event_time: int | None = None  # None: only a label is known so far
    head: bytes = b""
    time_end: int = 0  # head[:time_end]: event_id, entity_id, event_time
    attrs_at: int = 0  # head[attrs_at:]: attributes
    attributes: dict[str, str] = field(default_factory=dict)
    preds: dict[str, Pred] = field(default_factory=dict)  # variant -> prediction
    label: str | None = None
    label_time: int | None = None
    expired: bool = False  # a marker: the window closed; remembered for `too_late`

    def encode(self, with_bins: bool = False) -> bytes:
        """The changelog value. Version 2: a JSON line (time, label, predictions, the head's
        offsets), then the head's bytes. Version 1 (JSON with the decoded features) is still
        read; markers are unchanged. An event whose one prediction is all that is known of
        it is written by the join as that Prediction's own bytes instead (``decode`` reads
        both): nothing to encode. ``with_bins``: each prediction's feature bins too (``b``),
        as a disk store keeps an entry, so that reading it back decodes no features."""
        if self.expired:
            return orjson.dumps({"v": 1, "t": self.event_time, "x": 1})
        meta: dict[str, Any] = {
            "v": 2,
            "t": self.event_time,
            "h": [self.time_end, self.attrs_at],
            "p": {variant: p.to_list() for variant, p in self.preds.items()},
            "l": None if self.label is None else [self.label, self.label_time],
        }
        if with_bins:
            meta["b"] = {variant: p.bins for variant, p in self.preds.items()}
        return orjson.dumps(meta) + b"\n" + self.head

    def add_bins(self, value: bytes) -> bytes:
        """``encode(with_bins=True)`` from ``value``, this entry's ``encode()``: the bins
        spliced into its JSON line rather than the entry encoded a second time."""
        end = value.find(b"\n") - 1  # the JSON line's closing brace (no raw newline in it)
        if end < 0 or value[:1] != b"{":  # a Prediction's bytes, or version 1
            return self.encode(with_bins=True)
        bins = orjson.dumps({variant: p.bins for variant, p in self.preds.items()})
        return b"".join((value[:end], b',"b":', bins, value[end:]))

    @classmethod
    def decode(cls, event_id: str, data: bytes, rows: EventRows) -> Entry:
        if data[:2] == MAGIC:  # a Prediction's bytes: the event's one prediction, no label
            p, head, time_end, attrs_at = rows.read_prediction(data)
            if p["event_id"] != event_id:
                raise ValueError(f"a prediction for {p['event_id']!r} kept as {event_id!r}")
            return cls(
                event_id,
                event_time=p["event_time"],
                head=head,
                time_end=time_end,
                attrs_at=attrs_at,
                preds={p["variant"]: Pred.from_record(p)},
            )
        meta, newline, head = data.partition(b"\n")  # compact JSON has no raw newline
        raw = orjson.loads(meta)
        version = raw.get("v")
        if version not in (1, 2) or (version == 2) != bool(newline):
            raise ValueError(f"unknown label-join state version {version!r}")
        if raw.get("x"):
            return cls(event_id, event_time=raw["t"], expired=True)
        label = raw.get("l")
        entry = cls(
            event_id,
            event_time=raw.get("t"),
            preds={variant: Pred.from_list(p) for variant, p in (raw.get("p") or {}).items()},
            label=label[0] if label else None,
            label_time=label[1] if label else None,
        )
        if version == 2:
            entry.head = head
            entry.time_end, entry.attrs_at = raw["h"]
            for variant, bins in (raw.get("b") or {}).items():
                entry.preds[variant].bins = tuple(map(sys.intern, bins))
        elif entry.event_time is not None:  # version 1: the head is written from its fields
            entry.head, entry.time_end, entry.attrs_at = rows.head_of(
                {
                    "event_id": event_id,
                    "entity_id": raw.get("e", ""),
                    "event_time": entry.event_time,
                    "features": raw.get("f") or {},
                    "attributes": raw.get("a") or {},
                }
            )
        return entry


class _ExpiryBudget:
    """The entries one partition may still expire or forget in this batch."""

    def __init__(self, entries: int) -> None:
        self.left = entries
        self.stopped = False  # a bucket (or more) left for the next batches

    def buckets(
        self, store: JoinStore, index: Index, below: int
    ) -> Iterator[tuple[int, Collection[str]]]:
        """The index's buckets below ``below``, oldest first, each with the event_ids taken
        out of it; a bucket the budget does not empty is the last one (``stopped``)."""
        for bucket in sorted(b for b in store.buckets(index) if b < below):
            if self.left < 1:
                self.stopped = True
                return
            event_ids, drained = store.pop_bucket(index, bucket, self.left)
            self.left -= len(event_ids)
            self.stopped = not drained
            yield bucket, event_ids
            if self.stopped:
                return


@dataclass
class PartitionState:
    """One partition's join: its store (entries, expiry indexes, window statistics) and
    what the current batch and the publisher have still to take from it."""

    partition: int
    store: JoinStore
    watermark: int | None = None
    # the store's window statistics (the same dicts): live windows, and closed ones' finals.
    # Final statistics of closed windows are in the changelog too: written before the first
    # marker of their window, so a crash half-way through closing a window cannot turn the
    # rest of it into a partial "final" after the restart.
    stats: dict[GroupKey, GroupStats] = field(init=False)
    final_windows: dict[GroupKey, GroupStats] = field(init=False)
    dirty_stats: set[GroupKey] = field(default_factory=set)
    closed: dict[GroupKey, GroupStats] = field(default_factory=dict)  # final, to publish
    dirty_keys: set[str] = field(default_factory=set)
    # this batch's first predictions of events with no label, as they arrived: an event still
    # just that at the batch's end is written to the changelog as these bytes
    fresh: dict[str, bytes] = field(default_factory=dict)
    dirty_windows: set[GroupKey] = field(default_factory=set)
    dead_windows: set[GroupKey] = field(default_factory=set)
    # (model, version, variant, window, segment values) -> the groups a row of that kind
    # counts in: one lookup per row instead of a key and a lookup per group. Cleared
    # whenever a window's statistics leave ``stats``.
    groups: dict[tuple[Any, ...], Groups] = field(default_factory=dict)
    dirty_groups: list[Groups] = field(default_factory=list)  # into dirty_stats when taken
    # for a durable store: the groups this batch changed, and statistics it dropped
    stored_groups: list[Groups] = field(default_factory=list)
    removed_stats: set[GroupKey] = field(default_factory=set)
    # expiry not done for lack of budget (JoinConfig.expire_per_batch): every next batch of
    # the process goes on with it, whichever partitions its input is for; True at first
    backlog: bool = True
    # buckets below this one were closed when the batch began: their entries count as
    # expired even where a backlog has not got to them yet (None: nothing closed)
    closed_at_start: int | None = None

    def __post_init__(self) -> None:
        self.stats = self.store.stats
        self.final_windows = self.store.final_windows
        self.watermark = self.store.watermark

    @property
    def entries(self) -> JoinStore:
        """The events (read side: ``get``, ``in``, ``[...]``, ``len``)."""
        return self.store

    def stat(self, key: GroupKey, info: VersionInfo) -> GroupStats:
        held = self.stats.get(key)
        if held is None:
            held = self.stats[key] = GroupStats(info.classes, info.positive)
        self.dirty_stats.add(key)
        return held

    def flush_dirty(self) -> set[GroupKey]:
        for groups in self.dirty_groups:
            groups.dirty = False
            self.dirty_stats.update(groups.keys)
        self.dirty_groups.clear()
        return self.dirty_stats


@dataclass(slots=True)
class Groups:
    """The statistics one kind of row counts in, "all" first, and whether a row changed
    them since they were last taken (a flag, not a set of keys per row)."""

    keys: tuple[GroupKey, ...]
    stats: tuple[GroupStats, ...]
    dirty: bool = True
    # changed since a durable store last took them (never reset for the memory store)
    pending: bool = True


@dataclass(frozen=True, slots=True)
class OutputTopics:
    labeled: str
    examples: str
    unmatched: str


@dataclass
class BatchResult:
    outputs: list[Out]
    changelog: list[tuple[int, bytes, bytes | None]]  # (partition, key, value or tombstone)
    # partition -> the batch's number in its store, for ``JoinStore.checkpoint``
    sealed: dict[int, int] = field(default_factory=dict)


class JoinCore:
    """The join across the partitions this process owns (each with its own state)."""

    def __init__(
        self,
        config: JoinConfig,
        catalog: VersionCatalog,
        topics: OutputTopics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.topics = topics
        self.clock = clock
        self.partitions: dict[int, PartitionState] = {}
        self.counts: collections.Counter[str] = collections.Counter()
        self._future_ms = 0.0
        self.rows = EventRows()
        self._label_codec = codec("Label")
        self._unmatched_codec = codec("UnmatchedLabel")
        self._attributes: dict[bytes, dict[str, str]] = {}  # by their bytes: shared, read-only
        self._local_labeled = self._local_examples = self._local_unmatched = False

    def keep_partitions(self, topics: Iterable[str]) -> None:
        """Outputs to these topics go to the partition number of the state they come from,
        not to murmur2 of their key: the same partition, since the inputs are partitioned by
        murmur2 of the event_id (co-partitioned), when an output topic has as many partitions
        as the inputs. The service names the topics for which that holds."""
        keep = set(topics)
        self._local_labeled = self.topics.labeled in keep
        self._local_examples = self.topics.examples in keep
        self._local_unmatched = self.topics.unmatched in keep

    # --- partitions -----------------------------------------------------------------------

    def restore(
        self,
        partition: int,
        records: Iterable[tuple[bytes, bytes | None]],
        store: JoinStore | None = None,
    ) -> PartitionState:
        """Rebuild a partition's state from its changelog (last record per key wins), into
        ``store`` (a new ``MemoryStore`` by default)."""
        ps = self.attach(store if store is not None else MemoryStore(partition))
        self.apply(ps, records)
        self.finish_restore(ps)
        return ps

    def attach(self, store: JoinStore) -> PartitionState:
        """Own a partition whose state is ``store`` (as it holds it: empty, or as of its
        last checkpoint). ``apply`` the changelog records past that, then
        ``finish_restore``."""
        ps = PartitionState(store.partition, store)
        self.partitions[store.partition] = ps
        return ps

    def load_entry(self, event_id: str, data: bytes) -> Entry:
        """An entry from its changelog value, ready to join: attributes shared, names
        interned, feature bins made (they are not kept: the catalog decides them)."""
        features: dict[str, Any] | None = None  # decoded only for versions with bins
        if data[:2] == MAGIC:  # a Prediction's bytes: its features come with it
            p, head, time_end, attrs_at = self.rows.read_prediction(data)
            if p["event_id"] != event_id:
                raise ValueError(f"a prediction for {p['event_id']!r} kept as {event_id!r}")
            entry = Entry(
                event_id,
                event_time=p["event_time"],
                head=head,
                time_end=time_end,
                attrs_at=attrs_at,
                preds={sys.intern(p["variant"]): Pred.from_record(p)},
            )
            features = p["features"]
        else:
            entry = Entry.decode(event_id, data, self.rows)
        if entry.head:
            entry.attributes = self._shared(entry.head[entry.attrs_at :])
        for pred in entry.preds.values():
            pred.model, pred.version = sys.intern(pred.model), sys.intern(pred.version)
            info = self.catalog.info(pred.model, pred.version, pred.scores)
            if info.binners and not pred.bins:
                if features is None:
                    features = self.rows.decode_head(entry.head)["features"] if entry.head else {}
                pred.bins = info.bins_of(features)
        return entry

    def apply(self, ps: PartitionState, records: Iterable[tuple[bytes, bytes | None]]) -> int:
        """Changelog records onto the partition's state (last record per key wins): each
        event's entry replaced, its indexes and its share of the statistics with it, so
        records the state already holds change nothing. The store keeps them (``seal``:
        the number returned, for ``JoinStore.checkpoint``)."""
        latest: dict[bytes, bytes | None] = {}
        for key, value in records:
            latest[key] = value
        store = ps.store
        for raw_key, raw_value in latest.items():
            if raw_key.startswith(WINDOW_KEY):
                group = window_group(raw_key)
                if raw_value is None:
                    ps.final_windows.pop(group, None)
                else:
                    ps.final_windows[group] = GroupStats.from_json(raw_value)
                continue
            event_id = raw_key.decode()
            old = store.get(event_id)
            if old is not None:
                self._unindex(ps, old)
                self._count_entry(ps, old, -1)
            if raw_value is None:
                if old is not None:
                    store.remove(event_id)
                continue
            entry = self.load_entry(event_id, raw_value)
            store.put(entry)
            self.adopt(ps, entry)
        return self._seal(ps, list(latest.items()))

    def adopt(self, ps: PartitionState, entry: Entry) -> None:
        """An entry the store holds now (from the changelog): its indexes, the watermark,
        its share of the statistics."""
        self._index(ps, entry)
        if entry.event_time is not None and not entry.expired:
            ps.watermark = max(ps.watermark or entry.event_time, entry.event_time)
        self._count_entry(ps, entry, +1)

    def finish_restore(self, ps: PartitionState) -> int:
        """After the last ``apply``: closed windows' finals replace what their entries
        still add up to, and are published again (the crash may have beaten the
        publisher)."""
        for group, final in ps.final_windows.items():
            if ps.stats.pop(group, None) is not None:  # rebuilt from unexpired entries: partial
                ps.removed_stats.add(group)
            ps.closed[group] = final
        for group in [k for k, held in ps.stats.items() if held.predicted <= 0]:
            del ps.stats[group]  # every entry that counted in it was replaced
            ps.removed_stats.add(group)
        sealed = self._seal(ps, [])
        ps.groups.clear()
        ps.dirty_groups.clear()
        ps.dirty_stats.clear()
        return sealed

    def _count_entry(self, ps: PartitionState, entry: Entry, sign: int) -> None:
        """Add (1) or retract (-1) an entry's share of the window statistics."""
        if entry.expired or entry.event_time is None:
            return
        for variant, pred in entry.preds.items():
            info = self.catalog.info(pred.model, pred.version, pred.scores)
            for stats in self._groups(ps, entry, pred, variant, info):
                stats.predicted += sign
            if entry.label is not None:
                self._account(ps, entry, pred, variant, info, sign)

    def drop(self, partition: int) -> None:
        ps = self.partitions.pop(partition, None)
        if ps is not None:
            ps.store.close()

    def _index(self, ps: PartitionState, entry: Entry) -> None:
        where = self._where(entry)
        if where is not None:
            ps.store.index(where[0], where[1], entry.event_id)

    def _unindex(self, ps: PartitionState, entry: Entry) -> None:
        where = self._where(entry)
        if where is not None:
            ps.store.unindex(where[0], where[1], entry.event_id)

    def _where(self, entry: Entry) -> tuple[Index, int] | None:
        bucket = self.config.bucket
        if entry.expired:
            assert entry.event_time is not None
            return Index.MARKERS, bucket(entry.event_time)
        if entry.event_time is not None:
            return Index.EVENTS, bucket(entry.event_time)
        if entry.label_time is not None:
            return Index.LABELS, bucket(entry.label_time)
        return None

    def _seal(self, ps: PartitionState, records: list[ChangelogRecord]) -> int:
        """The batch's changes to the store; for a durable one with the statistics the
        batch changed."""
        stats: dict[GroupKey, bytes | None] = {}
        if ps.store.durable:
            for groups in ps.stored_groups:
                groups.pending = False
                for key in groups.keys:
                    held = ps.stats.get(key)
                    if held is not None:
                        stats[key] = held.to_json()
            for key in ps.removed_stats:
                if key not in ps.stats:
                    stats[key] = None
        ps.stored_groups.clear()
        ps.removed_stats.clear()
        return ps.store.seal(records, stats, ps.watermark)

    # --- the batch ------------------------------------------------------------------------

    def process(self, predictions: list[Record], labels: list[Record]) -> BatchResult:
        """Predictions first (they move the watermark), then labels, then expiry."""
        outputs: list[Out] = []
        touched = {partition for partition, ps in self.partitions.items() if ps.backlog}
        for state in self.partitions.values():
            state.closed_at_start = self._closed_before(state)
        # a clock far ahead never moves time: event times beyond this are not watermarks
        self._future_ms = self.clock() * 1000 + self.config.grace_ms
        if predictions:
            owned = self.partitions
            predicted = [
                self._read_prediction(record) if record.partition in owned else None
                for record in predictions
            ]
            self._prefetch(predictions, [p and p[0]["event_id"] for p in predicted])
            for record, prediction in zip(predictions, predicted, strict=True):
                ps = self.partitions.get(record.partition)
                if ps is None:  # revoked while the batch was in flight: the new owner replays it
                    continue
                touched.add(record.partition)
                if prediction is not None:
                    self._on_prediction(ps, record, prediction, outputs)
        if labels:
            read = [self._read_label(record) for record in labels]  # unowned ones: skipped below
            self._prefetch(
                labels, [la["event_id"] if isinstance(la, dict) else None for la in read]
            )
            for record, label in zip(labels, read, strict=True):
                ps = self.partitions.get(record.partition)
                if ps is None:
                    continue
                touched.add(record.partition)
                self._on_label(ps, record, label, outputs)
        changelog: list[tuple[int, bytes, bytes | None]] = []
        sealed: dict[int, int] = {}
        for partition in sorted(touched):
            ps = self.partitions[partition]
            self._expire(ps, outputs)
            for group in sorted(ps.dirty_windows):  # before the markers of their windows
                changelog.append((partition, window_key(group), ps.final_windows[group].to_json()))
            for group in sorted(ps.dead_windows):
                changelog.append((partition, window_key(group), None))
            ps.dirty_windows.clear()
            ps.dead_windows.clear()
            fresh = ps.fresh
            first = len(changelog)
            store = ps.store
            for event_id in ps.dirty_keys:
                entry = store.get(event_id)
                if entry is None:
                    value = None
                elif (
                    event_id in fresh
                    and entry.label is None
                    and not entry.expired
                    and len(entry.preds) == 1
                ):  # its one prediction is the whole event: kept as it arrived
                    value = fresh[event_id]
                else:
                    value = entry.encode()
                changelog.append((partition, event_id.encode(), value))
            ps.dirty_keys.clear()
            fresh.clear()
            sealed[partition] = self._seal(ps, [(k, v) for _, k, v in changelog[first:]])
        return BatchResult(outputs, changelog, sealed)

    def _closed_before(self, ps: PartitionState) -> int | None:
        """Event-time buckets below this one are closed (None: nothing seen yet)."""
        if ps.watermark is None:
            return None
        cfg = self.config
        return cfg.bucket(ps.watermark - cfg.window_ms - cfg.grace_ms)

    def _forget_before(self, ps: PartitionState) -> int | None:
        """Markers of event-time buckets below this one are forgotten."""
        if ps.watermark is None:
            return None
        cfg = self.config
        return cfg.bucket(ps.watermark - cfg.window_ms - cfg.grace_ms - cfg.marker_ms)

    def _shared(self, raw: bytes) -> dict[str, str]:
        """One dict per distinct attributes map (they repeat: segments are categories), from
        its bytes, decoded only when new."""
        held = self._attributes.get(raw)
        if held is None:
            held = self.rows.decode_attributes(raw)
            if len(self._attributes) < 4096:
                self._attributes[raw] = held
        return held

    def _read_prediction(self, record: Record) -> tuple[dict[str, Any], bytes, int, int] | None:
        """A prediction record decoded (with its head's bytes), or None: undecodable,
        counted and logged."""
        try:
            return self.rows.read_prediction(record.value or b"")
        except CodecError as exc:
            self.counts["prediction_undecodable"] += 1
            log.error(
                "undecodable prediction skipped",
                extra={"partition": record.partition, "offset": record.offset, "error": str(exc)},
            )
            return None

    def _on_prediction(
        self,
        ps: PartitionState,
        record: Record,
        prediction: tuple[dict[str, Any], bytes, int, int],
        outputs: list[Out],
    ) -> None:
        p, head, time_end, attrs_at = prediction
        event_id: str = p["event_id"]
        t: int = p["event_time"]
        watermark = ps.watermark
        if t <= self._future_ms and (watermark is None or t > watermark):
            ps.watermark = watermark = t
        entry = ps.store.get(event_id)
        if entry is not None and self._forget_closed_label(ps, entry, outputs):
            entry = None
        if entry is not None and entry.expired:
            self.counts["prediction_too_late"] += 1
            return
        cfg = self.config
        closed = self._closed_before(ps)
        if closed is not None and t < closed:  # bucket(t) < closed, as closed is a bucket start
            self.counts["prediction_too_late"] += 1
            return
        store = ps.store
        if entry is None:
            entry = Entry(event_id)
            store.put(entry)
        if entry.event_time is None:
            if entry.label_time is not None:  # a pending label now has its event
                store.unindex(Index.LABELS, cfg.bucket(entry.label_time), event_id)
            entry.event_time = t
            entry.head, entry.time_end, entry.attrs_at = head, time_end, attrs_at
            entry.attributes = self._shared(head[attrs_at:])
            store.index(Index.EVENTS, t - t % cfg.tumbling_ms, event_id)
        variant: str = sys.intern(p["variant"])
        if variant in entry.preds:
            self.counts["prediction_duplicate"] += 1
            return
        pred = Pred.from_record(p)
        first = not entry.preds
        if first and entry.label is None:
            ps.fresh[event_id] = record.value or b""
        entry.preds[variant] = pred
        ps.dirty_keys.add(event_id)
        info = self.catalog.info(pred.model, pred.version, pred.scores)
        if info.binners:
            pred.bins = info.bins_of(p["features"])
        for stats in self._groups(ps, entry, pred, variant, info):
            stats.predicted += 1
        self.counts["prediction"] += 1
        if entry.label is not None:
            self._account(ps, entry, pred, variant, info, +1)
            out_key = self._head(entry)
            outputs.append(self._labeled(ps, entry, pred, variant, out_key))
            self.counts["joined"] += 1
            if first:
                outputs.append(self._example(ps, entry, out_key))

    @staticmethod
    def _read_label(record: Record) -> dict[str, Any] | CodecError | InvalidLabel:
        """A label record decoded (Avro, or JSON by the rules of a label file, label_time the
        record's if none), or why it could not be."""
        try:
            return decode_label(record.value or b"", record.timestamp)
        except (CodecError, InvalidLabel) as exc:
            return exc

    def _prefetch(self, records: list[Record], event_ids: list[Any]) -> None:
        """Tell each partition's store which events this batch's records are for (None: a
        record that could not be read), so that a store on disk reads them in one pass (a
        multi-get) rather than one by one."""
        wanted: dict[int, list[str]] = {}
        for record, event_id in zip(records, event_ids, strict=True):
            if isinstance(event_id, str):
                wanted.setdefault(record.partition, []).append(event_id)
        for partition, event_ids in wanted.items():
            ps = self.partitions.get(partition)
            if ps is not None:
                ps.store.prefetch(event_ids)

    def _on_label(
        self,
        ps: PartitionState,
        record: Record,
        label: dict[str, Any] | CodecError | InvalidLabel,
        outputs: list[Out],
    ) -> None:
        if isinstance(label, InvalidLabel):
            outputs.append(self._unmatched(record, label.raw, "invalid_label", str(label)))
            return
        if isinstance(label, CodecError):
            outputs.append(self._unmatched(record, None, "undecodable", str(label)))
            return
        event_id, cls, label_time = label["event_id"], label["value"], label["label_time"]
        problem = _label_problem(event_id, cls, label_time)
        if problem:
            outputs.append(self._unmatched(record, label, "invalid_label", problem))
            return
        allowed = self.catalog.allowed_labels()
        if allowed is not None and cls not in allowed:
            outputs.append(
                self._unmatched(
                    record,
                    label,
                    "invalid_class",
                    f"label {cls!r} is not one of the model's classes {sorted(allowed)}",
                )
            )
            return
        self.counts["label"] += 1
        entry = ps.store.get(event_id)
        if entry is not None and self._forget_closed_label(ps, entry, outputs):
            entry = None
        if entry is not None and (
            entry.expired  # or due to be: its bucket closed, and a backlog waits on it
            or (
                entry.event_time is not None
                and ps.closed_at_start is not None
                and entry.event_time < ps.closed_at_start
            )
        ):
            outputs.append(
                self._unmatched(
                    record, label, "too_late", "the event's join window closed before the label"
                )
            )
            return
        if entry is None:
            cfg = self.config
            if (
                ps.watermark is not None
                and label_time < ps.watermark - cfg.window_ms - cfg.grace_ms
            ):
                outputs.append(
                    self._unmatched(
                        record,
                        label,
                        "too_late",
                        "label_time is older than the join window, so its event is too",
                    )
                )
                return
            entry = Entry(event_id, label=cls, label_time=label_time)
            ps.store.put(entry)
            ps.store.index(Index.LABELS, cfg.bucket(label_time), event_id)
            ps.dirty_keys.add(event_id)
            self.counts["label_pending"] += 1
            return
        if entry.label == cls:
            self.counts["label_duplicate"] += 1
            return
        if entry.label is not None and label_time < (entry.label_time or 0):
            self.counts["label_superseded"] += 1
            return
        correction = entry.label is not None
        if correction and entry.event_time is None:  # still pending: just hold the newer one
            bucket = self.config.bucket
            ps.store.unindex(Index.LABELS, bucket(entry.label_time or 0), event_id)
            ps.store.index(Index.LABELS, bucket(label_time), event_id)
        for variant, pred in entry.preds.items():
            info = self.catalog.info(pred.model, pred.version, pred.scores)
            if correction:
                self._account(ps, entry, pred, variant, info, -1)
        entry.label, entry.label_time = cls, label_time
        ps.dirty_keys.add(event_id)
        self._count("label_correction" if correction else "label_matched")
        if not entry.preds:
            return
        out_key = self._head(entry)
        for variant, pred in entry.preds.items():
            info = self.catalog.info(pred.model, pred.version, pred.scores)
            self._account(ps, entry, pred, variant, info, +1)
            outputs.append(self._labeled(ps, entry, pred, variant, out_key))
            self.counts["joined"] += 1
        outputs.append(self._example(ps, entry, out_key))

    # --- expiry ---------------------------------------------------------------------------

    def _expire(self, ps: PartitionState, outputs: list[Out]) -> None:
        if ps.watermark is None:
            ps.backlog = False
            return
        cfg = self.config
        closed = self._closed_before(ps)
        assert closed is not None
        store = ps.store
        budget = _ExpiryBudget(cfg.expire_per_batch)  # the rest waits for the next batches
        ps.backlog = True  # until the end
        for bucket, event_ids in budget.buckets(store, Index.EVENTS, closed):
            for event_id in event_ids:
                entry = store[event_id]
                if entry.label is None:
                    for variant, pred in entry.preds.items():
                        telemetry.EXPIRED_UNLABELED.labels(pred.model, pred.version, variant).inc()
                    self._count("expired_unlabeled", len(entry.preds))
                self.counts["expired"] += 1
                ps.dirty_keys.add(event_id)
                if cfg.marker_ms > 0:
                    store.put(Entry(event_id, event_time=entry.event_time, expired=True))
                    store.index(Index.MARKERS, bucket, event_id)
                else:
                    store.remove(event_id)
            ps.groups.clear()
            if budget.stopped:
                return  # its windows close once the bucket is done
            for key in [k for k in ps.stats if k[4] == bucket]:
                final = ps.stats.pop(key)
                ps.removed_stats.add(key)
                ps.dirty_stats.discard(key)
                held = ps.final_windows.get(key)
                if held is not None:  # closed before a crash: that record is complete
                    ps.closed[key] = held
                    continue
                final.expired_unlabeled = final.predicted - final.labeled
                ps.closed[key] = ps.final_windows[key] = final
                ps.dirty_windows.add(key)
        forget = self._forget_before(ps)
        assert forget is not None
        for _, event_ids in budget.buckets(store, Index.MARKERS, forget):
            for event_id in event_ids:
                store.remove(event_id)
                ps.dirty_keys.add(event_id)
        if budget.stopped:
            return
        forget_windows = cfg.bucket(
            ps.watermark - cfg.window_ms - cfg.grace_ms - max(cfg.marker_ms, cfg.tumbling_ms)
        )
        for key in [k for k in ps.final_windows if k[4] < forget_windows]:
            del ps.final_windows[key]
            ps.dirty_windows.discard(key)
            ps.dead_windows.add(key)
        for _, event_ids in budget.buckets(store, Index.LABELS, closed):
            for event_id in event_ids:
                pending = store.get(event_id)
                if pending is None or pending.event_time is not None or pending.label is None:
                    continue
                self._unknown_event(ps, pending, outputs)
        ps.backlog = budget.stopped

    def _unknown_event(self, ps: PartitionState, pending: Entry, outputs: list[Out]) -> None:
        """A label whose event had no prediction before its window closed: forgotten, and
        out as unmatched."""
        cfg = self.config
        ps.store.remove(pending.event_id)
        ps.dirty_keys.add(pending.event_id)
        label = {
            "event_id": pending.event_id,
            "value": pending.label,
            "label_time": pending.label_time,
        }
        outputs.append(
            self._unmatched(
                None,
                label,
                "unknown_event",
                "no prediction for this event arrived within the join window "
                f"({(cfg.window_ms + cfg.grace_ms) // SECOND_MS}s of event time)",
                ps.partition,
            )
        )

    def _forget_closed_label(self, ps: PartitionState, entry: Entry, outputs: list[Out]) -> bool:
        """If ``entry`` is a pending label (no prediction yet) whose bucket had closed when
        the batch began, which expiry would have let go already had a backlog not held it
        up: let it go now, as expiry would have, and say so."""
        if entry.event_time is not None or entry.label_time is None:
            return False
        bucket = self.config.bucket(entry.label_time)
        if ps.closed_at_start is None or bucket >= ps.closed_at_start:
            return False
        ps.store.unindex(Index.LABELS, bucket, entry.event_id)
        self._unknown_event(ps, entry, outputs)
        return True

    # --- statistics -----------------------------------------------------------------------

    def _groups(
        self, ps: PartitionState, entry: Entry, pred: Pred, variant: str, info: VersionInfo
    ) -> tuple[GroupStats, ...]:
        """The statistics a row of this event and prediction counts in ("all" first), marked
        changed. Looked up per row, not kept on the Pred: a list per prediction cost 10 % of
        the state's memory (184 of 2,039 bytes an entry)."""
        assert entry.event_time is not None
        window = self.config.bucket(entry.event_time)
        attributes = entry.attributes
        values = tuple([attributes.get(attr, MISSING) for attr in info.segments])
        kind = (pred.model, pred.version, variant, window, values)
        held = ps.groups.get(kind)
        if held is None:
            keys: list[GroupKey] = [(pred.model, pred.version, variant, "all", window)]
            for attr, value in zip(info.segments, values, strict=True):
                keys.append((pred.model, pred.version, variant, f"{attr}={value}", window))
            held = ps.groups[kind] = Groups(tuple(keys), tuple(ps.stat(k, info) for k in keys))
            ps.dirty_groups.append(held)
            ps.stored_groups.append(held)
            return held.stats
        if not held.dirty:
            held.dirty = True
            ps.dirty_groups.append(held)
        if not held.pending:
            held.pending = True
            ps.stored_groups.append(held)
        return held.stats

    def contribution(self, entry: Entry, pred: Pred, info: VersionInfo) -> Contribution:
        assert entry.label is not None and entry.event_time is not None
        label = entry.label
        return Contribution(
            label=label,
            decision=pred.decision,
            log_loss=log_loss_term(pred.scores, label),
            brier=brier_term(pred.scores, label, info.classes, info.positive),
            delay_bucket=delay_bucket((entry.label_time or 0) - entry.event_time),
            bins=pred.bins,
        )

    def _account(
        self,
        ps: PartitionState,
        entry: Entry,
        pred: Pred,
        variant: str,
        info: VersionInfo,
        sign: int,
    ) -> None:
        c = self.contribution(entry, pred, info)
        everything, *segments = self._groups(ps, entry, pred, variant, info)
        everything.add(c, sign)
        for stats in segments:
            stats.add(c, sign, bins=False)
        if sign > 0:
            delay_s = ((entry.label_time or 0) - (entry.event_time or 0)) / 1000.0
            telemetry.LABEL_DELAY.observe((pred.model, variant), delay_s)

    # --- output records -------------------------------------------------------------------

    def _head(self, entry: Entry) -> bytes:
        """The outputs' key (the event_id), encoded once per event."""
        return entry.event_id.encode()

    def _labeled(
        self, ps: PartitionState, entry: Entry, pred: Pred, variant: str, key: bytes
    ) -> Out:
        assert entry.label is not None and entry.event_time is not None
        value = self.rows.labeled(
            entry.head,
            entry.time_end,
            entry.attrs_at,
            (pred.model, pred.version, variant, pred.source, pred.score, pred.decision),
            entry.label,
            entry.label_time or 0,
            entry.event_time,
        )
        return Out(self.topics.labeled, key, value, ps.partition if self._local_labeled else None)

    def _example(self, ps: PartitionState, entry: Entry, key: bytes) -> Out:
        """Once per event (again only when a corrected label replaces the held one)."""
        assert entry.label is not None
        self.counts["training_example"] += 1
        value = self.rows.example(entry.head, entry.label, entry.label_time or 0)
        return Out(self.topics.examples, key, value, ps.partition if self._local_examples else None)

    def _unmatched(
        self,
        record: Record | None,
        label: dict[str, Any] | None,
        reason: str,
        detail: str,
        partition: int | None = None,
    ) -> Out:
        """``partition``: the state's, for a label that timed out (no ``record``)."""
        label = label or {}
        event_id = label.get("event_id")
        if record is not None:
            original = (record.value or b"")[: self.config.keep_original_bytes]
            if not (isinstance(event_id, str) and event_id) and record.key:
                event_id = record.key.decode("utf-8", "replace")
        else:  # a pending label that timed out: its bytes are re-encoded from the state
            original = self._label_codec.encode(label)
        value = label.get("value")
        label_time = label.get("label_time")
        out = {
            "event_id": event_id if isinstance(event_id, str) else None,
            "value": value if isinstance(value, str) else None,
            "label_time": label_time if isinstance(label_time, int) else None,
            "reason": reason,
            "detail": detail,
            "original": original,
            "received_at": int(self.clock() * 1000),
        }
        self._count(f"unmatched_{reason}")
        telemetry.UNMATCHED.labels(reason).inc()
        key = (
            event_id.encode()
            if isinstance(event_id, str)
            else (record.key if record is not None else None)
        )
        if record is not None:
            partition = record.partition
        return Out(
            self.topics.unmatched,
            key,
            self._unmatched_codec.encode(out),
            partition if self._local_unmatched else None,
        )

    def _count(self, what: str, n: int = 1) -> None:
        self.counts[what] += n

    # --- what the publisher needs ---------------------------------------------------------

    def take_dirty(self) -> tuple[dict[tuple[GroupKey, int], GroupStats], int | None]:
        """Shards changed since the last call, keyed by (group key, partition), and the
        newest watermark across partitions (where the sliding window ends)."""
        shards: dict[tuple[GroupKey, int], GroupStats] = {}
        newest: int | None = None
        for partition, ps in self.partitions.items():
            for key in ps.flush_dirty():
                held = ps.stats.get(key)
                if held is not None:
                    shards[(key, partition)] = held.copy()
            ps.dirty_stats.clear()
            for key, final in ps.closed.items():
                shards[(key, partition)] = final
            ps.closed.clear()
            if ps.watermark is not None:
                newest = ps.watermark if newest is None else max(newest, ps.watermark)
        return shards, newest

    def mark_all_dirty(self) -> None:
        for ps in self.partitions.values():
            ps.dirty_stats.update(ps.stats)

    @property
    def pending_entries(self) -> int:
        return sum(len(ps.store) for ps in self.partitions.values())


@functools.cache
def _rows() -> EventRows:
    return EventRows()


def state_record(data: bytes) -> dict[str, Any]:
    """A changelog value as one readable record (``scoremesh tail label-join.changelog``):
    its JSON line, with a version-2 entry's head decoded into ``head``; an event kept as its
    one Prediction as ``{"prediction": ...}``."""
    if data[:2] == MAGIC:  # an event's one prediction, as it arrived (Entry.decode)
        return {"prediction": codec("Prediction").decode(data)}
    meta, newline, head = data.partition(b"\n")
    try:
        value = orjson.loads(meta)
        if not isinstance(value, dict):
            raise ValueError(f"a JSON {type(value).__name__}, not an object")
        if newline:
            value["head"] = _rows().decode_head(head) if head else None
    except (ValueError, IndexError) as exc:  # orjson.JSONDecodeError is a ValueError
        raise CodecError(f"not a label-join state record: {exc}") from None
    return value


def _label_problem(event_id: Any, value: Any, label_time: Any) -> str | None:
    if (
        not isinstance(event_id, str)
        or not 0 < len(event_id) <= MAX_ID_LEN
        or not event_id.isprintable()
    ):
        return f"event_id must be a printable string of 1-{MAX_ID_LEN} characters"
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LEN or not value.isprintable():
        return f"value must be a printable class name of 1-{MAX_ID_LEN} characters"
    if not isinstance(label_time, int) or not 0 <= label_time < MAX_TIME_MS:
        return "label_time must be epoch milliseconds"
    return None
