"""`models spec init`: a first spec from data, with the guesses worth checking said."""

from __future__ import annotations

import csv
from pathlib import Path

import orjson
import pytest

from services.cli.main import main
from services.common.registration import load_labelled_data, load_spec
from services.common.spec_inference import SpecInferenceError, spec_from_file
from services.trainer.datasets import credit_events


def write_csv(path: Path, n: int = 600) -> None:
    names = ["salary", "commission", "age", "elevel", "channel", "vip"]
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, [*names, "label"])
        writer.writeheader()
        for i, (event, label) in enumerate(credit_events(n, seed=5)):
            f = event["features"]
            writer.writerow(
                {
                    "salary": f["salary"],
                    "commission": "" if f["commission"] is None else f["commission"],
                    "age": f["age"],
                    "elevel": f["elevel"],
                    "channel": event["attributes"]["channel"],
                    "vip": "true" if i % 7 == 0 else "false",
                    "label": label,
                }
            )


def test_a_csv_gives_types_ranges_nulls_categories_and_classes(tmp_path: Path) -> None:
    data = tmp_path / "train.csv"
    write_csv(data)
    inferred = spec_from_file(data, "label", margin=0.1)
    spec = inferred.spec
    rules = {r.name: r for r in spec.features}
    assert spec.names == ["salary", "commission", "age", "elevel", "channel", "vip"]
    assert spec.classes == ["0", "1"] and spec.positive == "1"
    salary = rules["salary"]
    assert salary.dtype == "double" and salary.range_action == "flag" and not salary.nullable
    rows, _ = load_labelled_data(data, spec)
    observed = [r["salary"] for r in rows]
    span = max(observed) - min(observed)
    assert salary.min == pytest.approx(max(0.0, min(observed) - 0.1 * span))
    assert salary.max == pytest.approx(max(observed) + 0.1 * span)
    commission = rules["commission"]
    assert commission.nullable and commission.impute is not None
    assert rules["age"].dtype == "long" and rules["age"].categories is None
    assert rules["elevel"].categories == [0, 1, 2, 3, 4]
    assert rules["channel"].dtype == "string"
    assert rules["channel"].categories == ["branch", "partner", "web"]
    assert rules["vip"].dtype == "boolean"
    assert any(n.startswith("commission: null in") for n in inferred.notes)


def test_json_lines_of_events_work_and_bad_data_is_explained(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    lines = [orjson.dumps({**e, "label": y}) for e, y in credit_events(300, seed=6)]
    data.write_bytes(b"\n".join(lines))
    spec = spec_from_file(data, "label").spec
    assert spec.names[:3] == ["salary", "commission", "age"]
    with pytest.raises(SpecInferenceError, match="no column 'target' in the header"):
        write_csv(tmp_path / "t.csv")
        spec_from_file(tmp_path / "t.csv", "target")
    (tmp_path / "one.csv").write_text("x,label\n1,a\n2,a\n")
    with pytest.raises(SpecInferenceError, match="single class"):
        spec_from_file(tmp_path / "one.csv", "label")
    (tmp_path / "mixed.csv").write_text("x,label\n1,a\nhello,b\n")
    with pytest.raises(SpecInferenceError, match="column 'x' mixes types"):
        spec_from_file(tmp_path / "mixed.csv", "label")


def test_the_command_writes_a_spec_that_loads_and_will_not_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "train.csv"
    write_csv(data)
    out = tmp_path / "spec.json"
    args = ["models", "spec", "init", "--data", str(data), "--label", "label", "--out", str(out)]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_spec(out).names[0] == "salary"
    assert main(args) == 1
    assert "exists; edit it, or pass --force" in capsys.readouterr().err
