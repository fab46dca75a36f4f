"""The dependency rule of the layout: inference/ (engine core, fit advisor, demo models) imports no Django and
nothing of the registry or the ledger, so the engine can run in a process of its own and the advisor anywhere.
"""
import ast
from pathlib import Path

import inference

FORBIDDEN = ("django", "appliance", "audit", "celery")
ROOT = Path(inference.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Return the top-level names of every module path imports, at any depth (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_inference_imports_no_django_registry_or_ledger():
    sources = sorted(ROOT.rglob("*.py"))
    assert len(sources) > 20  # the walk found the package, not an empty folder
    offenders = {str(p.relative_to(ROOT)): sorted(imported_modules(p) & set(FORBIDDEN) - GUARD_USERS.get(
        str(p.relative_to(ROOT)), set())) for p in sources}
    assert {p: names for p, names in offenders.items() if names} == {}


# The vLLM launcher installs the appliance's egress guard (audit.egress: Django only inside a function, where a
# Django process records to the ledger) in vLLM's own interpreter before vLLM's code runs; it is the one module
# here that may import from audit.
GUARD_USERS = {"vllm_guard.py": {"audit"}}


def test_the_rule_catches_a_django_import(tmp_path):
    module = tmp_path / "bad.py"
    module.write_text("def view():\n    from django.http import HttpResponse\n    return HttpResponse()\n")
    assert "django" in imported_modules(module)


def offenders(package: Path, forbidden: set[str]) -> dict[str, list[str]]:
    """Return each module of package that imports a forbidden top-level name, with those names."""
    found = {str(p.relative_to(package)): sorted(imported_modules(p) & forbidden) for p in sorted(package.rglob("*.py"))}
    return {path: names for path, names in found.items() if names}


def test_audit_imports_neither_the_registry_nor_the_engine():
    import audit

    assert offenders(Path(audit.__file__).parent, {"appliance", "inference"}) == {}


def test_the_chart_package_imports_none_of_the_others_nor_django():
    import charts

    package = Path(charts.__file__).parent
    assert len(list(package.rglob("*.py"))) >= 3  # the walk found the package
    assert offenders(package, {"appliance", "inference", "audit", "django", "celery"}) == {}
