"""`scoremesh topics create | list | describe`: the catalog's topics on your own Kafka.

The catalog (schemas/topics.yaml) says each topic's partitions, retention, cleanup
policy, size limit and replication; ``create`` makes the missing ones (idempotent: an
existing topic is left as it is and any difference from the catalog is reported), with the
replication factor capped at the brokers the cluster has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer

from services.cli.context import complete_topic, examples, load_settings, run_async
from services.cli.output import Output, OutputOption, emit, table
from services.cli.target import announce_kafka
from services.common.errors import UserError

if TYPE_CHECKING:
    from scoremesh.contract.catalog import TopicSpec
    from services.common.settings import Settings

app = typer.Typer(
    help="The catalog's topics (schemas/topics.yaml) on your Kafka: create, list, describe.",
    no_args_is_help=True,
)


@dataclass
class BrokerTopic:
    """A topic as the broker has it."""

    partitions: int
    replication_factor: int
    configs: dict[str, str] | None = None  # None: the broker did not say


@dataclass
class ClusterTopics:
    brokers: int
    topics: dict[str, BrokerTopic] = field(default_factory=dict)


async def read_cluster(settings: Settings, configs_of: list[str] | None = None) -> ClusterTopics:
    """The cluster's broker count and topics; the configs of the topics in ``configs_of``."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from services.common.kafka import client_options, start_with_retry

    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=30_000)
    await start_with_retry(admin.start, "admin", settings)
    try:
        cluster = await admin.describe_cluster()
        found = ClusterTopics(max(1, len(cluster.get("brokers", []))))
        names = await admin.list_topics()
        if names:
            for topic in await admin.describe_topics(names):
                parts = topic.get("partitions") or []
                replicas = max((len(p.get("replicas") or []) for p in parts), default=0)
                found.topics[topic["topic"]] = BrokerTopic(len(parts), replicas)
        wanted = [n for n in configs_of or [] if n in found.topics]
        if wanted:
            try:
                responses = await admin.describe_configs(
                    [ConfigResource(ConfigResourceType.TOPIC, n) for n in wanted]
                )
            except Exception:
                responses = []
            for response in responses:
                for resource in response.to_object().get("resources", []):
                    if resource.get("error_code"):
                        continue
                    held = found.topics.get(resource["resource_name"])
                    if held is not None:
                        held.configs = {
                            e["config_names"]: e["config_value"]
                            for e in resource.get("config_entries", [])
                            if e.get("config_value") is not None
                        }
        return found
    finally:
        await admin.close()


def _specs(names: list[str] | None) -> list[TopicSpec]:
    from scoremesh.contract.catalog import catalog

    every = catalog()
    unknown = [n for n in names or [] if n not in every]
    if unknown:
        raise UserError(
            f"unknown topic {unknown[0]!r}; the catalog (schemas/topics.yaml) has: "
            + ", ".join(every)
        )
    return [every[n] for n in names] if names else list(every.values())  # type: ignore[index]


def wanted_configs(spec: TopicSpec, brokers: int) -> tuple[int, dict[str, str]]:
    """The replication factor and configs a topic is created with on ``brokers`` brokers."""
    rf = min(spec.replication_factor, brokers)
    configs = dict(spec.configs)
    configs["min.insync.replicas"] = str(min(spec.min_insync_replicas, rf))
    return rf, configs


def differences(spec: TopicSpec, held: BrokerTopic, brokers: int) -> list[str]:
    """How a topic on the broker differs from the catalog (what ``create`` cannot fix)."""
    rf, configs = wanted_configs(spec, brokers)
    found = []
    if held.partitions != spec.partitions:
        found.append(f"partitions {held.partitions}, the catalog says {spec.partitions}")
    if held.replication_factor and held.replication_factor < rf:
        found.append(f"replication factor {held.replication_factor}, the catalog says {rf}")
    for key, value in configs.items():
        have = (held.configs or {}).get(key)
        if held.configs is not None and have is not None and have != value:
            found.append(f"{key}={have}, the catalog says {value}")
    return found


NamesArgument = Annotated[
    list[str] | None,
    typer.Argument(
        help="Catalog topics, e.g. predictions (default: every topic in the catalog).",
        autocompletion=complete_topic,
        show_default=False,
    ),
]


