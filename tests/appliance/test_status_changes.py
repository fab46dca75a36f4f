"""A status changes only through its model's transition rule: no code outside appliance/models.py writes a
status column itself, with a queryset `update(status=...)`, a `bulk_update` of "status", or an assignment to
`row.status` followed by `row.save()`.
"""
import ast
from pathlib import Path

import appliance

REPO = Path(appliance.__file__).resolve().parent.parent
PACKAGES = ("appliance", "audit", "inference")
MODEL_FILES = {Path("appliance/models.py")}  # where the transition rules live


def raw_status_writes(source: str) -> list[int]:
    """Return the line numbers in source that write a status column without a transition rule."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "update" and any(k.arg == "status" for k in node.keywords):
                found.append(node.lineno)
            elif node.func.attr == "bulk_update" and "status" in string_constants(node):
                found.append(node.lineno)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.extend(assigned_then_saved(node))
    return sorted(found)


def string_constants(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def assigned_then_saved(function: ast.AST) -> list[int]:
    """Return the lines of `name.status = ...` in a function that also calls `name.save()`."""
    assigned, saved = {}, set()
    for node in ast.walk(function):
        targets = node.targets if isinstance(node, ast.Assign) else []
        for target in targets:
            for element in (target.elts if isinstance(target, ast.Tuple) else [target]):
                if (isinstance(element, ast.Attribute) and element.attr == "status"
                        and isinstance(element.value, ast.Name)):
                    assigned.setdefault(element.value.id, node.lineno)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "save"
                and isinstance(node.func.value, ast.Name)):
            saved.add(node.func.value.id)
    return [line for name, line in assigned.items() if name in saved]


def test_no_status_is_written_outside_the_models_transition_rules():
    sources = [p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))]
    assert len(sources) > 100  # the walk found the packages, not empty folders
    offenders = {}
    for path in sources:
        relative = path.relative_to(REPO)
        if relative not in MODEL_FILES and "migrations" not in relative.parts:
            lines = raw_status_writes(path.read_text())
            if lines:
                offenders[str(relative)] = lines
    assert offenders == {}


def test_the_scan_catches_a_raw_update_of_a_status():
    source = "def f():\n    ModelVariant.objects.filter(pk=1).update(status='ready')\n"
    assert raw_status_writes(source) == [2]


def test_the_scan_catches_a_status_assigned_and_saved():
    source = "def f(variant):\n    variant.progress = 3\n    variant.status = 'ready'\n    variant.save()\n"
    assert raw_status_writes(source) == [3]


def test_the_scan_catches_a_bulk_update_of_the_status():
    source = "def f(rows):\n    ModelVariant.objects.bulk_update(rows, ['status', 'progress'])\n"
    assert raw_status_writes(source) == [2]


def test_the_scan_lets_a_transition_and_other_updates_pass():
    source = ("def f(variant):\n    variant.transition('ready')\n    variant.save()\n"
              "    Deployment.objects.filter(pk=1).update(actual='loading')\n"
              "def g(request):\n    request.status = 'running'\n")
    assert raw_status_writes(source) == []
