"""The RocksDB store against the memory store: same outputs, same changelog, same state after
a reopen, after a stale store catches up on the changelog's tail, and after lost batches."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.common.performance import GroupStats
from services.label_join.disk_store import DiskStore, DiskStoreConfig, DiskStores
from services.label_join.join import DAY_MS, HOUR_MS, JoinConfig, JoinCore, PartitionState
from services.label_join.store import Index, JoinStore, MemoryStore
from tests.label_join.factories import T0, features, label, prediction, scenario
from tests.label_join.test_join_core import TOPICS, Run, batches_of, make_core

CHANGELOG = "label-join.changelog"
# minute buckets over a scenario of ~10 minutes: many buckets expire, markers are forgotten
SMALL = JoinConfig(
    window_ms=3 * 60_000, grace_ms=60_000, tumbling_ms=60_000, sliding_ms=300_000, marker_ms=120_000
)
DEFAULT = JoinConfig(window_ms=DAY_MS, grace_ms=HOUR_MS, tumbling_ms=HOUR_MS, sliding_ms=DAY_MS)
# ... and a minute's bucket (~60 events) worked through 7 entries a batch: every bucket
# expires, and its markers are forgotten, over several batches
BUDGET = dataclasses.replace(SMALL, expire_per_batch=7)
CONFIGS = pytest.mark.parametrize(
    "config", [DEFAULT, SMALL, BUDGET], ids=["hour-buckets", "minute-buckets", "expiry-budget"]
)


def stores(tmp_path: Path) -> DiskStores:
    return DiskStores(DiskStoreConfig(tmp_path, cache_bytes=8 << 20, write_buffer_bytes=1 << 20))


def open_disk(core: JoinCore, tmp_path: Path, partition: int = 0) -> DiskStore:
    return stores(tmp_path).open(CHANGELOG, partition, core.load_entry)


def entries_of(store: JoinStore) -> dict[str, bytes]:
    if isinstance(store, MemoryStore):
        return {k: e.encode() for k, e in store.entries.items()}
    assert isinstance(store, DiskStore)
    return {k: e.encode() for k, e in store.all_entries()}


def indexes_of(store: JoinStore) -> list[dict[int, set[str]]]:
    out = []
    for index in Index:
        held = store.indexed(index)  # type: ignore[attr-defined]
        out.append({b: set(ids) for b, ids in held.items() if ids})
    return out


def stats_view(stats: dict[Any, GroupStats]) -> dict[Any, tuple[Any, ...]]:
    return {
        k: (
            s.predicted,
            s.labeled,
            s.expired_unlabeled,
            s.confusion,
            s.delays,
            s.bins,
            round(s.log_loss_sum, 6),
            round(s.brier_sum, 6),
        )
        for k, s in stats.items()
    }


def assert_same_state(a: PartitionState, b: PartitionState) -> None:
    assert entries_of(a.store) == entries_of(b.store)
    assert len(a.store) == len(b.store)
    assert indexes_of(a.store) == indexes_of(b.store)
    assert stats_view(a.stats) == stats_view(b.stats)
    assert stats_view(a.final_windows) == stats_view(b.final_windows)


class DiskRun(Run):
    """A Run whose partition 0 lives in a DiskStore, checkpointed ``lag`` batches behind,
    as the service does while batches wait for their changelog acknowledgements."""

    def __init__(self, core: JoinCore, store: DiskStore, lag: int = 3) -> None:
        super().__init__(core)
        core.drop(0)
        self.ps = core.attach(store)
        core.finish_restore(self.ps)
        self.store = store
        self.lag = lag
        self.waiting: list[tuple[int, int]] = []  # (sealed, changelog offset after it)

    def feed(self, batch: Any) -> list[tuple[bytes, bytes | None]]:
        before = len(self.changelog)
        written = super().feed(batch)
        sealed = self.last_sealed
        self.waiting.append((sealed, before + len(written)))
        while len(self.waiting) > self.lag:
            self.store.checkpoint(*self.waiting.pop(0))
        return written

    @property
    def last_sealed(self) -> int:
        return self.store._number - 1

    def settle(self) -> None:
        while self.waiting:
            self.store.checkpoint(*self.waiting.pop(0))


def side_by_side(
    tmp_path: Path, s: Any, memory_config: JoinConfig, disk_config: JoinConfig
) -> tuple[Run, DiskRun]:
    """The scenario's batches fed to a join on the memory store and one on a disk store."""
    memory = Run(make_core(memory_config))
    core = make_core(disk_config)
    disk = DiskRun(core, open_disk(core, tmp_path))
    for batch in batches_of(s):
        memory.feed(batch)
        disk.feed(batch)
    return memory, disk


