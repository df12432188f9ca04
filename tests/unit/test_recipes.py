"""Training recipes: pinned to their code, refused when it changed, trial-run before recording."""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
import sklearn

from services.common.evaluation import reference_distributions
from services.common.policies.retrain import TrainingWindowPolicy
from services.common.recipes import (
    EntryPointRecipe,
    PipelineRecipe,
    RecipeError,
    RecipeMismatch,
    pin,
    recipe_from_argument,
    resolve,
    trial_run,
)
from services.trainer.datasets import CREDIT_SPEC, credit_events
from services.trainer.job import _Reservoir
from services.trainer.pipeline import BUILTIN_RECIPE

LOGISTIC = """
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from {package}.helpers import C


def train(x, y, spec):
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=500)).fit(x, y)


def not_a_classifier(x, y, spec):
    return "a string"


def unconvertible(x, y, spec):
    class Mine:
        def fit(self, x, y):
            return self

        def predict_proba(self, x):
            return x

    return Mine()
"""


@pytest.fixture
def team_package(tmp_path: Path) -> Iterator[Path]:
    """A team's recipe package on the import path, as an installed package would be."""
    name = f"team_recipes_{tmp_path.name.replace('-', '_')}"
    root = tmp_path / name
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "helpers.py").write_text("C = 1.0\n")
    (root / "credit.py").write_text(textwrap.dedent(LOGISTIC.format(package=name)))
    sys.path.insert(0, str(tmp_path))
    try:
        yield root
    finally:
        sys.path.remove(str(tmp_path))
        for module in [m for m in sys.modules if m.startswith(name)]:
            del sys.modules[module]


def rows_and_labels(n: int = 800) -> tuple[list[dict[str, object]], list[str]]:
    pairs = list(credit_events(n, seed=4))
    return [e["features"] for e, _ in pairs], [y for _, y in pairs]


def test_an_entry_point_is_pinned_to_every_file_of_its_package(team_package: Path) -> None:
    recipe = pin(EntryPointRecipe(entry_point=f"{team_package.name}.credit:train"))
    assert len(recipe.code_sha256) == 64 and recipe.code["files"] == "3"
    fit, same = resolve(recipe)
    assert same.code_sha256 == recipe.code_sha256
    x = np.zeros((4, len(CREDIT_SPEC.features)), dtype=np.float32)
    x[2:] = 1
    assert fit(x, np.array([0, 0, 1, 1]), CREDIT_SPEC).predict_proba(x).shape == (4, 2)
    # A helper module the function imports changes: the recipe is not the one recorded.
    (team_package / "helpers.py").write_text("C = 0.01\n")
    with pytest.raises(RecipeMismatch, match=r"the recipe's code changed: recorded sha256"):
        resolve(recipe)
    _, accepted = resolve(recipe, accept_code=True)
    assert accepted.code_sha256 != recipe.code_sha256


def test_a_trial_run_fits_converts_and_scores(team_package: Path) -> None:
    rows, labels = rows_and_labels()
    trial = trial_run(
        EntryPointRecipe(entry_point=f"{team_package.name}.credit:train"),
        CREDIT_SPEC,
        rows,
        labels,
        sample=300,
    )
    assert trial.report["rows"] == 300 and trial.report["data"] == "given data"
    assert {"LinearClassifier", "Scaler"} <= set(trial.report["operators"])
    assert trial.report["outputs"][1] == [64, 2]
    assert trial.recipe.code_sha256


def test_trial_runs_refuse_what_could_not_retrain(team_package: Path) -> None:
    with pytest.raises(RecipeError, match="has no predict_proba"):
        trial_run(
            EntryPointRecipe(entry_point=f"{team_package.name}.credit:not_a_classifier"),
            CREDIT_SPEC,
        )
    with pytest.raises(RecipeError, match="skl2onnx cannot convert Mine"):
        trial_run(
            EntryPointRecipe(entry_point=f"{team_package.name}.credit:unconvertible"), CREDIT_SPEC
        )
    with pytest.raises(RecipeMismatch, match="no function 'missing'"):
        trial_run(EntryPointRecipe(entry_point=f"{team_package.name}.credit:missing"), CREDIT_SPEC)
    with pytest.raises(RecipeMismatch, match=r"cannot import 'nowhere_at_all\.module'"):
        pin(EntryPointRecipe(entry_point="nowhere_at_all.module:train"))
    with pytest.raises(RecipeMismatch, match="standard library"):
        pin(EntryPointRecipe(entry_point="json:dumps"))


