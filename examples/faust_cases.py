"""A downstream faust app over scoremesh: served predictions that score at or above a
threshold become cases for a review team, on a `cases` topic of its own.

    pip install 'scoremesh-client[faust]'
    python examples/faust_cases.py worker --without-web -l info

The mesh's location and topic prefix come from the ``SCOREMESH_*`` variables (as for every
scoremesh client); ``CASES_THRESHOLD`` (default 0.8) and ``CASES_APP_ID`` (the consumer
group, default ``scoremesh-cases``) configure the app. Delivery is at-least-once: after a
crash a prediction may open its case twice, so the readers of `cases` dedupe by event_id.
"""

from __future__ import annotations

import os
from typing import Any

import faust

from scoremesh.client import ClientConfig
from scoremesh.client.faust_codecs import faust_settings
from scoremesh.client.faust_records import Prediction


class Case(faust.Record, serializer="json", include_metadata=False):  # type: ignore[misc]
    """A prediction a person should look at."""

    event_id: str
    entity_id: str
    model: str
    model_version: str
    score: float
    decision: str
    event_time: int


def case_for(prediction: Prediction, threshold: float) -> Case | None:
    """The case a prediction opens: served (it decided for its entity) and at or above the
    threshold. Shadow predictions, which decided nothing, open none."""
    if not prediction.served or prediction.score < threshold:
        return None
    return Case(
        event_id=prediction.event_id,
        entity_id=prediction.entity_id,
        model=prediction.model,
        model_version=prediction.model_version,
        score=prediction.score,
        decision=prediction.decision,
        event_time=prediction.event_time,
    )


def create_app(config: ClientConfig | None = None, threshold: float | None = None) -> Any:
    """The faust App, its topics and its one agent."""
    config = config or ClientConfig.from_env()
    limit = threshold if threshold is not None else float(os.environ.get("CASES_THRESHOLD", 0.8))
    app = faust.App(os.environ.get("CASES_APP_ID", "scoremesh-cases"), **faust_settings(config))
    predictions = app.topic(config.topic("predictions"), key_type=str, value_type=Prediction)
    cases = app.topic(f"{config.topic_prefix}cases", key_type=str, value_type=Case, partitions=3)

    @app.task  # type: ignore[untyped-decorator]
    async def declare_cases() -> None:
        await cases.maybe_declare()

    @app.agent(predictions)  # type: ignore[untyped-decorator]
    async def open_cases(stream: Any) -> None:
        async for prediction in stream:
            case = case_for(prediction, limit)
            if case is not None:
                await cases.send(key=case.event_id, value=case)

    return app


def main() -> None:
    create_app().main()


if __name__ == "__main__":
    main()
