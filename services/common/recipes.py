"""Training recipes: how a version was trained, recorded so a retrain runs exactly that.

A recipe is either

- an **entry point** ``package.module:function``: ``function(x, y, spec)`` gets the training
  window as the serving ``Vectoriser``'s float32 matrix ``x``, the labels ``y`` as indices
  into ``spec.classes`` (so the model's probability columns follow the spec's class order)
  and the ``FeatureSpec``, and returns a fitted scikit-learn estimator skl2onnx can convert;
  its code hash covers every ``.py`` file of the top-level package the module belongs to;
- a **pipeline**: scikit-learn steps and hyperparameters, declared as data; its code hash
  covers the steps and the installed files (the wheel's RECORD) of the distributions the
  step classes come from, so a different scikit-learn is a different recipe.

``pin`` computes the hash when a recipe is recorded (`models register --recipe`, the
bootstrap); ``resolve`` recomputes it wherever a recipe is about to run and refuses, saying
what differs, when the code found is not the code recorded. See docs/adr/0013.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from scoremesh.contract.featurespec import FeatureSpec, Vectoriser
from services.common.errors import UserError

ONNX_OPSET = 17
ENTRY_POINT = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
# Pipeline steps may only name scikit-learn classes: a recipe is data from the registry,
# and importing any class it names would let a command run arbitrary installed code.
PIPELINE_PACKAGES = ("sklearn",)

Fit = Callable[[np.ndarray, np.ndarray, FeatureSpec], Any]


class RecipeError(UserError, ValueError):
    """A recipe cannot be recorded or run; the message says what and what to do."""


class RecipeMismatch(RecipeError):
    """The code a recipe resolves to here is not the code recorded with the version."""


class PipelineStep(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z_][\w-]*$")
    estimator: str = Field(
        description="the scikit-learn class, e.g. sklearn.linear_model.LogisticRegression"
    )
    params: dict[str, Any] = Field(default_factory=dict, description="constructor arguments")


class PipelineRecipe(BaseModel):
    """A scikit-learn Pipeline declared as data: steps and hyperparameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["pipeline"] = "pipeline"
    steps: list[PipelineStep] = Field(min_length=1)
    code_sha256: str = Field("", description="steps + the step classes' distributions")
    code: dict[str, str] = Field(
        default_factory=dict, description="distribution -> version the hash covers"
    )


class EntryPointRecipe(BaseModel):
    """A function of the team's own code: ``function(x, y, spec) -> fitted estimator``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["entry_point"] = "entry_point"
    entry_point: str = Field(pattern=ENTRY_POINT.pattern)
    code_sha256: str = Field("", description="every .py file of the top-level package")
    code: dict[str, str] = Field(
        default_factory=dict, description="package, files hashed and distribution version"
    )


Recipe = Annotated[PipelineRecipe | EntryPointRecipe, Field(discriminator="kind")]


class _RecipeDocument(BaseModel):
    recipe: Recipe


def parse_recipe(data: Any) -> PipelineRecipe | EntryPointRecipe:
    try:
        return _RecipeDocument.model_validate({"recipe": data}).recipe
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or "recipe"
        raise RecipeError(f"recipe: {where}: {first['msg']}") from None


def recipe_from_argument(value: str) -> PipelineRecipe | EntryPointRecipe:
    """``--recipe``: ``package.module:function``, or a JSON file declaring pipeline steps."""
    path = Path(value)
    if value.endswith(".json") or path.is_file():
        try:
            data = orjson.loads(path.read_bytes())
        except OSError as exc:
            raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
        except orjson.JSONDecodeError as exc:
            raise RecipeError(f"{path}: not JSON: {exc}") from None
        if isinstance(data, dict) and "kind" not in data:
            data = {"kind": "pipeline", **data}
        return parse_recipe(data)
    if not ENTRY_POINT.match(value):
        raise RecipeError(
            f"--recipe {value!r} is neither package.module:function nor a pipeline JSON file "
            '(e.g. {"steps": [{"name": "model", "estimator": '
            '"sklearn.linear_model.LogisticRegression", "params": {"C": 1.0}}]})'
        )
    return EntryPointRecipe(entry_point=value)


# --- code hashes ----------------------------------------------------------------------


def _module_name(entry_point: str) -> tuple[str, str]:
    module, _, function = entry_point.partition(":")
    return module, function


def _package_files(top: str) -> tuple[list[tuple[str, Path]], str]:
    """(relative name, path) of every .py file of a top-level package or module."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError) as exc:
        raise RecipeMismatch(f"cannot find {top!r}: {exc}") from None
    if spec is None:
        raise RecipeMismatch(
            f"no module {top!r} is installed here: install the package with the recipe "
            "(see docs/deploy.md, 'Training recipes')"
        )
    if spec.submodule_search_locations:
        files: list[tuple[str, Path]] = []
        for location in spec.submodule_search_locations:
            root = Path(location)
            files += [
                (f"{top}/{p.relative_to(root).as_posix()}", p)
                for p in root.rglob("*.py")
                if "__pycache__" not in p.parts
            ]
        return sorted(files), "package"
    if spec.origin is None or not spec.origin.endswith(".py"):
        raise RecipeMismatch(f"{top!r} is not Python source ({spec.origin}); cannot hash it")
    return [(Path(spec.origin).name, Path(spec.origin))], "module"