def test_a_pipeline_names_only_scikit_learn_classes(tmp_path: Path) -> None:
    path = tmp_path / "recipe.json"
    path.write_text(
        orjson.dumps({"steps": [{"name": "x", "estimator": "os.system", "params": {}}]}).decode()
    )
    with pytest.raises(RecipeError, match="only scikit-learn classes"):
        pin(recipe_from_argument(str(path)))
    path.write_text(
        orjson.dumps(
            {
                "steps": [
                    {
                        "name": "model",
                        "estimator": "sklearn.linear_model.LogisticRegression",
                        "params": {"C": 0.5},
                    }
                ]
            }
        ).decode()
    )
    recipe = pin(recipe_from_argument(str(path)))
    assert isinstance(recipe, PipelineRecipe) and recipe.code == {
        "scikit-learn": sklearn.__version__
    }
    assert pin(BUILTIN_RECIPE).code_sha256 != recipe.code_sha256
    bad = recipe.model_copy(update={"code_sha256": "f" * 64})
    with pytest.raises(RecipeMismatch, match=re.escape(f"scikit-learn {sklearn.__version__}")):
        resolve(bad)


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("train", "neither package.module:function nor a pipeline JSON"),
        ("pkg.mod:fn()", "neither package.module:function"),
        ("missing.json", "cannot read recipe missing.json"),
    ],
)
def test_a_recipe_argument_that_is_wrong_says_what_is_expected(argument: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        recipe_from_argument(argument)


def test_reference_distributions_cover_features_nulls_score_confidence_and_decisions() -> None:
    rows, _ = rows_and_labels(400)
    from scoremesh.contract.featurespec import Vectoriser

    matrix = Vectoriser(CREDIT_SPEC).transform(rows)
    proba = np.column_stack([np.linspace(0.1, 0.9, 400), np.linspace(0.9, 0.1, 400)])
    ref = reference_distributions(matrix, CREDIT_SPEC, proba, rows)
    assert set(ref["features"]) == set(CREDIT_SPEC.names)
    assert ref["features"]["elevel"]["kind"] == "categorical"
    assert len(ref["features"]["salary"]["edges"]) == 11
    nulls = sum(r["commission"] is None for r in rows) / 400
    assert ref["features"]["commission"]["null_rate"] == pytest.approx(nulls)
    assert "null_rate" not in ref["features"]["salary"]
    assert ref["score"]["edges"][0] == pytest.approx(0.1)
    assert ref["confidence"]["edges"][0] >= 0.5
    assert ref["decisions"] == {"0": 0.5, "1": 0.5}


def test_the_older_sample_is_bounded_uniform_and_keeps_the_latest_label() -> None:
    policy = TrainingWindowPolicy(older_ratio=0.25, older_max_examples=100)
    assert policy.older_cap(200) == 50 and policy.older_cap(10_000) == 100
    reservoir = _Reservoir(100, seed=1)
    for i in range(10_000):
        reservoir.offer({"event_id": f"e{i}", "label_time": 0, "event_time": i})
    kept = next(iter(reservoir.items))
    reservoir.offer({"event_id": kept, "label_time": 1, "event_time": -1})
    assert reservoir.items[kept]["label_time"] == 1, "a newer label replaces, never adds"
    times = sorted(e["event_time"] for e in reservoir.items.values() if e["event_time"] >= 0)
    assert len(reservoir.items) == 100 and reservoir.seen == 10_000
    assert times[0] < 2_000 and times[-1] > 8_000, "drawn from the whole span"


def test_a_version_registered_without_data_or_recipe_is_told_what_it_will_not_get() -> None:
    from services.common.model_version import VersionMetadata
    from services.common.registration import monitoring_gaps

    gaps = monitoring_gaps(VersionMetadata(), CREDIT_SPEC)
    text = "\n".join(gaps)
    assert len(gaps) == 5
    assert "no holdout metrics: performance alerts relative to training" in text
    assert "no reference distributions: PSI/KS drift" in text
    assert "predicted-class shift is not measured" in text
    assert "metric gates f1 >= 0.8, roc_auc >= 0.85 were not evaluated" in text
    assert "no training recipe: a retrain will not run" in text
    full = VersionMetadata(
        holdout_metrics={"f1": 0.9},
        class_balance={"0": 0.4, "1": 0.6},
        reference={"features": {"salary": {}}},
        validation={"metrics": {"f1": 0.9}},
        recipe=pin(BUILTIN_RECIPE),
    )
    assert monitoring_gaps(full, CREDIT_SPEC) == []
