"""The one reader of user files: JSON lines or CSV, every line accounted for."""

from __future__ import annotations

import math

import pytest

from services.common.tabular import Row, detect, label_text, parse_cell, read_rows


@pytest.mark.parametrize(
    ("cell", "value"),
    [("", None), ("true", True), ("FALSE", False), ("42", 42), ("-1.5", -1.5), ("web", "web")],
)
def test_a_csv_cell_is_typed_by_one_rule(cell: str, value: object) -> None:
    assert parse_cell(cell) == value and type(parse_cell(cell)) is type(value)


def test_nan_and_infinity_stay_text() -> None:
    assert parse_cell("nan") == "nan" and parse_cell("inf") == "inf"
    assert not any(isinstance(parse_cell(x), float) and math.isnan(parse_cell(x)) for x in ["nan"])


def test_the_format_comes_from_the_suffix_then_the_content() -> None:
    assert detect("a,b\n1,2", "x.csv") == "csv"
    assert detect('{"a": 1}', "x.jsonl") == "jsonl"
    assert detect('\n  {"a": 1}', "-") == "jsonl"
    assert detect("a,b\n1,2", "-") == "csv"
    assert detect('{"a": 1}', "x.csv", fmt="jsonl") == "jsonl"


def test_json_lines_keep_line_numbers_and_say_what_is_wrong() -> None:
    text = '{"a": 1}\n\n[1, 2]\n{bad\n{"b": true}\n'
    rows = list(read_rows(text, "x.jsonl"))
    assert [r.line for r in rows] == [1, 3, 4, 5]
    assert rows[0] == Row(1, {"a": 1})
    assert rows[1].values is None and "a JSON list" in str(rows[1].problem)
    assert rows[2].values is None and "not valid JSON" in str(rows[2].problem)
    assert rows[3].values == {"b": True}


def test_csv_rows_are_typed_and_a_long_row_is_reported() -> None:
    rows = list(read_rows("event_id,age,label\ne-1,41,1\ne-2,,0,extra\n", "x.csv"))
    assert rows[0] == Row(2, {"event_id": "e-1", "age": 41, "label": 1})
    assert rows[1].values is None and "1 more fields than the header" in str(rows[1].problem)


def test_labels_read_as_the_class_names_specs_use() -> None:
    assert [label_text(v) for v in (True, False, 1, "yes")] == ["1", "0", "1", "yes"]
