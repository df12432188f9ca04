"""`scoremesh sample`: events and their labels to try the mesh with, in the formats
`scoremesh events send` and `scoremesh labels send` read.

Loan applications from River's Agrawal generator (shipped with River, nothing downloaded),
with event times in the last hours so a retrain's default window covers them. A concept
other than the bootstrap model's (0) makes the champion wrong on these labels, which is
what a retrain is for.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Any

import orjson

from services.common.errors import UserError

BROKEN_KINDS = ("out_of_range", "unknown_category", "string_for_number", "missing_feature")
LABEL_DELAY_MS = 3_600_000  # labels arrive an hour after their event
STEP_MS = 1_000


def add_parser(sub: Any) -> None:
    sample = sub.add_parser(
        "sample",
        help="write sample events (JSON lines) and their labels (CSV) to try the mesh with",
        epilog="example: scoremesh sample --count 3000 --concept 2",
    )
    sample.add_argument("--count", type=_count, default=2000, help="events (default 2000)")
    sample.add_argument(
        "--concept",
        type=int,
        choices=range(10),
        default=0,
        metavar="0-9",
        help="Agrawal labelling function: 0 is what `models bootstrap` learnt, others "
        "(e.g. 2) are a changed world the champion gets wrong",
    )
    sample.add_argument(
        "--invalid",
        type=float,
        default=0.03,
        help="share of events with a broken value, for the dead-letter topic (default 0.03)",
    )
    sample.add_argument("--seed", type=int, default=1)
    sample.add_argument("--events", type=Path, default=Path("events.jsonl"), help="events file")
    sample.add_argument("--labels", type=Path, default=Path("labels.csv"), help="labels file")
    sample.add_argument("--json", action="store_true", help="machine-readable summary")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"must be between 1 and 1000000, got {value}")
    return value


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np

    from services.demo.runner import invalid_value
    from services.trainer.datasets import credit_events

    if not 0 <= args.invalid < 1:
        raise UserError(f"--invalid must be in [0, 1), got {args.invalid}")
    now = int(time.time() * 1000)
    start = now - LABEL_DELAY_MS - args.count * STEP_MS
    rng = np.random.default_rng(args.seed)
    broken: dict[str, int] = {}
    try:
        with args.events.open("wb") as events, args.labels.open("w", newline="") as labels:
            writer = csv.writer(labels)
            writer.writerow(("event_id", "value", "label_time"))
            for event, label in credit_events(
                args.count,
                seed=args.seed,
                classification_function=args.concept,
                start_ms=start,
                step_ms=STEP_MS,
                id_prefix=f"sample-c{args.concept}",
            ):
                if rng.random() < args.invalid:
                    kind = BROKEN_KINDS[int(rng.integers(len(BROKEN_KINDS)))]
                    event = orjson.loads(invalid_value(kind, event))
                    broken[kind] = broken.get(kind, 0) + 1
                else:  # a broken event is never scored, so it gets no label
                    writer.writerow(
                        (event["event_id"], label, event["event_time"] + LABEL_DELAY_MS)
                    )
                events.write(orjson.dumps(event) + b"\n")
    except OSError as exc:
        raise UserError(f"cannot write the sample: {exc}") from None
    summary = {
        "events": str(args.events),
        "labels": str(args.labels),
        "count": args.count,
        "labelled": args.count - sum(broken.values()),
        "broken": broken,
        "concept": args.concept,
    }
    if args.json:
        print(orjson.dumps(summary).decode())
    else:
        print(
            f"wrote {args.count} events to {args.events} ({sum(broken.values())} with a broken "
            f"value, for the dead-letter topic) and {summary['labelled']} labels to "
            f"{args.labels} (Agrawal concept {args.concept}, event times in the last "
            f"{(now - start) / 3_600_000:.1f} h)"
        )
    return 0
