"""A variant's family: the parents it names, the variants that name it, and their figures side by side.

Parents are stored on the child as names with a relation, so the tree is read from the registry as it is
now: a parent deleted since is still shown, by name, as no longer registered.
"""
from __future__ import annotations

from dataclasses import dataclass

from .models import ModelVariant, Relation

MAX_DEPTH = 8  # a lineage deeper than this is cut (and a cycle, which import refuses, could not loop)


@dataclass
class Node:
    name: str
    relation: str  # how this node relates to the one above it in the tree ("" at the root)
    variant: ModelVariant | None  # None: named as a parent, not registered (any more)
    children: list["Node"]


def relation_label(relation: str) -> str:
    return Relation(relation).label if relation in Relation.values else relation


def _registry() -> dict[str, ModelVariant]:
    return {v.name: v for v in ModelVariant.objects.select_related("fit")}


def ancestors(variant: ModelVariant, registry: dict | None = None, depth: int = 0) -> list[Node]:
    """Return the variant's parents, each with its own parents below it."""
    registry = _registry() if registry is None else registry
    if depth >= MAX_DEPTH:
        return []
    found = []
    for parent in variant.parents:
        row = registry.get(parent.get("name"))
        found.append(Node(parent.get("name", "?"), parent.get("relation", ""), row,
                          ancestors(row, registry, depth + 1) if row else []))
    return found


def descendants(variant: ModelVariant, registry: dict | None = None, depth: int = 0) -> list[Node]:
    """Return the variants that name this one as a parent, each with its own descendants below it."""
    registry = _registry() if registry is None else registry
    if depth >= MAX_DEPTH:
        return []
    found = []
    for row in registry.values():
        for parent in row.parents:
            if parent.get("name") == variant.name:
                found.append(Node(row.name, parent.get("relation", ""), row, descendants(row, registry, depth + 1)))
    return sorted(found, key=lambda n: n.name)


def figures(variant: ModelVariant | None) -> dict:
    """Return what the fit page compares for one member of the family: parameters, memory, verdict."""
    if variant is None:
        return {"registered": False}
    fit = getattr(variant, "fit", None)
    report = fit.report if fit else {}
    weights = report.get("weights_gb", {})
    return {"registered": True, "pk": variant.pk, "name": variant.name, "kind": variant.get_kind_display(),
            "params_total": variant.params_total, "params_active": variant.params_active, "dtype": variant.dtype,
            "weights_gb": weights.get(report.get("dtype")) if weights else None,
            "verdict": fit.verdict if fit else "not analysed", "margin_gb": fit.margin_gb if fit else None}


def family(variant: ModelVariant) -> list[dict]:
    """Return rows for the fit page: the variant itself, then each direct parent and child with its relation."""
    registry = _registry()
    rows = [{"role": "this variant", **figures(registry.get(variant.name, variant))}]
    for node in ancestors(variant, registry):
        rows.append({"role": f"parent ({relation_label(node.relation)})", "name": node.name, **figures(node.variant)})
    for node in descendants(variant, registry):
        rows.append({"role": f"child ({relation_label(node.relation)} this)", "name": node.name,
                     **figures(node.variant)})
    return rows
