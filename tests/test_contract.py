"""The published API, field by field, against the Replicate pages it must match.

tests/reference/ holds text dumps of the two model pages' "Input schema" sections:
- 002_d619646c036d561d.txt: the full schema, served by `predict.py:Predictor`;
- 000_ce5e5830ef703dc5.txt: the same without `replicate_weights`, served by
  `predict.py:TrainedLoraPredictor`.

The two dumps come from different page layouts. Both list each field as its name, its
type, then optionally "(enum)", a default, "Min: x", "Max: x" and "Options:" with the
choices, then the description. The full-schema dump shows enum fields as type "None" and
omits their options; the other dump lists them, so choices come from there (the two
pages agree on everything else, which is checked too). Replicate does not show a
minimum of 0, so a field with only "Max:" has a minimum of 0. File inputs (`image`,
`mask`) show as "string" (a URI); ours are cog Paths.
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cog import _adt as adt
from cog import _inspector

from tooling.openapi import openapi_schema

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parent / "reference"
FULL_PAGE = REFERENCE / "002_d619646c036d561d.txt"
TRAINED_PAGE = REFERENCE / "000_ce5e5830ef703dc5.txt"
PREDICTORS = {"Predictor": FULL_PAGE, "TrainedLoraPredictor": TRAINED_PAGE}

PAGE_TYPES = ("string", "integer", "number", "boolean", "None")
URI_FIELDS = ("image", "mask")
PRIMITIVES = {
    "string": adt.PrimitiveType.STRING,
    "integer": adt.PrimitiveType.INTEGER,
    "number": adt.PrimitiveType.FLOAT,
    "boolean": adt.PrimitiveType.BOOL,
}
NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass
class PageField:
    name: str
    type: str  # one of PAGE_TYPES; "None" is an enum whose options the page left out
    enum: bool = False
    default: Any = None  # typed per `type`; None where the page shows none
    minimum: float | None = None
    maximum: float | None = None
    choices: list[str] | None = None
    description: str = ""
    extra: list[str] = field(default_factory=list)


@dataclass
class Page:
    fields: list[PageField]
    output: dict[str, Any]

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def by_name(self) -> dict[str, PageField]:
        return {f.name: f for f in self.fields}


def _typed(kind: str, text: str) -> Any:
    if kind == "integer":
        return int(text)
    if kind == "number":
        return float(text)
    if kind == "boolean":
        return {"True": True, "False": False, "true": True, "false": False}[text]
    return text


def parse_page(text: str) -> Page:
    inputs_part, marker, output_part = text.partition("\nOutput schema")
    assert marker, "no 'Output schema' section"
    lines = [line.strip() for line in inputs_part.splitlines()]
    header = next(i for i, line in enumerate(lines) if line.startswith("Field") and "Default value" in line)
    lines = [line for line in lines[header + 1 :] if line]
    starts = [
        i for i in range(len(lines) - 1) if NAME.fullmatch(lines[i]) and lines[i + 1] in PAGE_TYPES
    ]  # a name line is always followed by its type line; defaults like "dev" are not
    fields = []
    for start, end in zip(starts, [*starts[1:], len(lines)], strict=True):
        block = lines[start + 2 : end]
        entry = PageField(name=lines[start], type=lines[start + 1])
        # The order on both pages: (enum), default, Min, Max, Options, description.
        if block and block[0] == "(enum)":
            entry.enum = True
            block.pop(0)
        if block and not re.search(r"\s", block[0]) and not block[0].endswith(":"):
            entry.default = _typed(entry.type, block.pop(0))
        if block and block[0].startswith("Min:"):
            entry.minimum = float(block.pop(0).removeprefix("Min:"))
        if block and block[0].startswith("Max:"):
            entry.maximum = float(block.pop(0).removeprefix("Max:"))
        if block and block[0] == "Options:":
            block.pop(0)
            entry.choices = [choice.strip() for choice in block.pop(0).split(",")]
        assert block, f"{entry.name}: no description"
        entry.description = block.pop(0)
        entry.extra = block
        fields.append(entry)

    schema_text = output_part.split("\nSchema", 1)[1].strip()
    try:
        output = json.loads(schema_text)
    except json.JSONDecodeError:  # the older page shows a Python dict
        output = ast.literal_eval(schema_text)
    return Page(fields, output)


@cache
def page(path: Path) -> Page:
    return parse_page(path.read_text(encoding="utf-8"))


@cache
def predictor_info(class_name: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # BasePredictor / predict() notices
        return _inspector.create_predictor("predict", class_name)


def choices_of(name: str) -> list[str] | None:
    """A field's options: listed on the trained-LoRA page only (the full page shows "None")."""
    trained = page(TRAINED_PAGE).by_name()
    if name in trained:
        return trained[name].choices
    return None


def ours(class_name: str) -> list[adt.InputField]:
    return sorted(predictor_info(class_name).inputs.values(), key=lambda f: f.order)


# --- the parser and the two pages -----------------------------------------------------------


def test_pages_parse_completely() -> None:
    full, trained = page(FULL_PAGE), page(TRAINED_PAGE)
    assert len(full.fields) == 21
    assert trained.names == [name for name in full.names if name != "replicate_weights"]
    for entry in [*full.fields, *trained.fields]:
        # Every line of a field was understood: only the description is left.
        assert entry.extra == [], (entry.name, entry.extra)
        assert entry.type in PAGE_TYPES
    by_name = full.by_name()
    assert by_name["num_inference_steps"].default == 28
    assert by_name["num_inference_steps"].minimum == 1 and by_name["num_inference_steps"].maximum == 50
    assert by_name["prompt_strength"].default == 0.8 and by_name["prompt_strength"].minimum is None
    assert by_name["go_fast"].default is False
    assert by_name["megapixels"].default == "1" and by_name["megapixels"].type == "None"
    assert by_name["prompt"].default is None and by_name["seed"].default is None
    assert trained.by_name()["aspect_ratio"].choices == [
        *"1:1 16:9 21:9 3:2 2:3 4:5 5:4 3:4 4:3 9:16 9:21".split(),
        "custom",
    ]


