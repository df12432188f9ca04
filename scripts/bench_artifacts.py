"""Artifact stores and training recipes, measured in paired rounds (JSON output).

1. A 50 MB ONNX artifact (a logistic regression with a large constant folded at load),
   in the ``models.artifacts`` topic and in S3 (moto's S3-compatible server, started
   here), on the embedded stack with an in-process registry. Per round and store, with
   fresh bytes each time (no cache helps):
   - ``upload``: storing the artifact;
   - ``register``: the register command's round trip (the registry fetches the artifact
     from the store, verifies its sha256 and loads it to check its inputs);
   - ``hot_load``: what a scorer does for a new version: fetch into an empty cache,
     verify, create the onnxruntime session and warm it.
2. Retrain wall time on the demo's drifted data (Agrawal function 2, the demo's window
   size): the built-in pipeline through the recipe path (``train(recipe=...)``: the code
   hash checked, the declared pipeline built) against the same estimator fitted directly
   as before recipes (``train(fit=...)``), plus a team's entry-point recipe (scaled
   logistic regression) for scale.

Rounds alternate A and B so that machine noise hits both; ratios are of medians.

    python scripts/bench_artifacts.py [--rounds 5] [--mb 50] [--examples 2000]
        [--output bench-results/artifacts.json]
"""

# ruff: noqa: E402 - SCOREMESH_HOME must be set before anything from services is imported

from __future__ import annotations

import os
import tempfile
from pathlib import Path

BENCH_HOME = Path(tempfile.mkdtemp(prefix="scoremesh-bench-artifacts-"))
os.environ["SCOREMESH_HOME"] = str(BENCH_HOME)

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scoremesh.contract.featurespec import FeatureSpec
from services.common.artifacts import fetch_artifact, store_artifact
from services.common.commands import command, new_command
from services.common.devstack import DevStack
from services.common.kafka import delete_topics, ensure_topics
from services.common.model_version import ModelVersion, VersionProposal
from services.common.onnx_model import load_model
from services.common.settings import Settings
from services.registry.service import RegistryService
from services.trainer.datasets import CREDIT_SPEC, credit_events
from services.trainer.pipeline import BUILTIN_RECIPE, builtin_recipe, train


def say(message: str) -> None:
    print(f"[bench_artifacts] {message}", file=sys.stderr, flush=True)


