"""Model artifacts: stored once, found by URI, verified on every load, cached locally.

Two stores, chosen by the URI scheme (docs/adr/0014-artifact-stores.md):

- ``kafka://`` (the default, nothing but Kafka needed): an artifact is cut into chunks
  keyed ``sha256:index`` and written to one partition of ``models.artifacts``; its URI
  records where: ``kafka://models.artifacts/<partition>/<first offset>?chunks=N``. A reader
  fetches exactly those records and checks every chunk belongs to the artifact;
- ``s3://`` (S3-compatible object storage, ``services/common/artifacts_s3.py``):
  ``s3://<bucket>/<prefix>/models/<name>/<version>/<sha256>.onnx``.

``SCOREMESH_ARTIFACT_STORE`` says where new artifacts go; any version loads from where its
URI points. Whatever the store, the sha256 of the whole is verified before the bytes reach
the cache or a model. scoremesh never deletes or overwrites a stored artifact.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from aiokafka import AIOKafkaProducer, TopicPartition

from scoremesh.contract.codec import codec
from scoremesh.contract.topics import TopicName
from services.common.kafka import make_consumer, start_with_retry
from services.common.settings import Settings

ARTIFACT_TOPIC: TopicName = "models.artifacts"


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete or does not match its checksum."""


@dataclass(frozen=True)
class ArtifactRef:
    uri: str
    sha256: str
    size: int


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _partition_for(sha256: str, partitions: int) -> int:
    return zlib.crc32(sha256.encode()) % partitions


async def upload_artifact(
    producer: AIOKafkaProducer,
    settings: Settings,
    data: bytes,
    on_progress: Callable[[int, int], None] | None = None,
) -> ArtifactRef:
    """Send the chunks of an artifact; ``on_progress(bytes acknowledged, total bytes)``."""
    if not data:
        raise ArtifactError("refusing to upload an empty artifact")
    digest = sha256_of(data)
    size = settings.artifact_chunk_bytes
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    topic = settings.topic(ARTIFACT_TOPIC)
    parts = await producer.partitions_for(topic)
    partition = _partition_for(digest, len(parts))
    chunk_codec = codec("ArtifactChunk")
    futures = []
    for index, chunk in enumerate(chunks):
        value = chunk_codec.encode(
            {
                "sha256": digest,
                "index": index,
                "total": len(chunks),
                "size": len(data),
                "data": chunk,
            }
        )
        future = await producer.send(
            topic, value, key=f"{digest}:{index}".encode(), partition=partition
        )
        if on_progress is not None:
            done = min(len(data), (index + 1) * size)
            future.add_done_callback(lambda _, done=done: on_progress(done, len(data)))
        futures.append(future)
    metadata = await asyncio.gather(*futures)
    # Another writer may interleave records; the reader skips foreign chunks by key.
    first = metadata[0].offset
    uri = f"kafka://{ARTIFACT_TOPIC}/{partition}/{first}?chunks={len(chunks)}"
    return ArtifactRef(uri=uri, sha256=digest, size=len(data))


def _parse_uri(uri: str) -> tuple[int, int, int]:
    parsed = urlparse(uri)
    try:
        if parsed.scheme != "kafka" or parsed.netloc != ARTIFACT_TOPIC:
            raise ValueError
        partition_s, offset_s = parsed.path.strip("/").split("/")
        chunks = int(parse_qs(parsed.query)["chunks"][0])
        return int(partition_s), int(offset_s), chunks
    except (ValueError, KeyError, IndexError):
        raise ArtifactError(
            f"artifact URI {uri!r} is not kafka://{ARTIFACT_TOPIC}/<partition>/<offset>?chunks=N"
        ) from None


def cached_path(settings: Settings, sha256: str) -> Path:
    return settings.artifact_dir / f"{sha256}.onnx"


def verify_file(path: Path, sha256: str) -> bool:
    try:
        return sha256_of(path.read_bytes()) == sha256
    except OSError:
        return False


