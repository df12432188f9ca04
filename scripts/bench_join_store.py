"""The label join's disk store (RocksDB) against its memory store, without a broker.

Two parts, each run in fresh subprocesses so that every peak RSS is one store's own:

1. **store** -- ``--entries`` pending predictions (20 million by default) written into one
   DiskStore as the join writes them: per event a lookup (the key is new: a Bloom-filter
   miss), the entry (a Prediction's bytes, as on the changelog) and its expiry-index key,
   in batches of 2048, each checkpointed with a changelog offset. Reported: peak RSS, bytes
   on disk per entry, insert rate, lookup rate of present keys (read and decoded into a
   joinable entry) and of absent ones, the time to expire the oldest hour-bucket (its index
   range read and deleted, each entry turned into an expiry marker) and the time to reopen
   the store cleanly at several sizes.
2. **service** -- the join itself (``JoinCore``, the model version's segments and feature
   bins included) on ``--service-entries`` predictions, whose labels then arrive in random
   order, once with each store, in ``--rounds`` paired rounds (the order alternates). The
   disk store is checkpointed three batches behind, as the service does while batches wait
   for their changelog. Reported per round and as medians: inputs/s of each store and the
   ratio disk/memory, label-to-metric latency (a label's batch from its start until the
   statistics reflect it: the join's share; the service adds its publish interval and the
   broker's round trips), peak RSS, and the restore rate from the changelog (written to a
   file during the run) onto an empty disk, and into memory.

    python scripts/bench_join_store.py [--entries 20000000] [--service-entries 500000]
        [--rounds 3] [--quick] [--output docs/benchmarks/join_store.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiokafka import ConsumerRecord  # noqa: E402

from scoremesh.contract.codec import codec  # noqa: E402
from scoremesh.contract.featurespec import FeatureRule, FeatureSpec  # noqa: E402
from services.common.lifecycle import tune_collector  # noqa: E402
from services.common.model_version import ModelVersion  # noqa: E402
from services.common.registry_view import RegistryState  # noqa: E402
from services.label_join.disk_store import DiskStoreConfig, DiskStores  # noqa: E402
from services.label_join.join import (  # noqa: E402
    DAY_MS,
    HOUR_MS,
    Entry,
    JoinConfig,
    JoinCore,
    OutputTopics,
    VersionCatalog,
)
from services.label_join.service import LabelJoinService  # noqa: E402
from services.label_join.store import Index, MemoryStore  # noqa: E402

T0 = 1_767_225_600_000
BATCH = 2048
LAG = 3  # batches between a batch's seal and its checkpoint (the service: up to 4 in flight)
CACHE_MB = 256
WRITE_BUFFER_MB = 16
CHANNELS = ("web", "branch", "partner")
NUMERIC = ("age", "income", "debt", "tenure", "balance", "utilisation")
CATEGORICAL = ("region", "product", "segment")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def spec() -> FeatureSpec:
    rules = [FeatureRule(name=n, dtype="double", min=0, max=1e9) for n in NUMERIC]
    rules += [FeatureRule(name=n, dtype="long", categories=list(range(12))) for n in CATEGORICAL]
    return FeatureSpec(features=rules, classes=["0", "1"], positive_class="1", segments=["channel"])


def model_version() -> ModelVersion:
    reference: dict[str, Any] = {"features": {}}
    for n in NUMERIC:
        reference["features"][n] = {"kind": "numeric", "edges": [float(x) for x in range(11)]}
    for n in CATEGORICAL:
        reference["features"][n] = {"kind": "categorical", "shares": {}}
    return ModelVersion(
        name="credit",
        version="1.0.0",
        stage="champion",
        generation=2,
        artifact_uri="kafka://models.artifacts/0/0?chunks=1",
        artifact_sha256="0" * 64,
        artifact_size=1,
        feature_spec_json=spec().model_dump_json(),
        metadata_json=json.dumps({"reference": reference}),
    )


def make_core(config: JoinConfig) -> JoinCore:
    catalog = VersionCatalog("credit")
    state = RegistryState()
    state.apply(model_version())
    catalog.update(state)
    return JoinCore(
        config,
        catalog,
        OutputTopics("predictions.labeled", "training.examples", "labels.unmatched"),
        clock=lambda: (T0 + 30 * DAY_MS) / 1000,
    )


def event_id(i: int) -> str:
    return f"ev{i:014d}"


def prediction(i: int, event_time: int, rng: random.Random) -> dict[str, Any]:
    p1 = rng.random()
    features: dict[str, Any] = {n: rng.uniform(0, 10) for n in NUMERIC}
    features.update({n: rng.randrange(12) for n in CATEGORICAL})
    return {
        "event_id": event_id(i),
        "entity_id": f"cust-{i % 100_000}",
        "event_time": event_time,
        "features": features,
        "attributes": {"channel": CHANNELS[i % 3]},
        "model": "credit",
        "model_version": "1.0.0",
        "variant": "champion",
        "served": True,
        "source": "stream",
        "score": p1,
        "scores": {"0": 1.0 - p1, "1": p1},
        "decision": "1" if p1 >= 0.5 else "0",
        "latency_ms": 1.0,
        "scored_at": event_time + 5,
    }


def record(topic: str, key: str, value: bytes, offset: int) -> Any:
    raw = key.encode()
    return ConsumerRecord(topic, 0, offset, 0, 0, raw, value, None, len(raw), len(value), [])


# --- 1. the store alone ---------------------------------------------------------------------


def store_part(entries: int, directory: Path) -> dict[str, Any]:
    config = JoinConfig(window_ms=7 * DAY_MS)
    core = make_core(config)
    stores = DiskStores(
        DiskStoreConfig(directory, CACHE_MB << 20, write_buffer_bytes=WRITE_BUFFER_MB << 20)
    )
    # values as varied as real ones (random features and scores: what compression meets),
    # made from a pool with each event's own id put in
    rng = random.Random(1)
    pool = [codec("Prediction").encode(prediction(0, T0, rng)) for _ in range(4096)]
    marker_id = event_id(0).encode()
    templates = []  # (entry as the join holds it, its head around the event_id)
    for value in pool:
        entry = core.load_entry(event_id(0), value)
        before, after = entry.head.split(marker_id)
        templates.append((entry, before, after))
    span = 7 * DAY_MS  # the window the pending predictions spread over
    store = stores.open("bench.changelog", 0, core.load_entry)
    reopen: list[dict[str, float]] = []
    reopen_at = sorted(
        {n for n in (1_000_000, 2_000_000, 5_000_000, 10_000_000, entries) if n <= entries}
    )
    waiting: list[tuple[int, int]] = []
    started = time.perf_counter()
    insert_s = 0.0
    for first in range(0, entries, BATCH):
        records = []
        for i in range(first, min(entries, first + BATCH)):
            eid = event_id(i)
            t = T0 + i * span // entries
            key = eid.encode()
            like, before, after = templates[i % 4093]
            # the event's entry as the join makes it from its prediction; the store writes
            # it with its feature bins (the changelog gets the Prediction's bytes)
            store.put(
                Entry(
                    eid,
                    event_time=t,
                    head=before + key + after,
                    time_end=like.time_end,
                    attrs_at=like.attrs_at,
                    attributes=like.attributes,
                    preds=like.preds,
                )
            )
            store.index(Index.EVENTS, t - t % HOUR_MS, eid)
            records.append((key, b"(the Prediction's bytes)"))
        waiting.append((store.seal(records, {}, t), first + len(records)))
        if len(waiting) > LAG:
            store.checkpoint(*waiting.pop(0))
        done = first + len(records)
        if reopen_at and done >= reopen_at[0]:
            while waiting:
                store.checkpoint(*waiting.pop(0))
            insert_s += time.perf_counter() - started
            store.close()
            t0 = time.perf_counter()
            store = stores.open("bench.changelog", 0, core.load_entry)
            reopen.append({"entries": len(store), "seconds": round(time.perf_counter() - t0, 4)})
            reopen_at.pop(0)
            started = time.perf_counter()
            progress = {  # a line per size, in case the run must be stopped early
                "entries": done,
                "insert_per_s": round(done / insert_s),
                "reopen_s": reopen[-1]["seconds"],
                "disk_bytes_per_entry": round(store.disk_bytes() / done, 1),
                "peak_rss_mb": round(peak_rss_mb(), 1),
            }
            print(f"  store progress {json.dumps(progress)}", file=sys.stderr, flush=True)
    db = store._db
    db.flush()
    disk = store.disk_bytes()
    rss_after_insert = peak_rss_mb()

    rng = random.Random(7)
    lookups = min(200_000, entries)
    present = [event_id(rng.randrange(entries)) for _ in range(lookups)]
    t0 = time.perf_counter()
    for n, eid in enumerate(present):
        assert store.get(eid) is not None
        if n % BATCH == BATCH - 1:
            store.checkpoint(store.seal([], {}, None), None)
    hit_s = time.perf_counter() - t0
    absent = [f"zz{rng.randrange(10**14):014d}" for _ in range(lookups)]
    t0 = time.perf_counter()
    for n, eid in enumerate(absent):
        assert store.get(eid) is None
        if n % BATCH == BATCH - 1:
            store.checkpoint(store.seal([], {}, None), None)
    miss_s = time.perf_counter() - t0

    # expire the oldest bucket as the join does: its index range, a marker per entry, a
    # batch of at most expire_per_batch entries at a time, each checkpointed
    oldest = min(store.buckets(Index.EVENTS))
    budget = config.expire_per_batch
    range_s = markers_s = 0.0
    expired = chunks = 0
    drained = False
    while not drained:
        t0 = time.perf_counter()
        ids, drained = store.pop_bucket(Index.EVENTS, oldest, budget)
        range_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        markers = []
        for eid in ids:
            assert store.get(eid) is not None  # the join reads each: expired unlabelled?
            marker = Entry(eid, event_time=oldest, expired=True)
            store.put(marker)
            store.index(Index.MARKERS, oldest, eid)
            markers.append((eid.encode(), marker.encode()))
        store.checkpoint(store.seal(markers, {}, None), None)
        markers_s += time.perf_counter() - t0
        expired += len(ids)
        chunks += 1
    assert not any(True for _ in store._scan(b"i\x00" + (oldest + (1 << 63)).to_bytes(8, "big")))
    store.close()
    return {
        "entries": entries,
        "batch": BATCH,
        "block_cache_mb": CACHE_MB,
        "write_buffer_mb": WRITE_BUFFER_MB,
        "prediction_bytes": round(sum(map(len, pool)) / len(pool), 1),
        "stored_value_bytes": len(templates[0][0].encode(with_bins=True)),
        "insert_per_s": round(entries / insert_s),
        "insert_s": round(insert_s, 1),
        "disk_bytes": disk,
        "disk_bytes_per_entry": round(disk / entries, 1),
        "lookup_present_per_s": round(lookups / hit_s),
        "lookup_absent_per_s": round(lookups / miss_s),
        "expire_bucket": {
            "entries": expired,
            "batches": chunks,
            "expire_per_batch": budget,
            "index_range_read_and_deleted_s": round(range_s, 3),
            "markers_written_s": round(markers_s, 3),
        },
        "reopen": reopen,
        "peak_rss_mb_after_insert": round(rss_after_insert, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


# --- 2. the join with each store -------------------------------------------------------------


def write_changelog(out: Any, changelog: list[tuple[int, bytes, bytes | None]]) -> None:
    for _, key, value in changelog:
        out.write(struct.pack(">ii", len(key), -1 if value is None else len(value)))
        out.write(key)
        if value is not None:
            out.write(value)


def read_changelog(path: Path) -> Iterator[tuple[bytes, bytes | None]]:
    with path.open("rb") as f:
        while header := f.read(8):
            k, v = struct.unpack(">ii", header)
            key = f.read(k)
            yield key, (None if v < 0 else f.read(v))


def service_part(store_kind: str, entries: int, directory: Path, seed: int) -> dict[str, Any]:
    config = JoinConfig(window_ms=7 * DAY_MS)
    core = make_core(config)
    stores = DiskStores(
        DiskStoreConfig(directory, CACHE_MB << 20, write_buffer_bytes=WRITE_BUFFER_MB << 20)
    )
    if store_kind == "disk":
        ps = core.attach(stores.open("bench.changelog", 0, core.load_entry))
    else:
        ps = core.attach(MemoryStore(0))
    core.finish_restore(ps)
    store = ps.store
    tune_collector(LabelJoinService.gc_thresholds)  # as the service once started
    rng = random.Random(seed)
    pcodec, lcodec = codec("Prediction"), codec("Label")
    directory.mkdir(parents=True, exist_ok=True)
    changelog_path = directory / "changelog.bin"
    waiting: list[tuple[int, int]] = []
    written = 0
    join_s = {"predictions": 0.0, "labels": 0.0}
    latencies: list[float] = []
    offset = 0
    span = 2 * DAY_MS
    with changelog_path.open("wb") as out:
        for phase in ("predictions", "labels"):
            order = list(range(entries))
            if phase == "labels":
                rng.shuffle(order)
            for first in range(0, entries, BATCH):
                records = []
                for i in order[first : first + BATCH]:
                    offset += 1
                    t = T0 + i * span // entries
                    if phase == "predictions":
                        value = pcodec.encode(prediction(i, t, rng))
                    else:
                        value = lcodec.encode(
                            {
                                "event_id": event_id(i),
                                "value": "1" if i % 3 else "0",
                                "label_time": t + 3_600_000,
                            }
                        )
                    records.append(record(phase, event_id(i), value, offset))
                t0 = time.perf_counter()
                if phase == "predictions":
                    result = core.process(records, [])
                else:
                    result = core.process([], records)
                core.take_dirty()  # the statistics now reflect the batch's labels
                latency = time.perf_counter() - t0
                written += len(result.changelog)
                for sealed in result.sealed.values():
                    waiting.append((sealed, written))
                while len(waiting) > LAG:
                    store.checkpoint(*waiting.pop(0))
                join_s[phase] += time.perf_counter() - t0
                if phase == "labels":
                    latencies.append(latency)
                write_changelog(out, result.changelog)
        t0 = time.perf_counter()
        while waiting:
            store.checkpoint(*waiting.pop(0))
        join_s["labels"] += time.perf_counter() - t0
    assert core.counts["joined"] == entries, core.counts
    rss_join = peak_rss_mb()
    changelog_records = written
    disk = store.disk_bytes() if store_kind == "disk" else None  # type: ignore[attr-defined]
    core.drop(0)

    # restore from the changelog: onto an empty disk, or into memory
    restorer = make_core(config)
    t0 = time.perf_counter()
    if store_kind == "disk":
        fresh = stores.open("bench.restored", 0, restorer.load_entry)
        rps = restorer.attach(fresh)
        chunk: list[tuple[bytes, bytes | None]] = []
        position = 0
        for item in read_changelog(changelog_path):  # as the service restores onto a new disk
            chunk.append(item)
            position += 1
            if len(chunk) >= 20_000:
                fresh.load_raw(chunk, position)
                chunk = []
        fresh.load_raw(chunk, position)
        fresh.rebuild(restorer, rps)
        fresh.checkpoint(restorer.finish_restore(rps), position)
    else:
        rps = restorer.restore(0, read_changelog(changelog_path))
    restore_s = time.perf_counter() - t0
    assert len(rps.store) == entries
    latencies.sort()
    total = 2 * entries
    return {
        "store": store_kind,
        "entries": entries,
        "inputs_per_s": round(total / (join_s["predictions"] + join_s["labels"])),
        "predictions_per_s": round(entries / join_s["predictions"]),
        "labels_per_s": round(entries / join_s["labels"]),
        "label_to_metric_ms": {
            "p50": round(1000 * latencies[len(latencies) // 2], 2),
            "p99": round(1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2),
        },
        "peak_rss_mb": round(rss_join, 1),
        "changelog_records": changelog_records,
        "disk_bytes_per_entry": None if disk is None else round(disk / entries, 1),
        "restore_s": round(restore_s, 2),
        "restore_changelog_records_per_s": round(changelog_records / restore_s),
        "restore_entries_per_s": round(entries / restore_s),
    }


# --- orchestration ---------------------------------------------------------------------------


def child(args: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    if done.returncode:
        raise RuntimeError(f"{args} failed")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=20_000_000)
    parser.add_argument("--service-entries", type=int, default=500_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a short seeded run (CI smoke)")
    parser.add_argument("--skip-store", action="store_true")
    parser.add_argument("--dir", type=Path, default=None, help="where the stores go (a disk)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench-results/join_store.json")
    parser.add_argument("--part", choices=["store", "service"], help=argparse.SUPPRESS)
    parser.add_argument("--store", choices=["disk", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=11, help=argparse.SUPPRESS)
    args = parser.parse_args()
    base = args.dir or Path(tempfile.gettempdir())
    if args.part == "store":
        print(json.dumps(store_part(args.entries, base)))
        return
    if args.part == "service":
        print(json.dumps(service_part(args.store, args.service_entries, base, args.seed)))
        return
    if args.quick:
        args.entries, args.service_entries, args.rounds = 100_000, 20_000, 3
    work = Path(tempfile.mkdtemp(prefix="scoremesh-bench-store-", dir=args.dir))
    try:
        out: dict[str, Any] = {
            "benchmark": "bench_join_store",
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "quick": args.quick,
        }
        if not args.skip_store:
            print(f"store: {args.entries:,} pending predictions", file=sys.stderr)
            out["store"] = child(
                ["--part", "store", "--entries", str(args.entries), "--dir", str(work / "store")]
            )
            shutil.rmtree(work / "store", ignore_errors=True)
            print(json.dumps(out["store"], indent=1), file=sys.stderr)
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            pair: dict[str, Any] = {}
            for kind in ("memory", "disk") if r % 2 == 0 else ("disk", "memory"):
                where = work / f"service-{r}-{kind}"
                pair[kind] = child(
                    [
                        "--part",
                        "service",
                        "--store",
                        kind,
                        "--service-entries",
                        str(args.service_entries),
                        "--dir",
                        str(where),
                        "--seed",
                        str(args.seed + r),
                    ]
                )
                shutil.rmtree(where, ignore_errors=True)
            pair["ratio"] = round(pair["disk"]["inputs_per_s"] / pair["memory"]["inputs_per_s"], 3)
            print(f"round {r + 1}: {json.dumps(pair)}", file=sys.stderr)
            rounds.append(pair)

        def med(kind: str, *path: str) -> float:
            values = []
            for pair in rounds:
                v: Any = pair[kind]
                for p in path:
                    v = v[p]
                values.append(v)
            return float(median(values))

        if not rounds:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(out, indent=2) + "\n")
            return
        out["service"] = {
            "entries": args.service_entries,
            "rounds": rounds,
            "median": {
                "disk_over_memory_inputs_per_s": median(float(p["ratio"]) for p in rounds),
                **{
                    f"{kind}_{name}": med(kind, *path)
                    for kind in ("disk", "memory")
                    for name, path in (
                        ("inputs_per_s", ("inputs_per_s",)),
                        ("label_to_metric_p50_ms", ("label_to_metric_ms", "p50")),
                        ("label_to_metric_p99_ms", ("label_to_metric_ms", "p99")),
                        ("peak_rss_mb", ("peak_rss_mb",)),
                        ("restore_entries_per_s", ("restore_entries_per_s",)),
                    )
                },
            },
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out["service"]["median"], indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