@functools.lru_cache(maxsize=1)
def _packages_distributions() -> dict[str, list[str]]:
    return dict(importlib.metadata.packages_distributions())


def _distribution_of(top: str) -> tuple[str, str] | None:
    for dist in _packages_distributions().get(top, []):
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def entry_point_hash(entry_point: str) -> tuple[str, dict[str, str]]:
    module, _ = _module_name(entry_point)
    top = module.split(".")[0]
    files, kind = _package_files(top)
    digest = hashlib.sha256()
    for name, path in files:
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    code = {"package": top, "kind": kind, "files": str(len(files))}
    dist = _distribution_of(top)
    if dist is not None:
        code["distribution"] = f"{dist[0]}=={dist[1]}"
    return digest.hexdigest(), code


def _check_estimator_name(name: str) -> None:
    module, _, cls = name.rpartition(".")
    if not module or module.split(".")[0] not in PIPELINE_PACKAGES or not cls:
        raise RecipeError(
            f"pipeline step estimator {name!r}: only scikit-learn classes may be named "
            "(e.g. sklearn.preprocessing.StandardScaler); for other code use an entry point"
        )


def pipeline_hash(steps: Sequence[PipelineStep]) -> tuple[str, dict[str, str]]:
    digest = hashlib.sha256(
        orjson.dumps([s.model_dump() for s in steps], option=orjson.OPT_SORT_KEYS)
    )
    code: dict[str, str] = {}
    for top in sorted({s.estimator.split(".")[0] for s in steps}):
        dist = _distribution_of(top)
        if dist is None:
            raise RecipeMismatch(f"no distribution provides {top!r} here")
        name, version = dist
        record = importlib.metadata.distribution(name).read_text("RECORD") or version
        digest.update(f"{name}=={version}\0".encode() + record.encode() + b"\0")
        code[name] = version
    return digest.hexdigest(), code


def pin(recipe: PipelineRecipe | EntryPointRecipe) -> PipelineRecipe | EntryPointRecipe:
    """The recipe with the hash of the code it resolves to on this machine."""
    if isinstance(recipe, PipelineRecipe):
        for step in recipe.steps:
            _check_estimator_name(step.estimator)
        digest, code = pipeline_hash(recipe.steps)
    else:
        _check_allowed(recipe, ())
        _import_function(recipe.entry_point)
        digest, code = entry_point_hash(recipe.entry_point)
    return recipe.model_copy(update={"code_sha256": digest, "code": code})


# --- resolving and running ------------------------------------------------------------


def _import_function(entry_point: str) -> Callable[..., Any]:
    module_name, function = _module_name(entry_point)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RecipeMismatch(
            f"recipe {entry_point}: cannot import {module_name!r} ({exc}); the trainer needs "
            "the package installed (docs/deploy.md, 'Training recipes')"
        ) from None
    target = getattr(module, function, None)
    if not callable(target):
        raise RecipeMismatch(f"recipe {entry_point}: {module_name} has no function {function!r}")
    return target  # type: ignore[no-any-return]