def big_onnx(spec: FeatureSpec, megabytes: float, tag: str) -> bytes:
    """A valid classifier whose file is ``megabytes`` large: logits = x W + b + 0 * sum(C)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = len(spec.features)
    rng = np.random.default_rng(abs(hash(tag)) % 2**32)
    filler = rng.random(int(megabytes * 1024 * 1024 / 4), dtype=np.float32)
    nodes = [
        helper.make_node("ReduceSum", ["C"], ["c_sum"], keepdims=0),
        helper.make_node("Mul", ["c_sum", "zero"], ["c_zero"]),
        helper.make_node("Gemm", ["input", "W", "b"], ["logits_raw"]),
        helper.make_node("Add", ["logits_raw", "c_zero"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "bench",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, n])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])],
        [
            numpy_helper.from_array(filler, "C"),
            numpy_helper.from_array(np.zeros((), np.float32), "zero"),
            numpy_helper.from_array(rng.normal(size=(n, 2)).astype(np.float32) * 1e-6, "W"),
            numpy_helper.from_array(np.zeros(2, np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.doc_string = tag
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


async def one_store_round(
    settings: Settings, spec: FeatureSpec, data: bytes, version: str, cache: Path
) -> dict[str, float]:
    t0 = time.perf_counter()
    ref = await store_artifact(settings, data, "bench", version)
    t1 = time.perf_counter()
    proposal = VersionProposal(
        version=version,
        artifact_uri=ref.uri,
        artifact_sha256=ref.sha256,
        artifact_size=ref.size,
        feature_spec=spec,
    )
    outcome = await command(
        settings,
        new_command("bench", "register", "bench", proposal=proposal.model_dump_json()),
        timeout_s=300,
    )
    t2 = time.perf_counter()
    if outcome["outcome"] != "applied":
        raise SystemExit(f"register refused: {outcome['detail']}")
    reader = settings.model_copy(update={"artifact_dir": cache})
    path = await fetch_artifact(reader, ref.uri, ref.sha256, timeout_s=300)
    mv = ModelVersion(
        name="bench",
        version=version,
        stage="champion",
        generation=1,
        artifact_uri=ref.uri,
        artifact_sha256=ref.sha256,
        artifact_size=ref.size,
        feature_spec_json=spec.model_dump_json(),
        metadata_json="{}",
    )
    await asyncio.to_thread(load_model, mv, path, 1)
    t3 = time.perf_counter()
    return {"upload_s": t1 - t0, "register_s": t2 - t1, "hot_load_s": t3 - t2}


def summarise(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in rounds), 3) for k in rounds[0]}


async def artifacts(args: argparse.Namespace, base: Settings) -> dict[str, Any]:
    from tests.helpers import S3Server

    spec = CREDIT_SPEC.model_copy(update={"gates": CREDIT_SPEC.gates.model_copy()})
    server = S3Server(BENCH_HOME / "moto.log")
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    run_id = str(int(time.time()))
    s3 = server.settings(bucket, "bench")
    # Every store's settings can read S3 (the registry loads whatever a URI points at).
    base = base.replace(**{k: v for k, v in s3.items() if k != "artifact_store"})
    stores = {
        "kafka": base.model_copy(
            update={
                "topic_prefix": f"bart-{run_id}.",
                "artifact_dir": BENCH_HOME / "registry-kafka",
                "kafka_max_request_bytes": 4 * 1024 * 1024,
            }
        ),
        "s3": base.model_copy(
            update={
                "artifact_store": s3["artifact_store"],
                "topic_prefix": f"bart-{run_id}.",
                "artifact_dir": BENCH_HOME / "registry-s3",
            }
        ),
    }
    await ensure_topics(stores["kafka"])
    registry = RegistryService(stores["kafka"])
    await registry.start()
    stop = asyncio.Event()
    task = asyncio.create_task(registry.run(stop))
    results: dict[str, list[dict[str, float]]] = {"kafka": [], "s3": []}
    try:
        for i in range(args.rounds):
            order = ("kafka", "s3") if i % 2 == 0 else ("s3", "kafka")
            for name in order:
                version = f"{1 + i}.{order.index(name)}.0"
                data = big_onnx(spec, args.mb, f"{name}-{i}-{run_id}")
                cache = BENCH_HOME / f"cache-{name}-{i}"
                say(f"round {i + 1}/{args.rounds}: {name}, {len(data) / 1e6:.1f} MB")
                results[name].append(
                    await one_store_round(stores[name], spec, data, version, cache)
                )
    finally:
        stop.set()
        await task
        await registry.stop()
        server.stop()
        await delete_topics(stores["kafka"], ["models.artifacts", "models.registry"])
    kafka, s3 = summarise(results["kafka"]), summarise(results["s3"])
    return {
        "artifact_mb": args.mb,
        "rounds": results,
        "median": {"kafka": kafka, "s3": s3},
        "ratio_s3_over_kafka": {k: round(s3[k] / kafka[k], 3) for k in kafka},
    }


def retrain(args: argparse.Namespace) -> dict[str, Any]:
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import StandardScaler

    pairs = list(credit_events(args.examples, seed=2027, classification_function=2))
    rows = [e["features"] for e, _ in pairs]
    labels = [y for _, y in pairs]
    params = BUILTIN_RECIPE.steps[1].params

    def direct(x: np.ndarray, y: np.ndarray, spec: FeatureSpec) -> Pipeline:
        # What the trainer did before recipes: the estimator built in code.
        return Pipeline(
            [("scale", StandardScaler()), ("model", GradientBoostingClassifier(**params))]
        ).fit(x, y)

    def team_lr(x: np.ndarray, y: np.ndarray, spec: FeatureSpec) -> Pipeline:
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y)

    recipe = builtin_recipe()

    def timed(run: Callable[[], Any]) -> float:
        started = time.perf_counter()
        run()
        return time.perf_counter() - started

    def with_recipe() -> Any:
        return train(CREDIT_SPEC, rows, labels, recipe=recipe, dataset="bench")

    def before_recipes() -> Any:
        return train(CREDIT_SPEC, rows, labels, recipe=recipe, fit=direct, dataset="bench")

    def entry_point() -> Any:
        return train(CREDIT_SPEC, rows, labels, recipe=recipe, fit=team_lr, dataset="bench")

    with_recipe()  # warm imports
    rounds: dict[str, list[float]] = {"recipe": [], "direct": [], "team_lr": []}
    for i in range(args.rounds):
        say(f"retrain round {i + 1}/{args.rounds}")
        pair = [("recipe", with_recipe), ("direct", before_recipes)]
        for name, run in pair if i % 2 == 0 else pair[::-1]:
            rounds[name].append(round(timed(run), 3))
        rounds["team_lr"].append(round(timed(entry_point), 3))
    median = {k: round(statistics.median(v), 3) for k, v in rounds.items()}
    return {
        "examples": args.examples,
        "data": "Agrawal function 2 (the demo's concept after its drift), 5-fold CV + fit",
        "rounds_s": rounds,
        "median_s": median,
        "ratio_recipe_over_direct": round(median["recipe"] / median["direct"], 3),
        "hash_check_s": round(timed(lambda: builtin_recipe()), 4),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mb", type=float, default=50.0, help="artifact size")
    parser.add_argument("--examples", type=int, default=2000, help="retrain window size")
    parser.add_argument("--output", type=Path, default=ROOT / "bench-results" / "artifacts.json")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.mb <= 0 or args.examples < 100:
        parser.error("--rounds >= 1, --mb > 0 and --examples >= 100")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stack = DevStack(BENCH_HOME, Settings(kafka_bootstrap=None, redis_url=None))
    say("starting the embedded stack ...")
    state, _ = stack.up()
    try:
        base = Settings(**state.settings_overrides())
        report = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "artifacts": asyncio.run(artifacts(args, base)),
            "retrain": retrain(args),
        }
    finally:
        stack.down()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
