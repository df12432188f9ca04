"""monitor.signals records: arrays round-trip exactly, bad bytes say what is wrong."""

from __future__ import annotations

import numpy as np
import pytest

from services.monitor import signals as sig


def _batch() -> sig.SignalBatch:
    rng = np.random.default_rng(1)
    return sig.from_labeled(
        "credit",
        "1.0.0",
        3,
        np.arange(10, 15),
        np.array([0, 1, 0, 0, 1]),
        rng.integers(0, 10**12, 5),
        rng.integers(0, 10**12, 5),
        np.full(5, 60_000),
    )


def test_a_batch_round_trips_exactly_and_describes_itself() -> None:
    batch = _batch()
    data = sig.encode(batch)
    back = sig.decode(data)
    assert (back.kind, back.model, back.version, back.source_partition) == (
        "labeled",
        "credit",
        "1.0.0",
        3,
    )
    for name, array in batch.arrays.items():
        assert back.arrays[name].dtype == array.dtype
        assert np.array_equal(back.arrays[name], array)
    described = sig.describe(data)
    assert described["rows"] == 5 and described["arrays"]["errors"]["dtype"] == "|u1"


def test_merge_puts_rows_of_several_batches_in_time_order() -> None:
    a, b = _batch(), _batch()
    b = sig.SignalBatch(
        b.kind, b.model, b.version, 4, {**b.arrays, "label_times": b.arrays["label_times"] + 1}
    )
    merged = sig.merge([a, b], "label_times")
    assert len(merged) == 10 and bool(np.all(np.diff(merged.arrays["label_times"]) >= 0))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not a signal", "no SMS1 header"),
        (sig.encode(_batch())[:-3], "truncated"),
        (b"SMS1\x02\x00\x00\x00{]", "not JSON"),
    ],
)
def test_unreadable_records_say_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(sig.SignalError, match=message):
        sig.decode(data)