def _check_allowed(recipe: EntryPointRecipe, allowed: Sequence[str]) -> None:
    top = recipe.entry_point.split(".")[0].split(":")[0]
    if allowed and top not in allowed:
        raise RecipeMismatch(
            f"recipe {recipe.entry_point}: package {top!r} is not among the trainer's recipe "
            f"packages {list(allowed)} (SCOREMESH_TRAINER_RECIPE_PACKAGES)"
        )
    if not allowed and top in sys.stdlib_module_names:
        raise RecipeMismatch(f"recipe {recipe.entry_point}: the standard library has no recipes")


def _build_pipeline(steps: Sequence[PipelineStep]) -> Any:
    from sklearn.pipeline import Pipeline

    built = []
    for step in steps:
        _check_estimator_name(step.estimator)
        module_name, _, cls_name = step.estimator.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError):
            raise RecipeMismatch(f"pipeline step {step.name}: no class {step.estimator}") from None
        try:
            built.append((step.name, cls(**step.params)))
        except TypeError as exc:
            raise RecipeError(f"pipeline step {step.name} ({cls_name}): {exc}") from None
    return Pipeline(built)


def resolve(
    recipe: PipelineRecipe | EntryPointRecipe,
    allowed_packages: Sequence[str] = (),
    accept_code: bool = False,
) -> tuple[Fit, PipelineRecipe | EntryPointRecipe]:
    """A fit function for the recipe, after checking the code here is the code recorded.

    ``accept_code``: a person vouched for the code found here (a changed hash is recorded
    instead of refused). Returns the recipe as it will be recorded with the new version.
    """
    if isinstance(recipe, EntryPointRecipe):
        _check_allowed(recipe, allowed_packages)
        function = _import_function(recipe.entry_point)
        digest, code = entry_point_hash(recipe.entry_point)
    else:
        digest, code = pipeline_hash(recipe.steps)
    if recipe.code_sha256 and digest != recipe.code_sha256 and not accept_code:
        was = ", ".join(f"{k} {v}" for k, v in sorted(recipe.code.items()))
        now = ", ".join(f"{k} {v}" for k, v in sorted(code.items()))
        raise RecipeMismatch(
            f"the recipe's code changed: recorded sha256 {recipe.code_sha256[:12]}... "
            f"({was}), found {digest[:12]}... here ({now}); a person must check the change, "
            "then retrain with --accept-recipe-code or register a version made with it"
        )
    if not recipe.code_sha256 and not accept_code:
        raise RecipeMismatch("the recipe was recorded without a code hash; pin it first")
    pinned = recipe.model_copy(update={"code_sha256": digest, "code": code})
    if isinstance(recipe, PipelineRecipe):
        steps = recipe.steps

        def fit_pipeline(x: np.ndarray, y: np.ndarray, spec: FeatureSpec) -> Any:
            return _build_pipeline(steps).fit(x, y)

        return fit_pipeline, pinned

    def fit_entry_point(x: np.ndarray, y: np.ndarray, spec: FeatureSpec) -> Any:
        estimator = function(x, y, spec)
        if not hasattr(estimator, "predict_proba"):
            raise RecipeError(
                f"recipe {recipe.entry_point} returned {type(estimator).__name__}, which has "
                "no predict_proba: return a fitted scikit-learn classifier or Pipeline"
            )
        return estimator

    return fit_entry_point, pinned


def to_onnx(estimator: Any, spec: FeatureSpec) -> bytes:
    """ONNX bytes for a fitted classifier or Pipeline: one float input, probabilities as a
    tensor (no ZipMap), the spec's input name and width."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    try:
        onnx_model = convert_sklearn(
            estimator,
            initial_types=[(spec.input_name, FloatTensorType([None, len(spec.features)]))],
            options={id(final): {"zipmap": False}},
            target_opset=ONNX_OPSET,
        )
    except Exception as exc:  # skl2onnx raises many types for unsupported estimators
        raise RecipeError(
            f"skl2onnx cannot convert {type(final).__name__}: {str(exc).splitlines()[0]}"
        ) from exc
    return bytes(onnx_model.SerializeToString())


def operators(onnx: bytes) -> list[str]:
    """The ONNX operator types of a model's graph, sorted (what the estimator became)."""
    import onnx as onnx_lib

    return sorted({node.op_type for node in onnx_lib.load_from_string(onnx).graph.node})


