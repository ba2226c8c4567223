"""How `cog build` reads predict.py: the static rules of cog's Go schema generator, on Python's ast.

cog 0.19+ builds the OpenAPI schema before Docker starts, by parsing predict.py with
tree-sitter; no Python runs. Its rules (replicate/cog `pkg/schema/python/inputs.go`,
`module_scope.go`, `literals.go`), and what happens outside them:

- a parameter's default is an `Input(...)` call in the signature, `Class.attr` naming an
  `Input(...)` assigned in a top-level class of the same file, or a literal (or a
  module-level name bound to one). Anything else fails the build: "default `X` cannot be
  statically resolved".
- `Input`'s positional arguments are ignored; only keywords are read.
- `default=` must be a literal or a module-level name bound to one; otherwise it silently
  becomes None.
- `choices=` must be a list literal or a module-level name bound to one (or `+` of those);
  anything else, an imported name included, fails the build.
- `ge=`/`le=` must be number literals (Go's ParseFloat of the source text); anything else
  is silently dropped.
- `description=` is read as the source text between the quotes of one string literal, or of
  a module-level name bound to one: escapes are not decoded, an f-string, `"a" + b` or a
  parenthesised string is silently dropped, and implicit concatenation keeps the inner
  quotes and line breaks.

`violations` reports every use outside these rules, naming the input, so that what cog
builds is exactly what Python's runtime sees; `static_inputs` reads the fields as Go does.
This is our reading of cog's Go source (cog's CLI cannot run here: it needs Go 1.26 and
Docker), kept deliberately strict: a form is allowed only where Go's result is certain.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from dataclasses import dataclass
from typing import Any

INPUT_KEYWORDS = {
    "default",
    "description",
    "ge",
    "le",
    "min_length",
    "max_length",
    "regex",
    "choices",
    "deprecated",
    "accept",
}
SIMPLE_TYPES = {"str", "int", "float", "bool", "Path"}
# What Go's strconv.ParseFloat accepts of a number literal as Python writes it (no underscores).
NUMBER = re.compile(r"-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")
MISSING = object()


@dataclass
class StaticInput:
    name: str
    order: int
    annotation: str
    default: Any = MISSING  # MISSING: no default written (required)
    description: str | None = None
    ge: float | None = None
    le: float | None = None
    choices: list[Any] | None = None


class Reader:
    def __init__(self, source: str):
        self.source = source
        self.tree = ast.parse(source)
        self.module_names: dict[str, ast.expr] = {}
        self.module_assignments: dict[str, ast.Assign] = {}
        self.class_inputs: dict[str, ast.Call] = {}
        self.classes: dict[str, ast.ClassDef] = {}
        for node in self.tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                self.module_names[node.targets[0].id] = node.value
                self.module_assignments[node.targets[0].id] = node
            if isinstance(node, ast.ClassDef):
                self.classes[node.name] = node
                for statement in node.body:
                    if (
                        isinstance(statement, ast.Assign)
                        and len(statement.targets) == 1
                        and isinstance(statement.targets[0], ast.Name)
                        and self.is_input_call(statement.value)
                    ):
                        self.class_inputs[f"{node.name}.{statement.targets[0].id}"] = statement.value  # type: ignore[assignment]

    def text(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.source, node) or ""

    @staticmethod
    def is_input_call(node: ast.AST) -> bool:
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Input"

    # --- literals, as literals.go parses them ---------------------------------------------

    def written(self, owner: ast.keyword | ast.Assign) -> str:
        """The source text right of `=`, parentheses included (ast's own positions leave them out)."""
        return self.text(owner).split("=", 1)[1].strip()

    def single_string(self, node: ast.AST, written: str) -> str | None:
        """The value Go reads for a string literal, when it equals Python's: one plain
        "..." or '...' token on one line, with no backslash."""
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            return None
        text = self.text(node)
        if written != text:
            return None  # parenthesised
        tokens = [
            token
            for token in tokenize.generate_tokens(io.StringIO(text).readline)
            if token.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)
        ]
        if len(tokens) != 1 or tokens[0].type != tokenize.STRING:
            return None  # implicit concatenation, parentheses or a comment
        if text[:1] not in "\"'" or text.startswith(('"""', "'''")) or "\\" in text or "\n" in text:
            return None
        return text[1:-1]

    def number(self, node: ast.AST) -> float | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, bool):
            return None
        if NUMBER.fullmatch(self.text(node).strip()):
            return float(self.text(node))
        return None

    def literal(self, node: ast.AST) -> tuple[bool, Any]:
        """(resolvable, value) for a default: None, booleans, numbers, single strings, lists."""
        if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, bool)):
            return True, node.value
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            value = self.single_string(node, self.text(node))
            return value is not None, value
        if self.number(node) is not None:
            return True, ast.literal_eval(node)
        if isinstance(node, ast.List):
            items = [self.literal(item) for item in node.elts]
            return all(ok for ok, _ in items), [value for _, value in items]
        return False, None

    def resolve(self, node: ast.AST) -> tuple[bool, Any]:
        """A literal, or a module-level name bound to one (module_scope.go)."""
        if isinstance(node, ast.Name) and node.id in self.module_names:
            return self.literal(self.module_names[node.id])
        return self.literal(node)

    # --- Input(...) calls and parameters ------------------------------------------------

    def read_input_call(self, call: ast.Call, field: StaticInput, problems: list[str]) -> None:
        where = f"input '{field.name}'"
        if call.args:
            problems.append(f"{where}: positional arguments to Input() are ignored by cog; use keywords")
        for keyword in call.keywords:
            key, value = keyword.arg, keyword.value
            if key not in INPUT_KEYWORDS:
                problems.append(f"{where}: Input({key}=...) is not read by cog")
            elif key == "default":
                ok, literal = self.resolve(value)
                if not ok:
                    problems.append(f"{where}: default `{self.text(value)}` is not a literal; cog reads it as None")
                field.default = literal
            elif key == "description":
                if isinstance(value, ast.Name) and value.id in self.module_names:
                    assignment = self.module_assignments[value.id]
                    text = self.single_string(assignment.value, self.written(assignment))
                else:
                    text = self.single_string(value, self.written(keyword))
                if text is None:
                    problems.append(
                        f"{where}: description `{self.text(value)[:60]}` is not one single-line string literal "
                        "(or a module-level name bound to one); cog drops or garbles it"
                    )
                field.description = text
            elif key in ("ge", "le"):
                number = self.number(value)
                if number is None:
                    problems.append(f"{where}: {key}=`{self.text(value)}` is not a number literal; cog drops it")
                setattr(field, key, number)
            elif key == "choices":
                listed = self.module_names.get(value.id) if isinstance(value, ast.Name) else value
                ok, items = self.literal(listed) if isinstance(listed, ast.List) else (False, None)
                if not ok:
                    problems.append(
                        f"{where}: choices `{self.text(value)}` is not a list literal or a module-level name "
                        "bound to one; cog fails the build"
                    )
                    items = None
                field.choices = items

    def annotation_problem(self, node: ast.expr | None) -> str | None:
        if node is None:
            return "has no type annotation"
        parts = [node.left, node.right] if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) else [node]
        names = [part.id if isinstance(part, ast.Name) else self.text(part) for part in parts]
        if len(parts) == 2 and "None" in names:
            names.remove("None")
        if len(names) != 1 or names[0] not in SIMPLE_TYPES:
            return f"type `{self.text(node)}` is not one of {sorted(SIMPLE_TYPES)} or `X | None`"
        return None

    def predict_method(self, class_name: str) -> ast.FunctionDef:
        for statement in self.classes[class_name].body:
            if isinstance(statement, ast.FunctionDef) and statement.name in ("predict", "run"):
                return statement
        raise LookupError(f"{class_name} defines no predict()")

    def inputs(self, class_name: str) -> tuple[list[StaticInput], list[str]]:
        method = self.predict_method(class_name)
        arguments = method.args
        problems: list[str] = []
        if arguments.posonlyargs or arguments.vararg or arguments.kwonlyargs or arguments.kwarg:
            problems.append(f"{class_name}.predict: only plain parameters are read by cog")
        parameters = arguments.args[1:]  # self
        defaults: list[ast.expr | None] = [None] * (len(parameters) - len(arguments.defaults))
        defaults += arguments.defaults
        fields = []
        for order, (parameter, default) in enumerate(zip(parameters, defaults, strict=True)):
            field = StaticInput(parameter.arg, order, self.text(parameter.annotation) if parameter.annotation else "")
            annotation_problem = self.annotation_problem(parameter.annotation)
            if annotation_problem:
                problems.append(f"input '{field.name}': {annotation_problem}")
            if default is None:
                pass
            elif self.is_input_call(default):
                self.read_input_call(default, field, problems)  # type: ignore[arg-type]
            elif self.text(default) in self.class_inputs:
                self.read_input_call(self.class_inputs[self.text(default)], field, problems)
            else:
                ok, value = self.resolve(default)
                if not ok:
                    problems.append(
                        f"input '{field.name}': default `{self.text(default)}` cannot be statically resolved "
                        "(cog fails the build)"
                    )
                field.default = value
            fields.append(field)
        return fields, problems


def static_inputs(source: str, class_name: str) -> list[StaticInput]:
    fields, problems = Reader(source).inputs(class_name)
    if problems:
        raise ValueError("; ".join(problems))
    return fields


def violations(source: str, class_name: str) -> list[str]:
    return Reader(source).inputs(class_name)[1]
