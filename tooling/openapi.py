"""Generate ``.cog/openapi_schema.json`` the way the Go ``cog build`` does.

The pip ``cog`` package ships only the SDK and the Rust "coglet" HTTP server.
That server validates inputs (HTTP 422) and serves ``/openapi.json`` only when
``.cog/openapi_schema.json`` exists; the Go CLI normally writes that file at
build time.  This module writes the same document from the predictor's Python
signature, read with cog's own inspector (``cog._inspector``).

The format mirrors ``pkg/schema/openapi_spec.go`` (``buildOpenAPISpec`` /
``buildInputSchema``) in replicate/cog:

* ``openapi: 3.0.2``, ``info: {title: Cog, version: <cog version>}``;
* paths ``/``, ``/health-check``, ``/predictions`` (POST, with
  ``x-cog-streaming`` when the method is decorated with ``@cog.streaming``) and
  ``/predictions/{prediction_id}/cancel``;
* ``components.schemas`` in the order Input, Output, one enum schema per input
  with ``choices`` (named after the input), PredictionRequest,
  PredictionResponse, Status, HTTPValidationError, ValidationError;
* an input property has ``x-order`` and either ``title`` plus its inline type or
  ``allOf: [{$ref: #/components/schemas/<name>}]`` for choices; then
  ``default``, ``nullable``, ``description``, ``minimum``/``maximum``,
  ``minLength``/``maxLength``/``pattern``, ``deprecated``, ``x-cog-accept``;
* Go's required rule: an input is required when it has no *effective*
  default and is not ``Optional``.  ``x: int = Input(default=None)`` is
  required with no default; ``x: Optional[int] = Input(default=None)`` is not
  required, is ``nullable`` and has ``"default": null``.  A bare ``Secret``
  with ``default=None`` counts as optional (Go special case).

Go's ``encoding/json`` sorts the keys of plain maps and keeps insertion order
for its ordered maps (input properties, component schemas, paths, object
output properties); the dict returned here has the same key order, and
:func:`write_openapi_schema` writes compact JSON with Go's HTML escaping, so
the file is byte-compatible with what Go would write for the same predictor.

Whether a default was written explicitly is not visible at run time
(``Input()`` stores ``default=None`` either way), so the method's source is
parsed with :mod:`ast`, as Go's static parser does.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import inspect
import json
import os
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterable
from enum import Enum
from pathlib import Path
from typing import Any

import cog
from cog import _adt as adt
from cog import _inspector
from cog.input import FieldInfo

DEFAULT_SCHEMA_PATH = Path(".cog/openapi_schema.json")

__all__ = [
    "DEFAULT_SCHEMA_PATH",
    "openapi_schema",
    "schema_json",
    "title_case",
    "write_openapi_schema",
]


class _Ordered(dict):
    """A map whose keys keep insertion order in the output (Go's orderedMapAny).

    Every other dict is emitted with sorted keys, as Go's encoding/json does
    for ``map[string]any``.
    """


def title_case(name: str) -> str:
    """Go's ``TitleCase``: split on ``_``, upper-case each part's first letter."""
    return " ".join(p[:1].upper() + p[1:] for p in name.split("_"))


# ---------------------------------------------------------------------------
# Loading the predictor
# ---------------------------------------------------------------------------


def _split_ref(predictor_ref: str, root: Path | None = None) -> tuple[Path, str]:
    file_part, sep, name = predictor_ref.rpartition(":")
    if not sep or not file_part or not name:
        raise ValueError(f"invalid predictor reference {predictor_ref!r}; expected 'file.py:Name'")
    return (Path(root or ".") / file_part).resolve(), name


def _import_file(path: Path) -> str:
    """Import ``path`` as a module and return the module's name in sys.modules.

    If the file is already imported under its stem (``import predict``), that
    module is reused.  Otherwise it is (re)loaded under a private name, so that
    a later ``import predict`` elsewhere is not handed this copy.  While it runs,
    the file's directory is first on ``sys.path`` (as for the server, which
    runs from the project directory) so that the predictor's imports resolve.
    """
    if not path.is_file():
        raise FileNotFoundError(f"predictor file not found: {path}")
    existing = sys.modules.get(path.stem)
    existing_file = getattr(existing, "__file__", None)
    if existing_file and Path(existing_file).resolve() == path:
        return path.stem

    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"_cog_openapi_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import predictor file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    directory = str(path.parent)
    sys.path.insert(0, directory)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        try:
            sys.path.remove(directory)
        except ValueError:
            pass
    return name


def _predict_function(module_name: str, name: str) -> Callable[..., Any]:
    obj = getattr(sys.modules[module_name], name)
    if inspect.isclass(obj):
        _, fn = _inspector._selected_predict_method(obj, f"{module_name}.{name}")
    else:
        fn = obj
    return _inspector._unwrap(fn)


def _source_facts(fn: Callable[..., Any]) -> tuple[dict[str, bool] | None, bool]:
    """From the method's source: which inputs set a default explicitly, and
    whether the method is decorated with ``streaming``.

    Returns ``(None, False)`` when the source is unavailable.
    """
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return None, False
    node = next(
        (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == fn.__name__),
        None,
    )
    if node is None:
        return None, False

    args = node.args.posonlyargs + node.args.args
    defaults: list[ast.expr | None] = [None] * (len(args) - len(node.args.defaults)) + list(node.args.defaults)
    explicit: dict[str, bool] = {}
    for arg, default in zip(args, defaults, strict=True):
        if default is None:
            explicit[arg.arg] = False
        elif isinstance(default, ast.Call) and _dotted_tail(default.func) == "Input":
            explicit[arg.arg] = bool(default.args) or any(k.arg == "default" for k in default.keywords)
        else:  # a bare literal default: ``x: int = 3`` / ``x: Optional[str] = None``
            explicit[arg.arg] = True

    streaming = any(_dotted_tail(d.func if isinstance(d, ast.Call) else d) == "streaming" for d in node.decorator_list)
    return explicit, streaming


def _dotted_tail(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _raw_field_infos(fn: Callable[..., Any]) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    return {k: p.default for k, p in params.items() if k != "self"}


# ---------------------------------------------------------------------------
# JSON values
# ---------------------------------------------------------------------------


def _num(v: Any) -> Any:
    """Go marshals float64 3.0 as ``3``; do the same for integral floats."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e21:
        return int(v)
    return v


