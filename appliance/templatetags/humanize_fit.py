"""Filters for the console's figures."""
from django import template

register = template.Library()


@register.filter
def count(n) -> str:
    """Return a parameter count as 671.0B / 37.5M / 1.2K."""
    if n is None:
        return "–"
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


@register.filter
def percent(x) -> str:
    """Return a fraction as a percentage with one decimal."""
    return "–" if x is None else f"{x * 100:.1f}%"


@register.filter
def get(mapping, key):
    """Return mapping[key], or None."""
    return (mapping or {}).get(key)
