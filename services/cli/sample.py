"""`scoremesh sample`: events and their labels to try the mesh with, in the formats
`scoremesh events send` and `scoremesh labels send` read.

Loan applications from River's Agrawal generator (shipped with River, nothing downloaded),
with event times in the last hours so a retrain's default window covers them. A concept
other than the bootstrap model's (0) makes the champion wrong on these labels, which is
what a retrain is for.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Annotated

import typer

from services.cli.context import examples
from services.cli.output import Output, OutputOption, emit
from services.common.errors import UserError

BROKEN_KINDS = ("out_of_range", "unknown_category", "string_for_number", "missing_feature")
LABEL_DELAY_MS = 3_600_000  # labels arrive an hour after their event
STEP_MS = 1_000


def register(app: typer.Typer) -> None:
    app.command(
        "sample",
        epilog=examples(
            "scoremesh sample",
            "scoremesh sample --count 3000 --concept 2",
            "scoremesh sample --count 500 --invalid 0 --events e.jsonl --labels l.csv",
        ),
    )(sample)


def sample(
    count: Annotated[
        int, typer.Option(min=1, max=1_000_000, help="How many events to write.")
    ] = 2000,
    concept: Annotated[
        int,
        typer.Option(
            min=0,
            max=9,
            help="Agrawal labelling function 0-9: 0 is what `models bootstrap` learnt, others "
            "(e.g. 2) are a changed world the champion gets wrong.",
        ),
    ] = 0,
    invalid: Annotated[
        float,
        typer.Option(
            help="Share of events with a broken value, for the dead-letter topic, in [0, 1)."
        ),
    ] = 0.03,
    seed: Annotated[int, typer.Option(help="Random seed (the same seed, the same files).")] = 1,
    events: Annotated[Path, typer.Option(help="Where the events go.")] = Path("events.jsonl"),
    labels: Annotated[Path, typer.Option(help="Where the labels go.")] = Path("labels.csv"),
    output: OutputOption = Output.table,
) -> None:
    """Write sample events (JSON lines) and their labels (CSV) to try the mesh with."""
    import numpy as np
    import orjson

    from services.demo.runner import invalid_value
    from services.trainer.datasets import credit_events

    if not 0 <= invalid < 1:
        raise UserError(f"--invalid must be in [0, 1), got {invalid}")
    now = int(time.time() * 1000)
    start = now - LABEL_DELAY_MS - count * STEP_MS
    rng = np.random.default_rng(seed)
    broken: dict[str, int] = {}
    try:
        with events.open("wb") as events_out, labels.open("w", newline="") as labels_out:
            writer = csv.writer(labels_out)
            writer.writerow(("event_id", "value", "label_time"))
            for event, label in credit_events(
                count,
                seed=seed,
                classification_function=concept,
                start_ms=start,
                step_ms=STEP_MS,
                id_prefix=f"sample-c{concept}",
            ):
                if rng.random() < invalid:
                    kind = BROKEN_KINDS[int(rng.integers(len(BROKEN_KINDS)))]
                    event = orjson.loads(invalid_value(kind, event))
                    broken[kind] = broken.get(kind, 0) + 1
                else:  # a broken event is never scored, so it gets no label
                    writer.writerow(
                        (event["event_id"], label, event["event_time"] + LABEL_DELAY_MS)
                    )
                events_out.write(orjson.dumps(event) + b"\n")
    except OSError as exc:
        raise UserError(f"cannot write the sample: {exc}") from None
    summary = {
        "events": str(events),
        "labels": str(labels),
        "count": count,
        "labelled": count - sum(broken.values()),
        "broken": broken,
        "concept": concept,
    }
    emit(
        summary,
        output,
        [
            f"wrote {count} events to {events} ({sum(broken.values())} with a broken "
            f"value, for the dead-letter topic) and {summary['labelled']} labels to "
            f"{labels} (Agrawal concept {concept}, event times in the last "
            f"{(now - start) / 3_600_000:.1f} h)"
        ],
    )