def _json_value(v: Any) -> Any:
    if isinstance(v, Enum):
        v = v.value
    if isinstance(v, cog.Secret):
        return v.get_secret_value()
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (bool, int, float, str)) or v is None:
        return _num(v)
    return str(v)


# ---------------------------------------------------------------------------
# Input / Output schemas
# ---------------------------------------------------------------------------

_NULLABLE = (adt.Repetition.OPTIONAL, adt.Repetition.OPTIONAL_REPEATED)


def _field_type_schema(ft: adt.FieldType) -> dict[str, Any]:
    schema = ft.json_type()
    if ft.union_variants is not None and ft.repetition is adt.Repetition.OPTIONAL:
        # Go marks each variant nullable as well as the union itself.
        schema = {
            "anyOf": [dict(v, nullable=True) for v in schema["anyOf"]],
            "nullable": True,
        }
    return schema


def _input_schema(
    inputs: dict[str, adt.InputField],
    raw: dict[str, Any],
    explicit: dict[str, bool] | None,
) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    properties = _Ordered()
    required: list[str] = []
    enums: list[tuple[str, dict[str, Any]]] = []

    for name, field in sorted(inputs.items(), key=lambda kv: kv[1].order):
        ft = field.type
        info = raw.get(name, inspect.Parameter.empty)
        prop: dict[str, Any] = {"x-order": field.order}

        if field.choices:
            json_type = ft.primitive.json_type().get("type") or "string"
            enums.append(
                (
                    name,
                    {
                        "title": name,
                        "description": "An enumeration.",
                        "enum": [_json_value(c) for c in field.choices],
                        "type": json_type,
                    },
                )
            )
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
        else:
            prop["title"] = title_case(name)
            prop.update(_field_type_schema(ft))

        # Did the signature give a default at all, and is it None?
        if info is inspect.Parameter.empty:
            has_default = False
        elif isinstance(info, FieldInfo):
            if field.default is not None:
                has_default = True
            elif explicit is not None:
                has_default = explicit.get(name, False)
            else:  # no source: ``Input(default=None)`` is the common spelling
                has_default = ft.repetition in _NULLABLE
        else:
            has_default = True
        default_is_none = field.default is None

        nullable = ft.repetition in _NULLABLE
        if (
            ft.primitive is adt.PrimitiveType.SECRET
            and ft.repetition is adt.Repetition.REQUIRED
            and has_default
            and default_is_none
        ):
            nullable = True
        effective = has_default and not (default_is_none and not nullable)

        is_union = ft.union_variants is not None
        if not effective and (is_union or ft.repetition in (adt.Repetition.REQUIRED, adt.Repetition.REPEATED)):
            required.append(name)
        if effective:
            prop["default"] = None if default_is_none else _json_value(field.default)
        if nullable:
            prop["nullable"] = True
        if field.description is not None:
            prop["description"] = field.description
        if field.ge is not None:
            prop["minimum"] = _num(field.ge)
        if field.le is not None:
            prop["maximum"] = _num(field.le)
        if field.min_length is not None:
            prop["minLength"] = field.min_length
        if field.max_length is not None:
            prop["maxLength"] = field.max_length
        if field.regex is not None:
            prop["pattern"] = field.regex
        if field.deprecated:
            prop["deprecated"] = True
        accept = getattr(info, "accept", None) if isinstance(info, FieldInfo) else None
        if accept is not None:
            prop["x-cog-accept"] = accept

        properties[name] = prop

    schema: dict[str, Any] = {
        "title": "Input",
        "type": "object",
        "properties": properties,
    }
    if required:
        schema["required"] = required
    return schema, enums


