"""predict.py as `cog build` reads it: within the Go generator's static rules, and the same
contract as Python's runtime, cog's server and the published pages see.

The rules and their consequences are in tests/cog_static.py.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.cog_static import MISSING, Reader, static_inputs, violations
from tests.test_contract import PREDICTORS, choices_of, page, predictor_info

REPO = Path(__file__).resolve().parents[1]
SOURCE = (REPO / "predict.py").read_text(encoding="utf-8")


@pytest.mark.parametrize("class_name", PREDICTORS)
def test_predict_py_uses_only_forms_cog_reads(class_name: str) -> None:
    assert violations(SOURCE, class_name) == []


@pytest.mark.parametrize("class_name", PREDICTORS)
def test_every_parameter_is_declared_by_the_inputs_attribute_of_its_name(class_name: str) -> None:
    """engine.inputs.input_contract looks each parameter's declaration up by name on `Inputs`."""
    reader = Reader(SOURCE)
    method = reader.predict_method(class_name)
    for parameter, default in zip(method.args.args[1:], method.args.defaults, strict=True):
        assert reader.text(default) == f"Inputs.{parameter.arg}", parameter.arg


@pytest.mark.parametrize("class_name", PREDICTORS)
def test_cog_static_reading_is_the_published_contract(class_name: str) -> None:
    fields = static_inputs(SOURCE, class_name)
    reference = page(PREDICTORS[class_name])
    assert [field.name for field in fields] == reference.names
    for field, entry in zip(fields, reference.fields, strict=True):
        if entry.name == "prompt":
            assert field.default is MISSING  # Input() with no default: required
        else:
            assert field.default == entry.default and type(field.default) is type(entry.default), entry.name
        minimum = 0 if entry.minimum is None and entry.maximum is not None else entry.minimum
        assert (field.ge, field.le) == (minimum, entry.maximum), entry.name
        assert field.choices == choices_of(entry.name), entry.name
        assert field.description, entry.name


@pytest.mark.parametrize("class_name", PREDICTORS)
def test_cog_static_reading_equals_the_runtime_reading(class_name: str) -> None:
    """What Go writes into the image's schema and what cog's Python runtime enforces agree,
    descriptions included, character for character."""
    runtime = predictor_info(class_name).inputs
    for field in static_inputs(SOURCE, class_name):
        ours = runtime[field.name]
        assert field.description == ours.description, field.name
        assert (field.ge, field.le) == (ours.ge, ours.le), field.name
        assert field.choices == ours.choices, field.name
        assert field.default == ours.default or (field.default is MISSING and ours.default is None), field.name
        assert field.order == ours.order, field.name


BAD_FORMS = {
    "module-level Input": ("PROMPT = Input(description='x')", "prompt: str = PROMPT", "cannot be statically resolved"),
    "bound from a tuple": ("R = (256, 1440)", "height: int = Input(ge=R[0], default=512)", "ge=`R[0]`"),
    "description built with +": ("B = 'b'", "prompt: str = Input(description='a' + B)", "description"),
    "implicit concatenation": ("", "prompt: str = Input(description='a' \n 'b')", "description"),
    "parenthesised description": ("", "prompt: str = Input(description=('a'))", "description"),
    "f-string description": ("", "prompt: str = Input(description=f'{1}')", "description"),
    "escape in description": ("", "prompt: str = Input(description='a\\tb')", "description"),
    "imported choices": ("from x import C", "model: str = Input(choices=C, default='a')", "choices"),
    "computed choices": ("", "model: str = Input(choices=sorted(['a']), default='a')", "choices"),
    "positional default": ("", "steps: int = Input(28)", "positional"),
    "computed default": ("", "steps: int = Input(default=int('3'))", "default `int('3')`"),
    "no annotation": ("", "steps=Input(default=3)", "no type annotation"),
    "unknown type": ("", "steps: list[int] = Input(default=None)", "type `list[int]`"),
}


@pytest.mark.parametrize("case", BAD_FORMS)
def test_each_form_outside_cogs_rules_is_reported_with_its_input(case: str) -> None:
    module_line, parameter, expected = BAD_FORMS[case]
    source = textwrap.dedent(
        """
        from cog import BasePredictor, Input
        {module_line}

        class Predictor(BasePredictor):
            def predict(self, {parameter}) -> str:
                return ""
        """
    ).format(module_line=module_line, parameter=parameter)
    problems = violations(source, "Predictor")
    assert len(problems) == 1, problems
    name = parameter.split(":")[0].split("=")[0].strip()
    assert f"input '{name}'" in problems[0] and expected in problems[0], problems


def test_the_class_attribute_idiom_resolves_like_a_signature_call() -> None:
    source = textwrap.dedent(
        """
        from cog import BasePredictor, Input
        SIZES = ["a", "b"]
        TEXT = "shared text"

        class Inputs:
            size = Input(description=TEXT, choices=SIZES, default="b")
            scale = Input(description="s", ge=-1.0, le=3, default=1.0)

        class Predictor(BasePredictor):
            def predict(self, size: str = Inputs.size, scale: float = Inputs.scale, n: int | None = None) -> str:
                return ""
        """
    )
    size, scale, n = static_inputs(source, "Predictor")
    assert (size.description, size.choices, size.default) == ("shared text", ["a", "b"], "b")
    assert (scale.ge, scale.le, scale.default) == (-1.0, 3.0, 1.0)
    assert (n.default, n.annotation) == (None, "int | None")
