"""Records of ``monitor.signals``: one model version's signals from one input batch.

The monitor's first stage reads predictions and predictions.labeled partition by
partition, turns each batch into arrays (``features.Preparer``) and publishes them here,
keyed by model: every record of a model lands on one partition, in order, and the
consumer that owns that partition runs the model's detectors over its whole stream.
Raw per-event values travel, not aggregates, so the detectors see exactly what one
detector fed the whole stream in arrival order would see.

Wire format (internal to the monitor; ``scoremesh tail`` shows the header):

    b"SMS1" | u32 little-endian header length | header JSON | array bytes, in order

The header names the kind (``predictions`` or ``labeled``), model, version, source
partition, row count and each array's name, dtype and shape. About 130 bytes per
prediction of a 25-feature model (float32 features).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson

from services.monitor.features import PreparedBatch

MAGIC = b"SMS1"
SignalKind = Literal["predictions", "labeled"]
_DTYPES = frozenset({"<f4", "<f8", "<i8", "<i2", "|u1", "|b1"})


class SignalError(ValueError):
    """A monitor.signals record that cannot be read; the message says what is wrong."""


@dataclass(frozen=True)
class SignalBatch:
    kind: SignalKind
    model: str
    version: str
    source_partition: int
    arrays: dict[str, np.ndarray]

    @property
    def offsets(self) -> np.ndarray:
        """Offsets of the rows in their source partition (the first stage's dedupe key)."""
        return self.arrays["offsets"]

    def __len__(self) -> int:
        return len(self.arrays["offsets"])

    def rows(self, keep: np.ndarray) -> SignalBatch:
        return SignalBatch(
            self.kind,
            self.model,
            self.version,
            self.source_partition,
            {name: a[keep] for name, a in self.arrays.items()},
        )


def encode(batch: SignalBatch) -> bytes:
    names: list[list[Any]] = []
    chunks: list[bytes] = []
    for name, array in batch.arrays.items():
        a = np.ascontiguousarray(array)
        if a.dtype.str not in _DTYPES:
            raise SignalError(f"signal array {name!r}: dtype {a.dtype.str} is not supported")
        names.append([name, a.dtype.str, list(a.shape)])
        chunks.append(a.tobytes())
    header = orjson.dumps(
        {
            "kind": batch.kind,
            "model": batch.model,
            "version": batch.version,
            "partition": batch.source_partition,
            "arrays": names,
        }
    )
    return b"".join((MAGIC, struct.pack("<I", len(header)), header, *chunks))


def decode_header(data: bytes) -> tuple[dict[str, Any], int]:
    if data[:4] != MAGIC or len(data) < 8:
        raise SignalError("not a monitor.signals record (no SMS1 header)")
    (size,) = struct.unpack_from("<I", data, 4)
    try:
        header = orjson.loads(data[8 : 8 + size])
    except orjson.JSONDecodeError as exc:
        raise SignalError(f"monitor.signals header is not JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("kind") not in ("predictions", "labeled"):
        raise SignalError("monitor.signals header lacks a known kind")
    return header, 8 + size


def decode(data: bytes) -> SignalBatch:
    header, at = decode_header(data)
    arrays: dict[str, np.ndarray] = {}
    try:
        for name, dtype, shape in header["arrays"]:
            if dtype not in _DTYPES:
                raise SignalError(f"signal array {name!r}: dtype {dtype} is not supported")
            count = int(np.prod(shape)) if shape else 1
            size = count * np.dtype(dtype).itemsize
            if at + size > len(data):
                raise SignalError(f"signal array {name!r} is truncated")
            arrays[name] = np.frombuffer(data, dtype=dtype, count=count, offset=at).reshape(shape)
            at += size
        batch = SignalBatch(
            header["kind"], header["model"], header["version"], int(header["partition"]), arrays
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, SignalError):
            raise
        raise SignalError(f"monitor.signals header is incomplete: {exc}") from None
    if "offsets" not in arrays or any(len(a) != len(arrays["offsets"]) for a in arrays.values()):
        raise SignalError("monitor.signals arrays disagree on the number of rows")
    return batch


def describe(data: bytes) -> dict[str, Any]:
    """The header and row count of a record, for ``scoremesh tail``."""
    header, _ = decode_header(data)
    arrays = header.get("arrays") or []
    rows = arrays[0][2][0] if arrays and arrays[0][2] else 0
    return {
        "kind": header["kind"],
        "model": header.get("model"),
        "version": header.get("version"),
        "partition": header.get("partition"),
        "rows": rows,
        "arrays": {name: {"dtype": dtype, "shape": shape} for name, dtype, shape in arrays},
    }


def from_predictions(
    model: str, version: str, partition: int, offsets: np.ndarray, batch: PreparedBatch
) -> SignalBatch:
    arrays: dict[str, np.ndarray] = {
        "offsets": np.asarray(offsets, dtype=np.int64),
        "event_times": batch.event_times.astype(np.int64),
        "matrix": batch.matrix.astype(np.float32),
        "nulls": batch.nulls,
        "out_of_range": batch.out_of_range,
        "scores": batch.scores.astype(np.float64),
        "confidence": batch.confidence.astype(np.float64),
        "decisions": batch.decisions.astype(np.int16),
    }
    return SignalBatch("predictions", model, version, partition, arrays)


def merge(batches: list[SignalBatch], order_by: str) -> SignalBatch:
    """Rows of several batches of one version and kind, in ``order_by`` order (stable)."""
    if len(batches) == 1:
        only = batches[0]
        times = only.arrays[order_by]
        if len(times) < 2 or bool(np.all(times[1:] >= times[:-1])):
            return only
    first = batches[0]
    arrays = {name: np.concatenate([b.arrays[name] for b in batches]) for name in first.arrays}
    order = np.argsort(arrays[order_by], kind="stable")
    return SignalBatch(
        first.kind,
        first.model,
        first.version,
        -1,  # rows from several source partitions
        {name: a[order] for name, a in arrays.items()},
    )


def prepared(batch: SignalBatch, codes: dict[int, np.ndarray]) -> PreparedBatch:
    a = batch.arrays
    return PreparedBatch(
        matrix=a["matrix"],
        nulls=a["nulls"],
        out_of_range=a["out_of_range"],
        codes=codes,
        scores=a["scores"],
        confidence=a["confidence"],
        decisions=a["decisions"].astype(np.int64),
        event_times=a["event_times"],
    )


def from_labeled(
    model: str,
    version: str,
    partition: int,
    offsets: np.ndarray,
    errors: np.ndarray,
    event_times: np.ndarray,
    label_times: np.ndarray,
    label_delays: np.ndarray,
) -> SignalBatch:
    arrays: dict[str, np.ndarray] = {
        "offsets": np.asarray(offsets, dtype=np.int64),
        "errors": np.asarray(errors, dtype=np.uint8),
        "event_times": np.asarray(event_times, dtype=np.int64),
        "label_times": np.asarray(label_times, dtype=np.int64),
        "label_delays": np.asarray(label_delays, dtype=np.int64),
    }
    return SignalBatch("labeled", model, version, partition, arrays)
