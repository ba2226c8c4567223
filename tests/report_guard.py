"""pytest hooks that keep a failing test a reported failure, in seconds, never a crash of the run.

Registered by tests/conftest.py (which imports the hooks) and loadable alone with `-p tests.report_guard`.
Two ways a failure used to take the suite down, both reproduced here with pytest 9.2 and
pytest-timeout 2.4 on Python 3.11:

1. `assert png == other_png` on two ~50 KB images: with CI set (pytest then never truncates), pytest
   explains the inequality by pretty-printing both byte strings and running difflib.ndiff over the
   lines, which is quadratic in them and runs for minutes. pytest-timeout then fires inside difflib.
2. pytest-timeout fires by a signal, and the exception it raises can land on an instruction that has
   no line number (Python 3.11 gives such traceback entries `tb_lineno = None`). pytest's traceback
   formatting computes `tb_lineno - 1` and stops the whole run with INTERNALERROR, so the rest of the
   suite is never reported. Frames run from code without line tables (exec'd or generated code) do the
   same.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

import pytest

# Byte strings up to this size are explained by pytest as usual; larger ones get one line.
LARGE_BYTES = 1024


def _large_bytes(value: object) -> bool:
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value) > LARGE_BYTES
    if isinstance(value, list | tuple):
        return any(_large_bytes(item) for item in value)
    return False


def _explained_here(op: str, left: object, right: object) -> bool:
    return op in ("==", "!=") and (_large_bytes(left) or _large_bytes(right))


def pytest_configure(config: pytest.Config) -> None:
    """pytest calls every pytest_assertrepr_compare and keeps the first answer, so its own still runs its
    difflib after ours has answered: it is told to stand aside for the comparisons answered here. pytest
    has no public switch for this; the built-in implementation is the hook of its "assertion" plugin."""
    for implementation in config.pluginmanager.hook.pytest_assertrepr_compare.get_hookimpls():
        builtin = implementation.function
        if implementation.plugin_name == "assertion" and not getattr(builtin, "stands_aside", False):
            implementation.function = _standing_aside(builtin)


def _standing_aside(builtin: Any) -> Any:
    def unless_large_bytes(config: pytest.Config, op: str, left: object, right: object) -> Any:
        return None if _explained_here(op, left, right) else builtin(config, op, left, right)

    unless_large_bytes.stands_aside = True  # type: ignore[attr-defined]
    return unless_large_bytes


def pytest_assertrepr_compare(config: pytest.Config, op: str, left: object, right: object) -> list[str] | None:
    """A bare `assert a == b` on large byte strings (or lists of them) is explained without difflib."""
    if not _explained_here(op, left, right):
        return None
    from tests.compare import describe_difference  # numpy, PIL: only when such a comparison fails

    def items(value: object) -> list[Any]:
        return list(value) if isinstance(value, list | tuple) else [value]

    lines = [f"{type(left).__name__} {op} {type(right).__name__} (large bytes: no diff)"]
    lefts, rights = items(left), items(right)
    if len(lefts) != len(rights):
        lines.append(f"{len(lefts)} items against {len(rights)}")
    for index, (a, b) in enumerate(zip(lefts, rights, strict=False)):
        if isinstance(a, bytes | bytearray) and isinstance(b, bytes | bytearray):
            lines.append(f"[{index}] " + ("equal" if a == b else describe_difference(bytes(a), bytes(b))))
        elif a != b:
            lines.append(f"[{index}] {type(a).__name__} against {type(b).__name__}")
    return lines


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo = [error]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [e for e in (current.__cause__, current.__context__) if e is not None]
        todo += list(getattr(current, "exceptions", ()))  # an ExceptionGroup's members


def with_line_numbers(traceback: types.TracebackType | None) -> types.TracebackType | None:
    """The traceback with every entry given a line number: an entry without one is replaced by one at its
    frame's current line, or its code's first line. The replacement's instruction index is -1 ("none"), so
    that the traceback module takes the line given rather than look the lost instruction up."""
    entries = []
    while traceback is not None:
        entries.append(traceback)
        traceback = traceback.tb_next
    following = None
    for entry in reversed(entries):
        if entry.tb_lineno is None:
            frame = entry.tb_frame
            line = frame.f_lineno or frame.f_code.co_firstlineno
            entry = types.TracebackType(following, frame, -1, line)
        elif entry.tb_next is not following:
            entry.tb_next = following
        following = entry
    return following


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    if call.excinfo is not None:
        for error in _chain(call.excinfo.value):
            error.__traceback__ = with_line_numbers(error.__traceback__)
        if call.excinfo.value.__traceback__ is not None:
            call.excinfo.traceback = pytest.ExceptionInfo.from_exception(call.excinfo.value).traceback
    return (yield)