def test_pages_agree_on_shared_fields() -> None:
    """Same defaults and bounds; the full page's "None" type is the other's enum."""
    full = page(FULL_PAGE).by_name()
    for entry in page(TRAINED_PAGE).fields:
        other = full[entry.name]
        assert (other.default, other.minimum, other.maximum) == (entry.default, entry.minimum, entry.maximum)
        if entry.enum:
            assert entry.type == "string" and entry.choices
            assert other.type == "None" and other.choices is None
        else:
            assert other.type == entry.type and not other.enum and entry.choices is None


def test_output_schemas_on_both_pages_are_lists_of_uris() -> None:
    expected = {"items": {"format": "uri", "type": "string"}, "title": "Output", "type": "array"}
    assert page(FULL_PAGE).output == expected
    assert page(TRAINED_PAGE).output == expected


# --- our signature, as cog sees it ------------------------------------------------------------


@pytest.mark.parametrize("class_name", PREDICTORS)
def test_names_and_order(class_name: str) -> None:
    fields = ours(class_name)
    assert [f.name for f in fields] == page(PREDICTORS[class_name]).names
    assert [f.order for f in fields] == list(range(len(fields)))


@pytest.mark.parametrize("class_name", PREDICTORS)
def test_types(class_name: str) -> None:
    inputs = predictor_info(class_name).inputs
    for entry in page(PREDICTORS[class_name]).fields:
        ours_type = inputs[entry.name].type
        if entry.name in URI_FIELDS:
            assert entry.type == "string"
            assert ours_type.primitive is adt.PrimitiveType.PATH, entry.name
            assert ours_type.repetition is adt.Repetition.OPTIONAL, entry.name
        elif entry.type == "None" or entry.enum:
            assert ours_type.primitive is adt.PrimitiveType.STRING, entry.name
        else:
            assert ours_type.primitive is PRIMITIVES[entry.type], entry.name
        assert ours_type.repetition in (adt.Repetition.REQUIRED, adt.Repetition.OPTIONAL), entry.name


@pytest.mark.parametrize("class_name", PREDICTORS)
def test_defaults(class_name: str) -> None:
    inputs = predictor_info(class_name).inputs
    for entry in page(PREDICTORS[class_name]).fields:
        default = inputs[entry.name].default
        assert default == entry.default, entry.name
        if entry.default is not None:
            # 3.0 not 3 for numbers, 1 not True for integers: the JSON type must match too.
            assert type(default) is type(entry.default), (entry.name, default)
        else:
            # No default shown: the input is optional (None), except the required prompt.
            assert inputs[entry.name].type.repetition is (
                adt.Repetition.REQUIRED if entry.name == "prompt" else adt.Repetition.OPTIONAL
            ), entry.name


@pytest.mark.parametrize("class_name", PREDICTORS)
def test_bounds(class_name: str) -> None:
    inputs = predictor_info(class_name).inputs
    for entry in page(PREDICTORS[class_name]).fields:
        ge, le = inputs[entry.name].ge, inputs[entry.name].le
        if entry.minimum is None and entry.maximum is not None:
            assert ge == 0, f"{entry.name}: the page hides a minimum of 0, ours is {ge}"
        else:
            assert ge == entry.minimum, entry.name
        assert le == entry.maximum, entry.name


@pytest.mark.parametrize("class_name", PREDICTORS)
def test_choices(class_name: str) -> None:
    inputs = predictor_info(class_name).inputs
    for entry in page(PREDICTORS[class_name]).fields:
        expected = choices_of(entry.name)
        assert inputs[entry.name].choices == expected, entry.name
        if expected is not None:
            assert inputs[entry.name].default in expected, entry.name


@pytest.mark.parametrize("class_name", PREDICTORS)
def test_output_is_a_list_of_paths(class_name: str) -> None:
    output = predictor_info(class_name).output
    assert output.kind is adt.OutputKind.LIST
    assert output.type is adt.PrimitiveType.PATH
    assert output.json_type() == page(PREDICTORS[class_name]).output


# --- the OpenAPI document the server validates against --------------------------------------


@pytest.mark.parametrize("class_name", PREDICTORS)
def test_openapi_schema(class_name: str) -> None:
    schema = openapi_schema(f"predict.py:{class_name}", root=REPO)
    components = schema["components"]["schemas"]
    inputs = components["Input"]
    assert inputs["required"] == ["prompt"]
    properties = inputs["properties"]
    in_order = sorted(properties, key=lambda name: properties[name]["x-order"])
    reference = page(PREDICTORS[class_name])
    assert in_order == reference.names
    for entry in reference.fields:
        prop = properties[entry.name]
        assert prop.get("default") == entry.default, entry.name
        assert ("default" in prop) == (entry.name != "prompt"), entry.name
        assert prop.get("maximum") == entry.maximum, entry.name
        if entry.maximum is not None and entry.minimum is None:
            assert prop.get("minimum") == 0, entry.name
        else:
            assert prop.get("minimum") == entry.minimum, entry.name
        choices = choices_of(entry.name)
        if choices is not None:
            assert prop["allOf"] == [{"$ref": f"#/components/schemas/{entry.name}"}]
            assert components[entry.name]["enum"] == choices
        elif entry.name in URI_FIELDS:
            assert (prop["type"], prop["format"]) == ("string", "uri")
        else:
            assert prop["type"] == entry.type, entry.name
    assert components["Output"] == reference.output