async def store_artifact(
    settings: Settings,
    data: bytes,
    model: str,
    version: str,
    producer: AIOKafkaProducer | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ArtifactRef:
    """Store a new artifact where ``settings.artifact_store`` says; ``on_progress(bytes
    stored, total bytes)`` as it goes (an object store reports once, at the end)."""
    if not data:
        raise ArtifactError("refusing to upload an empty artifact")
    target = settings.artifact_store
    if target.startswith("s3://"):
        from services.common.artifacts_s3 import S3Store

        ref = await S3Store.from_settings(settings).put(target, data, model, version)
        if on_progress is not None:
            on_progress(len(data), len(data))
        return ref
    if producer is not None:
        return await upload_artifact(producer, settings, data, on_progress)
    from services.common.kafka import make_producer

    own = make_producer(settings)
    await start_with_retry(own.start, "artifact-upload", settings)
    try:
        return await upload_artifact(own, settings, data, on_progress)
    finally:
        await own.stop()


async def fetch_artifact(
    settings: Settings, uri: str, sha256: str, timeout_s: float = 60.0
) -> Path:
    """Return a local path to the verified artifact, fetching it from its store if needed."""
    path = cached_path(settings, sha256)
    if verify_file(path, sha256):
        return path
    scheme = urlparse(uri).scheme
    if scheme == "s3":
        from services.common.artifacts_s3 import S3Store

        data = await S3Store.from_settings(settings).get(uri)
    elif scheme == "kafka":
        data = await _fetch_from_topic(settings, uri, sha256, timeout_s)
    else:
        raise ArtifactError(
            f"artifact URI {uri!r}: unknown store {scheme!r}; scoremesh reads kafka:// and s3://"
        )
    actual = sha256_of(data)
    if actual != sha256:
        raise ArtifactError(
            f"artifact checksum mismatch: registry says {sha256[:12]}..., the bytes at {uri} "
            f"are {actual[:12]}...; refusing to load it"
        )
    settings.artifact_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=settings.artifact_dir, suffix=".part")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return path


async def _fetch_from_topic(settings: Settings, uri: str, sha256: str, timeout_s: float) -> bytes:
    partition, offset, total = _parse_uri(uri)
    consumer = make_consumer(settings, group_id=None, max_poll_records=64)
    await start_with_retry(consumer.start, "artifact-fetch", settings)
    chunk_codec = codec("ArtifactChunk")
    pieces: dict[int, bytes] = {}
    foreign: set[str] = set()
    try:
        tp = TopicPartition(settings.topic(ARTIFACT_TOPIC), partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(pieces) < total:
            if asyncio.get_running_loop().time() > deadline:
                raise ArtifactError(
                    f"artifact {sha256[:12]}: only {len(pieces)} of {total} chunks found at {uri}"
                )
            batch = await consumer.getmany(tp, timeout_ms=500)
            for record in batch.get(tp, []):
                if record.value is None:
                    continue
                chunk = chunk_codec.decode(record.value)
                if chunk["sha256"] == sha256 and chunk["total"] == total:
                    pieces[chunk["index"]] = chunk["data"]
                elif record.offset < offset + total:
                    foreign.add(chunk["sha256"])
            hw = consumer.highwater(tp)
            if hw is not None and await consumer.position(tp) >= hw and len(pieces) < total:
                if not pieces and foreign:
                    raise ArtifactError(
                        f"artifact checksum mismatch: the bytes at {uri} have sha256 "
                        f"{sorted(foreign)[0][:12]}..., the record says {sha256[:12]}...; "
                        "refusing it"
                    )
                raise ArtifactError(
                    f"artifact {sha256[:12]}: {total - len(pieces)} of {total} chunks missing "
                    f"from {uri}"
                )
    finally:
        await consumer.stop()
    return b"".join(pieces[i] for i in range(total))