def _output_schema(output: adt.OutputType) -> dict[str, Any]:
    if output.kind is adt.OutputKind.OBJECT:
        assert output.fields is not None
        props = _Ordered()
        required = []
        for name, ft in output.fields.items():
            prop = ft.json_type()
            if ft.repetition in _NULLABLE:
                prop["nullable"] = True
            else:
                required.append(name)
            prop["title"] = title_case(name)
            props[name] = prop
        schema: dict[str, Any] = {
            "type": "object",
            "properties": props,
            "title": "Output",
        }
        if required:
            schema["required"] = required
        return schema
    schema = output.json_type()
    if "type" not in schema:  # typing.Any: Go's SchemaAny is an opaque object
        schema["type"] = "object"
    return schema


# ---------------------------------------------------------------------------
# The document
# ---------------------------------------------------------------------------

_EMPTY_200 = {
    "description": "Successful Response",
    "content": {"application/json": {"schema": {}}},
}
_422 = {
    "description": "Validation Error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
}


def _document(
    input_schema: dict[str, Any],
    enums: Iterable[tuple[str, dict[str, Any]]],
    output_schema: dict[str, Any],
    streaming: bool,
) -> dict[str, Any]:
    components = _Ordered()
    components["Input"] = input_schema
    components["Output"] = output_schema
    for name, enum_schema in enums:
        components[name] = enum_schema
    components["PredictionRequest"] = {
        "title": "PredictionRequest",
        "type": "object",
        "properties": {
            "id": {"title": "Id", "type": "string"},
            "input": {"$ref": "#/components/schemas/Input"},
        },
    }
    components["PredictionResponse"] = {
        "title": "PredictionResponse",
        "type": "object",
        "properties": {
            "input": {"$ref": "#/components/schemas/Input"},
            "output": {"$ref": "#/components/schemas/Output"},
            "id": {"title": "Id", "type": "string"},
            "version": {"title": "Version", "type": "string"},
            "created_at": {
                "title": "Created At",
                "type": "string",
                "format": "date-time",
            },
            "started_at": {
                "title": "Started At",
                "type": "string",
                "format": "date-time",
            },
            "completed_at": {
                "title": "Completed At",
                "type": "string",
                "format": "date-time",
            },
            "status": {"title": "Status", "type": "string"},
            "error": {"title": "Error", "type": "string"},
            "logs": {"title": "Logs", "type": "string"},
            "metrics": {"title": "Metrics", "type": "object"},
        },
    }
    components["Status"] = {
        "title": "Status",
        "description": "An enumeration.",
        "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
        "type": "string",
    }
    components["HTTPValidationError"] = {
        "title": "HTTPValidationError",
        "type": "object",
        "properties": {
            "detail": {
                "title": "Detail",
                "type": "array",
                "items": {"$ref": "#/components/schemas/ValidationError"},
            }
        },
    }
    components["ValidationError"] = {
        "title": "ValidationError",
        "required": ["loc", "msg", "type"],
        "type": "object",
        "properties": {
            "loc": {
                "title": "Location",
                "type": "array",
                "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            },
            "msg": {"title": "Message", "type": "string"},
            "type": {"title": "Error Type", "type": "string"},
        },
    }

    predict_op: dict[str, Any] = {
        "summary": "Predict",
        "description": "Run a single prediction on the model",
        "operationId": "predict_predictions_post",
        "requestBody": {
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionRequest"}}}
        },
        "responses": {
            "200": {
                "description": "Successful Response",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionResponse"}}},
            },
            "422": _422,
        },
    }
    if streaming:
        predict_op["x-cog-streaming"] = True

    paths = _Ordered()
    paths["/"] = {
        "get": {
            "summary": "Root",
            "operationId": "root__get",
            "responses": {"200": _EMPTY_200},
        }
    }
    paths["/health-check"] = {
        "get": {
            "summary": "Healthcheck",
            "operationId": "healthcheck_health_check_get",
            "responses": {"200": _EMPTY_200},
        }
    }
    paths["/predictions"] = {"post": predict_op}
    paths["/predictions/{prediction_id}/cancel"] = {
        "post": {
            "summary": "Cancel",
            "operationId": "cancel_predictions__prediction_id__cancel_post",
            "parameters": [
                {
                    "required": True,
                    "schema": {"title": title_case("prediction_id"), "type": "string"},
                    "name": "prediction_id",
                    "in": "path",
                }
            ],
            "responses": {"200": _EMPTY_200, "422": _422},
        }
    }

    doc = {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": cog.__version__},
        "paths": paths,
        "components": {"schemas": components},
    }
    _remove_title_next_to_ref(doc)
    return _go_order(doc)


def _remove_title_next_to_ref(v: Any) -> None:
    """OpenAPI 3.0 allows no siblings next to ``$ref`` (Go post-processing)."""
    if isinstance(v, dict):
        if "$ref" in v:
            v.pop("title", None)
        for child in v.values():
            _remove_title_next_to_ref(child)
    elif isinstance(v, list):
        for child in v:
            _remove_title_next_to_ref(child)


def _go_order(v: Any) -> Any:
    """Plain dicts get sorted keys, ``_Ordered`` ones keep theirs; copies all."""
    if isinstance(v, _Ordered):
        return {k: _go_order(x) for k, x in v.items()}
    if isinstance(v, dict):
        return {k: _go_order(v[k]) for k in sorted(v)}
    if isinstance(v, list):
        return [_go_order(x) for x in v]
    return v


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def openapi_schema(predictor_ref: str, *, root: Path | None = None) -> dict[str, Any]:
    """Build the OpenAPI document for ``predictor_ref`` (e.g. ``predict.py:Predictor``).

    A relative file path is taken from ``root`` (default: the current
    directory), as the server takes it from its working directory.  The module
    is imported (its top level runs; ``setup()`` does not).
    """
    path, name = _split_ref(predictor_ref, root)
    module_name = _import_file(path)
    with warnings.catch_warnings():
        # BasePredictor / predict() deprecation notices are not our business here.
        warnings.simplefilter("ignore", DeprecationWarning)
        info = _inspector.create_predictor(module_name, name)
        fn = _predict_function(module_name, name)
    explicit, streaming = _source_facts(fn)
    input_schema, enums = _input_schema(info.inputs, _raw_field_infos(fn), explicit)
    return _document(input_schema, enums, _output_schema(info.output), streaming)


def schema_json(schema: dict[str, Any]) -> str:
    """Serialise like Go's ``json.Marshal``: compact, UTF-8, HTML-safe escapes."""
    text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(ch, esc)
    return text


def write_openapi_schema(
    predictor_ref: str,
    path: Path = DEFAULT_SCHEMA_PATH,
    *,
    root: Path | None = None,
) -> Path:
    """Write the schema file the coglet server loads: ``.cog/openapi_schema.json``
    in the server's working directory.  With ``root``, both the predictor file
    and a relative ``path`` are taken from ``root``.  Returns the path written."""
    path = Path(root or ".") / path
    text = schema_json(openapi_schema(predictor_ref, root=root))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tooling.openapi",
        description="Write the OpenAPI schema the cog (coglet) server needs to "
        "validate inputs and serve /openapi.json.",
    )
    parser.add_argument("predictor_ref", help="e.g. predict.py:Predictor")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_SCHEMA_PATH,
        help=f"output file (default: {DEFAULT_SCHEMA_PATH}); '-' for stdout",
    )
    args = parser.parse_args(argv)
    if str(args.out) == "-":
        sys.stdout.write(schema_json(openapi_schema(args.predictor_ref)) + "\n")
        return 0
    out = write_openapi_schema(args.predictor_ref, args.out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