@CONFIGS
def test_the_disk_store_joins_exactly_as_the_memory_store(
    tmp_path: Path, config: JoinConfig
) -> None:
    s = scenario(600, seed=5, window_ms=config.window_ms)
    memory, disk = side_by_side(tmp_path, s, config, config)
    # expiry walks a bucket in the store's order (a set, or the keys' order on disk)
    assert {t: sorted(map(repr, rows)) for t, rows in disk.outputs.items()} == {
        t: sorted(map(repr, rows)) for t, rows in memory.outputs.items()
    }
    assert disk.outputs[TOPICS.labeled] == memory.outputs[TOPICS.labeled]
    assert sorted(disk.changelog, key=repr) == sorted(memory.changelog, key=repr)
    assert dict(disk.changelog) == dict(memory.changelog)
    assert stats_view(disk.shards) == stats_view(memory.shards)
    disk.settle()
    assert_same_state(disk.ps, memory.core.partitions[0])
    assert disk.core.counts == memory.core.counts


@CONFIGS
@pytest.mark.parametrize("stop_at", [0.3, 0.6, 1.0])
def test_a_reopened_store_plus_the_changelog_tail_is_a_full_restore(
    tmp_path: Path, config: JoinConfig, stop_at: float
) -> None:
    """A clean reopen (nothing to replay), a crash with batches not yet checkpointed, and a
    partition that moved away and came back (the tail written by another owner) are all:
    the store as of its checkpoint, plus the changelog from that checkpoint."""
    s = scenario(600, seed=7, window_ms=config.window_ms)
    batches = batches_of(s)
    cut = int(len(batches) * stop_at)
    core = make_core(config)
    first = DiskRun(core, open_disk(core, tmp_path))
    for batch in batches[:cut]:
        first.feed(batch)
    checkpoint = first.store.offset or 0
    first.store.close()  # the batches still waiting are lost with the process
    # ... while another owner (memory) goes on from the changelog and writes the tail
    other = Run(make_core(config))
    other.changelog = list(first.changelog)
    other.core.restore(0, other.changelog)
    for batch in batches[cut:]:
        other.feed(batch)

    back = make_core(config)
    back.drop(0)
    store = open_disk(back, tmp_path)
    assert store.offset == checkpoint
    ps = back.attach(store)
    back.apply(ps, other.changelog[checkpoint:])
    back.finish_restore(ps)
    store.checkpoint(store._number - 1, len(other.changelog))

    full = make_core(config)
    full.drop(0)
    expected = full.restore(0, other.changelog)
    assert_same_state(ps, expected)
    assert ps.closed.keys() == expected.closed.keys()
    store.close()

    again = make_core(config)
    again.drop(0)
    reopened = again.attach(open_disk(again, tmp_path))
    again.finish_restore(reopened)
    assert_same_state(reopened, expected)