@app.command(
    epilog=examples(
        "scoremesh topics create --dry-run",
        "scoremesh --bootstrap-server kafka:9092 topics create",
        "scoremesh topics create predictions labels -o json",
    )
)
def create(
    names: NamesArgument = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be created; create nothing.")
    ] = False,
    output: OutputOption = Output.table,
) -> None:
    """Create the catalog's topics that are missing (idempotent; existing topics are left
    as they are, and their differences from the catalog reported)."""
    from services.common.kafka import ensure_topics

    settings = load_settings()
    settings.require_bootstrap()
    specs = _specs(names)
    announce_kafka(settings)
    cluster = run_async(read_cluster(settings, [settings.topic(s.name) for s in specs]))
    rows: list[dict[str, Any]] = []
    for spec in specs:
        physical = settings.topic(spec.name)
        rf, configs = wanted_configs(spec, cluster.brokers)
        held = cluster.topics.get(physical)
        rows.append(
            {
                "topic": physical,
                "action": "exists" if held else ("would create" if dry_run else "create"),
                "partitions": spec.partitions,
                "replication_factor": rf,
                "configs": configs,
                "differences": differences(spec, held, cluster.brokers) if held else [],
            }
        )
    missing = [s for s, r in zip(specs, rows, strict=True) if r["action"] != "exists"]
    if missing and not dry_run:
        created = set(run_async(ensure_topics(settings, missing)))
        for row in rows:
            if row["action"] == "create":
                row["action"] = "created" if row["topic"] in created else "exists"
    data = {"dry_run": dry_run, "brokers": cluster.brokers, "topics": rows}

    def human() -> None:
        table(
            [
                {
                    **r,
                    "rf": r["replication_factor"],
                    "retention.ms": r["configs"]["retention.ms"],
                    "cleanup": r["configs"]["cleanup.policy"],
                    "notes": "; ".join(r["differences"]) or "-",
                }
                for r in rows
            ],
            ("topic", "action", "partitions", "rf", "cleanup", "retention.ms", "notes"),
            max_width=80,
        )
        made = sum(r["action"] in ("created", "would create") for r in rows)
        verb = "would create" if dry_run else "created"
        print(f"{verb} {made}, {len(rows) - made} already there ({cluster.brokers} broker(s))")

    emit(data, output, human)


@app.command(
    "list",
    epilog=examples("scoremesh topics list", "scoremesh topics list -o json"),
)
def list_topics(output: OutputOption = Output.table) -> None:
    """Every catalog topic: what the catalog says, and whether the broker has it."""
    settings = load_settings()
    settings.require_bootstrap()
    cluster = run_async(read_cluster(settings))
    rows: list[dict[str, Any]] = []
    for spec in _specs(None):
        held = cluster.topics.get(settings.topic(spec.name))
        rows.append(
            {
                "topic": settings.topic(spec.name),
                "key": spec.key,
                "value": spec.value,
                "partitions": spec.partitions,
                "on_broker": held is not None,
                "broker_partitions": held.partitions if held else None,
                "cleanup_policy": spec.cleanup_policy,
                "retention_ms": spec.retention_ms,
            }
        )
    emit(
        rows,
        output,
        lambda: table(
            [
                {
                    **r,
                    "broker": (
                        "missing" if not r["on_broker"] else f"{r['broker_partitions']} partitions"
                    ),
                }
                for r in rows
            ],
            ("topic", "key", "value", "partitions", "broker", "cleanup_policy", "retention_ms"),
        ),
    )


@app.command(
    epilog=examples(
        "scoremesh topics describe predictions", "scoremesh topics describe labels -o yaml"
    )
)
def describe(
    name: Annotated[
        str,
        typer.Argument(help="A catalog topic, e.g. predictions.", autocompletion=complete_topic),
    ],
    output: OutputOption = Output.table,
) -> None:
    """One topic: the catalog's contract (key, value, partitions, configs) next to what the
    broker has, with the differences."""
    settings = load_settings()
    settings.require_bootstrap()
    (spec,) = _specs([name])
    physical = settings.topic(spec.name)
    cluster = run_async(read_cluster(settings, [physical]))
    held = cluster.topics.get(physical)
    rf, configs = wanted_configs(spec, cluster.brokers)
    data: dict[str, Any] = {
        "topic": physical,
        "doc": spec.doc,
        "key": spec.key,
        "value": spec.value,
        "value_formats": list(spec.value_formats),
        "catalog": {"partitions": spec.partitions, "replication_factor": rf, "configs": configs},
        "broker": None
        if held is None
        else {
            "partitions": held.partitions,
            "replication_factor": held.replication_factor,
            "configs": held.configs,
        },
        "differences": differences(spec, held, cluster.brokers) if held else [],
    }

    def human() -> None:
        print(f"{physical}: {spec.doc}")
        print(f"key {spec.key}, value {spec.value} ({', '.join(spec.value_formats)})")
        rows = [
            {
                "setting": "partitions",
                "catalog": spec.partitions,
                "broker": held.partitions if held else "-",
            },
            {
                "setting": "replication factor",
                "catalog": rf,
                "broker": held.replication_factor if held else "-",
            },
        ]
        rows += [
            {
                "setting": key,
                "catalog": value,
                "broker": "-"
                if held is None or held.configs is None
                else held.configs.get(key, "-"),
            }
            for key, value in configs.items()
        ]
        table(rows, ("setting", "catalog", "broker"))
        if held is None:
            print(f"not on the broker; create it with: scoremesh topics create {name}")
        elif held.configs is None:
            print("the broker did not report the topic's configs")
        for line in data["differences"]:
            print(f"differs: {line}")

    emit(data, output, human)