def class_indices(labels: Sequence[str], spec: FeatureSpec) -> np.ndarray:
    unknown = sorted(set(labels) - set(spec.classes))
    if unknown:
        raise RecipeError(f"labels {unknown[:5]} are not among the spec's classes {spec.classes}")
    index = {c: i for i, c in enumerate(spec.classes)}
    return np.fromiter((index[v] for v in labels), dtype=np.int64, count=len(labels))


def synthetic_rows(
    spec: FeatureSpec, n: int, seed: int = 0
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows within the spec's ranges and categories, labels cycling through the classes:
    enough to prove a recipe fits and converts when no labelled data was given."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for rule in spec.features:
        if rule.categories:
            picks = rng.integers(len(rule.categories), size=n)
            values: list[Any] = [rule.categories[int(i)] for i in picks]
        elif rule.dtype == "boolean":
            values = [bool(v) for v in rng.integers(2, size=n)]
        else:
            low = rule.min if rule.min is not None else -1.0
            high = rule.max if rule.max is not None else low + 2.0
            drawn = rng.uniform(low, high, size=n)
            values = [int(v) if rule.dtype == "long" else float(v) for v in drawn]
        for row, value in zip(rows, values, strict=True):
            row[rule.name] = value
    labels = [spec.classes[i % len(spec.classes)] for i in range(n)]
    return rows, labels


@dataclass(frozen=True)
class TrialRun:
    recipe: PipelineRecipe | EntryPointRecipe
    report: dict[str, Any]


def trial_run(
    recipe: PipelineRecipe | EntryPointRecipe,
    spec: FeatureSpec,
    rows: list[dict[str, Any]] | None = None,
    labels: list[str] | None = None,
    sample: int = 2_000,
    seed: int = 0,
) -> TrialRun:
    """Pin the recipe, fit it on a sample, convert to ONNX and score with onnxruntime, so a
    retrain weeks later cannot fail on an import or a converter limitation."""
    from services.common.onnx_model import ModelLoadError, check_onnx_inputs, make_session

    pinned = pin(recipe)
    source = "given data"
    if not rows or not labels:
        rows, labels = synthetic_rows(spec, min(sample, 500), seed)
        source = "synthetic rows within the spec (no --data given)"
    elif len(rows) > sample:
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), sample, replace=False))
        rows, labels = [rows[i] for i in keep], [labels[i] for i in keep]
    y = class_indices(labels, spec)
    if len(set(y.tolist())) < 2:
        raise RecipeError("the trial sample has a single class; give data with every class")
    x = Vectoriser(spec).transform(rows)
    fit, pinned = resolve(pinned)
    started = time.perf_counter()
    try:
        estimator = fit(x, y, spec)
    except RecipeError:
        raise
    except Exception as exc:  # the team's code: report whatever it raised
        raise RecipeError(
            f"the recipe failed on a trial sample: {type(exc).__name__}: {exc}"
        ) from exc
    fit_s = time.perf_counter() - started
    onnx = to_onnx(estimator, spec)
    try:
        session = make_session(onnx, 1)
        check_onnx_inputs(session, spec)
        outputs = session.run(None, {session.get_inputs()[0].name: x[:64]})
    except ModelLoadError as exc:
        raise RecipeError(f"the recipe's model does not load in onnxruntime: {exc}") from None
    return TrialRun(
        pinned,
        {
            "rows": len(rows),
            "data": source,
            "fit_s": round(fit_s, 3),
            "onnx_bytes": len(onnx),
            "operators": operators(onnx),
            "outputs": [list(np.asarray(o).shape) for o in outputs],
            "at": int(time.time() * 1000),
        },
    )