def test_replaying_records_the_store_already_holds_changes_nothing(tmp_path: Path) -> None:
    s = scenario(300, seed=3, window_ms=SMALL.window_ms)
    core = make_core(SMALL)
    run = DiskRun(core, open_disk(core, tmp_path))
    for batch in batches_of(s)[:-2]:
        run.feed(batch)
    run.settle()
    before = (entries_of(run.ps.store), indexes_of(run.ps.store), stats_view(run.ps.stats))
    core.apply(run.ps, run.changelog[len(run.changelog) // 2 :])
    core.finish_restore(run.ps)
    run.store.checkpoint(run.last_sealed, len(run.changelog))
    after = (entries_of(run.ps.store), indexes_of(run.ps.store), stats_view(run.ps.stats))
    assert after == before


def test_a_store_of_another_changelog_is_rebuilt(tmp_path: Path) -> None:
    core = make_core(SMALL)
    s = scenario(100, seed=1, window_ms=SMALL.window_ms)
    run = DiskRun(core, open_disk(core, tmp_path))
    for batch in batches_of(s)[:3]:
        run.feed(batch)
    run.settle()
    assert len(run.store) > 0
    run.store.close()
    other = stores(tmp_path)
    store = DiskStore(
        other.path(CHANGELOG, 0), other.options(), "other.changelog", 0, core.load_entry
    )
    assert (len(store), store.offset, store.stats) == (0, None, {})
    store.close()


@CONFIGS
def test_a_restore_onto_an_empty_disk_in_two_passes_is_a_full_restore(
    tmp_path: Path, config: JoinConfig
) -> None:
    s = scenario(600, seed=9, window_ms=config.window_ms)
    run = Run(make_core(config))
    for batch in batches_of(s)[:-1]:
        run.feed(batch)
    core = make_core(config)
    core.drop(0)
    store = open_disk(core, tmp_path)
    ps = core.attach(store)
    for i in range(0, len(run.changelog), 500):
        store.load_raw(run.changelog[i : i + 500], min(len(run.changelog), i + 500))
    store.close()  # a crash between the passes: the store knows it is half-built
    core.drop(0)
    store = open_disk(core, tmp_path)
    assert store.rebuilding
    ps = core.attach(store)
    store.rebuild(core, ps, chunk=97)
    store.checkpoint(core.finish_restore(ps), len(run.changelog))
    assert not store.rebuilding
    full = make_core(config)
    full.drop(0)
    expected = full.restore(0, run.changelog)
    assert_same_state(ps, expected)
    assert ps.watermark == expected.watermark
    store.close()
    core.drop(0)
    reopened = open_disk(core, tmp_path)
    assert not reopened.rebuilding and reopened.offset == len(run.changelog)
    assert len(reopened) == len(expected.store)


def test_a_store_held_by_another_owner_fails_with_what_to_do(tmp_path: Path) -> None:
    from services.label_join import disk_store

    core = make_core(SMALL)
    held = open_disk(core, tmp_path)
    path = held.path
    with pytest.raises(disk_store.StoreLockedError, match="SCOREMESH_LABEL_JOIN_DATA_DIR"):
        disk_store._open(path, stores(tmp_path).options(), wait_s=0.3)
    held.close()


def test_expiry_over_several_batches_ends_where_one_batch_would(tmp_path: Path) -> None:
    """A bucket larger than ``expire_per_batch`` leaves over the next batches; labels for
    its events meanwhile are too late, as they would be had it left at once. So the joins
    and every closed window's final statistics are those of unbounded expiry. One outcome
    may differ: a label later than window + grace + marker after its event finds the marker
    a backlog still holds (too late) where unbounded expiry had forgotten it (the label then
    waits for a prediction that cannot come)."""
    s = scenario(600, seed=9, window_ms=SMALL.window_ms)
    unbounded, budgeted = side_by_side(tmp_path, s, SMALL, BUDGET)
    extra = 0
    while budgeted.ps.backlog:  # batches with no input go on with it
        budgeted.feed(([], []))
        extra += 1
        assert extra < 1000
    assert extra > 10  # the budget did hold expiry back
    budgeted.settle()
    moved = budgeted.core.counts["unmatched_too_late"] - unbounded.core.counts["unmatched_too_late"]
    assert moved == unbounded.core.counts["label_pending"] - budgeted.core.counts["label_pending"]
    assert 0 <= moved <= len(s.late_labels)
    same = ("unmatched_too_late", "label_pending")
    assert {k: v for k, v in budgeted.core.counts.items() if k not in same} == {
        k: v for k, v in unbounded.core.counts.items() if k not in same
    }
    assert budgeted.outputs[TOPICS.labeled] == unbounded.outputs[TOPICS.labeled]
    assert stats_view(budgeted.ps.final_windows) == stats_view(
        unbounded.core.partitions[0].final_windows
    )
    assert stats_view(budgeted.shards) == stats_view(unbounded.shards)


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_a_pending_label_a_backlog_holds_is_let_go_when_its_event_comes(
    tmp_path: Path, store: str
) -> None:
    """Labels without predictions whose bucket closed while a backlog (one entry a batch)
    holds up expiry: a prediction or a new label for their event meets them as unbounded
    expiry would have left things (the label out as unknown_event, the event new)."""
    rng = np.random.default_rng(3)
    minute = 60_000
    old, now = T0, T0 + 10 * minute

    def pred(event_id: str, t: int) -> dict[str, Any]:
        return prediction(event_id, t, features(rng), 0.8)

    batches: list[Any] = [
        ([pred("e0", old), pred("e1", old)], [label("u1", "1", old), label("u2", "0", old)]),
        ([pred("e9", now)], []),  # closes the old buckets: e0, e1 take the next batches
        ([pred("u1", now)], [label("u2", "1", now)]),
    ]
    one = dataclasses.replace(BUDGET, expire_per_batch=1)
    unbounded = Run(make_core(SMALL))
    core = make_core(one)
    budgeted = DiskRun(core, open_disk(core, tmp_path)) if store == "disk" else Run(core)
    for batch in batches:
        unbounded.feed(batch)
        budgeted.feed(batch)
    assert budgeted.core.partitions[0].backlog  # the old buckets are still being worked on
    for run in (unbounded, budgeted):
        unmatched = {(r["event_id"], r["reason"]) for r in run.outputs[TOPICS.unmatched]}
        assert ("u1", "unknown_event") in unmatched
        assert not run.outputs[TOPICS.labeled]  # u1's prediction joined no stale label
        assert run.core.partitions[0].entries["u2"].label_time == now  # pending anew
    assert budgeted.core.counts == unbounded.core.counts
