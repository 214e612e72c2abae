"""Code shape: no function in src/ncen_cli is longer than 80 lines or takes more than 8
positional parameters (the project's standard), except the Typer command functions in
src/ncen_cli/cli/, whose signatures are the commands' option lists."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ncen_cli

SRC = Path(ncen_cli.__file__).parent
MAX_LINES = 80
MAX_POSITIONAL = 8
# Known offenders outside this test's owners' files, excused until their owners fix them
# (``path name``); none at present.
KNOWN_OFFENDERS: set[str] = set()


def _is_typer_command(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Decorated with ``@command(...)``, ``@common.command(...)`` or ``@app.command(...)``."""
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name == "command":
            return True
    return False


def offenders(root: Path = SRC) -> list[tuple[str, str, str]]:
    """``(path name, line, why)`` for every function over the limits (Typer commands in cli/
    left out). Lines count from ``def`` to the function's last line, docstring included."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        in_cli = path.parent.name == "cli"
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if in_cli and _is_typer_command(node):
                continue
            where = f"{path.relative_to(root.parent).as_posix()} {node.name}"
            lines = node.end_lineno - node.lineno + 1
            positional = len(node.args.posonlyargs) + len(node.args.args)
            if node.args.args and node.args.args[0].arg in ("self", "cls"):
                positional -= 1
            if lines > MAX_LINES:
                found.append((where, str(node.lineno), f"{lines} lines"))
            if positional > MAX_POSITIONAL:
                found.append((where, str(node.lineno), f"{positional} positional parameters"))
    return found


def test_the_checker_sees_a_long_function_and_a_wide_signature(tmp_path):
    package = tmp_path / "pkg"
    (package / "cli").mkdir(parents=True)
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (package / "a.py").write_text(
        f"def long():\n{body}\n\n\ndef wide(a, b, c, d, e, f, g, h, i):"
        "\n    pass\n\n\ndef fine(self, a, b, c, d, e, f, g, h, *, i):"
        "\n    pass\n"
    )
    (package / "cli" / "c.py").write_text(
        "@app.command('x')\ndef cmd(a, b, c, d, e, f, g, h, i):\n    pass\n\n\n"
        "@command('y')\ndef cmd2(a, b, c, d, e, f, g, h, i):\n    pass\n"
    )
    assert offenders(package) == [
        ("pkg/a.py long", "1", f"{MAX_LINES + 1} lines"),
        ("pkg/a.py wide", "84", "9 positional parameters"),
    ]


@pytest.mark.parametrize("limit", ["lines", "positional parameters"])
def test_no_function_is_too_long_or_too_wide(limit):
    found = [
        f"{where}:{line} {why}"
        for where, line, why in offenders()
        if why.endswith(limit) and where not in KNOWN_OFFENDERS
    ]
    assert not found, "\n".join(found)
